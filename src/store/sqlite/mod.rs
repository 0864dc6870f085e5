//! The SQLite backend: one server per database file (an exclusive lock
//! keeps others off it), WAL, a pool of read-only connections, and one
//! write connection for the writer.

mod open;
#[cfg(test)]
mod plans;
mod retention;
pub(crate) mod sql;
mod tx;

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Connection, QueryBuilder, Sqlite, SqliteConnection, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

pub use open::{OpenCause, OpenError};

use super::{
    Cursor, Durability, EventBody, EventFormat, ExecutionFilter, HistoryPage, LogPage, LogScope,
    Page, SNAPSHOT_PAGE, SNAPSHOT_PAGE_BYTES, Snapshot, StoredEvent, TaskRunFilter, TaskRunPage,
    backend::{Opened, ReadBackend},
    fit::fit_rows,
    rows,
};
use crate::{
    Error, Result,
    domain::{Execution, ExecutionId, State, StateType, TaskRun, TaskRunId, Timestamp, document},
    keys::{ActiveKey, KeySet},
};

/// The most rows a read connection fetches ahead of its reader.
const READ_ROW_BUFFER: usize = 16;

/// The database file a SQLite URL names, for messages.
pub(crate) fn path_of(url: &str) -> std::path::PathBuf {
    SqliteConnectOptions::from_str(url)
        .map(|o| o.get_filename().to_owned())
        .unwrap_or_else(|_| url.into())
}

/// Opens (creating and migrating if needed) the database at `url`, after
/// taking the lock that keeps other servers off the file.
pub(crate) async fn open(url: &str, durability: Durability) -> Result<Opened, OpenError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| OpenError::new(url, OpenCause::Url(e.to_string())))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Process => SqliteSynchronous::Normal,
            Durability::Power => SqliteSynchronous::Full,
        })
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        .statement_cache_capacity(256);
    let path = options.get_filename().to_owned();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let lock = if in_memory {
        None
    } else {
        Some(open::DatabaseLock::take(&path)?)
    };
    let failed = |e: sqlx::Error| OpenError::database(&path, e);

    // The writer's own settings: a larger page cache, and checkpoints
    // left to the checkpointer below (the limit is a safety net should
    // it fall behind), so commits never copy the WAL back themselves.
    let writer_options = options
        .clone()
        .pragma("cache_size", "-65536")
        .pragma("wal_autocheckpoint", "50000");
    let mut conn = SqliteConnection::connect_with(&writer_options)
        .await
        .map_err(failed)?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&mut conn)
        .await
        .map_err(|e| OpenError::migrate(&path, e))?;

    let read = SqlitePoolOptions::new()
        .max_connections(8)
        .min_connections(1)
        // Rows reach a reader a few at a time, so that a read that
        // stops early (a page full to its byte limit) never had many
        // large rows queued for it.
        .connect_with(
            options
                .clone()
                .read_only(true)
                .row_buffer_size(READ_ROW_BUFFER),
        )
        .await
        .map_err(failed)?;

    let checkpointer = SqliteConnection::connect_with(&options)
        .await
        .map_err(failed)?;
    Ok(Opened {
        reads: Arc::new(SqliteReads { pool: read }),
        writer: Box::new(tx::SqliteTx::new(conn)),
        guard: lock.map(|l| Box::new(l) as Box<dyn std::any::Any + Send>),
        signals: None,
        beside: Some(Box::new(move |stop| {
            Box::pin(checkpoint(checkpointer, stop))
        })),
    })
}

/// Reads on the pool of read-only connections.
#[derive(Debug)]
struct SqliteReads {
    pool: SqlitePool,
}

