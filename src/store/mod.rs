//! Storage: SQLite through sqlx. Reads use a pool of read-only connections;
//! every write goes through the single writer (see `writer`).

mod open;
mod page;
#[cfg(test)]
mod plans;
mod rows;
pub(crate) mod sql;
mod tx;
mod writer;

use std::{str::FromStr, time::Duration};

use sqlx::{
    Connection, QueryBuilder, Sqlite, SqliteConnection, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{mpsc, oneshot};

pub use open::{OpenCause, OpenError};
pub use page::{Cursor, DEFAULT_PAGE_SIZE, HistoryPage, MAX_PAGE_SIZE, Page};
pub use tx::{Pruned, WriteTx};
pub(crate) use writer::TxFuture;
pub use writer::{WriterStats, WriterStopped, WriterTask};

/// The most rows a read connection fetches ahead of its reader.
const READ_ROW_BUFFER: usize = 16;

/// The most events one retention transaction removes.
const PRUNE_EVENTS_PER_TRANSACTION: i64 = 20_000;

use crate::{
    Error, Result,
    domain::{Execution, ExecutionId, State, StateType, TaskRun, TaskRunId, Timestamp, document},
    stream::{Feed, LoggedEvent},
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

/// Which executions a list returns.
#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub task_id: Option<String>,
    pub state_types: Vec<StateType>,
    pub metadata: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub show_deleted: bool,
}

/// Which task runs a list returns.
#[derive(Debug, Clone, Default)]
pub struct TaskRunFilter {
    pub execution_id: Option<ExecutionId>,
    pub task_key: Option<String>,
    pub state_types: Vec<StateType>,
    pub labels: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub show_deleted: bool,
    pub stale: Option<bool>,
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

    /// Whether `e` is in the scope: what a log read of the scope returns.
    pub fn matches(&self, e: &LoggedEvent) -> bool {
        e.tenant_id == self.tenant()
            && match self {
                LogScope::Tenant(_) => true,
                LogScope::Execution(_, id) => &e.execution_id == id,
                LogScope::ExecutionOnly(_, id) => &e.execution_id == id && e.task_run_id.is_none(),
                LogScope::TaskRun(_, id) => e.task_run_id.as_ref() == Some(id),
            }
    }

    /// Whether `e` is about the scope's run itself: for a per-run scope,
    /// what a log read of [`LogScope::run`] returns; never for a tenant.
    pub fn is_own(&self, e: &LoggedEvent) -> bool {
        match self {
            LogScope::Tenant(_) => false,
            LogScope::Execution(t, id) | LogScope::ExecutionOnly(t, id) => {
                &e.tenant_id == t && &e.execution_id == id && e.task_run_id.is_none()
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

/// A run as a per-run stream's snapshot sees it, with the sequence of its
/// latest event.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub execution: Option<(Execution, i64)>,
    /// The first page of its task runs, when asked for.
    pub task_runs: TaskRunPage,
    /// The log's head when the snapshot was read: everything up to here is
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
const SNAPSHOT_PAGE: i64 = 100;
/// About how many bytes of documents a page of a snapshot holds.
const SNAPSHOT_PAGE_BYTES: usize = 64 * 1024;

/// A handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    read: SqlitePool,
    writes: mpsc::Sender<writer::BoxedOp>,
    stop_writes: tokio_util::sync::CancellationToken,
    stats: std::sync::Arc<WriterStats>,
    reads: std::sync::Arc<ReadStats>,
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
    pub events: Vec<LoggedEvent>,
    /// The read stopped at a bound: more may follow.
    pub full: bool,
    /// The log's head as the read saw it: when the page is not full,
    /// the scope has no event after the page's up to this sequence.
    pub head: i64,
}

impl Store {
    /// Opens (creating and migrating if needed) the database at `url` and
    /// starts its writer, after taking the lock that keeps other servers
    /// off the file for as long as the writer runs.
    pub async fn open(
        url: &str,
        durability: Durability,
        feed: Feed,
    ) -> Result<(Store, WriterTask), OpenError> {
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
        sqlx::migrate!("./migrations")
            .run(&mut conn)
            .await
            .map_err(|e| OpenError::migrate(&path, e))?;
        let next_seq = sqlx::query_scalar::<_, i64>(HEAD_SQL)
            .fetch_one(&mut conn)
            .await
            .map_err(failed)?
            + 1;

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
        let (tx, rx) = mpsc::channel(4096);
        let stop_writes = tokio_util::sync::CancellationToken::new();
        let stop_writer = stop_writes.clone();
        let stats = std::sync::Arc::new(WriterStats::default());
        let writer_stats = std::sync::Arc::clone(&stats);
        let writer = writer::start(lock, move || async move {
            let (stop, stopped) = oneshot::channel();
            let checkpoints = tokio::spawn(checkpoint(checkpointer, stopped));
            writer::run(conn, rx, stop_writer, feed, next_seq, writer_stats).await;
            let _ = stop.send(());
            let _ = checkpoints.await;
        })
        .await
        .map_err(|e| OpenError::new(&path, OpenCause::Writer(e.to_string())))?;
        Ok((
            Store {
                read,
                writes: tx,
                stop_writes,
                stats,
                reads: std::sync::Arc::default(),
            },
            writer,
        ))
    }

    /// Counts of the writer's work.
    pub fn writer_stats(&self) -> std::sync::Arc<WriterStats> {
        std::sync::Arc::clone(&self.stats)
    }

    /// Counts of reads of the event log.
    pub fn read_stats(&self) -> std::sync::Arc<ReadStats> {
        std::sync::Arc::clone(&self.reads)
    }

    /// Runs `f` in the writer's next transaction and answers once it has
    /// committed.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a, 'c> FnMut(&'a mut WriteTx<'c>) -> TxFuture<'a, T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = writer::ClosureOp::new(f, reply);
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
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await?;
        row.map(|(doc, seq)| Ok((rows::decode_doc(&doc)?, seq)))
            .transpose()
    }

    pub async fn task_run(&self, tenant: &str, id: TaskRunId) -> Result<Option<(TaskRun, i64)>> {
        let row: Option<(String, i64)> = sqlx::query_as(sql::TASK_RUN_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await?;
        row.map(|(doc, seq)| Ok((rows::decode_doc(&doc)?, seq)))
            .transpose()
    }

    /// Newest first: a page that fits in one response (see [`fit_rows`]).
    pub async fn list_executions(
        &self,
        tenant: &str,
        filter: &ExecutionFilter,
        page: &Page,
    ) -> Result<(Vec<Execution>, Option<Cursor>)> {
        use futures::TryStreamExt;

        let mut q = list_executions_query(tenant, filter, page);
        let rows = q.build_query_as().fetch(&self.read).map_ok(list_row);
        fit_rows(rows, page.size, document::execution_bytes).await
    }

    /// Newest first: a page that fits in one response (see [`fit_rows`]).
    pub async fn list_task_runs(
        &self,
        tenant: &str,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)> {
        use futures::TryStreamExt;

        let mut q = list_task_runs_query(tenant, filter, page);
        let rows = q.build_query_as().fetch(&self.read).map_ok(list_row);
        fit_rows(rows, page.size, document::task_run_bytes).await
    }

    /// A page of a run's state history, oldest first, that fits in one
    /// response (see [`fit_rows`]), and the token of the next page if there
    /// is one.
    pub async fn states(
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
            .fetch(&self.read)
            .map_ok(|(row, doc)| (doc, row));
        let (states, last) = fit_rows(rows, page.size, document::state_bytes).await?;
        Ok((states, last.map(HistoryPage::token)))
    }

    /// Events of `scope` with sequence above `after`, in order: up to
    /// `limit` of them, stopping once they hold `max_bytes` (at least one
    /// event), with the log's head read in the same transaction.
    pub async fn events_after(
        &self,
        scope: &LogScope,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<LogPage> {
        use futures::TryStreamExt;

        self.reads
            .log_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sql, tenant, id) = match scope {
            LogScope::Tenant(t) => (sql::EVENTS_OF_TENANT, t, None),
            LogScope::Execution(t, id) => (sql::EVENTS_OF_EXECUTION, t, Some(id)),
            LogScope::ExecutionOnly(t, id) => (sql::EVENTS_OF_EXECUTION_ONLY, t, Some(id)),
            LogScope::TaskRun(t, id) => (sql::EVENTS_OF_TASK_RUN, t, Some(id)),
        };
        // One read transaction: the events read are those committed up to
        // the head it sees.
        let mut tx = self.read.begin().await?;
        let head: i64 = sqlx::query_scalar(HEAD_SQL).fetch_one(&mut *tx).await?;
        let mut q = sqlx::query_as::<_, EventRow>(sql).bind(tenant);
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
                events.push(row.into_logged());
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

    /// The latest sequence the log has given out.
    pub async fn head(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(HEAD_SQL).fetch_one(&self.read).await?)
    }

    /// The highest sequence retention has removed from the log.
    pub async fn compacted_seq(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'compacted_seq'")
                .fetch_one(&self.read)
                .await?,
        )
    }

    /// An execution (and optionally its task runs) with the log head, read
    /// in one consistent transaction.
    pub async fn execution_snapshot(
        &self,
        tenant: &str,
        id: ExecutionId,
        include_task_runs: bool,
    ) -> Result<Snapshot> {
        let mut tx = self.read.begin().await?;
        let head: i64 = sqlx::query_scalar(HEAD_SQL).fetch_one(&mut *tx).await?;
        let row: Option<(String, i64)> = sqlx::query_as(sql::EXECUTION_BY_ID)
            .bind(tenant)
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let execution = row
            .map(|(d, s)| Ok::<_, Error>((rows::decode_doc(&d)?, s)))
            .transpose()?;
        let task_runs = if include_task_runs && execution.is_some() {
            task_runs_page(&mut tx, id, 0, head).await?
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

    /// The next page of an execution's task runs for a snapshot taken at
    /// `head`: those whose latest event is after `after` and not after
    /// `head`. A task run changed (or created) since the snapshot's head is
    /// left out: its own later events show it.
    pub async fn task_runs_after(
        &self,
        execution: ExecutionId,
        after: i64,
        head: i64,
    ) -> Result<TaskRunPage> {
        let mut conn = self.read.acquire().await?;
        task_runs_page(&mut conn, execution, after, head).await
    }

    /// A task run with the log head, read in one consistent transaction.
    pub async fn task_run_snapshot(
        &self,
        tenant: &str,
        id: TaskRunId,
    ) -> Result<(Option<(TaskRun, i64)>, i64)> {
        let mut tx = self.read.begin().await?;
        let head: i64 = sqlx::query_scalar(HEAD_SQL).fetch_one(&mut *tx).await?;
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

    /// Applies retention through the writer: removes the events older than
    /// `cutoff`, the history rows and transition results of finished runs
    /// whose last event that removes (each keeps its current state), and
    /// cache entries expired by now. A long backlog goes in several
    /// transactions, so that other writes wait for none of them for long.
    pub async fn prune(&self, cutoff: Timestamp) -> Result<Pruned> {
        let mut total = Pruned::default();
        loop {
            let now = Timestamp::now();
            let round = self
                .write(move |tx| Box::pin(tx.prune(cutoff, now, PRUNE_EVENTS_PER_TRANSACTION)))
                .await?;
            total.events += round.events;
            total.states += round.states;
            total.transitions += round.transitions;
            total.cache_entries += round.cache_entries;
            if round.events < PRUNE_EVENTS_PER_TRANSACTION as u64 {
                return Ok(total);
            }
        }
    }

    /// The API keys in force.
    pub async fn load_keys(&self) -> Result<crate::keys::KeySet> {
        let mut conn = self.read.acquire().await?;
        crate::keys::KeySet::load(&mut conn).await
    }

    /// The key in force with this secret hash.
    pub async fn find_key(&self, hash: &str) -> Result<Option<crate::keys::ActiveKey>> {
        let mut conn = self.read.acquire().await?;
        crate::keys::find(&mut conn, hash).await
    }

    /// Today's request counts per key id.
    pub async fn key_usage(&self, day: i64) -> Result<std::collections::HashMap<String, i64>> {
        let mut conn = self.read.acquire().await?;
        crate::keys::usage_today(&mut conn, day).await
    }

    /// Records request counts: (key id, day, requests that day).
    pub async fn record_key_usage(&self, counts: Vec<(String, i64, i64)>) -> Result<()> {
        let counts = std::sync::Arc::new(counts);
        self.write(move |tx| {
            let counts = std::sync::Arc::clone(&counts);
            Box::pin(async move { tx.record_key_usage(&counts).await })
        })
        .await
    }

    /// Records when these keys (by secret hash) were last used.
    pub async fn touch_keys(&self, hashes: Vec<String>) -> Result<()> {
        let hashes = std::sync::Arc::new(hashes);
        self.write(move |tx| {
            let hashes = std::sync::Arc::clone(&hashes);
            Box::pin(async move { tx.touch_keys(&hashes, Timestamp::now()).await })
        })
        .await
    }

    /// Closes the read pool: later reads fail, and this waits for the
    /// connections in use to come back.
    pub async fn close_reads(&self) {
        self.read.close().await;
    }

    /// Tells the writer to stop, whoever still holds a handle: it commits
    /// the writes it has already accepted, answers later ones UNAVAILABLE,
    /// and ends ([`WriterTask::wait`]).
    pub fn stop_writes(&self) {
        self.stop_writes.cancel();
    }
}

/// Reads a list's rows (a document and where a page after it starts), in
/// order, keeping them while they fit in one response: at most `size` of
/// them, whose wire size (by `measure`) stays within
/// [`document::MAX_PAGE_BYTES`]; the first row is always kept, as each fits
/// alone. Rows are decoded one at a time and the read stops at the first
/// row left out, so a page holds only what it returns, that row, and the
/// few rows the connection reads ahead ([`READ_ROW_BUFFER`]). The second
/// value is where the next page starts, the last row kept, when rows were
/// left out.
async fn fit_rows<T, K>(
    rows: impl futures::Stream<Item = sqlx::Result<(String, K)>>,
    size: u32,
    measure: impl Fn(&T) -> usize,
) -> Result<(Vec<T>, Option<K>)>
where
    T: serde::de::DeserializeOwned,
{
    use futures::TryStreamExt;

    let mut rows = std::pin::pin!(rows);
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    while let Some((doc, key)) = rows.try_next().await? {
        if items.len() >= size as usize {
            return Ok((items, last));
        }
        let item = rows::decode_doc(&doc)?;
        drop(doc);
        let item_bytes = measure(&item);
        if !items.is_empty() && bytes + item_bytes > document::MAX_PAGE_BYTES {
            return Ok((items, last));
        }
        bytes += item_bytes;
        items.push(item);
        last = Some(key);
    }
    Ok((items, None))
}

/// A list row as [`fit_rows`] reads it.
fn list_row((doc, created_at, id): (String, i64, String)) -> (String, Cursor) {
    (doc, Cursor { created_at, id })
}

/// Up to a page of an execution's task runs whose latest event is in
/// (`after`, `head`], in the order of those events, bounded by count and
/// by the bytes of their documents.
async fn task_runs_page(
    conn: &mut SqliteConnection,
    execution: ExecutionId,
    after: i64,
    head: i64,
) -> Result<TaskRunPage> {
    use futures::TryStreamExt;

    let mut rows = sqlx::query_as::<_, (String, i64)>(sql::TASK_RUNS_OF_EXECUTION)
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

/// The latest sequence given out: the log's last, or the compaction mark
/// when retention emptied the log.
const HEAD_SQL: &str = "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0), \
     (SELECT value FROM counters WHERE name = 'compacted_seq'))";

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    tenant_id: String,
    execution_id: String,
    task_run_id: Option<String>,
    task_id: Option<String>,
    payload: Vec<u8>,
}

impl EventRow {
    fn into_logged(self) -> LoggedEvent {
        LoggedEvent::from_log(
            self.seq,
            self.tenant_id,
            self.execution_id,
            self.task_run_id,
            self.task_id,
            &self.payload,
        )
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
