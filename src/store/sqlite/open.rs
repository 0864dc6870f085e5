//! Opening the database file: the lock that keeps a second server off it,
//! and errors that name the file and say what is wrong with it.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io,
    path::{Path, PathBuf},
};

/// The database could not be opened. Most causes are the user's to fix:
/// the message names the file and says what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the database {path}: {cause}")]
pub struct OpenError {
    pub path: PathBuf,
    pub cause: OpenCause,
}

/// What is wrong with the database file.
#[derive(Debug, thiserror::Error)]
pub enum OpenCause {
    #[error("the folder {} does not exist", .0.display())]
    MissingFolder(PathBuf),
    #[error("{} is a file, not a folder", .0.display())]
    NotAFolder(PathBuf),
    #[error("permission denied")]
    PermissionDenied,
    #[error("it is a folder, not a file")]
    IsAFolder,
    #[error("the file system is read-only")]
    ReadOnly,
    #[error("the file is not a SQLite database")]
    NotADatabase,
    #[error(
        "another runledger server is using it (it holds the lock {}); \
         one server serves a SQLite database",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("the database URL is not valid: {0}")]
    Url(String),
    #[error("migrating it: {0}")]
    Migrate(String),
    #[error("starting its writer: {0}")]
    Writer(String),
    #[error("{0}")]
    Os(io::Error),
    #[error("{0}")]
    Sqlite(String),
    #[error(
        "the PostgreSQL server does not answer ({0}); check the host and port, and that it runs"
    )]
    Unreachable(String),
    #[error("the PostgreSQL server refused the login ({0}); check the user name and password")]
    AuthenticationFailed(String),
    #[error("the database does not exist on the PostgreSQL server ({0}); create it first")]
    NoSuchDatabase(String),
    #[error("{0}")]
    Postgres(String),
}

impl OpenError {
    pub(crate) fn new(path: impl Into<PathBuf>, cause: OpenCause) -> Self {
        OpenError {
            path: path.into(),
            cause,
        }
    }

    /// An error SQLite gave while opening or first using the file. SQLite
    /// only says it could not open or write the file; the operating system
    /// says why.
    pub(crate) fn database(path: &Path, e: sqlx::Error) -> Self {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        let cause = match code {
            Some(SQLITE_NOTADB) => OpenCause::NotADatabase,
            Some(SQLITE_PERM | SQLITE_READONLY | SQLITE_IOERR | SQLITE_CANTOPEN) => {
                match probe(path) {
                    Err(os) => cause_of(path, os),
                    Ok(()) => OpenCause::Sqlite(message(&e)),
                }
            }
            _ => OpenCause::Sqlite(message(&e)),
        };
        OpenError::new(path, cause)
    }

    pub(crate) fn migrate(path: &Path, e: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        match e {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                let opened = OpenError::database(path, e);
                match opened.cause {
                    OpenCause::Sqlite(m) => OpenError::new(path, OpenCause::Migrate(m)),
                    _ => opened,
                }
            }
            MigrateError::VersionMissing(v) => OpenError::new(
                path,
                OpenCause::Migrate(format!(
                    "it has schema version {v}, made by a newer runledger than this one"
                )),
            ),
            e => OpenError::new(path, OpenCause::Migrate(e.to_string())),
        }
    }
}

// SQLite's primary result codes.
const SQLITE_PERM: i32 = 3;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_NOTADB: i32 = 26;

/// SQLite's own words, without the result code.
fn message(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => d.message().to_owned(),
        None => e.to_string(),
    }
}

/// Opens the file as SQLite would, to learn what the operating system
/// says about it.
fn probe(path: &Path) -> io::Result<()> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        // SQLite creates a missing file; only a missing folder stops it.
        Err(e) if e.kind() == io::ErrorKind::NotFound && folder_of(path).is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What an operating-system error on `path` means for the user.
