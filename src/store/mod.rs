//! Storage: the ledger's runs, history and event log, behind one seam
//! (`backend`) with a SQLite implementation (`sqlite`, one server per
//! database) and a PostgreSQL one (`postgres`, servers sharing it). Reads
//! go to the backend's read connections; every write goes through the
//! writer, which commits the operations waiting at one moment together
//! (see `writer` and `batch`). The store speaks in domain types only.

mod backend;
mod batch;
#[cfg(test)]
pub(crate) mod conformance;
mod fit;
pub(crate) mod postgres;
mod rows;
mod sqlite;
mod writer;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

pub use crate::domain::page::{
    Cursor, DEFAULT_PAGE_SIZE, ExecutionFilter, HistoryPage, MAX_PAGE_SIZE, Page, TaskRunFilter,
};
pub use batch::WriteTx;
#[cfg(test)]
pub(crate) use conformance::{conformance_suite, conformance_tests};
pub use postgres::EVENTS_CHANNEL;
pub use sqlite::{OpenCause, OpenError};
pub(crate) use writer::TxFuture;
pub use writer::{WriterStats, WriterStopped, WriterTask};

/// The most events one retention transaction removes.
const PRUNE_EVENTS_PER_TRANSACTION: i64 = 20_000;

use crate::{
    Error, Result,
    domain::{EventRecord, Execution, ExecutionId, State, TaskRun, TaskRunId, Timestamp},
};

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// WAL with synchronous=NORMAL: an acknowledged write survives the
    /// process crashing or being killed; a power loss may lose the last
    /// commits.
    Process,
    /// WAL with synchronous=FULL: an acknowledged write also survives a
    /// power loss or OS crash.
    Power,
}

/// Which part of the log a stream reads: the same scope selects the rows
/// of a log read (in SQL) and the events a live subscriber takes from the
/// feed (`matches`).
#[derive(Debug, Clone)]
pub enum LogScope {
    /// Every event of the tenant.
    Tenant(String),
    /// An execution's events and its task runs' events: tenant, execution
    /// id (as text, the way events carry it).
    Execution(String, String),
    /// An execution's own events, without its task runs'.
    ExecutionOnly(String, String),
    /// One task run's events: tenant, task run id.
    TaskRun(String, String),
}

impl LogScope {
    /// The tenant whose events these are.
    pub fn tenant(&self) -> &str {
        match self {
            LogScope::Tenant(t)
            | LogScope::Execution(t, _)
            | LogScope::ExecutionOnly(t, _)
            | LogScope::TaskRun(t, _) => t,
        }
    }

    /// Whether an event about these ids is in the scope: what a log read
    /// of the scope returns.
    pub fn matches(&self, e: &EventIds<'_>) -> bool {
        e.tenant_id == self.tenant()
            && match self {
                LogScope::Tenant(_) => true,
                LogScope::Execution(_, id) => e.execution_id == id,
                LogScope::ExecutionOnly(_, id) => e.execution_id == id && e.task_run_id.is_none(),
                LogScope::TaskRun(_, id) => e.task_run_id == Some(id.as_str()),
            }
    }

    /// Whether an event about these ids is about the scope's run itself:
    /// for a per-run scope, what a log read of [`LogScope::run`] returns;
    /// never for a tenant.
    pub fn is_own(&self, e: &EventIds<'_>) -> bool {
        match self {
            LogScope::Tenant(_) => false,
            LogScope::Execution(t, id) | LogScope::ExecutionOnly(t, id) => {
                e.tenant_id == t && e.execution_id == id && e.task_run_id.is_none()
            }
            LogScope::TaskRun(..) => self.matches(e),
        }
    }

    /// The scope of the run itself, for a per-run scope: an execution
    /// without its task runs, or the task run.
    pub fn run(&self) -> Option<LogScope> {
        match self {
            LogScope::Tenant(_) => None,
            LogScope::Execution(t, id) | LogScope::ExecutionOnly(t, id) => {
                Some(LogScope::ExecutionOnly(t.clone(), id.clone()))
            }
            LogScope::TaskRun(..) => Some(self.clone()),
        }
    }
}

