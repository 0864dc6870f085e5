//! The write transaction's primitives on PostgreSQL: the writer's own
//! connection (made again when it is lost), READ COMMITTED transactions
//! that lock a tenant's counter row before reading anything of it, and
//! multi-row statements over arrays.
//!
//! A batch's transaction begins with its first statement that needs one.
//! A batch that only adds new runs needs none: it checks their
//! idempotency keys, then one statement (`seal`) numbers its events after
//! the tenant's head, writes them with the runs and history rows, and
//! commits as it ends; the counter row is held only while that statement
//! runs and its commit is flushed.
//!
//! A transaction that fails before COMMIT is sent (or a seal that fails
//! with an error from the server) leaves nothing behind, so it may run
//! again: after losing a race with another server's writer (deadlock,
//! serialization failure) or losing the connection (the next `begin`
//! connects again). A connection lost while COMMIT, or a seal that commits
//! on its own, is under way leaves the outcome unknown: the callers are
//! answered UNAVAILABLE and retry with their idempotency keys.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{PgConnection, postgres::PgConnectOptions};

use super::sql;
use crate::{
    Error, Result,
    domain::{Execution, ExecutionId, RunCore, StateType, TaskRun, TaskRunId, Timestamp},
    store::{
        Pruned,
        backend::{EventRow, RunRow, StateRow, TxBackend},
        rows,
    },
};

/// How many rows one multi-row statement carries at most.
const ROWS_PER_STATEMENT: usize = 1000;

/// Why the latest statement failed, when running the transaction again
/// may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A deadlock or serialization failure with another writer.
    Race,
    /// The connection was lost before COMMIT was sent.
    Reconnect,
}

/// The writer's connection.
pub(super) struct PgTx {
    /// None until the first transaction, and once lost: `begin` connects.
    /// The connection is made by the writer's own runtime, whose thread
    /// then drives it alone.
    conn: Option<PgConnection>,
    options: PgConnectOptions,
    /// The database URL, to keep its password out of messages.
    url: String,
    /// The database URL, shown without its password.
    shown: String,
    /// Set by the latest failed statement of the open transaction.
    retry: Option<Retry>,
    /// Where the writer's transaction stands.
    state: TxState,
    /// Whether a statement of the current batch has run on the connection.
    used: bool,
}

/// A transaction is begun when its first statement that needs one runs:
/// a batch that only checks its new runs and then seals them needs none,
/// its seal committing on its own (see `seal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    /// No batch under way.
    Idle,
    /// A batch began; nothing it did needed a transaction yet.
    Pending,
    /// BEGIN was sent.
    Open,
    /// The batch's seal ran outside a transaction and committed.
    Committed,
}

impl std::fmt::Debug for PgTx {
    /// Without the URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTx")
            .field("database", &self.shown)
            .field("connected", &self.conn.is_some())
            .field("retry", &self.retry)
            .finish()
    }
}

/// Runs `$query` (an expression of `$conn`) in the writer's
/// transaction, beginning it if need be, noting a failure.
macro_rules! run {
    ($self:ident, |$conn:ident| $query:expr) => {{
        $self.open().await?;
        run_alone!($self, |$conn| $query)
    }};
}

/// Runs `$query` on the writer's connection, in the transaction if one is
/// open and on its own otherwise, noting a failure.
macro_rules! run_alone {
    ($self:ident, |$conn:ident| $query:expr) => {{
        let $conn = $self.conn()?;
        match $query.await {
            Ok(done) => {
                $self.used = true;
                Ok(done)
            }
            Err(e) => Err($self.failed(e)),
        }
    }};
}

/// Binds the columns of new executions, in the order INSERT_EXECUTIONS and SEAL take them.
macro_rules! bind_new_executions {
    ($q:expr, $c:ident) => {
        $q.bind(&$c.tenant_id)
            .bind(&$c.id)
            .bind(&$c.created_at)
            .bind(&$c.task_id)
            .bind(&$c.state_type)
            .bind(&$c.request_id)
            .bind(&$c.request_hash)
            .bind(&$c.deleted_at)
            .bind(&$c.last_seq)
            .bind(&$c.pause_deadline)
            .bind(&$c.metadata)
            .bind(&$c.doc)
    };
}

