//! The database the benchmark's servers share: a fresh SQLite file in a
//! temporary folder, or a fresh database of its own on a PostgreSQL
//! server, created for the run and dropped after it (on success, error
//! and interruption alike).

use std::{path::PathBuf, time::Duration};

use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};

use super::BenchError;
use crate::database_url::{Backend, backend, redacted};

/// The `--database` value that names a fresh SQLite file (the default).
pub(super) const SQLITE: &str = "sqlite";

/// How long the benchmark waits for PostgreSQL to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the benchmark's servers keep their data, as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fresh SQLite file in a temporary folder.
    Sqlite,
    /// A fresh database on this PostgreSQL server (its URL, password and
    /// all; shown only through [`redacted`]).
    Postgres(String),
}

impl Target {
    /// What `--database` names. The value itself is never repeated in an
    /// error, only its redacted form.
    pub fn parse(database: &str) -> Result<Target, BenchError> {
        if database == SQLITE {
            return Ok(Target::Sqlite);
        }
        match backend(database) {
            Ok(Backend::Postgres) => Ok(Target::Postgres(database.to_owned())),
            _ => Err(BenchError::Usage(format!(
                "--database takes `{SQLITE}` (a fresh SQLite file, the default) or a PostgreSQL \
                 server as postgres://USER@HOST:PORT/DATABASE, on which the benchmark creates a \
                 database of its own and drops it at the end; not {:?}",
                redacted(database)
            ))),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Target::Sqlite => Backend::Sqlite,
            Target::Postgres(_) => Backend::Postgres,
        }
    }
}

/// The storage of one benchmark run, made by [`Storage::prepare`] and
/// removed by [`Storage::remove`] (or, failing that, when dropped).
#[derive(Debug)]
pub(super) enum Storage {
    Sqlite(SqliteFolder),
    Postgres(BenchDatabase),
}

impl Storage {
    pub(super) async fn prepare(target: &Target) -> Result<Storage, BenchError> {
        match target {
            Target::Sqlite => Ok(Storage::Sqlite(SqliteFolder::create().await?)),
            Target::Postgres(server) => Ok(Storage::Postgres(BenchDatabase::create(server).await?)),
        }
    }

    /// The `--database` value for the servers.
    pub(super) fn url(&self) -> String {
        match self {
            Storage::Sqlite(f) => format!("sqlite://{}", f.dir.join("bench.db").display()),
            Storage::Postgres(db) => db.url().to_owned(),
        }
    }

    /// Removes the SQLite folder or drops the PostgreSQL database.
    pub(super) async fn remove(self) -> Result<(), BenchError> {
        match self {
            Storage::Sqlite(mut f) => f.remove(),
            Storage::Postgres(db) => db.drop_database().await,
        }
    }
}

/// A fresh temporary folder for an SQLite file, removed when dropped.
#[derive(Debug)]
pub(super) struct SqliteFolder {
    dir: PathBuf,
    /// The version of the SQLite library built in.
    pub(super) version: String,
    removed: bool,
}

impl SqliteFolder {
    async fn create() -> Result<SqliteFolder, BenchError> {
        let dir = std::env::temp_dir().join(format!("runledger-bench-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Database(format!("creating {}: {e}", dir.display())))?;
        let version = sqlite_version().await.unwrap_or_default();
        Ok(SqliteFolder {
            dir,
            version,
            removed: false,
        })
    }

    fn remove(&mut self) -> Result<(), BenchError> {
        self.removed = true;
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| BenchError::Database(format!("removing {}: {e}", self.dir.display())))
    }
}

impl Drop for SqliteFolder {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The version of the SQLite library built in.
async fn sqlite_version() -> Result<String, sqlx::Error> {
    let mut conn = SqliteConnection::connect("sqlite::memory:").await?;
    let v = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await.ok();
    Ok(v)
}

/// What the benchmark reports of a PostgreSQL server.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresInfo {
    /// `SELECT version()`.
    pub version: String,
    /// The server's default `synchronous_commit`.
    pub synchronous_commit: String,
    /// The server's URL, its password hidden.
    pub server: String,
    /// The database created for the run.
    pub database: String,
}

impl PostgresInfo {
    /// What is known of `server` (a URL, password and all, that is kept
    /// only redacted) and the benchmark's `database` on it.
    pub fn new(server: &str, database: &str, version: String, synchronous_commit: String) -> Self {
        PostgresInfo {
            version,
            synchronous_commit,
            server: redacted(server),
            database: database.to_owned(),
        }
    }

