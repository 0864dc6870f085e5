//! PostgreSQL for the tests: a fresh database per test on the server named
//! by RUNLEDGER_TEST_POSTGRES, dropped when the test ends.

use std::{fmt::Display, time::Duration};

use runledger::database_url::redacted;
use sqlx::{AssertSqlSafe, Connection, PgConnection, migrate::Migrator};

/// The variable naming the server the tests create their databases on.
pub const SERVER_VAR: &str = "RUNLEDGER_TEST_POSTGRES";
pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The PostgreSQL schema, as the server applies it.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a test waits for the server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL of the server the tests use.
pub fn server_url() -> String {
    std::env::var(SERVER_VAR)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
}

/// Why a test could not reach PostgreSQL, and what to do about it.
pub fn unreachable_message(server: &str, cause: impl Display) -> String {
    format!(
        "cannot connect to PostgreSQL at {} ({cause}); these tests need a server: \
         start PostgreSQL there, or set {SERVER_VAR} to the URL of a server \
         where the user may create databases",
        redacted(server)
    )
}

/// `server` with its database replaced by `database`.
pub fn with_database(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let authority_start = base.find("://").map_or(0, |p| p + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |p| authority_start + p);
    let mut url = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

pub async fn connect(url: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable_message(url, e)),
        Err(_) => Err(unreachable_message(
            url,
            format!("no answer in {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// A database of its own for one test, dropped (with any connections
/// still open to it) when this value is.
#[derive(Debug)]
pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// A fresh database on the server named by RUNLEDGER_TEST_POSTGRES.
    pub async fn create() -> Self {
        Self::on(&server_url()).await
    }

    /// A fresh database with the PostgreSQL schema applied.
    pub async fn migrated() -> Self {
        let db = Self::create().await;
        let mut conn = db.connect().await;
        MIGRATOR.run(&mut conn).await.expect("the migrations apply");
        conn.close().await.expect("the connection closes");
        db
    }

    /// A fresh database on `server`; the test fails when it cannot be made.
    pub async fn on(server: &str) -> Self {
        Self::try_on(server).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh database on `server`, or why there is none.
    pub async fn try_on(server: &str) -> Result<Self, String> {
        let mut conn = connect(server).await?;
        let name = format!("runledger_test_{}", uuid::Uuid::now_v7().simple());
        // The name is made here of [a-z0-9_] alone.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("creating a test database on {}: {e}", redacted(server)))?;
        conn.close().await.ok();
        Ok(TestDatabase {
            url: with_database(server, &name),
            server: server.to_owned(),
            name,
        })
    }

    /// The URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the server this database is on.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A connection to this database.
    pub async fn connect(&self) -> PgConnection {
        connect(&self.url).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TestDatabase {
    /// Drop runs outside async code, possibly on the only thread of a
    /// current-thread runtime, so the database is dropped from a thread of
    /// its own with a runtime of its own.
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut conn = connect(&server).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
                conn.close().await.ok();
                Ok::<_, String>(())
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the thread dropping it panicked".to_owned()));
        if let Err(e) = outcome {
            let message = format!("dropping the test database {}: {e}", self.name);
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}
