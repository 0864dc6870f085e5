//! The single writer: every change goes through one task that commits the
//! operations waiting at that moment together, in one transaction (group
//! commit). A caller is answered only after its transaction commits, and
//! subscribers hear of the events only then.

use std::{future::Future, pin::Pin, sync::Arc};

use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::{
    Error, Result,
    domain::{Event, Execution, ExecutionId, State, TaskRun, TaskRunId, Timestamp},
    stream::{Feed, LoggedEvent},
};

use super::rows;

/// The most operations one transaction commits.
const MAX_BATCH: usize = 512;

/// A boxed future borrowing the write transaction.
pub(crate) type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The view an operation has of the open write transaction. Reads see the
/// writes of earlier operations in the same batch.
#[derive(Debug)]
pub struct WriteTx<'c> {
    conn: &'c mut SqliteConnection,
    next_seq: i64,
    events: Vec<Arc<LoggedEvent>>,
    /// Statements that changed something since the current operation began.
    writes_in_op: usize,
}

impl WriteTx<'_> {
    pub fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    pub async fn execution(&mut self, tenant: &str, id: ExecutionId) -> Result<Option<Execution>> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT doc FROM executions WHERE tenant_id = ? AND id = ?")
                .bind(tenant)
                .bind(id.to_string())
                .fetch_optional(&mut *self.conn)
                .await?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    /// The execution created with `request_id`, and its request fingerprint.
    pub async fn execution_by_request_id(
        &mut self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<(Execution, String)>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT doc, request_hash FROM executions WHERE tenant_id = ? AND request_id = ?",
        )
        .bind(tenant)
        .bind(request_id)
        .fetch_optional(&mut *self.conn)
        .await?;
        row.map(|(doc, hash)| Ok((rows::decode_doc(&doc)?, hash.unwrap_or_default())))
            .transpose()
    }

    pub async fn save_execution(
        &mut self,
        e: &Execution,
        request_hash: Option<&str>,
        last_seq: i64,
    ) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query(
            "INSERT INTO executions (id, tenant_id, created_at, task_id, state_type, request_id, \
             request_hash, deleted_at, last_seq, doc, pause_deadline) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET state_type = excluded.state_type, \
             deleted_at = excluded.deleted_at, last_seq = excluded.last_seq, doc = excluded.doc, \
             pause_deadline = excluded.pause_deadline",
        )
        .bind(e.id.to_string())
        .bind(&e.tenant_id)
        .bind(e.run.created_at.as_micros())
        .bind(&e.task_id)
        .bind(e.run.state.state_type.code())
        .bind(&e.request_id)
        .bind(request_hash)
        .bind(e.run.deleted_at.map(Timestamp::as_micros))
        .bind(last_seq)
        .bind(rows::encode_doc(e)?)
        .bind(pause_deadline(&e.run))
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    pub async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT doc FROM task_runs WHERE tenant_id = ? AND id = ?")
                .bind(tenant)
                .bind(id.to_string())
                .fetch_optional(&mut *self.conn)
                .await?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    pub async fn task_run_by_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        let doc: Option<String> = sqlx::query_scalar(
            "SELECT doc FROM task_runs WHERE execution_id = ? AND task_key = ? AND dynamic_key = ?",
        )
        .bind(execution_id.to_string())
        .bind(task_key)
        .bind(dynamic_key)
        .fetch_optional(&mut *self.conn)
        .await?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    /// How many task runs the execution has for `task_key`.
    pub async fn count_task_runs_for_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM task_runs WHERE execution_id = ? AND task_key = ?",
        )
        .bind(execution_id.to_string())
        .bind(task_key)
        .fetch_one(&mut *self.conn)
        .await?)
    }

    pub async fn save_task_run(&mut self, t: &TaskRun, last_seq: i64) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query(
            "INSERT INTO task_runs (id, tenant_id, execution_id, task_key, dynamic_key, created_at, \
             state_type, stale, deleted_at, last_seq, doc, pause_deadline) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET state_type = excluded.state_type, \
             stale = excluded.stale, deleted_at = excluded.deleted_at, \
             last_seq = excluded.last_seq, doc = excluded.doc, \
             pause_deadline = excluded.pause_deadline",
        )
        .bind(t.id.to_string())
        .bind(&t.tenant_id)
        .bind(t.execution_id.to_string())
        .bind(&t.task_key)
        .bind(&t.dynamic_key)
        .bind(t.run.created_at.as_micros())
        .bind(t.run.state.state_type.code())
        .bind(t.stale)
        .bind(t.run.deleted_at.map(Timestamp::as_micros))
        .bind(last_seq)
        .bind(rows::encode_doc(t)?)
        .bind(pause_deadline(&t.run))
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    /// Every task run of an execution, oldest first.
    pub async fn task_runs_of(&mut self, execution_id: ExecutionId) -> Result<Vec<TaskRun>> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM task_runs WHERE execution_id = ? ORDER BY created_at, id",
        )
        .bind(execution_id.to_string())
        .fetch_all(&mut *self.conn)
        .await?;
        docs.iter().map(|d| rows::decode_doc(d)).collect()
    }

    /// The runs of one task key in an execution, newest first.
    pub async fn task_runs_by_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<Vec<TaskRun>> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM task_runs WHERE execution_id = ? AND task_key = ? \
             ORDER BY created_at DESC, id DESC",
        )
        .bind(execution_id.to_string())
        .bind(task_key)
        .fetch_all(&mut *self.conn)
        .await?;
        docs.iter().map(|d| rows::decode_doc(d)).collect()
    }

    /// The tenant's cached result for `key`: output and expiration.
    pub async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>> {
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT output, expiration FROM cache_entries WHERE tenant_id = ? AND cache_key = ?",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(&mut *self.conn)
        .await?;
        row.map(|(output, exp)| {
            let output = output.map(|o| rows::decode_doc(&o)).transpose()?;
            Ok((output, exp.map(Timestamp::from_micros)))
        })
        .transpose()
    }

    pub async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query(
            "INSERT INTO cache_entries (tenant_id, cache_key, task_run_id, output, expiration, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, cache_key) DO UPDATE SET \
             task_run_id = excluded.task_run_id, output = excluded.output, \
             expiration = excluded.expiration, created_at = excluded.created_at",
        )
        .bind(tenant)
        .bind(key)
        .bind(run.to_string())
        .bind(output.map(rows::encode_doc).transpose()?)
        .bind(expiration.map(Timestamp::as_micros))
        .bind(Timestamp::now().as_micros())
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    /// PAUSED runs whose pause timed out by `now`: (tenant, id) of up to
    /// `limit` executions and task runs each.
    pub async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        let executions = sqlx::query_as(
            "SELECT tenant_id, id FROM executions WHERE pause_deadline <= ? LIMIT ?",
        )
        .bind(now.as_micros())
        .bind(limit)
        .fetch_all(&mut *self.conn)
        .await?;
        let task_runs =
            sqlx::query_as("SELECT tenant_id, id FROM task_runs WHERE pause_deadline <= ? LIMIT ?")
                .bind(now.as_micros())
                .bind(limit)
                .fetch_all(&mut *self.conn)
                .await?;
        Ok((executions, task_runs))
    }

    /// Appends a state to a run's history.
    pub async fn append_state(&mut self, tenant: &str, run_id: &str, state: &State) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query("INSERT INTO states (id, tenant_id, run_id, doc) VALUES (?, ?, ?, ?)")
            .bind(state.id.to_string())
            .bind(tenant)
            .bind(run_id)
            .bind(rows::encode_doc(state)?)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    /// The recorded first result of a transition_id, as JSON.
    pub async fn transition(
        &mut self,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT result FROM transitions WHERE run_id = ? AND transition_id = ?",
        )
        .bind(run_id)
        .bind(transition_id)
        .fetch_optional(&mut *self.conn)
        .await?)
    }

    pub async fn record_transition(
        &mut self,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query("INSERT INTO transitions (run_id, transition_id, result) VALUES (?, ?, ?)")
            .bind(run_id)
            .bind(transition_id)
            .bind(result_json)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    /// Appends an event to the log and returns its sequence. Subscribers
    /// receive it once the transaction commits.
    pub async fn append_event(&mut self, event: &Event<'_>) -> Result<i64> {
        self.writes_in_op += 1;
        let seq = self.next_seq;
        let logged = LoggedEvent::new(seq, event);
        sqlx::query(
            "INSERT INTO events (seq, tenant_id, execution_id, task_run_id, task_id, occurred_at, payload) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(seq)
        .bind(&logged.tenant_id)
        .bind(&logged.execution_id)
        .bind(&logged.task_run_id)
        .bind(&logged.task_id)
        .bind(event.occurred_at.as_micros())
        .bind(logged.encode())
        .execute(&mut *self.conn)
        .await?;
        self.next_seq += 1;
        self.events.push(Arc::new(logged));
        Ok(seq)
    }

    /// Removes events that occurred before `cutoff` and raises the
    /// compaction mark. Returns how many were removed.
    pub(crate) async fn prune_events(&mut self, cutoff: Timestamp) -> Result<u64> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE occurred_at < ?")
                .bind(cutoff.as_micros())
                .fetch_one(&mut *self.conn)
                .await?;
        let Some(max) = max else { return Ok(0) };
        self.writes_in_op += 1;
        let removed = sqlx::query("DELETE FROM events WHERE seq <= ?")
            .bind(max)
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        sqlx::query("UPDATE counters SET value = MAX(value, ?) WHERE name = 'compacted_seq'")
            .bind(max)
            .execute(&mut *self.conn)
            .await?;
        Ok(removed)
    }
}

