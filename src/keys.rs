//! API keys: random secrets shown once at creation, stored only as a
//! SHA-256 hash, each belonging to one tenant and named for the
//! `updated_by` it writes. `runledger keys create|list|revoke` and the
//! server's authentication share this module. Keys live in the ledger's
//! database, SQLite or PostgreSQL: the queries here are written once, in
//! the SQL both understand.

use std::{collections::HashMap, str::FromStr, time::Duration};

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{
    Connection, PgConnection, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode},
};

use crate::{
    Error, Result,
    database_url::{self, Backend},
    domain::{Caller, Timestamp, execution::check_chars},
    store::{OpenCause, OpenError},
};

/// The ledger's database, as the key commands use it.
#[derive(Debug)]
pub enum KeyDatabase {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// Runs `$body` with `$conn` bound to the connection, whichever it is.
macro_rules! on_either {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            KeyDatabase::Sqlite($conn) => $body,
            KeyDatabase::Postgres($conn) => $body,
        }
    };
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub rate: Option<f64>,
    pub daily_quota: Option<i64>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// What a new key may do.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant: String,
    pub name: String,
    pub rate: Option<f64>,
    pub daily_quota: Option<i64>,
}

/// A fresh secret: "rl_" and 32 random bytes in hex.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("rl_{hex}")
}

/// Whether `secret` has the form of a secret this module makes.
pub fn looks_like_secret(secret: &str) -> bool {
    secret
        .strip_prefix("rl_")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Opens (creating a SQLite file, and migrating) the database at `url`
/// for the key commands. They take no lock: they share a SQLite file with
/// a running server through SQLite's own locking, and a PostgreSQL
/// database with every server.
pub async fn connect(url: &str) -> Result<KeyDatabase, OpenError> {
    match database_url::backend(url) {
        Ok(Backend::Sqlite) => connect_sqlite(url).await.map(KeyDatabase::Sqlite),
        Ok(Backend::Postgres) => {
            use crate::store::postgres;
            let options = postgres::options(url)?;
            let mut conn = postgres::connect(url, &options).await?;
            postgres::migrate(url, &mut conn).await?;
            Ok(KeyDatabase::Postgres(conn))
        }
        Err(e) => Err(OpenError::new(
            database_url::redacted(url),
            OpenCause::Url(e.to_string()),
        )),
    }
}

async fn connect_sqlite(url: &str) -> Result<SqliteConnection, OpenError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| OpenError::new(url, OpenCause::Url(e.to_string())))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let path = options.get_filename().to_owned();
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| OpenError::database(&path, e))?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&mut conn)
        .await
        .map_err(|e| OpenError::migrate(&path, e))?;
    Ok(conn)
}

