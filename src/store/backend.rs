//! The storage seam: what a backend (SQLite, PostgreSQL) provides. The
//! write path (batches, the overlay of pending runs, sequence numbers,
//! idempotency retries) is written once in `batch` and `writer` on top of
//! [`TxBackend`]; reads go through [`ReadBackend`]. Backends convert their
//! rows to domain types themselves: nothing above this seam sees SQL.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;

use super::{
    Cursor, ExecutionFilter, HistoryPage, LogPage, LogScope, Page, Pruned, Snapshot, TaskRunFilter,
    TaskRunPage,
};
use crate::{
    Result,
    domain::{Execution, ExecutionId, State, TaskRun, TaskRunId, Timestamp},
    keys::{ActiveKey, KeySet},
};

/// A run waiting in a batch to be written, with what its row needs beside
/// the document.
#[derive(Debug)]
pub(crate) struct RunRow<'a, R> {
    pub run: &'a R,
    /// The sequence of the run's latest event.
    pub last_seq: i64,
    /// The fingerprint of the request that created the execution.
    pub request_hash: Option<&'a str>,
    /// Whether the batch created the run (an insert that may meet a run
    /// stored under the same idempotency key) or changed a stored one.
    pub new: bool,
}

/// A history row: tenant, run id, state.
pub(crate) type StateRow = (String, String, State);

/// An event as a batch writes it to the log.
#[derive(Debug)]
pub(crate) struct EventRow<'a> {
    pub event: &'a super::StoredEvent,
    pub occurred_at: i64,
    pub format: i16,
    pub bytes: &'a [u8],
}

/// The primitives of one write transaction, on the writer's connection.
/// Reads made here see the transaction's own writes. A backend shared by
/// several writers (several replicas on one database) needs no lock on the
/// rows it reads: a transaction locks the counter row of a tenant before
/// it reads anything of the tenant ([`lock_heads`](TxBackend::lock_heads)),
/// so a tenant's readers take turns and each reads what the last one
/// committed. A transaction that only adds new runs (which nobody else
/// can have read) takes the row when it numbers its events
/// ([`seal`](TxBackend::seal)), just before it commits.
#[async_trait]
pub(crate) trait TxBackend: Send {
    async fn begin(&mut self) -> Result<()>;
    async fn commit(&mut self) -> Result<()>;
    /// Rolls back whatever is open; never fails (a failure to roll back
    /// leaves nothing open to undo).
    async fn rollback(&mut self);
    async fn close(self: Box<Self>);

    /// Whether this writer is the database's only one, so that it may
    /// remember runs between transactions.
    fn sole_writer(&self) -> bool;

    /// Whether `e` means the transaction lost a race with another writer
    /// (a deadlock or serialization failure) and may simply run again.
    fn is_retryable(&self, e: &crate::Error) -> bool;

