//! The PostgreSQL backend: several servers (replicas) share one database.
//! Reads go to a pool of connections, each read that must be consistent
//! (a page of the log with its head, a snapshot) in a REPEATABLE READ
//! transaction; the writer has a connection of its own (see `tx`), and
//! each of its transactions holds the counter rows of the tenants it
//! writes (see `store::batch`).

pub(crate) mod listen;
mod sql;
mod tx;

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres, QueryBuilder,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    Cursor, EventBody, EventFormat, ExecutionFilter, HistoryPage, LogPage, LogScope, OpenCause,
    OpenError, Page, SNAPSHOT_PAGE, SNAPSHOT_PAGE_BYTES, Snapshot, StoredEvent, TaskRunFilter,
    TaskRunPage,
    backend::{Opened, ReadBackend},
    fit::fit_rows,
    rows,
};
use crate::{
    Error, Result,
    database_url::{redacted, scrubbed},
    domain::{Execution, ExecutionId, State, StateType, TaskRun, TaskRunId, Timestamp, document},
    keys::{ActiveKey, KeySet},
};

/// The channel every commit that appends to a tenant's log notifies, with
/// "<tenant>:<head>" (the tenant's latest sequence), as it commits: a
/// server sharing the database LISTENs to it to learn of other servers'
/// events.
pub const EVENTS_CHANNEL: &str = "runledger_events";

/// The most connections the read pool opens.
const READ_CONNECTIONS: u32 = 16;

/// How long opening waits for the server to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A read that must see one consistent state of the database.
const CONSISTENT_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// The connection options a URL names, as the server's connections use
/// them.
pub(crate) fn options(url: &str) -> Result<PgConnectOptions, OpenError> {
    PgConnectOptions::from_str(url)
        .map(|o| match o.get_application_name() {
            Some(_) => o,
            None => o.application_name("runledger"),
        })
        .map_err(|e| OpenError::new(redacted(url), OpenCause::Url(scrubbed(&e.to_string(), url))))
}

/// Connects to the database at `url`, saying clearly why it cannot.
pub(crate) async fn connect(
    url: &str,
    options: &PgConnectOptions,
) -> Result<PgConnection, OpenError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(open_error(url, &e)),
        Err(_) => Err(OpenError::new(
            redacted(url),
            OpenCause::Unreachable(format!("no answer in {CONNECT_TIMEOUT:?}")),
        )),
    }
}

/// Applies the PostgreSQL schema's migrations (sqlx holds an advisory
/// lock meanwhile, so servers starting together migrate once).
pub(crate) async fn migrate(url: &str, conn: &mut PgConnection) -> Result<(), OpenError> {
    use sqlx::migrate::MigrateError;
    sqlx::migrate!("./migrations/postgres")
        .run(conn)
        .await
        .map_err(|e| {
            let cause = match e {
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                    OpenCause::Migrate(scrubbed(&message(&e), url))
                }
                MigrateError::VersionMissing(v) => OpenCause::Migrate(format!(
                    "it has schema version {v}, made by a newer runledger than this one"
                )),
                e => OpenCause::Migrate(scrubbed(&e.to_string(), url)),
            };
            OpenError::new(redacted(url), cause)
        })
}

/// What a failure to connect to or first use the database at `url` means
/// for the user. Nothing of the URL's password is in it.
pub(crate) fn open_error(url: &str, e: &sqlx::Error) -> OpenError {
    let said = scrubbed(&message(e), url);
    let cause = match e {
        sqlx::Error::Io(_) => OpenCause::Unreachable(said),
        sqlx::Error::Tls(_) => OpenCause::Postgres(format!("TLS: {said}")),
        sqlx::Error::Configuration(_) => OpenCause::Url(said),
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // invalid_password, invalid_authorization_specification
            Some("28P01" | "28000") => OpenCause::AuthenticationFailed(said),
            // invalid_catalog_name
            Some("3D000") => OpenCause::NoSuchDatabase(said),
            // cannot_connect_now (starting up or shutting down)
            Some("57P03") => OpenCause::Unreachable(said),
            _ => OpenCause::Postgres(said),
        },
        _ => OpenCause::Postgres(said),
    };
    OpenError::new(redacted(url), cause)
}