/// The ids an event is selected by.
#[derive(Debug, Clone, Copy)]
pub struct EventIds<'a> {
    pub tenant_id: &'a str,
    pub execution_id: &'a str,
    pub task_run_id: Option<&'a str>,
}

/// An event of the log: its sequence in its tenant's log, the ids streams
/// select on, and the ledger's record of it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub tenant_id: String,
    pub execution_id: String,
    pub task_run_id: Option<String>,
    /// The task_id of the execution the event belongs to.
    pub task_id: Option<String>,
    pub body: EventBody,
}

impl StoredEvent {
    pub fn ids(&self) -> EventIds<'_> {
        EventIds {
            tenant_id: &self.tenant_id,
            execution_id: &self.execution_id,
            task_run_id: self.task_run_id.as_deref(),
        }
    }
}

/// What the log holds of an event.
#[derive(Debug, Clone)]
pub enum EventBody {
    /// The record, as the writer just committed it.
    Record(Arc<EventRecord>),
    /// The record as stored, read back from the log.
    Stored { format: EventFormat, bytes: Vec<u8> },
}

/// How a stored event is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    /// A StatusEvent of API v1, as logs written before event records hold.
    LegacyWire,
    /// An [`EventRecord`], versioned: its first byte tells the version (see
    /// [`EventRecord::decode`]).
    Record,
    /// A format this server does not know.
    Unknown(i64),
}

impl EventFormat {
    pub(crate) fn code(self) -> i64 {
        match self {
            EventFormat::LegacyWire => 1,
            EventFormat::Record => 2,
            EventFormat::Unknown(c) => c,
        }
    }

    pub(crate) fn from_code(code: i64) -> Self {
        match code {
            1 => EventFormat::LegacyWire,
            2 => EventFormat::Record,
            c => EventFormat::Unknown(c),
        }
    }
}

/// A run as a per-run stream's snapshot sees it, with the sequence of its
/// latest event.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub execution: Option<(Execution, i64)>,
    /// The first page of its task runs, when asked for.
    pub task_runs: TaskRunPage,
    /// The tenant log's head when the snapshot was read: everything up to here is
    /// reflected in it, and nothing after it.
    pub head: i64,
}

/// Task runs of an execution in the order of their latest events, each
/// with that event's sequence, and the sequence the next page starts
/// after if one may follow.
#[derive(Debug, Clone, Default)]
pub struct TaskRunPage {
    pub runs: Vec<(TaskRun, i64)>,
    pub next: Option<i64>,
}

/// How many task runs a page of a snapshot holds at most.
pub(crate) const SNAPSHOT_PAGE: i64 = 100;
/// About how many bytes of documents a page of a snapshot holds.
pub(crate) const SNAPSHOT_PAGE_BYTES: usize = 64 * 1024;

/// A handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    reads: Arc<dyn backend::ReadBackend>,
    writes: mpsc::Sender<writer::BoxedOp>,
    stop_writes: tokio_util::sync::CancellationToken,
    stats: Arc<WriterStats>,
    read_stats: Arc<ReadStats>,
    /// Taken by the one who follows other servers' commits.
    signals: Arc<std::sync::Mutex<Option<mpsc::Receiver<CommitSignal>>>>,
    /// Whether other servers may write to the database too.
    shared: bool,
}

/// Counts of reads of the event log, readable while the service runs.
#[derive(Debug, Default)]
pub struct ReadStats {
    log_reads: std::sync::atomic::AtomicU64,
}

