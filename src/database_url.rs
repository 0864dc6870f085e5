//! What a `--database` value names: which backend stores the ledger, and
//! how the value may be shown in logs.
//!
//! Accepted forms:
//! * `sqlite://PATH`, `sqlite:PATH` (`sqlite::memory:` too) or a plain path:
//!   an SQLite file;
//! * `postgres://...` or `postgresql://...`: a PostgreSQL database.
//!
//! Schemes are matched in lower case, as the drivers match them.

use std::fmt;

/// The database software that stores the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

/// Why a `--database` value names no backend. The messages never repeat
/// the value itself, which may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("the database URL is empty; {ACCEPTED}")]
    Empty,
    #[error("unsupported database URL scheme {0:?}; {ACCEPTED}")]
    UnsupportedScheme(String),
}

const ACCEPTED: &str = "use sqlite://PATH, sqlite:PATH or a plain path for SQLite, \
     or postgres://USER@HOST:PORT/DATABASE (or postgresql://) for PostgreSQL; \
     write ./NAME for a file whose name contains a colon";

/// The backend a `--database` value names.
pub fn backend(database: &str) -> Result<Backend, DatabaseUrlError> {
    if database.is_empty() {
        return Err(DatabaseUrlError::Empty);
    }
    if database.starts_with("sqlite:") {
        return Ok(Backend::Sqlite);
    }
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return Ok(Backend::Postgres);
    }
    match scheme(database) {
        // One letter before the colon is a Windows drive: `C:\ledger.db`.
        Some(s) if s.len() > 1 => Err(DatabaseUrlError::UnsupportedScheme(format!("{s}:"))),
        _ => Ok(Backend::Sqlite),
    }
}

/// The scheme of a URL (RFC 3986: a letter, then letters, digits, `+`,
/// `-` or `.`, then a colon), if the value starts with one.
fn scheme(value: &str) -> Option<&str> {
    let (head, _) = value.split_once(':')?;
    let mut chars = head.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(head)
}

/// The value with every password replaced by `***`, for logs and
/// messages: the password of the URL's user (`scheme://user:PASSWORD@host`)
/// and `password` / `sslpassword` query parameters. Where the value is
/// malformed (a password holding an unencoded '/', '?', '#' or '@'), more
/// is hidden rather than less.
pub fn redacted(database: &str) -> String {
    let mut hidden = password_ranges(database);
    hidden.sort_unstable();
    let mut out = String::with_capacity(database.len());
    let mut shown_to = 0;
    let mut ranges = hidden.into_iter().peekable();
    while let Some((start, mut end)) = ranges.next() {
        while let Some(&(next_start, next_end)) = ranges.peek()
            && next_start <= end
        {
            end = end.max(next_end);
            ranges.next();
        }
        out.push_str(&database[shown_to..start]);
        out.push_str("***");
        shown_to = end;
    }
    out.push_str(&database[shown_to..]);
    out
}

/// `message` with every password of `database` in it (as written, or
/// percent-decoded) replaced by `***`: for messages a driver made from
/// the value, which should never quote it but might.
pub fn scrubbed(message: &str, database: &str) -> String {
    let mut out = message.to_owned();
    for (start, end) in password_ranges(database) {
        let written = &database[start..end];
        for password in [written.to_owned(), percent_decoded(written)] {
            if !password.is_empty() {
                out = out.replace(&password, "***");
            }
        }
    }
    out
}

/// `s` with its %XX escapes decoded (as lossy UTF-8).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the passwords of `database` are: byte ranges, possibly
/// overlapping.
fn password_ranges(database: &str) -> Vec<(usize, usize)> {
    let mut hidden = Vec::new();
    if let Some(p) = database.find("://") {
        let start = p + 3;
        let rest = &database[start..];
        // The user part ends at the last '@', so that a password holding
        // '/', '?', '#' or '@' is hidden whole.
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':')
                && !userinfo[..colon].contains(['/', '?', '#'])
            {
                hidden.push((start + colon + 1, start + at));
            }
        }
    }
    if let Some(q) = database.find('?') {
        // A password parameter's value runs to the next '&': a '#' in it
        // is taken as part of the password.
        let mut offset = q + 1;
        for param in database[q + 1..].split('&') {
            if let Some((key, _)) = param.split_once('=')
                && is_password_key(key)
            {
                hidden.push((offset + key.len() + 1, offset + param.len()));
            }
            offset += param.len() + 1;
        }
    }
    hidden
}