/// The server's own words, without the driver's prefix.
fn message(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => d.message().to_owned(),
        None => e.to_string(),
    }
}

/// Opens (migrating if needed) the PostgreSQL database at `url`.
pub(crate) async fn open(url: &str) -> Result<Opened, OpenError> {
    let options = options(url)?;
    let mut conn = connect(url, &options).await?;
    migrate(url, &mut conn).await?;
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the migration's connection");
    }
    let pool = PgPoolOptions::new()
        .max_connections(READ_CONNECTIONS)
        .min_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options.clone())
        .await
        .map_err(|e| open_error(url, &e))?;
    let signals = listen::spawn(pool.clone());
    Ok(Opened {
        reads: Arc::new(PgReads { pool }),
        writer: Box::new(tx::PgTx::new(options, url)),
        guard: None,
        signals: Some(signals),
        beside: None,
    })
}

/// Reads on the pool.
#[derive(Debug)]
pub(crate) struct PgReads {
    pool: PgPool,
}

#[async_trait]
impl ReadBackend for PgReads {
    async fn execution(&self, tenant: &str, id: ExecutionId) -> Result<Option<(Execution, i64)>> {
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(read_error)?;
        row.map(|(doc, seq)| Ok((rows::decode_doc(&doc)?, seq)))
            .transpose()
    }