impl ReadStats {
    /// Pages of events read from the log.
    pub fn log_reads(&self) -> u64 {
        self.log_reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A page of the event log read for one scope.
#[derive(Debug)]
pub struct LogPage {
    pub events: Vec<StoredEvent>,
    /// The read stopped at a bound: more may follow.
    pub full: bool,
    /// The tenant log's head as the read saw it: when the page is not
    /// full, the scope has no event after the page's up to this sequence.
    pub head: i64,
}

/// Word that a tenant's log has grown, from a database several servers
/// share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitSignal {
    /// The tenant's log reaches at least this sequence.
    Head { tenant: String, head: i64 },
    /// Word may have been missed (the connection that hears it dropped):
    /// every tenant's head should be read again.
    Resync,
}

/// Hears of the events each transaction wrote, once it has committed, in
/// the order of each tenant's log.
pub trait CommitListener: Send + Sync + 'static {
    /// `answer` answers the transaction's callers: the listener calls it
    /// once subscribers can have the events (and must call it in any
    /// case), so that a caller who hears its write succeeded finds its
    /// event already on the way to every subscriber. The writer meanwhile
    /// goes on with the next transaction.
    fn committed(&self, events: Vec<StoredEvent>, answer: Answer);
}

/// Answers the callers of a committed transaction.
pub type Answer = Box<dyn FnOnce() + Send>;

impl Store {
    /// Opens (creating and migrating if needed) the database at `url` and
    /// starts its writer, which tells `listener` of every commit. A SQLite
    /// database is locked against other servers for as long as the writer
    /// runs.
    pub async fn open(
        url: &str,
        durability: Durability,
        listener: Arc<dyn CommitListener>,
    ) -> Result<(Store, WriterTask), OpenError> {
        let (opened, path) = match crate::database_url::backend(url) {
            Ok(crate::database_url::Backend::Sqlite) => {
                (sqlite::open(url, durability).await?, sqlite::path_of(url))
            }
            Ok(crate::database_url::Backend::Postgres) => {
                let shown = std::path::PathBuf::from(crate::database_url::redacted(url));
                (postgres::open(url).await?, shown)
            }
            Err(e) => {
                return Err(OpenError::new(
                    crate::database_url::redacted(url),
                    OpenCause::Url(e.to_string()),
                ));
            }
        };
        let (tx, rx) = mpsc::channel(4096);
        let stop_writes = tokio_util::sync::CancellationToken::new();
        let stats = Arc::new(WriterStats::default());
        let writer = writer::start(
            opened.writer,
            opened.guard,
            opened.beside,
            rx,
            stop_writes.clone(),
            listener,
            Arc::clone(&stats),
        )
        .await
        .map_err(|e| OpenError::new(&path, OpenCause::Writer(e.to_string())))?;
        let shared = opened.signals.is_some();
        Ok((
            Store {
                reads: opened.reads,
                writes: tx,
                stop_writes,
                stats,
                read_stats: Arc::default(),
                signals: Arc::new(std::sync::Mutex::new(opened.signals)),
                shared,
            },
            writer,
        ))
    }