#[async_trait]
impl ReadBackend for SqliteReads {
    async fn execution(&self, tenant: &str, id: ExecutionId) -> Result<Option<(Execution, i64)>> {
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(doc, seq)| Ok((rows::decode_doc(&doc)?, seq)))
            .transpose()
    }

    async fn task_run(&self, tenant: &str, id: TaskRunId) -> Result<Option<(TaskRun, i64)>> {
        let row: Option<(String, i64)> = sqlx::query_as(sql::TASK_RUN_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
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

        let mut q = list_executions_query(tenant, filter, page);
        let rows = q.build_query_as().fetch(&self.pool).map_ok(list_row);
        fit_rows(rows, page.size, document::execution_bytes).await
    }

    async fn list_task_runs(
        &self,
        tenant: &str,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)> {
        use futures::TryStreamExt;

        let mut q = list_task_runs_query(tenant, filter, page);
        let rows = q.build_query_as().fetch(&self.pool).map_ok(list_row);
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
            .map_ok(|(row, doc)| (doc, row));
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
        // One read transaction: the events read are those committed up to
        // the head it sees.
        let mut tx = self.pool.begin().await?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
        let mut q = sqlx::query_as::<_, EventRecordRow>(sql).bind(tenant);
        if let Some(id) = id {
            q = q.bind(id);
        }
        let mut events = Vec::new();
        let mut full = false;
        {
            let mut rows = q.bind(after).bind(limit).fetch(&mut *tx);
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await? {
                bytes += row.payload.len();
                events.push(row.into_stored());
                if bytes >= max_bytes {
                    full = true;
                    break;
                }
            }
        }
        tx.commit().await?;
        let full = full || events.len() as i64 == limit;
        Ok(LogPage { events, full, head })
    }

    async fn head(&self, tenant: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn heads(&self, tenants: &[String]) -> Result<HashMap<String, i64>> {
        if tenants.is_empty() {
            return Ok(HashMap::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT tenant_id, head FROM tenant_heads WHERE tenant_id IN (",
        );
        let mut list = q.separated(", ");
        for t in tenants {
            list.push_bind(t.clone());
        }
        list.push_unseparated(")");
        let rows: Vec<(String, i64)> = q
            .build_query_as()
            .persistent(false)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn compacted_seq(&self, tenant: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE((SELECT compacted FROM tenant_heads WHERE tenant_id = ?), 0)",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn execution_snapshot(
        &self,
        tenant: &str,
        id: ExecutionId,
        include_task_runs: bool,
    ) -> Result<Snapshot> {
        let mut tx = self.pool.begin().await?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let execution = row
            .map(|(d, s)| Ok::<_, Error>((rows::decode_doc(&d)?, s)))
            .transpose()?;
        let task_runs = if include_task_runs && execution.is_some() {
            task_runs_page(&mut tx, tenant, id, 0, head).await?
        } else {
            TaskRunPage::default()
        };
        tx.commit().await?;
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
        let mut conn = self.pool.acquire().await?;
        task_runs_page(&mut conn, tenant, execution, after, head).await
    }

    async fn task_run_snapshot(
        &self,
        tenant: &str,
        id: TaskRunId,
    ) -> Result<(Option<(TaskRun, i64)>, i64)> {
        let mut tx = self.pool.begin().await?;
        let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
        let row: Option<(String, i64)> = sqlx::query_as(sql::TASK_RUN_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let run = row
            .map(|(d, s)| Ok::<_, Error>((rows::decode_doc(&d)?, s)))
            .transpose()?;
        Ok((run, head))
    }

    async fn load_keys(&self) -> Result<KeySet> {
        let mut conn = self.pool.acquire().await?;
        crate::keys::sqlite::load(&mut conn).await
    }

    async fn find_key(&self, hash: &str) -> Result<Option<ActiveKey>> {
        let mut conn = self.pool.acquire().await?;
        crate::keys::sqlite::find(&mut conn, hash).await
    }

    async fn key_usage(&self, day: i64) -> Result<HashMap<String, i64>> {
        let mut conn = self.pool.acquire().await?;
        crate::keys::sqlite::usage_today(&mut conn, day).await
    }

    async fn close(&self) {
        self.pool.close().await;
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
    conn: &mut SqliteConnection,
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
    while let Some((doc, seq)) = rows.try_next().await? {
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

/// Copies committed WAL pages back into the database file, beside the
/// writer rather than inside its commits; truncates the WAL at the end.
async fn checkpoint(mut conn: SqliteConnection, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "checkpoint");
        }
    }
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
    {
        tracing::warn!(error = %e, "final checkpoint");
    }
    let _ = conn.close().await;
}

#[derive(sqlx::FromRow)]
struct EventRecordRow {
    seq: i64,
    tenant_id: String,
    execution_id: String,
    task_run_id: Option<String>,
    task_id: Option<String>,
    format: i64,
    payload: Vec<u8>,
}

impl EventRecordRow {
    fn into_stored(self) -> StoredEvent {
        StoredEvent {
            seq: self.seq,
            tenant_id: self.tenant_id,
            execution_id: self.execution_id,
            task_run_id: self.task_run_id,
            task_id: self.task_id,
            body: EventBody::Stored {
                format: EventFormat::from_code(self.format),
                bytes: self.payload,
            },
        }
    }
}

/// The list query for executions; also checked by the plan test.
pub(crate) fn list_executions_query<'a>(
    tenant: &'a str,
    filter: &'a ExecutionFilter,
    page: &'a Page,
) -> QueryBuilder<Sqlite> {
    let mut q = QueryBuilder::<Sqlite>::new(
        "SELECT doc, created_at, id FROM executions WHERE tenant_id = ",
    );
    q.push_bind(tenant.to_owned());
    if let Some(task_id) = &filter.task_id {
        q.push(" AND task_id = ").push_bind(task_id.clone());
    }
    push_state_types(&mut q, &filter.state_types);
    push_pairs(&mut q, "$.metadata", &filter.metadata);
    push_common(
        &mut q,
        filter.created_after,
        filter.created_before,
        filter.show_deleted,
        page,
    );
    q
}

/// The list query for task runs; also checked by the plan test.
pub(crate) fn list_task_runs_query<'a>(
    tenant: &'a str,
    filter: &'a TaskRunFilter,
    page: &'a Page,
) -> QueryBuilder<Sqlite> {
    let mut q =
        QueryBuilder::<Sqlite>::new("SELECT doc, created_at, id FROM task_runs WHERE tenant_id = ");
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
    push_pairs(&mut q, "$.labels", &filter.labels);
    push_common(
        &mut q,
        filter.created_after,
        filter.created_before,
        filter.show_deleted,
        page,
    );
    q
}

/// Every pair must be in the document's map at `path`.
fn push_pairs(q: &mut QueryBuilder<Sqlite>, path: &'static str, pairs: &[(String, String)]) {
    for (k, v) in pairs {
        q.push(" AND EXISTS (SELECT 1 FROM json_each(doc, '")
            .push(path)
            .push("') WHERE key = ")
            .push_bind(k.clone())
            .push(" AND value = ")
            .push_bind(v.clone())
            .push(")");
    }
}

fn push_state_types(q: &mut QueryBuilder<Sqlite>, types: &[StateType]) {
    if types.is_empty() {
        return;
    }
    q.push(" AND state_type IN (");
    let mut sep = q.separated(", ");
    for t in types {
        sep.push_bind(t.code());
    }
    sep.push_unseparated(")");
}

fn push_common(
    q: &mut QueryBuilder<Sqlite>,
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
    use prost::Message;
    use sqlx::{Connection, SqliteConnection, migrate::Migrator, sqlite::SqliteConnectOptions};

    use super::*;
    use crate::grpc::pb;

    /// A log written before sequences were per tenant keeps its events and
    /// their numbers (cursors stay valid); each tenant's counter starts from
    /// its own latest event, and retention's mark carries over.
    #[tokio::test]
    async fn a_log_of_the_earlier_numbering_is_kept_and_continued_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = dir.path().join("earlier");
        std::fs::create_dir(&earlier).unwrap();
        for entry in std::fs::read_dir("migrations/sqlite").unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.as_str() < "0009" {
                std::fs::copy(&path, earlier.join(name)).unwrap();
            }
        }
        let file = dir.path().join("old.db");
        let options = SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        Migrator::new(earlier.as_path())
            .await
            .unwrap()
            .run(&mut conn)
            .await
            .unwrap();
        // Global numbering: a's events 1 and 3, b's 2; retention took 1.
        for (seq, tenant) in [(2, "b"), (3, "a")] {
            let wire = pb::StatusEvent {
                sequence: seq,
                kind: pb::EventKind::Created as i32,
                ..Default::default()
            }
            .encode_to_vec();
            sqlx::query(
                "INSERT INTO events (seq, tenant_id, execution_id, occurred_at, payload) \
                 VALUES (?, ?, 'e', 0, ?)",
            )
            .bind(seq)
            .bind(tenant)
            .bind(wire)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::query("UPDATE counters SET value = 1 WHERE name = 'compacted_seq'")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();

        let url = format!("sqlite://{}", file.display());
        let opened = open(&url, Durability::Process).await.unwrap();
        let reads = opened.reads;
        assert_eq!(reads.head("a").await.unwrap(), 3);
        assert_eq!(reads.head("b").await.unwrap(), 2);
        assert_eq!(reads.head("c").await.unwrap(), 0);
        assert_eq!(reads.compacted_seq("a").await.unwrap(), 1);
        assert_eq!(reads.compacted_seq("c").await.unwrap(), 0);
        let page = reads
            .events_after(&LogScope::Tenant("a".into()), 1, 10, 1 << 20)
            .await
            .unwrap();
        assert_eq!(page.events.len(), 1);
        let e = page.events.into_iter().next().unwrap();
        assert_eq!(e.seq, 3);
        assert!(matches!(
            e.body,
            EventBody::Stored {
                format: EventFormat::LegacyWire,
                ..
            }
        ));
        let sent = crate::stream::LoggedEvent::from_stored(e);
        assert!(!sent.is_stand_in());
        assert_eq!(sent.event().sequence, 3);
    }

    /// The storage conformance suite, on a fresh SQLite file per check.
    mod conformance {
        use std::sync::Arc;

        use crate::store::{CommitListener, Durability, Store, conformance::Guard};

        async fn open(listener: Arc<dyn CommitListener>) -> (Store, Guard) {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
            let (store, writer) = Store::open(&url, Durability::Process, listener)
                .await
                .unwrap();
            (store, Box::new((writer, dir)))
        }

        crate::store::conformance_suite!(open);
    }
}