    async fn task_run(&self, tenant: &str, id: TaskRunId) -> Result<Option<(TaskRun, i64)>> {
        let row: Option<(String, i64)> = sqlx::query_as(sql::TASK_RUN_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(read_error)?;
        row.map(|(doc, seq)| Ok((rows::decode_doc(&doc)?, seq)))
            .transpose()
    }

    async fn list_executions(
        &self,
        tenant: &str,
        filter: &ExecutionFilter,
        page: &Page,
    ) -> Result<(Vec<Execution>, Option<Cursor>)> {
        use futures::TryStreamExt;

        let mut q = list_executions_query(tenant, filter, page)?;
        let rows = q
            .build_query_as()
            .fetch(&self.pool)
            .map_ok(list_row)
            .map_err(read_error);
        fit_rows(rows, page.size, document::execution_bytes).await
    }

    async fn list_task_runs(
        &self,
        tenant: &str,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)> {
        use futures::TryStreamExt;

        let mut q = list_task_runs_query(tenant, filter, page)?;
        let rows = q
            .build_query_as()
            .fetch(&self.pool)
            .map_ok(list_row)
            .map_err(read_error);
        fit_rows(rows, page.size, document::task_run_bytes).await
    }

    async fn states(
        &self,
        tenant: &str,
        run_id: &str,
        page: &HistoryPage,
    ) -> Result<(Vec<State>, Option<String>)> {
        use futures::TryStreamExt;

        let rows = sqlx::query_as::<_, (i64, String)>(sql::STATES_OF_RUN)
            .bind(tenant)
            .bind(run_id)
            .bind(page.after.unwrap_or(0))
            .bind(page.size as i64 + 1)
            .fetch(&self.pool)
            .map_ok(|(pos, doc)| (doc, pos))
            .map_err(read_error);
        let (states, last) = fit_rows(rows, page.size, document::state_bytes).await?;
        Ok((states, last.map(HistoryPage::token)))
    }

    async fn events_after(
        &self,
        scope: &LogScope,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<LogPage> {
        use futures::TryStreamExt;

        let (sql, tenant, id) = match scope {
            LogScope::Tenant(t) => (sql::EVENTS_OF_TENANT, t, None),
            LogScope::Execution(t, id) => (sql::EVENTS_OF_EXECUTION, t, Some(id)),
            LogScope::ExecutionOnly(t, id) => (sql::EVENTS_OF_EXECUTION_ONLY, t, Some(id)),
            LogScope::TaskRun(t, id) => (sql::EVENTS_OF_TASK_RUN, t, Some(id)),
        };
        // One snapshot: the events read are those committed up to the
        // head it sees.
        let mut tx = self
            .pool
            .begin_with(CONSISTENT_READ)
            .await
            .map_err(read_error)?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await
            .map_err(read_error)?;
        let mut q = sqlx::query_as::<_, EventRow>(sql).bind(tenant);
        if let Some(id) = id {
            q = q.bind(id);
        }
        let mut events = Vec::new();
        let mut full = false;
        {
            let mut rows = q.bind(after).bind(limit).fetch(&mut *tx);
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await.map_err(read_error)? {
                bytes += row.payload.len();
                events.push(row.into_stored());
                if bytes >= max_bytes {
                    full = true;
                    break;
                }
            }
        }
        tx.commit().await.map_err(read_error)?;
        let full = full || events.len() as i64 == limit;
        Ok(LogPage { events, full, head })
    }

    async fn head(&self, tenant: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(read_error)?)
    }

    async fn heads(&self, tenants: &[String]) -> Result<HashMap<String, i64>> {
        if tenants.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT tenant_id, head FROM tenant_heads WHERE tenant_id = ANY($1)")
                .bind(tenants)
                .fetch_all(&self.pool)
                .await
                .map_err(read_error)?;
        Ok(rows.into_iter().collect())
    }

    async fn compacted_seq(&self, tenant: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql::COMPACTED_OF_TENANT)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(read_error)?)
    }

    async fn execution_snapshot(
        &self,
        tenant: &str,
        id: ExecutionId,
        include_task_runs: bool,
    ) -> Result<Snapshot> {
        let mut tx = self
            .pool
            .begin_with(CONSISTENT_READ)
            .await
            .map_err(read_error)?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await
            .map_err(read_error)?;
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(read_error)?;
        let execution = row
            .map(|(d, s)| Ok::<_, Error>((rows::decode_doc(&d)?, s)))
            .transpose()?;
        let task_runs = if include_task_runs && execution.is_some() {
            task_runs_page(&mut tx, tenant, id, 0, head).await?
        } else {
            TaskRunPage::default()
        };
        tx.commit().await.map_err(read_error)?;
        Ok(Snapshot {
            execution,
            task_runs,
            head,
        })
    }

    async fn task_runs_after(
        &self,
        tenant: &str,
        execution: ExecutionId,
        after: i64,
        head: i64,
    ) -> Result<TaskRunPage> {
        let mut conn = self.pool.acquire().await.map_err(read_error)?;
        task_runs_page(&mut conn, tenant, execution, after, head).await
    }

    async fn task_run_snapshot(
        &self,
        tenant: &str,
        id: TaskRunId,
    ) -> Result<(Option<(TaskRun, i64)>, i64)> {
        let mut tx = self
            .pool
            .begin_with(CONSISTENT_READ)
            .await
            .map_err(read_error)?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await
            .map_err(read_error)?;
        let row: Option<(String, i64)> = sqlx::query_as(sql::TASK_RUN_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(read_error)?;
        tx.commit().await.map_err(read_error)?;
        let run = row
            .map(|(d, s)| Ok::<_, Error>((rows::decode_doc(&d)?, s)))
            .transpose()?;
        Ok((run, head))
    }

    async fn load_keys(&self) -> Result<KeySet> {
        let mut conn = self.pool.acquire().await.map_err(read_error)?;
        crate::keys::postgres::load(&mut conn).await
    }

    async fn find_key(&self, hash: &str) -> Result<Option<ActiveKey>> {
        let mut conn = self.pool.acquire().await.map_err(read_error)?;
        crate::keys::postgres::find(&mut conn, hash).await
    }

    async fn key_usage(&self, day: i64) -> Result<HashMap<String, i64>> {
        let mut conn = self.pool.acquire().await.map_err(read_error)?;
        crate::keys::postgres::usage_today(&mut conn, day).await
    }

    async fn take_quota(&self, tenant: &str, key_id: &str, day: i64, quota: i64) -> Result<bool> {
        let taken: Option<i64> = sqlx::query_scalar(sql::TAKE_QUOTA)
            .bind(tenant)
            .bind(key_id)
            .bind(day)
            .bind(quota)
            .fetch_optional(&self.pool)
            .await
            .map_err(read_error)?;
        Ok(taken.is_some())
    }

    async fn take_token(
        &self,
        tenant: &str,
        key_id: &str,
        rate: f64,
    ) -> Result<Option<std::time::Duration>> {
        let left: Option<f64> = sqlx::query_scalar(sql::TAKE_TOKEN)
            .bind(tenant)
            .bind(key_id)
            .bind(rate)
            .fetch_optional(&self.pool)
            .await
            .map_err(read_error)?;
        // None left: about one token's time.
        Ok(left.is_none().then(|| {
            std::time::Duration::try_from_secs_f64(1.0 / rate)
                .unwrap_or(std::time::Duration::from_secs(86_400))
        }))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// A read's failure: UNAVAILABLE when the database cannot be reached
/// (the request changed nothing and may simply be sent again).
fn read_error(e: sqlx::Error) -> Error {
    let unreachable = matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
        || tx::connection_lost(&e)
        || e.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == "55000" || c == "3D000");
    if unreachable {
        tracing::warn!(error = %e, "a read cannot reach the database");
        Error::Unavailable
    } else {
        e.into()
    }
}

/// A list row as `fit_rows` reads it.
fn list_row((doc, created_at, id): (String, i64, String)) -> (String, Cursor) {
    (doc, Cursor { created_at, id })
}

/// Up to a page of an execution's task runs whose latest event is in
/// (`after`, `head`], in the order of those events, bounded by count and
/// by the bytes of their documents.
async fn task_runs_page(
    conn: &mut PgConnection,
    tenant: &str,
    execution: ExecutionId,
    after: i64,
    head: i64,
) -> Result<TaskRunPage> {
    use futures::TryStreamExt;

    let mut rows = sqlx::query_as::<_, (String, i64)>(sql::TASK_RUNS_OF_EXECUTION)
        .bind(tenant)
        .bind(execution.to_string())
        .bind(after)
        .bind(head)
        .bind(SNAPSHOT_PAGE)
        .fetch(&mut *conn);
    let mut page = TaskRunPage::default();
    let mut bytes = 0;
    let mut last = None;
    while let Some((doc, seq)) = rows.try_next().await.map_err(read_error)? {
        bytes += doc.len();
        page.runs.push((rows::decode_doc(&doc)?, seq));
        last = Some(seq);
        if bytes >= SNAPSHOT_PAGE_BYTES {
            break;
        }
    }
    if bytes >= SNAPSHOT_PAGE_BYTES || page.runs.len() as i64 == SNAPSHOT_PAGE {
        page.next = last;
    }
    Ok(page)
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    tenant_id: String,
    execution_id: String,
    task_run_id: Option<String>,
    task_id: Option<String>,
    format: i16,
    payload: Vec<u8>,
}

impl EventRow {
    fn into_stored(self) -> StoredEvent {
        StoredEvent {
            seq: self.seq,
            tenant_id: self.tenant_id,
            execution_id: self.execution_id,
            task_run_id: self.task_run_id,
            task_id: self.task_id,
            body: EventBody::Stored {
                format: EventFormat::from_code(i64::from(self.format)),
                bytes: self.payload,
            },
        }
    }
}

/// A map of string pairs as a JSON object, for `@>` on a JSONB column.
fn pairs_json(pairs: &[(String, String)]) -> Result<String> {
    let object: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    rows::encode_doc(&object)
}

/// The list query for executions.
pub(crate) fn list_executions_query(
    tenant: &str,
    filter: &ExecutionFilter,
    page: &Page,
) -> Result<QueryBuilder<Postgres>> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT doc, created_at, id FROM executions WHERE tenant_id = ",
    );
    q.push_bind(tenant.to_owned());
    if let Some(task_id) = &filter.task_id {
        q.push(" AND task_id = ").push_bind(task_id.clone());
    }
    push_state_types(&mut q, &filter.state_types);
    if !filter.metadata.is_empty() {
        q.push(" AND metadata @> ")
            .push_bind(pairs_json(&filter.metadata)?)
            .push("::jsonb");
    }
    push_common(
        &mut q,
        filter.created_after,
        filter.created_before,
        filter.show_deleted,
        page,
    );
    Ok(q)
}