    /// Whether other servers may write to the database too: then this
    /// server's commits are not all there is, and [`Store::take_signals`]
    /// tells of the others'.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Word of commits to the database by any server, for the one who
    /// follows them (None once taken, or for a database only this server
    /// writes).
    pub fn take_signals(&self) -> Option<mpsc::Receiver<CommitSignal>> {
        self.signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Counts of the writer's work.
    pub fn writer_stats(&self) -> Arc<WriterStats> {
        Arc::clone(&self.stats)
    }

    /// Counts of reads of the event log.
    pub fn read_stats(&self) -> Arc<ReadStats> {
        Arc::clone(&self.read_stats)
    }

    /// Runs `f`, which changes `tenant`'s runs, in the writer's next
    /// transaction and answers once it has committed.
    pub(crate) async fn write<T, F>(&self, tenant: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a, 'c> FnMut(&'a mut WriteTx<'c>) -> TxFuture<'a, T> + Send + 'static,
    {
        self.write_op(Some(tenant.into()), f).await
    }

    /// Runs `f`, which is no one tenant's (or several tenants'), in the
    /// writer's next transaction and answers once it has committed.
    pub(crate) async fn write_system<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a, 'c> FnMut(&'a mut WriteTx<'c>) -> TxFuture<'a, T> + Send + 'static,
    {
        self.write_op(None, f).await
    }

    async fn write_op<T, F>(&self, tenant: Option<Arc<str>>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a, 'c> FnMut(&'a mut WriteTx<'c>) -> TxFuture<'a, T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = writer::ClosureOp::new(tenant, f, reply);
        self.writes
            .send(Box::new(op))
            .await
            .map_err(|_| Error::Unavailable)?;
        answer.await.map_err(|_| Error::Unavailable)?
    }

    pub async fn execution(
        &self,
        tenant: &str,
        id: ExecutionId,
    ) -> Result<Option<(Execution, i64)>> {
        self.reads.execution(tenant, id).await
    }

    pub async fn task_run(&self, tenant: &str, id: TaskRunId) -> Result<Option<(TaskRun, i64)>> {
        self.reads.task_run(tenant, id).await
    }

    /// Newest first: a page that fits in one response.
    pub async fn list_executions(
        &self,
        tenant: &str,
        filter: &ExecutionFilter,
        page: &Page,
    ) -> Result<(Vec<Execution>, Option<Cursor>)> {
        self.reads.list_executions(tenant, filter, page).await
    }

    /// Newest first: a page that fits in one response.
    pub async fn list_task_runs(
        &self,
        tenant: &str,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)> {
        self.reads.list_task_runs(tenant, filter, page).await
    }

    /// A page of a run's state history, oldest first, that fits in one
    /// response, and the token of the next page if there is one.
    pub async fn states(
        &self,
        tenant: &str,
        run_id: &str,
        page: &HistoryPage,
    ) -> Result<(Vec<State>, Option<String>)> {
        self.reads.states(tenant, run_id, page).await
    }

    /// Events of `scope` with sequence above `after`, in order: up to
    /// `limit` of them, stopping once they hold `max_bytes` (at least one
    /// event), with the tenant log's head read in the same transaction.
    pub async fn events_after(
        &self,
        scope: &LogScope,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<LogPage> {
        self.read_stats
            .log_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reads
            .events_after(scope, after, limit, max_bytes)
            .await
    }

    /// The latest sequence the tenant's log has given out.
    pub async fn head(&self, tenant: &str) -> Result<i64> {
        self.reads.head(tenant).await
    }

    /// The latest sequence of each of `tenants` that has one.
    pub async fn heads(
        &self,
        tenants: &[String],
    ) -> Result<std::collections::HashMap<String, i64>> {
        self.reads.heads(tenants).await
    }

    /// The highest sequence retention has removed from the tenant's log.
    pub async fn compacted_seq(&self, tenant: &str) -> Result<i64> {
        self.reads.compacted_seq(tenant).await
    }

    /// An execution (and optionally its task runs) with the tenant log's
    /// head, read in one consistent transaction.
    pub async fn execution_snapshot(
        &self,
        tenant: &str,
        id: ExecutionId,
        include_task_runs: bool,
    ) -> Result<Snapshot> {
        self.reads
            .execution_snapshot(tenant, id, include_task_runs)
            .await
    }

    /// The next page of an execution's task runs for a snapshot taken at
    /// `head`: those whose latest event is after `after` and not after
    /// `head`. A task run changed (or created) since the snapshot's head is
    /// left out: its own later events show it.
    pub async fn task_runs_after(
        &self,
        tenant: &str,
        execution: ExecutionId,
        after: i64,
        head: i64,
    ) -> Result<TaskRunPage> {
        self.reads
            .task_runs_after(tenant, execution, after, head)
            .await
    }

    /// A task run with the tenant log's head, read in one consistent
    /// transaction.
    pub async fn task_run_snapshot(
        &self,
        tenant: &str,
        id: TaskRunId,
    ) -> Result<(Option<(TaskRun, i64)>, i64)> {
        self.reads.task_run_snapshot(tenant, id).await
    }

    /// Applies retention through the writer, tenant by tenant: removes the
    /// events older than `cutoff`, the history rows and transition results
    /// of finished runs whose last event that removes (each keeps its
    /// current state), and cache entries expired by now. A long backlog
    /// goes in several transactions, so that other writes wait for none of
    /// them for long.
    pub async fn prune(&self, cutoff: Timestamp) -> Result<Pruned> {
        let now = Timestamp::now();
        let mut total = Pruned {
            cache_entries: self
                .write_system(move |tx| Box::pin(tx.expire_cache_entries(now)))
                .await?,
            ..Pruned::default()
        };
        let tenants = self
            .write_system(move |tx| Box::pin(tx.tenants_with_events_before(cutoff)))
            .await?;
        for tenant in tenants {
            let tenant: Arc<str> = tenant.into();
            loop {
                let t = Arc::clone(&tenant);
                let round = self
                    .write(&tenant, move |tx| {
                        let t = Arc::clone(&t);
                        Box::pin(
                            async move { tx.prune(&t, cutoff, PRUNE_EVENTS_PER_TRANSACTION).await },
                        )
                    })
                    .await?;
                total.events += round.events;
                total.states += round.states;
                total.transitions += round.transitions;
                if round.events < PRUNE_EVENTS_PER_TRANSACTION as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// The API keys in force.
    pub async fn load_keys(&self) -> Result<crate::keys::KeySet> {
        self.reads.load_keys().await
    }

    /// The key in force with this secret hash.
    pub async fn find_key(&self, hash: &str) -> Result<Option<crate::keys::ActiveKey>> {
        self.reads.find_key(hash).await
    }

    /// Today's request counts per key id.
    pub async fn key_usage(&self, day: i64) -> Result<std::collections::HashMap<String, i64>> {
        self.reads.key_usage(day).await
    }

    /// Takes one request from a key's daily quota, for every server on
    /// the database: false when the day's count has reached `quota`.
    pub async fn take_quota(
        &self,
        tenant: &str,
        key_id: &str,
        day: i64,
        quota: i64,
    ) -> Result<bool> {
        self.reads.take_quota(tenant, key_id, day, quota).await
    }

    /// Takes one token from a key's bucket (`rate` per second, as many at
    /// once), for every server on the database: how long to wait when
    /// none is left.
    pub async fn take_token(
        &self,
        tenant: &str,
        key_id: &str,
        rate: f64,
    ) -> Result<Option<std::time::Duration>> {
        self.reads.take_token(tenant, key_id, rate).await
    }

    /// Adds request counts: (tenant, key id, day, requests to add).
    pub async fn record_key_usage(&self, counts: Vec<(String, String, i64, i64)>) -> Result<()> {
        let counts = Arc::new(counts);
        self.write_system(move |tx| {
            let counts = Arc::clone(&counts);
            Box::pin(async move { tx.record_key_usage(&counts).await })
        })
        .await
    }

    /// Records when these keys (by secret hash) were last used.
    pub async fn touch_keys(&self, hashes: Vec<String>) -> Result<()> {
        let hashes = Arc::new(hashes);
        self.write_system(move |tx| {
            let hashes = Arc::clone(&hashes);
            Box::pin(async move { tx.touch_keys(&hashes, Timestamp::now()).await })
        })
        .await
    }

    /// Closes the read connections: later reads fail, and this waits for
    /// the connections in use to come back.
    pub async fn close_reads(&self) {
        self.reads.close().await;
    }

    /// Tells the writer to stop, whoever still holds a handle: it commits
    /// the writes it has already accepted, answers later ones UNAVAILABLE,
    /// and ends ([`WriterTask::wait`]).
    pub fn stop_writes(&self) {
        self.stop_writes.cancel();
    }
}

/// What one round of retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    /// History rows of finished runs.
    pub states: u64,
    /// Recorded transition results of finished runs.
    pub transitions: u64,
    /// Expired cache entries.
    pub cache_entries: u64,
}