    async fn execution(&mut self, tenant: &str, id: ExecutionId) -> Result<Option<Execution>>;
    async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>>;
    /// The execution created with `request_id`, and its request fingerprint.
    async fn execution_by_request_id(
        &mut self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<(Execution, String)>>;
    /// The request fingerprint stored with an execution ("" when none).
    async fn request_hash(&mut self, tenant: &str, id: ExecutionId) -> Result<String>;
    async fn task_run_by_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>>;
    async fn count_task_runs_for_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64>;
    /// Every task run of an execution, oldest first.
    async fn task_runs_of(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
    ) -> Result<Vec<TaskRun>>;
    /// The latest COMPLETED run of `task_key` other than `except`: its id
    /// and its output as JSON text.
    async fn latest_completed_output(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<Option<(TaskRunId, Option<String>)>>;
    /// Whether `task_key` has runs other than `except`, and whether one of
    /// those has not ended.
    async fn runs_of_key_exist(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<(bool, bool)>;

    async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>>;
    async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()>;

    /// PAUSED runs whose pause timed out by `now`: (tenant, id) of up to
    /// `limit` executions and task runs each. These are candidates, read
    /// before their tenants are locked: on a shared backend another writer
    /// may have changed (or be about to change) one, so the caller checks
    /// each again once it has read it, under its tenant's lock.
    async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)>;

    /// Adds request counts: (tenant, key id, day, requests to add).
    async fn record_key_usage(&mut self, counts: &[(String, String, i64, i64)]) -> Result<()>;
    /// Records when these API keys (by secret hash) were last used.
    async fn touch_keys(&mut self, hashes: &[String], at: Timestamp) -> Result<()>;

    /// The recorded first result of a transition_id, as JSON.
    async fn transition(
        &mut self,
        tenant: &str,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>>;
    async fn record_transition(
        &mut self,
        tenant: &str,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()>;

    /// Writes runs: inserts the new ones, updates the changed ones. A new
    /// run that meets one stored under the same id or idempotency key is
    /// not written; the ids of those are returned.
    async fn write_runs(
        &mut self,
        executions: &[RunRow<'_, Execution>],
        task_runs: &[RunRow<'_, TaskRun>],
    ) -> Result<Vec<String>>;
    async fn insert_states(&mut self, states: &[StateRow]) -> Result<()>;
    async fn insert_events(&mut self, events: &[EventRow<'_>]) -> Result<()>;

    /// The latest sequence given out for each of `tenants`, locked for the
    /// rest of the transaction, which sets them with [`set_heads`].
    async fn lock_heads(&mut self, tenants: &[&str]) -> Result<HashMap<String, i64>>;
    /// Records the latest sequence given out for each tenant.
    async fn set_heads(&mut self, heads: &[(&str, i64)]) -> Result<()>;

    /// Whether events are numbered when the transaction ends ([`seal`])
    /// rather than as they are appended: a backend other writers share
    /// takes a tenant's counter row as late as it can, so that writers
    /// hold it only while they finish, not while they work.
    ///
    /// [`seal`]: TxBackend::seal
    fn numbers_at_commit(&self) -> bool {
        false
    }

    /// Of new runs about to be written, those that meet a stored run
    /// under the same id or idempotency key: their ids.
    async fn stored_conflicts(
        &mut self,
        _executions: &[RunRow<'_, Execution>],
        _task_runs: &[RunRow<'_, TaskRun>],
    ) -> Result<Vec<String>> {
        Err(crate::Error::Internal(
            "this backend writes new runs as they are flushed".into(),
        ))
    }

    /// Ends the transaction's writes: writes the events, numbered 1, 2, ...
    /// per tenant in the transaction (`counts`: how many each tenant has),
    /// after each tenant's head, which it raises and locks until the
    /// commit; the new runs not written yet, their latest sequences
    /// numbered the same way; and the history rows not written yet. A
    /// batch that wrote nothing before may commit with it (then `commit`
    /// has nothing left to do). Returns each tenant's head as it was before;
    /// a retryable error if one of the new runs met a run stored meanwhile
    /// under the same idempotency key.
    async fn seal(
        &mut self,
        _counts: &[(&str, i64)],
        _events: &[EventRow<'_>],
        _executions: &[RunRow<'_, Execution>],
        _task_runs: &[RunRow<'_, TaskRun>],
        _states: &[StateRow],
    ) -> Result<HashMap<String, i64>> {
        Err(crate::Error::Internal(
            "this backend numbers events as they are appended".into(),
        ))
    }

    /// Applies retention to one tenant's log: removes up to `limit` of its
    /// events that occurred before `cutoff` (the oldest first) and raises
    /// its compaction mark; a finished run (COMPLETED, CANCELLED or
    /// deleted) whose last event goes loses its older history rows and its
    /// recorded transition results, keeping its current state.
    async fn prune(&mut self, tenant: &str, cutoff: Timestamp, limit: i64) -> Result<Pruned>;
    /// Removes cache entries expired by `now`; returns how many.
    async fn expire_cache_entries(&mut self, now: Timestamp) -> Result<u64>;
    /// Tenants whose logs hold events that occurred before `cutoff`.
    async fn tenants_with_events_before(&mut self, cutoff: Timestamp) -> Result<Vec<String>>;
}

/// Reads, on the backend's pool of read connections. Each read sees one
/// consistent, committed state.
#[async_trait]
pub(crate) trait ReadBackend: Send + Sync + std::fmt::Debug {
    async fn execution(&self, tenant: &str, id: ExecutionId) -> Result<Option<(Execution, i64)>>;
    async fn task_run(&self, tenant: &str, id: TaskRunId) -> Result<Option<(TaskRun, i64)>>;
    async fn list_executions(
        &self,
        tenant: &str,
        filter: &ExecutionFilter,
        page: &Page,
    ) -> Result<(Vec<Execution>, Option<Cursor>)>;
    async fn list_task_runs(
        &self,
        tenant: &str,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)>;
    async fn states(
        &self,
        tenant: &str,
        run_id: &str,
        page: &HistoryPage,
    ) -> Result<(Vec<State>, Option<String>)>;
    async fn events_after(
        &self,
        scope: &LogScope,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<LogPage>;
    async fn head(&self, tenant: &str) -> Result<i64>;
    /// The latest sequence of each tenant that has one.
    async fn heads(&self, tenants: &[String]) -> Result<HashMap<String, i64>>;
    async fn compacted_seq(&self, tenant: &str) -> Result<i64>;
    async fn execution_snapshot(
        &self,
        tenant: &str,
        id: ExecutionId,
        include_task_runs: bool,
    ) -> Result<Snapshot>;
    async fn task_runs_after(
        &self,
        tenant: &str,
        execution: ExecutionId,
        after: i64,
        head: i64,
    ) -> Result<TaskRunPage>;
    async fn task_run_snapshot(
        &self,
        tenant: &str,
        id: TaskRunId,
    ) -> Result<(Option<(TaskRun, i64)>, i64)>;
    async fn load_keys(&self) -> Result<KeySet>;
    async fn find_key(&self, hash: &str) -> Result<Option<ActiveKey>>;
    /// Today's request counts per key id, summed over every writer.
    async fn key_usage(&self, day: i64) -> Result<HashMap<String, i64>>;
    /// See `Store::take_quota`: for a database several servers share (one
    /// server counts its keys' requests itself).
    async fn take_quota(
        &self,
        _tenant: &str,
        _key_id: &str,
        _day: i64,
        _quota: i64,
    ) -> Result<bool> {
        Err(crate::Error::Internal(
            "quotas are taken from the store only on a shared database".into(),
        ))
    }
    /// See `Store::take_token`, likewise.
    async fn take_token(
        &self,
        _tenant: &str,
        _key_id: &str,
        _rate: f64,
    ) -> Result<Option<std::time::Duration>> {
        Err(crate::Error::Internal(
            "rates are taken from the store only on a shared database".into(),
        ))
    }
    async fn close(&self);
}

/// A backend once opened: its reads, and the connection its writer uses.
pub(crate) struct Opened {
    pub reads: Arc<dyn ReadBackend>,
    pub writer: Box<dyn TxBackend>,
    /// Held for as long as the writer runs (a lock that keeps other
    /// servers off a database only one may serve).
    pub guard: Option<Box<dyn std::any::Any + Send>>,
    /// Word of commits other servers make to the same database, for a
    /// backend several servers share.
    pub signals: Option<tokio::sync::mpsc::Receiver<super::CommitSignal>>,
    /// Work beside the writer (SQLite's checkpoints), run on the writer's
    /// thread until the writer ends.
    pub beside: Option<Box<dyn FnOnce(tokio::sync::oneshot::Receiver<()>) -> BesideFuture + Send>>,
}

pub(crate) type BesideFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