/// Creates a key; returns it and its secret, which is not stored.
pub async fn create(db: &mut KeyDatabase, new: NewKey) -> Result<(ApiKey, String)> {
    let mut v = crate::domain::Violations::new();
    v.check("tenant", check_chars(new.tenant.clone(), 1, 100));
    v.check("name", check_chars(new.name.clone(), 1, 100));
    if new.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        v.add("rate", "must be a positive number of requests per second");
    }
    if new.daily_quota.is_some_and(|q| q <= 0) {
        v.add("daily_quota", "must be positive");
    }
    v.finish(|| ())?;
    let secret = new_secret();
    let key = ApiKey {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: new.tenant,
        name: new.name,
        rate: new.rate,
        daily_quota: new.daily_quota,
        created_at: Timestamp::now().as_micros(),
        last_used_at: None,
        revoked_at: None,
    };
    let hash = hash_secret(&secret);
    let inserted = on_either!(db, |conn| {
        sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, secret_hash, rate, daily_quota, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key.id)
    .bind(&key.tenant_id)
    .bind(&key.name)
    .bind(&hash)
    .bind(key.rate)
    .bind(key.daily_quota)
    .bind(key.created_at)
    .execute(&mut *conn)
    .await
    .map(|_| ())
    });
    match inserted {
        Ok(()) => Ok((key, secret)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(Error::AlreadyExists(format!(
                "tenant {:?} already has a key named {:?}",
                key.tenant_id, key.name
            )))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn list(db: &mut KeyDatabase) -> Result<Vec<ApiKey>> {
    const LIST: &str = "SELECT id, tenant_id, name, rate, daily_quota, created_at, last_used_at, \
         revoked_at FROM api_keys ORDER BY tenant_id, name";
    Ok(on_either!(db, |conn| sqlx::query_as(LIST)
        .fetch_all(&mut *conn)
        .await?))
}

/// Revokes the key with this id, or the only key with this name.
pub async fn revoke(db: &mut KeyDatabase, name_or_id: &str) -> Result<ApiKey> {
    let matches: Vec<ApiKey> = list(db)
        .await?
        .into_iter()
        .filter(|k| k.id == name_or_id || k.name == name_or_id)
        .collect();
    let key = match matches.as_slice() {
        [k] => k.clone(),
        [] => {
            return Err(Error::NotFound(format!(
                "no key named or with id {name_or_id:?}"
            )));
        }
        _ => {
            return Err(Error::FailedPrecondition(format!(
                "several tenants have a key named {name_or_id:?}; revoke it by id"
            )));
        }
    };
    on_either!(db, |conn| sqlx::query(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2"
    )
    .bind(Timestamp::now().as_micros())
    .bind(&key.id)
    .execute(&mut *conn)
    .await
    .map(|_| ()))?;
    Ok(ApiKey {
        revoked_at: Some(
            key.revoked_at
                .unwrap_or_else(|| Timestamp::now().as_micros()),
        ),
        ..key
    })
}

/// A key in force, as the server checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveKey {
    pub id: String,
    pub caller: Caller,
    pub rate: Option<f64>,
    pub daily_quota: Option<i64>,
}

/// The keys that work now, by secret hash.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    by_hash: HashMap<String, ActiveKey>,
    /// Whether the database holds any key at all, revoked or not.
    pub any: bool,
}

type KeyRow = (
    String,
    String,
    String,
    String,
    Option<f64>,
    Option<i64>,
    Option<i64>,
);

/// The key of a row, if it is not revoked.
fn active(
    (hash, id, tenant_id, name, rate, daily_quota, revoked): KeyRow,
) -> Option<(String, ActiveKey)> {
    revoked.is_none().then(|| {
        let caller = Caller { tenant_id, name };
        let key = ActiveKey {
            id,
            caller,
            rate,
            daily_quota,
        };
        (hash, key)
    })
}

/// The key in force with this secret hash, as the database has it now.
pub async fn find(db: &mut KeyDatabase, hash: &str) -> Result<Option<ActiveKey>> {
    match db {
        KeyDatabase::Sqlite(conn) => sqlite::find(conn, hash).await,
        KeyDatabase::Postgres(conn) => postgres::find(conn, hash).await,
    }
}

/// Today's request counts per key id (UTC day number since the epoch).
pub async fn usage_today(db: &mut KeyDatabase, day: i64) -> Result<HashMap<String, i64>> {
    match db {
        KeyDatabase::Sqlite(conn) => sqlite::usage_today(conn, day).await,
        KeyDatabase::Postgres(conn) => postgres::usage_today(conn, day).await,
    }
}