fn is_password_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_and_plain_paths_name_sqlite() {
        for value in [
            "sqlite://runledger.db",
            "sqlite:///var/lib/runledger/ledger.db",
            "sqlite:runledger.db",
            "sqlite::memory:",
            "sqlite://ledger.db?mode=rwc",
            "runledger.db",
            "/var/lib/runledger/ledger.db",
            "./data/ledger.db",
            "./odd:name.db",
            "data/2024-01-01T00:00.db",
            r"C:\ledger\runledger.db",
            "C:/ledger/runledger.db",
        ] {
            assert_eq!(backend(value), Ok(Backend::Sqlite), "{value}");
        }
    }

    #[test]
    fn postgres_urls_name_postgres() {
        for value in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgresql://ledger:secret@db.internal/ledger?sslmode=require",
            "postgres:///ledger?host=/var/run/postgresql",
            "postgres://a,b:5433/ledger",
        ] {
            assert_eq!(backend(value), Ok(Backend::Postgres), "{value}");
        }
    }

    #[test]
    fn other_values_are_refused_with_the_accepted_forms() {
        for (value, scheme) in [
            ("mysql://root@localhost/ledger", "mysql:"),
            ("http://example.com/ledger", "http:"),
            ("POSTGRES://db/ledger", "POSTGRES:"),
            ("SQLite://ledger.db", "SQLite:"),
            ("postgres:ledger", "postgres:"),
            ("file:ledger.db", "file:"),
        ] {
            assert_eq!(
                backend(value),
                Err(DatabaseUrlError::UnsupportedScheme(scheme.to_owned())),
                "{value}"
            );
        }
        let message = backend("mysql://root:hunter2@localhost/x")
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"mysql:\""), "{message}");
        assert!(message.contains("sqlite://PATH"), "{message}");
        assert!(message.contains("postgres://"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");

        assert_eq!(backend(""), Err(DatabaseUrlError::Empty));
        assert!(DatabaseUrlError::Empty.to_string().contains("empty"));
    }

    #[test]
    fn backends_have_names() {
        assert_eq!(Backend::Sqlite.to_string(), "SQLite");
        assert_eq!(Backend::Postgres.to_string(), "PostgreSQL");
    }

    #[test]
    fn passwords_are_hidden() {
        for (value, shown) in [
            (
                "postgres://ledger:s3cret@db:5432/ledger",
                "postgres://ledger:***@db:5432/ledger",
            ),
            (
                "postgresql://ledger:s3cret@db/ledger?sslmode=require",
                "postgresql://ledger:***@db/ledger?sslmode=require",
            ),
            (
                "postgres://db/ledger?user=ledger&password=s3cret&sslmode=disable",
                "postgres://db/ledger?user=ledger&password=***&sslmode=disable",
            ),
            (
                "postgres://db/ledger?PASSWORD=s3cret",
                "postgres://db/ledger?PASSWORD=***",
            ),
            (
                "postgres://u:s3@db/x?sslpassword=s3cret&password=s3cret&sslmode=require",
                "postgres://u:***@db/x?sslpassword=***&password=***&sslmode=require",
            ),
            // Unencoded '/', '?', '@', '#' and '&' in a password are hidden too.
            (
                "postgres://ledger:s3/c@r#et@db/ledger",
                "postgres://ledger:***@db/ledger",
            ),
            (
                "postgres://ledger:s3?x@db/ledger",
                "postgres://ledger:***@db/ledger",
            ),
            (
                "postgres://db/ledger?password=s3c#ret",
                "postgres://db/ledger?password=***",
            ),
            (
                "postgres://db/ledger?password=s3:c@ret",
                "postgres://db/ledger?password=***",
            ),
            (
                "postgres://ledger:s3?password=s3@db",
                "postgres://ledger:***",
            ),
            (
                "postgres://ledger:@db/ledger",
                "postgres://ledger:***@db/ledger",
            ),
        ] {
            let got = redacted(value);
            assert_eq!(got, shown, "{value}");
            assert!(!got.contains("s3"), "{got}");
        }
    }

    #[test]
    fn messages_lose_the_passwords_they_quote() {
        let url = "postgres://ledger:s3%2Fcret@db/ledger?password=hunter2";
        let message = "bad thing near s3%2Fcret, s3/cret and hunter2 for ledger@db";
        assert_eq!(
            scrubbed(message, url),
            "bad thing near ***, *** and *** for ledger@db"
        );
        assert_eq!(scrubbed("ok", "postgres://db/x"), "ok");
        assert_eq!(scrubbed("a:b", "postgres://u:@db/x"), "a:b");
    }

    #[test]
    fn values_without_passwords_are_shown_as_they_are() {
        for value in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgres://db:5432/ledger?sslmode=require&application_name=runledger",
            "postgres:///ledger?host=/var/run/postgresql",
            "sqlite://runledger.db",
            "sqlite:runledger.db?mode=rwc",
            "sqlite::memory:",
            "/var/lib/runledger/ledger.db",
            "",
        ] {
            assert_eq!(redacted(value), value);
        }
    }
}