/// Binds the columns of new task runs, in the order INSERT_TASK_RUNS and SEAL take them.
macro_rules! bind_new_task_runs {
    ($q:expr, $c:ident) => {
        $q.bind(&$c.tenant_id)
            .bind(&$c.id)
            .bind(&$c.execution_id)
            .bind(&$c.task_key)
            .bind(&$c.dynamic_key)
            .bind(&$c.created_at)
            .bind(&$c.state_type)
            .bind(&$c.stale)
            .bind(&$c.deleted_at)
            .bind(&$c.last_seq)
            .bind(&$c.pause_deadline)
            .bind(&$c.labels)
            .bind(&$c.doc)
    };
}

/// Binds the columns of events, in the order INSERT_EVENTS and SEAL take them.
macro_rules! bind_events {
    ($q:expr, $c:ident) => {
        $q.bind(&$c.tenants)
            .bind(&$c.seqs)
            .bind(&$c.executions)
            .bind(&$c.task_runs)
            .bind(&$c.task_ids)
            .bind(&$c.occurred)
            .bind(&$c.formats)
            .bind(&$c.payloads)
    };
}

/// Binds the columns of history rows, in the order INSERT_STATES and SEAL take them.
macro_rules! bind_states {
    ($q:expr, $c:ident) => {
        $q.bind(&$c.tenants)
            .bind(&$c.runs)
            .bind(&$c.ids)
            .bind(&$c.docs)
    };
}

impl PgTx {
    pub(super) fn new(options: PgConnectOptions, url: &str) -> Self {
        PgTx {
            conn: None,
            options,
            url: url.to_owned(),
            shown: crate::database_url::redacted(url),
            retry: None,
            state: TxState::Idle,
            used: false,
        }
    }

    /// Sends BEGIN if the batch has no transaction open yet.
    async fn open(&mut self) -> Result<()> {
        match self.state {
            TxState::Pending => {}
            TxState::Open => return Ok(()),
            TxState::Idle | TxState::Committed => {
                return Err(Error::Internal(
                    "a statement outside a batch's transaction".into(),
                ));
            }
        }
        // A connection the server has ended shows it only when used: try
        // once more on a new one.
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.reconnect().await?;
            }
            let begun = run_alone!(self, |conn| sqlx::raw_sql("BEGIN").execute(conn));
            match begun {
                Ok(_) => {
                    self.state = TxState::Open;
                    return Ok(());
                }
                Err(_) if attempt == 0 && self.conn.is_none() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Internal("the database connection was lost".into()))
    }

    fn conn(&mut self) -> Result<&mut PgConnection> {
        self.conn.as_mut().ok_or_else(|| {
            self.retry = Some(Retry::Reconnect);
            Error::Internal("the database connection was lost".into())
        })
    }

    /// Notes what a failed statement means for the transaction.
    fn failed(&mut self, e: sqlx::Error) -> Error {
        if is_race(&e) {
            self.retry = Some(Retry::Race);
        } else if connection_lost(&e) {
            tracing::warn!(error = %e, "the writer's database connection was lost");
            self.conn = None;
            self.retry = Some(Retry::Reconnect);
        }
        e.into()
    }

    async fn reconnect(&mut self) -> Result<()> {
        use sqlx::Connection;
        let connected = tokio::time::timeout(
            super::CONNECT_TIMEOUT,
            PgConnection::connect_with(&self.options),
        )
        .await;
        let why = match connected {
            Ok(Ok(conn)) => {
                tracing::info!(database = %self.shown, "the writer connected");
                self.conn = Some(conn);
                return Ok(());
            }
            Ok(Err(e)) => crate::database_url::scrubbed(&e.to_string(), &self.url),
            Err(_) => format!("no answer in {:?}", super::CONNECT_TIMEOUT),
        };
        // Nothing was written: the callers may simply try again.
        tracing::error!(database = %self.shown, error = %why, "the writer cannot connect to the database");
        Err(Error::Unavailable)
    }
}

/// A deadlock or serialization failure: the transaction was rolled back
/// and may run again.
fn is_race(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40001" || c == "40P01")
}

/// Whether the connection is gone (its socket failed, or the server ended
/// it: an administrator, a restart).
pub(super) fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // connection_exception; admin_shutdown, crash_shutdown,
            // cannot_connect_now
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