/// The pause deadline the sweeper watches, while the run is PAUSED.
fn pause_deadline(run: &crate::domain::RunCore) -> Option<i64> {
    (run.state.state_type == crate::domain::StateType::Paused)
        .then_some(run.state.details.pause_timeout)
        .flatten()
        .map(Timestamp::as_micros)
}

/// One unit of work for the writer.
pub(crate) trait WriteOp: Send {
    /// Runs the operation in the open transaction. Err means the database
    /// failed and the transaction must roll back; the operation's own
    /// answer (which may be a refusal) is kept inside it.
    fn apply<'a, 'c>(&'a mut self, tx: &'a mut WriteTx<'c>) -> TxFuture<'a, ()>
    where
        'c: 'a;

    /// Answers the caller: with the kept answer if the transaction
    /// committed, with `failure` otherwise.
    fn finish(self: Box<Self>, failure: Option<Error>);
}

/// An operation made from a closure that may run more than once (a batch
/// that fails is retried one operation at a time).
pub(crate) struct ClosureOp<T, F> {
    f: F,
    answer: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> ClosureOp<T, F> {
    pub(crate) fn new(f: F, reply: oneshot::Sender<Result<T>>) -> Self {
        Self {
            f,
            answer: None,
            reply,
        }
    }
}

impl<T, F> WriteOp for ClosureOp<T, F>
where
    T: Send,
    F: for<'a, 'c> FnMut(&'a mut WriteTx<'c>) -> TxFuture<'a, T> + Send,
{
    fn apply<'a, 'c>(&'a mut self, tx: &'a mut WriteTx<'c>) -> TxFuture<'a, ()>
    where
        'c: 'a,
    {
        Box::pin(async move {
            tx.writes_in_op = 0;
            let answer = (self.f)(tx).await;
            match answer {
                // A database error, or a refusal after something was
                // written: the transaction cannot commit as it is.
                Err(e @ Error::Internal(_)) => Err(e),
                Err(e) if tx.writes_in_op > 0 => {
                    error!(error = %e, "operation refused after writing; rolling back");
                    Err(Error::Internal("refused after writing".into()))
                }
                answer => {
                    self.answer = Some(answer);
                    Ok(())
                }
            }
        })
    }

    fn finish(self: Box<Self>, failure: Option<Error>) {
        let answer = match failure {
            Some(e) => Err(e),
            None => self
                .answer
                .unwrap_or_else(|| Err(Error::Internal("operation did not run".into()))),
        };
        // The caller may have gone away; its write stands regardless.
        let _ = self.reply.send(answer);
    }
}

impl<T, F> std::fmt::Debug for ClosureOp<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClosureOp")
    }
}

pub(crate) type BoxedOp = Box<dyn WriteOp>;

/// Runs until every sender is gone, then returns after the last commit.
pub(crate) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<BoxedOp>,
    feed: Feed,
    mut next_seq: i64,
) {
    let mut batch: Vec<BoxedOp> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit(&mut conn, &mut batch, next_seq).await {
            Ok(events) => {
                next_seq += events.len() as i64;
                feed.publish(events);
                for op in batch.drain(..) {
                    op.finish(None);
                }
            }
            Err(e) => {
                warn!(error = %e, ops = batch.len(), "batch failed; retrying its operations one by one");
                for op in batch.drain(..) {
                    let mut one = vec![op];
                    match commit(&mut conn, &mut one, next_seq).await {
                        Ok(events) => {
                            next_seq += events.len() as i64;
                            feed.publish(events);
                            if let Some(op) = one.pop() {
                                op.finish(None)
                            }
                        }
                        Err(e) => {
                            error!(error = %e, "write failed");
                            if let Some(op) = one.pop() {
                                op.finish(Some(Error::Internal(e.to_string())))
                            }
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = conn.close().await {
        warn!(error = %e, "closing the write connection");
    }
}

/// Applies `ops` in one transaction and commits it, returning the events
/// written; on error everything is rolled back.
async fn commit(
    conn: &mut SqliteConnection,
    ops: &mut [BoxedOp],
    next_seq: i64,
) -> Result<Vec<Arc<LoggedEvent>>> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let mut tx = WriteTx {
        conn,
        next_seq,
        events: Vec::new(),
        writes_in_op: 0,
    };
    let mut result = Ok(());
    for op in ops.iter_mut() {
        result = op.apply(&mut tx).await;
        if result.is_err() {
            break;
        }
    }
    let events = std::mem::take(&mut tx.events);
    match result {
        Ok(()) => match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(events),
            Err(e) => {
                rollback(conn).await;
                Err(e.into())
            }
        },
        Err(e) => {
            rollback(conn).await;
            Err(e)
        }
    }
}

async fn rollback(conn: &mut SqliteConnection) {
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
        // Nothing was open (the failure ended the transaction already).
        warn!(error = %e, "rollback");
    }
}