/// The list query for task runs.
pub(crate) fn list_task_runs_query(
    tenant: &str,
    filter: &TaskRunFilter,
    page: &Page,
) -> Result<QueryBuilder<Postgres>> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT doc, created_at, id FROM task_runs WHERE tenant_id = ",
    );
    q.push_bind(tenant.to_owned());
    if let Some(id) = filter.execution_id {
        q.push(" AND execution_id = ").push_bind(id.to_string());
    }
    if let Some(key) = &filter.task_key {
        q.push(" AND task_key = ").push_bind(key.clone());
    }
    if let Some(stale) = filter.stale {
        q.push(" AND stale = ").push_bind(stale);
    }
    push_state_types(&mut q, &filter.state_types);
    if !filter.labels.is_empty() {
        q.push(" AND labels @> ")
            .push_bind(pairs_json(&filter.labels)?)
            .push("::jsonb");
    }
    push_common(
        &mut q,
        filter.created_after,
        filter.created_before,
        filter.show_deleted,
        page,
    );
    Ok(q)
}

fn push_state_types(q: &mut QueryBuilder<Postgres>, types: &[StateType]) {
    if types.is_empty() {
        return;
    }
    let codes: Vec<i16> = types.iter().map(|t| t.code() as i16).collect();
    q.push(" AND state_type = ANY(").push_bind(codes).push(")");
}