#[async_trait]
impl TxBackend for PgTx {
    async fn begin(&mut self) -> Result<()> {
        self.retry = None;
        self.used = false;
        if self.conn.is_none() {
            self.reconnect().await?;
        }
        self.state = TxState::Pending;
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, TxState::Idle) {
            TxState::Open => {}
            // Committed by its seal, or nothing written.
            TxState::Committed | TxState::Pending | TxState::Idle => return Ok(()),
        }
        let committed = match self.conn.as_mut() {
            Some(conn) => sqlx::raw_sql("COMMIT").execute(conn).await,
            None => return Err(Error::Internal("the database connection was lost".into())),
        };
        match committed {
            Ok(_) => Ok(()),
            Err(e) if connection_lost(&e) => {
                // The server may have committed before the connection
                // went: the outcome is unknown, and running it again could
                // apply it twice.
                tracing::error!(error = %e, "the connection was lost while committing");
                self.conn = None;
                self.retry = None;
                Err(Error::Unavailable)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn rollback(&mut self) {
        if std::mem::replace(&mut self.state, TxState::Idle) != TxState::Open {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = sqlx::raw_sql("ROLLBACK").execute(conn).await {
            tracing::warn!(error = %e, "rollback");
            if connection_lost(&e) {
                self.conn = None;
            }
        }
    }

    async fn close(self: Box<Self>) {
        use sqlx::Connection;
        if let Some(conn) = self.conn
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the write connection");
        }
    }

    fn sole_writer(&self) -> bool {
        false
    }

    fn is_retryable(&self, e: &Error) -> bool {
        matches!(e, Error::Internal(_)) && self.retry.is_some()
    }

    async fn execution(&mut self, tenant: &str, id: ExecutionId) -> Result<Option<Execution>> {
        let doc: Option<String> = run!(self, |conn| sqlx::query_scalar(sql::EXECUTION_DOC)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(conn))?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>> {
        let doc: Option<String> = run!(self, |conn| sqlx::query_scalar(sql::TASK_RUN_DOC)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(conn))?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    async fn execution_by_request_id(
        &mut self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<(Execution, String)>> {
        let row: Option<(String, Option<String>)> =
            run!(self, |conn| sqlx::query_as(sql::EXECUTION_BY_REQUEST_ID)
                .bind(tenant)
                .bind(request_id)
                .fetch_optional(conn))?;
        row.map(|(doc, hash)| Ok((rows::decode_doc(&doc)?, hash.unwrap_or_default())))
            .transpose()
    }

    async fn request_hash(&mut self, tenant: &str, id: ExecutionId) -> Result<String> {
        let hash: Option<Option<String>> =
            run!(self, |conn| sqlx::query_scalar(sql::REQUEST_HASH)
                .bind(tenant)
                .bind(id.to_string())
                .fetch_optional(conn))?;
        Ok(hash.flatten().unwrap_or_default())
    }

    async fn task_run_by_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        let doc: Option<String> = run!(self, |conn| sqlx::query_scalar(sql::TASK_RUN_BY_KEY)
            .bind(tenant)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(dynamic_key)
            .fetch_optional(conn))?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    async fn count_task_runs_for_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64> {
        run!(self, |conn| sqlx::query_scalar(
            sql::COUNT_TASK_RUNS_FOR_KEY
        )
        .bind(tenant)
        .bind(execution_id.to_string())
        .bind(task_key)
        .fetch_one(conn))
    }

    async fn task_runs_of(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
    ) -> Result<Vec<TaskRun>> {
        let docs: Vec<String> = run!(self, |conn| sqlx::query_scalar(sql::TASK_RUNS_OF)
            .bind(tenant)
            .bind(execution_id.to_string())
            .fetch_all(conn))?;
        docs.iter().map(|d| rows::decode_doc(d)).collect()
    }

    async fn latest_completed_output(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<Option<(TaskRunId, Option<String>)>> {
        let row: Option<(String, String)> =
            run!(self, |conn| sqlx::query_as(sql::LATEST_COMPLETED_OF_KEY)
                .bind(tenant)
                .bind(execution_id.to_string())
                .bind(task_key)
                .bind(except.to_string())
                .fetch_optional(conn))?;
        row.map(|(id, doc)| {
            let id = TaskRunId::parse(&id)
                .map_err(|e| Error::Internal(format!("a stored task run id: {e}")))?;
            Ok((id, output_of(&doc)?))
        })
        .transpose()
    }

    async fn runs_of_key_exist(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<(bool, bool)> {
        run!(self, |conn| sqlx::query_as(sql::RUNS_OF_KEY_EXIST)
            .bind(tenant)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(except.to_string())
            .fetch_one(conn))
    }

    async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>> {
        let row: Option<(Option<String>, Option<i64>)> =
            run!(self, |conn| sqlx::query_as(sql::CACHE_ENTRY)
                .bind(tenant)
                .bind(key)
                .fetch_optional(conn))?;
        row.map(|(output, exp)| {
            let output = output.map(|o| rows::decode_doc(&o)).transpose()?;
            Ok((output, exp.map(Timestamp::from_micros)))
        })
        .transpose()
    }

    async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()> {
        let output = output.map(rows::encode_doc).transpose()?;
        run!(self, |conn| sqlx::query(sql::PUT_CACHE_ENTRY)
            .bind(tenant)
            .bind(key)
            .bind(run.to_string())
            .bind(output)
            .bind(expiration.map(Timestamp::as_micros))
            .bind(Timestamp::now().as_micros())
            .execute(conn))?;
        Ok(())
    }

    async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        let executions = run!(self, |conn| sqlx::query_as(sql::EXPIRED_PAUSED_EXECUTIONS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(conn))?;
        let task_runs = run!(self, |conn| sqlx::query_as(sql::EXPIRED_PAUSED_TASK_RUNS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(conn))?;
        Ok((executions, task_runs))
    }

    async fn record_key_usage(&mut self, counts: &[(String, String, i64, i64)]) -> Result<()> {
        // One row per key and day (a statement may change a row once).
        let mut sums: HashMap<(&str, &str, i64), i64> = HashMap::new();
        for (tenant, key, day, requests) in counts {
            *sums
                .entry((tenant.as_str(), key.as_str(), *day))
                .or_default() += *requests;
        }
        if sums.is_empty() {
            return Ok(());
        }
        let (mut tenants, mut keys, mut days, mut requests) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((tenant, key, day), n) in sums {
            tenants.push(tenant);
            keys.push(key);
            days.push(day);
            requests.push(n);
        }
        run!(self, |conn| sqlx::query(sql::RECORD_KEY_USAGE)
            .bind(&tenants)
            .bind(&keys)
            .bind(&days)
            .bind(&requests)
            .execute(conn))?;
        Ok(())
    }

    async fn touch_keys(&mut self, hashes: &[String], at: Timestamp) -> Result<()> {
        run!(self, |conn| sqlx::query(sql::TOUCH_KEYS)
            .bind(at.as_micros())
            .bind(hashes)
            .execute(conn))?;
        Ok(())
    }

    async fn transition(
        &mut self,
        tenant: &str,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>> {
        run!(self, |conn| sqlx::query_scalar(sql::TRANSITION)
            .bind(tenant)
            .bind(run_id)
            .bind(transition_id)
            .fetch_optional(conn))
    }

    async fn record_transition(
        &mut self,
        tenant: &str,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()> {
        run!(self, |conn| sqlx::query(sql::RECORD_TRANSITION)
            .bind(tenant)
            .bind(run_id)
            .bind(transition_id)
            .bind(result_json)
            .execute(conn))?;
        Ok(())
    }

    async fn write_runs(
        &mut self,
        executions: &[RunRow<'_, Execution>],
        task_runs: &[RunRow<'_, TaskRun>],
    ) -> Result<Vec<String>> {
        let mut withdrawn = Vec::new();
        let (new, changed): (Vec<_>, Vec<_>) = executions.iter().partition(|p| p.new);
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let rows = ExecutionColumns::of(chunk)?;
            let insert = bind_new_executions!(sqlx::query_scalar(sql::INSERT_EXECUTIONS), rows);
            let written: Vec<String> = run!(self, |conn| insert.fetch_all(conn))?;
            withdrawn.extend(not_written(rows.id, written));
        }
        for chunk in changed.chunks(ROWS_PER_STATEMENT) {
            let rows = ExecutionColumns::of(chunk)?;
            run!(self, |conn| sqlx::query(sql::UPDATE_EXECUTIONS)
                .bind(&rows.tenant_id)
                .bind(&rows.id)
                .bind(&rows.state_type)
                .bind(&rows.deleted_at)
                .bind(&rows.last_seq)
                .bind(&rows.pause_deadline)
                .bind(&rows.metadata)
                .bind(&rows.doc)
                .execute(conn))?;
        }
        let (new, changed): (Vec<_>, Vec<_>) = task_runs.iter().partition(|p| p.new);
        for chunk in new.chunks(ROWS_PER_STATEMENT) {
            let rows = TaskRunColumns::of(chunk)?;
            let insert = bind_new_task_runs!(sqlx::query_scalar(sql::INSERT_TASK_RUNS), rows);
            let written: Vec<String> = run!(self, |conn| insert.fetch_all(conn))?;
            withdrawn.extend(not_written(rows.id, written));
        }
        for chunk in changed.chunks(ROWS_PER_STATEMENT) {
            let rows = TaskRunColumns::of(chunk)?;
            run!(self, |conn| sqlx::query(sql::UPDATE_TASK_RUNS)
                .bind(&rows.tenant_id)
                .bind(&rows.id)
                .bind(&rows.state_type)
                .bind(&rows.stale)
                .bind(&rows.deleted_at)
                .bind(&rows.last_seq)
                .bind(&rows.pause_deadline)
                .bind(&rows.labels)
                .bind(&rows.doc)
                .execute(conn))?;
        }
        Ok(withdrawn)
    }

    async fn insert_states(&mut self, states: &[StateRow]) -> Result<()> {
        for chunk in states.chunks(ROWS_PER_STATEMENT) {
            let s = StateColumns::of(chunk)?;
            let insert = bind_states!(sqlx::query(sql::INSERT_STATES), s);
            run!(self, |conn| insert.execute(conn))?;
        }
        Ok(())
    }

    async fn insert_events(&mut self, events: &[EventRow<'_>]) -> Result<()> {
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let e = EventColumns::of(chunk);
            let insert = bind_events!(sqlx::query(sql::INSERT_EVENTS), e);
            run!(self, |conn| insert.execute(conn))?;
        }
        Ok(())
    }

    async fn lock_heads(&mut self, tenants: &[&str]) -> Result<HashMap<String, i64>> {
        run!(self, |conn| sqlx::query(sql::ADD_HEADS)
            .bind(tenants)
            .execute(conn))?;
        let rows: Vec<(String, i64)> = run!(self, |conn| sqlx::query_as(sql::LOCK_HEADS)
            .bind(tenants)
            .fetch_all(conn))?;
        Ok(rows.into_iter().collect())
    }

    fn numbers_at_commit(&self) -> bool {
        true
    }

    async fn stored_conflicts(
        &mut self,
        executions: &[RunRow<'_, Execution>],
        task_runs: &[RunRow<'_, TaskRun>],
    ) -> Result<Vec<String>> {
        let x_tenants: Vec<&str> = executions
            .iter()
            .map(|r| r.run.tenant_id.as_str())
            .collect();
        let x_ids: Vec<String> = executions.iter().map(|r| r.run.id.to_string()).collect();
        let x_requests: Vec<Option<&str>> = executions
            .iter()
            .map(|r| r.run.request_id.as_deref())
            .collect();
        let t_tenants: Vec<&str> = task_runs.iter().map(|r| r.run.tenant_id.as_str()).collect();
        let t_ids: Vec<String> = task_runs.iter().map(|r| r.run.id.to_string()).collect();
        let t_executions: Vec<String> = task_runs
            .iter()
            .map(|r| r.run.execution_id.to_string())
            .collect();
        let t_keys: Vec<&str> = task_runs.iter().map(|r| r.run.task_key.as_str()).collect();
        let t_dynamic: Vec<&str> = task_runs
            .iter()
            .map(|r| r.run.dynamic_key.as_str())
            .collect();
        run_alone!(self, |conn| sqlx::query_scalar(sql::STORED_CONFLICTS)
            .bind(&x_tenants)
            .bind(&x_ids)
            .bind(&x_requests)
            .bind(&t_tenants)
            .bind(&t_ids)
            .bind(&t_executions)
            .bind(&t_keys)
            .bind(&t_dynamic)
            .fetch_all(conn))
    }

    async fn seal(
        &mut self,
        counts: &[(&str, i64)],
        events: &[EventRow<'_>],
        executions: &[RunRow<'_, Execution>],
        task_runs: &[RunRow<'_, TaskRun>],
        states: &[StateRow],
    ) -> Result<HashMap<String, i64>> {
        // Nothing written yet: the statement is the transaction, and
        // commits as it ends, so that the counter rows are held for no
        // round trip at all. The connection must be known to be alive
        // (the batch's check used it), or an outcome could be unknown
        // for want of a probe.
        let alone = self.state == TxState::Pending && self.used;
        if !alone {
            self.open().await?;
        }
        let s = StateColumns::of(states)?;
        let tenants: Vec<&str> = counts.iter().map(|(t, _)| *t).collect();
        let ns: Vec<i64> = counts.iter().map(|(_, n)| *n).collect();
        let e = EventColumns::of(events);
        let x = ExecutionColumns::of(&executions.iter().collect::<Vec<_>>())?;
        let t = TaskRunColumns::of(&task_runs.iter().collect::<Vec<_>>())?;
        let seal = sqlx::query_as::<_, (String, i64, i64)>(sql::SEAL)
            .bind(&tenants)
            .bind(&ns);
        let seal = bind_events!(seal, e);
        let seal = bind_new_executions!(seal, x);
        let seal = bind_new_task_runs!(seal, t);
        let seal = bind_states!(seal, s).bind((executions.len() + task_runs.len()) as i64);
        let sealed = run_alone!(self, |conn| seal.fetch_all(conn));
        let sealed = match sealed {
            Ok(sealed) => {
                if alone {
                    self.state = TxState::Committed;
                }
                sealed
            }
            Err(_) if alone && self.retry == Some(Retry::Reconnect) => {
                // The statement may have committed before the connection
                // went: as for a lost COMMIT, the outcome is unknown.
                tracing::error!("the connection was lost while sealing a batch");
                self.retry = None;
                self.state = TxState::Idle;
                return Err(Error::Unavailable);
            }
            Err(e) => return Err(e),
        };
        // (A new run that met one stored meanwhile under the same key
        // failed the statement as a serialization failure.)
        if sealed.len() != counts.len() {
            let defect = format!(
                "numbered the events of {} of {} tenants",
                sealed.len(),
                counts.len()
            );
            tracing::error!(error = %defect, "sealing a batch");
            // Committed already when the statement was the transaction:
            // the callers must not be told it failed, nor the batch run
            // again.
            return Err(if alone {
                Error::Unavailable
            } else {
                Error::Internal(defect)
            });
        }
        Ok(sealed.into_iter().map(|(t, base, _)| (t, base)).collect())
    }

    async fn set_heads(&mut self, heads: &[(&str, i64)]) -> Result<()> {
        if heads.is_empty() {
            return Ok(());
        }
        let tenants: Vec<&str> = heads.iter().map(|(t, _)| *t).collect();
        let values: Vec<i64> = heads.iter().map(|(_, h)| *h).collect();
        let set: i64 = run!(self, |conn| sqlx::query_scalar(sql::SET_HEADS)
            .bind(&tenants)
            .bind(&values)
            .fetch_one(conn))?;
        if set != heads.len() as i64 {
            return Err(Error::Internal(format!(
                "set {set} of {} tenants' heads: a counter row was not locked",
                heads.len()
            )));
        }
        Ok(())
    }

    async fn prune(&mut self, tenant: &str, cutoff: Timestamp, limit: i64) -> Result<Pruned> {
        let (max, compacted): (Option<i64>, i64) =
            run!(self, |conn| sqlx::query_as(sql::PRUNE_BOUNDS)
                .bind(tenant)
                .bind(cutoff.as_micros())
                .fetch_one(conn))?;
        let Some(max) = max.filter(|m| *m > compacted) else {
            return Ok(Pruned::default());
        };
        let max = max.min(compacted.saturating_add(limit));
        let (events, states, transitions, marked): (i64, i64, i64, i64) =
            run!(self, |conn| sqlx::query_as(sql::PRUNE)
                .bind(tenant)
                .bind(compacted)
                .bind(max)
                .fetch_one(conn))?;
        if marked != 1 {
            return Err(Error::Internal(
                "retention found no counter row for its tenant".into(),
            ));
        }
        Ok(Pruned {
            events: events as u64,
            states: states as u64,
            transitions: transitions as u64,
            cache_entries: 0,
        })
    }

    async fn expire_cache_entries(&mut self, now: Timestamp) -> Result<u64> {
        let done = run!(self, |conn| sqlx::query(sql::EXPIRED_CACHE_ENTRIES)
            .bind(now.as_micros())
            .execute(conn))?;
        Ok(done.rows_affected())
    }

    async fn tenants_with_events_before(&mut self, cutoff: Timestamp) -> Result<Vec<String>> {
        run!(self, |conn| sqlx::query_scalar(
            sql::TENANTS_WITH_EVENTS_BEFORE
        )
        .bind(cutoff.as_micros())
        .fetch_all(conn))
    }
}

/// The ids of `ids` that `written` does not hold.
fn not_written(ids: Vec<String>, written: Vec<String>) -> Vec<String> {
    if written.len() == ids.len() {
        return Vec::new();
    }
    let written: std::collections::HashSet<String> = written.into_iter().collect();
    ids.into_iter().filter(|id| !written.contains(id)).collect()
}

/// A task run's output (JSON text) out of its document, None when it has
/// none.
fn output_of(doc: &str) -> Result<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        run: Run,
    }
    #[derive(serde::Deserialize)]
    struct Run {
        /// Absent is None; a JSON null is an output of null.
        #[serde(default, deserialize_with = "present")]
        output: Option<serde_json::Value>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<serde_json::Value>, D::Error> {
        serde::Deserialize::deserialize(d).map(Some)
    }
    let doc: Doc = serde_json::from_str(doc)
        .map_err(|e| Error::Internal(format!("decoding a document: {e}")))?;
    Ok(doc.run.output.map(|o| o.to_string()))
}

/// The pause deadline the sweeper watches, while the run is PAUSED.
fn pause_deadline(run: &RunCore) -> Option<i64> {
    (run.state.state_type == StateType::Paused)
        .then_some(run.state.details.pause_timeout)
        .flatten()
        .map(Timestamp::as_micros)
}

/// Executions as the columns of a multi-row statement.
struct ExecutionColumns<'a> {
    tenant_id: Vec<&'a str>,
    id: Vec<String>,
    created_at: Vec<i64>,
    task_id: Vec<Option<&'a str>>,
    state_type: Vec<i16>,
    request_id: Vec<Option<&'a str>>,
    request_hash: Vec<Option<&'a str>>,
    deleted_at: Vec<Option<i64>>,
    last_seq: Vec<i64>,
    pause_deadline: Vec<Option<i64>>,
    metadata: Vec<String>,
    doc: Vec<String>,
}

impl<'a> ExecutionColumns<'a> {
    fn of(rows: &[&'a RunRow<'a, Execution>]) -> Result<Self> {
        let n = rows.len();
        let mut c = ExecutionColumns {
            tenant_id: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            task_id: Vec::with_capacity(n),
            state_type: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            request_hash: Vec::with_capacity(n),
            deleted_at: Vec::with_capacity(n),
            last_seq: Vec::with_capacity(n),
            pause_deadline: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            doc: Vec::with_capacity(n),
        };
        for p in rows {
            let e = p.run;
            c.tenant_id.push(&e.tenant_id);
            c.id.push(e.id.to_string());
            c.created_at.push(e.run.created_at.as_micros());
            c.task_id.push(e.task_id.as_deref());
            c.state_type.push(e.run.state.state_type.code() as i16);
            c.request_id.push(e.request_id.as_deref());
            c.request_hash.push(p.request_hash);
            c.deleted_at
                .push(e.run.deleted_at.map(Timestamp::as_micros));
            c.last_seq.push(p.last_seq);
            c.pause_deadline.push(pause_deadline(&e.run));
            c.metadata.push(rows::encode_doc(&e.metadata)?);
            c.doc.push(rows::encode_doc(e)?);
        }
        Ok(c)
    }
}

/// Task runs as the columns of a multi-row statement.
struct TaskRunColumns<'a> {
    tenant_id: Vec<&'a str>,
    id: Vec<String>,
    execution_id: Vec<String>,
    task_key: Vec<&'a str>,
    dynamic_key: Vec<&'a str>,
    created_at: Vec<i64>,
    state_type: Vec<i16>,
    stale: Vec<bool>,
    deleted_at: Vec<Option<i64>>,
    last_seq: Vec<i64>,
    pause_deadline: Vec<Option<i64>>,
    labels: Vec<String>,
    doc: Vec<String>,
}

impl<'a> TaskRunColumns<'a> {
    fn of(rows: &[&'a RunRow<'a, TaskRun>]) -> Result<Self> {
        let n = rows.len();
        let mut c = TaskRunColumns {
            tenant_id: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            execution_id: Vec::with_capacity(n),
            task_key: Vec::with_capacity(n),
            dynamic_key: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            state_type: Vec::with_capacity(n),
            stale: Vec::with_capacity(n),
            deleted_at: Vec::with_capacity(n),
            last_seq: Vec::with_capacity(n),
            pause_deadline: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            doc: Vec::with_capacity(n),
        };
        for p in rows {
            let t = p.run;
            c.tenant_id.push(&t.tenant_id);
            c.id.push(t.id.to_string());
            c.execution_id.push(t.execution_id.to_string());
            c.task_key.push(&t.task_key);
            c.dynamic_key.push(&t.dynamic_key);
            c.created_at.push(t.run.created_at.as_micros());
            c.state_type.push(t.run.state.state_type.code() as i16);
            c.stale.push(t.stale);
            c.deleted_at
                .push(t.run.deleted_at.map(Timestamp::as_micros));
            c.last_seq.push(p.last_seq);
            c.pause_deadline.push(pause_deadline(&t.run));
            c.labels.push(rows::encode_doc(&t.labels)?);
            c.doc.push(rows::encode_doc(t)?);
        }
        Ok(c)
    }
}

/// History rows as the columns of an UNNEST insert.
struct StateColumns<'a> {
    tenants: Vec<&'a str>,
    runs: Vec<&'a str>,
    ids: Vec<String>,
    docs: Vec<String>,
}

impl<'a> StateColumns<'a> {
    fn of(states: &'a [StateRow]) -> Result<Self> {
        let n = states.len();
        let mut c = StateColumns {
            tenants: Vec::with_capacity(n),
            runs: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            docs: Vec::with_capacity(n),
        };
        for (tenant, run_id, state) in states {
            c.tenants.push(tenant.as_str());
            c.runs.push(run_id.as_str());
            c.ids.push(state.id.to_string());
            c.docs.push(rows::encode_doc(state)?);
        }
        Ok(c)
    }
}

/// Events as the columns of an UNNEST insert.
struct EventColumns<'a> {
    tenants: Vec<&'a str>,
    seqs: Vec<i64>,
    executions: Vec<&'a str>,
    task_runs: Vec<Option<&'a str>>,
    task_ids: Vec<Option<&'a str>>,
    occurred: Vec<i64>,
    formats: Vec<i16>,
    payloads: Vec<&'a [u8]>,
}

impl<'a> EventColumns<'a> {
    fn of(events: &[EventRow<'a>]) -> Self {
        let n = events.len();
        let mut c = EventColumns {
            tenants: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            executions: Vec::with_capacity(n),
            task_runs: Vec::with_capacity(n),
            task_ids: Vec::with_capacity(n),
            occurred: Vec::with_capacity(n),
            formats: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
        };
        for e in events {
            let s = e.event;
            c.tenants.push(s.tenant_id.as_str());
            c.seqs.push(s.seq);
            c.executions.push(s.execution_id.as_str());
            c.task_runs.push(s.task_run_id.as_deref());
            c.task_ids.push(s.task_id.as_deref());
            c.occurred.push(e.occurred_at);
            c.formats.push(e.format);
            c.payloads.push(e.bytes);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_is_taken_out_of_a_document_as_written() {
        let doc = r#"{"id":"x","run":{"state":{},"output":{"a":[1,2.5],"b":"a\u0000b"}}}"#;
        assert_eq!(
            output_of(doc).unwrap().as_deref(),
            Some(r#"{"a":[1,2.5],"b":"a\u0000b"}"#)
        );
        assert_eq!(
            output_of(r#"{"run":{"output":null}}"#).unwrap().as_deref(),
            Some("null")
        );
        assert_eq!(output_of(r#"{"run":{}}"#).unwrap(), None);
        assert!(output_of("{").is_err());
    }
}