    /// "PostgreSQL 15.8" out of the whole `version()` text.
    pub fn short_version(&self) -> String {
        self.version
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A database of the benchmark's own on a PostgreSQL server, dropped
/// (with any connections still open to it) by [`drop_database`], or when
/// this value is dropped if that never ran.
///
/// [`drop_database`]: BenchDatabase::drop_database
#[derive(Debug)]
pub struct BenchDatabase {
    server: String,
    name: String,
    url: String,
    info: PostgresInfo,
    dropped: bool,
}

impl BenchDatabase {
    /// Creates `runledger_bench_<unique>` on `server` (a PostgreSQL URL;
    /// its database is only the one to connect to for the creation).
    pub async fn create(server: &str) -> Result<BenchDatabase, BenchError> {
        let mut conn = connect(server).await?;
        let name = format!("runledger_bench_{}", uuid::Uuid::now_v7().simple());
        let failed = |doing: &str, e: sqlx::Error| {
            BenchError::Database(format!("{doing} on {}: {e}", redacted(server)))
        };
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| failed("reading the version", e))?;
        let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| failed("reading synchronous_commit", e))?;
        // The name is made here of [a-z0-9_] alone.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .map_err(|e| failed(&format!("creating the database {name}"), e))?;
        conn.close().await.ok();
        Ok(BenchDatabase {
            url: with_database(server, &name),
            info: PostgresInfo::new(server, &name, version, synchronous_commit),
            server: server.to_owned(),
            name,
            dropped: false,
        })
    }

    /// The URL of the database, password and all: for the servers only.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> &PostgresInfo {
        &self.info
    }

    /// Drops the database, ending the connections still open to it.
    pub async fn drop_database(mut self) -> Result<(), BenchError> {
        self.dropped = true;
        drop_on(&self.server, &self.name).await
    }
}

impl Drop for BenchDatabase {
    /// Drop runs outside async code, possibly on the only thread of a
    /// current-thread runtime, so the database is dropped from a thread of
    /// its own with a runtime of its own.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        let outcome = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| BenchError::Database(e.to_string()))?
                .block_on(drop_on(&server, &name))
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{e}"),
            Err(_) => eprintln!("dropping the database {}: the thread panicked", self.name),
        }
    }
}

async fn drop_on(server: &str, name: &str) -> Result<(), BenchError> {
    let mut conn = connect(server).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| {
        BenchError::Database(format!(
            "dropping the database {name} on {}: {e}; drop it by hand",
            redacted(server)
        ))
    })?;
    conn.close().await.ok();
    Ok(())
}

async fn connect(url: &str) -> Result<PgConnection, BenchError> {
    let cause = match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => return Ok(conn),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {CONNECT_TIMEOUT:?}"),
    };
    Err(BenchError::Database(format!(
        "cannot connect to PostgreSQL at {} ({cause})",
        redacted(url)
    )))
}

/// `server` with its database replaced by `database`, its user, password,
/// hosts and parameters kept.
pub fn with_database(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let authority_start = base.find("://").map_or(0, |p| p + 3);
    // The authority ends at the first '/' after the last '@', so that a
    // password holding a '/' stays whole.
    let hosts_start = base[authority_start..]
        .rfind('@')
        .map_or(authority_start, |p| authority_start + p + 1);
    let authority_end = base[hosts_start..]
        .find('/')
        .map_or(base.len(), |p| hosts_start + p);
    let mut url = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() {
        for (server, url) in [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/b1",
            ),
            ("postgres://postgres@db", "postgres://postgres@db/b1"),
            (
                "postgresql://u:p@db:5433/x?sslmode=disable",
                "postgresql://u:p@db:5433/b1?sslmode=disable",
            ),
            (
                "postgres://db?sslmode=disable",
                "postgres://db/b1?sslmode=disable",
            ),
            ("postgres://u:p/q@db/x", "postgres://u:p/q@db/b1"),
            ("postgres://a,b:5433/x", "postgres://a,b:5433/b1"),
        ] {
            assert_eq!(with_database(server, "b1"), url, "{server}");
        }
    }

    #[test]
    fn database_values_name_a_target() {
        assert_eq!(Target::parse("sqlite").unwrap(), Target::Sqlite);
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgresql://u:p@db/x?sslmode=require",
        ] {
            assert_eq!(
                Target::parse(url).unwrap(),
                Target::Postgres(url.to_owned())
            );
        }
        for other in [
            "sqlite://bench.db",
            "bench.db",
            "mysql://root:hunter2@db/x",
            "",
        ] {
            let message = Target::parse(other).unwrap_err().to_string();
            assert!(message.contains("--database takes `sqlite`"), "{message}");
            assert!(message.contains("postgres://USER@HOST"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn the_short_version_is_name_and_number() {
        let info = PostgresInfo::new(
            "postgres://u:hunter2@db/postgres",
            "runledger_bench_1",
            "PostgreSQL 15.8 (Debian 15.8-0+deb12u1) on x86_64-pc-linux-gnu".into(),
            "on".into(),
        );
        assert_eq!(info.server, "postgres://u:***@db/postgres");
        assert_eq!(info.short_version(), "PostgreSQL 15.8");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_without_its_password() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("postgres://bench:hunter2@127.0.0.1:{port}/postgres");
        let message = BenchDatabase::create(&url).await.unwrap_err().to_string();
        assert!(
            message.contains(&format!(
                "cannot connect to PostgreSQL at postgres://bench:***@127.0.0.1:{port}/postgres"
            )),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}