/// The server's reads of keys, on a connection of either backend.
macro_rules! key_reads {
    ($backend:ident, $conn:ty) => {
        pub(crate) mod $backend {
            use super::*;

            /// The keys in force, and whether there are any at all.
            pub(crate) async fn load(conn: &mut $conn) -> Result<KeySet> {
                let rows: Vec<KeyRow> = sqlx::query_as(
                    "SELECT secret_hash, id, tenant_id, name, rate, daily_quota, revoked_at \
                     FROM api_keys",
                )
                .fetch_all(&mut *conn)
                .await?;
                let any = !rows.is_empty();
                let by_hash = rows.into_iter().filter_map(active).collect();
                Ok(KeySet { by_hash, any })
            }

            /// See [`super::find`].
            pub(crate) async fn find(conn: &mut $conn, hash: &str) -> Result<Option<ActiveKey>> {
                let row: Option<KeyRow> = sqlx::query_as(
                    "SELECT secret_hash, id, tenant_id, name, rate, daily_quota, revoked_at \
                     FROM api_keys WHERE secret_hash = $1",
                )
                .bind(hash)
                .fetch_optional(&mut *conn)
                .await?;
                Ok(row.and_then(active).map(|(_, key)| key))
            }

            /// See [`super::usage_today`].
            pub(crate) async fn usage_today(
                conn: &mut $conn,
                day: i64,
            ) -> Result<HashMap<String, i64>> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT key_id, requests FROM key_usage WHERE day = $1")
                        .bind(day)
                        .fetch_all(&mut *conn)
                        .await?;
                Ok(rows.into_iter().collect())
            }
        }
    };
}

key_reads!(sqlite, SqliteConnection);
key_reads!(postgres, PgConnection);

impl KeySet {
    pub async fn load(db: &mut KeyDatabase) -> Result<Self> {
        match db {
            KeyDatabase::Sqlite(conn) => sqlite::load(conn).await,
            KeyDatabase::Postgres(conn) => postgres::load(conn).await,
        }
    }

    pub fn key(&self, secret: &str) -> Option<&ActiveKey> {
        self.by_hash(&hash_secret(secret))
    }

    /// The key with this secret hash.
    pub fn by_hash(&self, hash: &str) -> Option<&ActiveKey> {
        self.by_hash.get(hash)
    }

    pub fn caller(&self, secret: &str) -> Option<&Caller> {
        self.key(secret).map(|k| &k.caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_created_listed_revoked_and_only_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let mut conn = connect(&url).await.unwrap();
        let new = NewKey {
            tenant: "acme".into(),
            name: "ci".into(),
            rate: Some(5.0),
            daily_quota: Some(1000),
        };
        let (key, secret) = create(&mut conn, new.clone()).await.unwrap();
        assert!(secret.starts_with("rl_") && secret.len() == 67);
        assert!(matches!(
            create(&mut conn, new).await,
            Err(Error::AlreadyExists(_))
        ));
        let KeyDatabase::Sqlite(sqlite) = &mut conn else {
            panic!("a SQLite URL opens SQLite")
        };
        let stored: Vec<String> = sqlx::query_scalar("SELECT secret_hash FROM api_keys")
            .fetch_all(&mut *sqlite)
            .await
            .unwrap();
        assert_eq!(stored, [hash_secret(&secret)]);
        assert!(!stored[0].contains(&secret[3..]));

        let set = KeySet::load(&mut conn).await.unwrap();
        assert_eq!(set.caller(&secret).unwrap().tenant_id, "acme");
        assert!(set.caller("rl_wrong").is_none());
        assert!(looks_like_secret(&secret) && !looks_like_secret("rl_wrong"));
        let found = find(&mut conn, &hash_secret(&secret)).await.unwrap();
        assert_eq!(found.unwrap().caller.name, "ci");
        assert_eq!(list(&mut conn).await.unwrap(), std::slice::from_ref(&key));

        revoke(&mut conn, "ci").await.unwrap();
        let set = KeySet::load(&mut conn).await.unwrap();
        assert!(set.caller(&secret).is_none() && set.any);
        let found = find(&mut conn, &hash_secret(&secret)).await.unwrap();
        assert!(found.is_none(), "a revoked key is not in force");
        assert!(matches!(
            revoke(&mut conn, "nope").await,
            Err(Error::NotFound(_))
        ));
    }
}