fn cause_of(path: &Path, e: io::Error) -> OpenCause {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory if !folder_of(path).is_dir() => {
            let folder = folder_of(path).to_owned();
            if folder.is_file() {
                OpenCause::NotAFolder(folder)
            } else {
                OpenCause::MissingFolder(folder)
            }
        }
        io::ErrorKind::PermissionDenied => OpenCause::PermissionDenied,
        io::ErrorKind::IsADirectory => OpenCause::IsAFolder,
        io::ErrorKind::ReadOnlyFilesystem => OpenCause::ReadOnly,
        _ => OpenCause::Os(e),
    }
}

/// The lock a server holds on its database: an exclusive advisory lock on
/// a file beside it, `<database>.lock` (beside the file itself, whatever
/// symbolic links lead to it, so that every path to one database takes the
/// same lock), released when the process ends
/// however it ends. Only servers take it: `runledger keys` and other
/// SQLite clients share the database through SQLite's own locking.
#[derive(Debug)]
pub(super) struct DatabaseLock {
    _file: File,
}

impl DatabaseLock {
    pub(super) fn take(database: &Path) -> Result<Self, OpenError> {
        let mut name = real_path(database).into_os_string();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| OpenError::new(database, cause_of(database, e)))?;
        match file.try_lock() {
            Ok(()) => Ok(DatabaseLock { _file: file }),
            Err(TryLockError::WouldBlock) => {
                Err(OpenError::new(database, OpenCause::InUse(lock_path)))
            }
            Err(TryLockError::Error(e)) => Err(OpenError::new(database, OpenCause::Os(e))),
        }
    }
}

/// Where `database` really is: symbolic links followed (also a link to a
/// file SQLite has yet to create) and the folder made absolute. A path
/// whose folder is missing stays as it is; opening it names the folder.
fn real_path(database: &Path) -> PathBuf {
    let mut path = database.to_owned();
    // As many links as the operating system follows.
    for _ in 0..40 {
        if let Ok(real) = std::fs::canonicalize(&path) {
            return real;
        }
        match std::fs::read_link(&path) {
            Ok(target) => path = folder_of(&path).join(target),
            Err(_) => break,
        }
    }
    match (path.file_name(), std::fs::canonicalize(folder_of(&path))) {
        (Some(name), Ok(folder)) => folder.join(name),
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_until_the_first_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let first = DatabaseLock::take(&db).unwrap();
        let refused = DatabaseLock::take(&db).unwrap_err();
        assert!(matches!(refused.cause, OpenCause::InUse(_)), "{refused}");
        assert!(refused.to_string().contains(&db.display().to_string()));
        drop(first);
        DatabaseLock::take(&db).expect("free again");
    }

    #[test]
    fn a_database_reached_through_a_link_takes_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        // Before SQLite has made the file, and after.
        for exists in [false, true] {
            if exists {
                std::fs::write(&db, b"").unwrap();
            }
            let first = DatabaseLock::take(&link).unwrap();
            let refused = DatabaseLock::take(&db).unwrap_err();
            assert!(matches!(refused.cause, OpenCause::InUse(_)), "{refused}");
            drop(first);
            let first = DatabaseLock::take(&db).unwrap();
            let refused = DatabaseLock::take(&link).unwrap_err();
            assert!(matches!(refused.cause, OpenCause::InUse(_)), "{refused}");
            assert!(refused.to_string().contains(&link.display().to_string()));
            drop(first);
        }
        // A linked folder leads to the same file too.
        let folder_link = dir.path().join("folder");
        std::os::unix::fs::symlink(dir.path(), &folder_link).unwrap();
        let _first = DatabaseLock::take(&db).unwrap();
        let refused = DatabaseLock::take(&folder_link.join("x.db")).unwrap_err();
        assert!(matches!(refused.cause, OpenCause::InUse(_)), "{refused}");
    }

    #[test]
    fn a_missing_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nowhere").join("x.db");
        let e = DatabaseLock::take(&db).unwrap_err();
        assert!(
            matches!(&e.cause, OpenCause::MissingFolder(f) if f == &dir.path().join("nowhere")),
            "{e}"
        );
    }
}