fn push_common(
    q: &mut QueryBuilder<Postgres>,
    after: Option<Timestamp>,
    before: Option<Timestamp>,
    show_deleted: bool,
    page: &Page,
) {
    if let Some(t) = after {
        q.push(" AND created_at > ").push_bind(t.as_micros());
    }
    if let Some(t) = before {
        q.push(" AND created_at < ").push_bind(t.as_micros());
    }
    if !show_deleted {
        q.push(" AND deleted_at IS NULL");
    }
    if let Some(c) = &page.after {
        q.push(" AND (created_at, id) < (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(c.id.clone())
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(page.size as i64 + 1);
}

#[cfg(test)]
mod tests {
    mod conformance {
        use std::sync::Arc;

        use sqlx::{Connection, PgConnection};

        use crate::store::{CommitListener, Durability, Store, conformance::Guard};

        /// The server the tests make their databases on.
        fn server() -> String {
            std::env::var("RUNLEDGER_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
        }

        /// A fresh database, dropped with its guard.
        struct Fresh {
            server: String,
            name: String,
        }

        impl Drop for Fresh {
            fn drop(&mut self) {
                let (server, name) = (self.server.clone(), self.name.clone());
                // Drop cannot wait on the test's runtime: a thread of its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        if let Ok(mut conn) = PgConnection::connect(&server).await {
                            let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                            let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                                .execute(&mut conn)
                                .await;
                        }
                    });
                })
                .join();
            }
        }

        async fn open(listener: Arc<dyn CommitListener>) -> (Store, Guard) {
            let (url, fresh) = fresh().await;
            let (store, writer) = Store::open(&url, Durability::Process, listener)
                .await
                .unwrap();
            (store, Box::new((writer, fresh)))
        }

        /// A fresh database: its URL, and the guard that drops it.
        async fn fresh() -> (String, Fresh) {
            let server = server();
            let mut conn = PgConnection::connect(&server).await.unwrap_or_else(|e| {
                panic!(
                    "no PostgreSQL server answers at {} ({e}): start one, or set \
                     RUNLEDGER_TEST_POSTGRES to a server's URL",
                    crate::database_url::redacted(&server)
                )
            });
            let name = format!("runledger_conformance_{}", uuid::Uuid::now_v7().simple());
            let create = format!("CREATE DATABASE \"{name}\"");
            sqlx::query(sqlx::AssertSqlSafe(create))
                .execute(&mut conn)
                .await
                .unwrap();
            let fresh = Fresh {
                server: server.clone(),
                name: name.clone(),
            };
            let (base, _) = server.rsplit_once('/').expect("a database in the URL");
            (format!("{base}/{name}"), fresh)
        }

        crate::store::conformance_suite!(open);

        /// A fresh, migrated database: its URL, and the guard that drops it
        /// (with the store that migrated it).
        async fn migrated() -> (String, Guard) {
            let (url, fresh) = fresh().await;
            let heard = Arc::new(crate::store::conformance::Heard::default());
            let (store, writer) = Store::open(&url, Durability::Process, heard).await.unwrap();
            (url, Box::new((store, writer, fresh)))
        }

        mod seal {
            use std::sync::Arc;

            use super::migrated;
            use crate::{
                domain::{Event, EventKind, Resource, Timestamp},
                store::{
                    EventBody, EventFormat, StoredEvent,
                    backend::{EventRow, RunRow, TxBackend},
                    conformance::execution_at,
                    postgres::tx::PgTx,
                },
            };

            /// A new execution's creation event, numbered 1 in its
            /// transaction, and the execution.
            fn created(request_id: &str) -> (crate::domain::Execution, StoredEvent, Vec<u8>) {
                let e = execution_at("t", Timestamp::now(), Some(request_id));
                let record = Event {
                    kind: EventKind::Created,
                    occurred_at: e.run.created_at,
                    previous_state_type: None,
                    resource: Resource::Execution(&e),
                    task_id: None,
                }
                .record();
                let bytes = record.encode().unwrap();
                let stored = StoredEvent {
                    seq: 1,
                    tenant_id: "t".into(),
                    execution_id: e.id.to_string(),
                    task_run_id: None,
                    task_id: None,
                    body: EventBody::Record(Arc::new(record)),
                };
                (e, stored, bytes)
            }

            async fn seal_one(
                tx: &mut PgTx,
                (e, stored, bytes): &(crate::domain::Execution, StoredEvent, Vec<u8>),
            ) -> crate::Result<std::collections::HashMap<String, i64>> {
                let event = EventRow {
                    event: stored,
                    occurred_at: e.run.created_at.as_micros(),
                    format: EventFormat::Record.code() as i16,
                    bytes,
                };
                let run = RunRow {
                    run: e,
                    last_seq: 1,
                    request_hash: Some("fingerprint"),
                    new: true,
                };
                tx.seal(&[("t", 1)], &[event], &[run], &[], &[]).await
            }

            fn checked(e: &crate::domain::Execution) -> RunRow<'_, crate::domain::Execution> {
                RunRow {
                    run: e,
                    last_seq: 0,
                    request_hash: None,
                    new: true,
                }
            }

            /// Two writers add an execution under one request_id: the one
            /// whose check came before the other's commit finds, when it
            /// writes, that it lost the race, and may run again; running
            /// again, its check names the stored execution.
            #[tokio::test]
            async fn a_new_run_stored_by_another_writer_after_the_check_loses_the_race() {
                let (url, _guard) = migrated().await;
                let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
                let mut a = PgTx::new(options.clone(), &url);
                let mut b = PgTx::new(options, &url);
                let mine = created("once");
                let theirs = created("once");

                a.begin().await.unwrap();
                let conflicts = a.stored_conflicts(&[checked(&mine.0)], &[]).await.unwrap();
                assert!(conflicts.is_empty());

                b.begin().await.unwrap();
                let bases = seal_one(&mut b, &theirs).await.unwrap();
                assert_eq!(bases.get("t"), Some(&0));
                b.commit().await.unwrap();

                let lost = seal_one(&mut a, &mine).await.unwrap_err();
                assert!(a.is_retryable(&lost), "{lost}");
                a.rollback().await;

                a.begin().await.unwrap();
                let conflicts = a.stored_conflicts(&[checked(&mine.0)], &[]).await.unwrap();
                assert_eq!(conflicts, [mine.0.id.to_string()]);
                a.rollback().await;

                // The winner's event is the tenant's first; nothing of the
                // loser's was kept.
                b.begin().await.unwrap();
                let heads = b.lock_heads(&["t"]).await.unwrap();
                assert_eq!(heads.get("t"), Some(&1));
                assert!(b.execution("t", mine.0.id).await.unwrap().is_none());
                assert!(b.execution("t", theirs.0.id).await.unwrap().is_some());
                b.rollback().await;
            }

            /// Events sealed by one writer follow those another committed
            /// first, numbered densely from each tenant's head.
            #[tokio::test]
            async fn a_seal_numbers_after_the_head_another_writer_left() {
                let (url, _guard) = migrated().await;
                let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
                let mut a = PgTx::new(options.clone(), &url);
                let mut b = PgTx::new(options, &url);
                for i in 0..3 {
                    let tx = if i == 1 { &mut b } else { &mut a };
                    tx.begin().await.unwrap();
                    let bases = seal_one(tx, &created(&format!("r{i}"))).await.unwrap();
                    assert_eq!(bases.get("t"), Some(&(i as i64)));
                    tx.commit().await.unwrap();
                }
            }
        }
    }
}
