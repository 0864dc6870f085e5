//! The single writer: every change goes through one task that commits the
//! operations waiting at that moment together, in one transaction (group
//! commit). A caller is answered only after its transaction commits, and
//! subscribers hear of the events only then.
//!
//! The writer runs on a thread of its own, so encoding, template
//! resolution and commits never take a worker from the services, and a
//! defect in one operation fails that operation only: its transaction
//! rolls back, its caller gets INTERNAL and the writer carries on.

use std::{
    any::Any,
    future::Future,
    num::NonZeroUsize,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::FutureExt;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{
    Store,
    open::DatabaseLock,
    tx::{RunCache, WriteTx},
};
use crate::{
    Error, Result,
    stream::{Feed, LoggedEvent},
};

/// The most operations one transaction commits.
const MAX_BATCH: usize = 512;

/// How many runs the writer remembers between batches.
const CACHED_RUNS: usize = 16_384;

/// A boxed future borrowing the write transaction.
pub(crate) type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

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
/// that fails is retried one operation at a time, and an operation that
/// met a stored idempotency key runs again).
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

/// The writer's thread, to await at shutdown once the writer is told to
/// stop (or every `Store` handle is dropped).
#[derive(Debug)]
pub struct WriterTask {
    finished: oneshot::Receiver<()>,
}

/// The writer ended before it was told to stop: a defect outside any one
/// operation stopped it, and no write can be made.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store's writer stopped unexpectedly")]
pub struct WriterStopped;

impl WriterTask {
    /// Waits until the writer has ended: after its last commit once it is
    /// told to stop (or every `Store` handle is gone), or early if a defect
    /// stopped it.
    pub async fn wait(self) -> Result<(), WriterStopped> {
        self.finished.await.map_err(|_| WriterStopped)
    }
}

/// Runs `work` on a new thread with its own single-threaded runtime; the
/// database lock is released when the work ends (or the thread dies).
pub(super) async fn start<F, Fut>(
    lock: Option<DatabaseLock>,
    work: F,
) -> std::io::Result<WriterTask>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (ready, started) = oneshot::channel();
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name("runledger-writer".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            runtime.block_on(work());
            drop(runtime);
            // Free the database for the next server before saying so.
            drop(lock);
            let _ = done.send(());
        })?;
    started
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread ended at start")))?;
    Ok(WriterTask { finished })
}

/// Counts of the writer's work, readable while the service runs.
#[derive(Debug, Default)]
pub struct WriterStats {
    commits: AtomicU64,
    batches_retried: AtomicU64,
}

impl WriterStats {
    /// Transactions committed.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Batches that failed as a whole and were retried one operation per
    /// transaction.
    pub fn batches_retried(&self) -> u64 {
        self.batches_retried.load(Ordering::Relaxed)
    }
}

/// Runs until every sender is gone or `stop` fires, then returns after
/// the last commit. Once stopped it takes no more operations (their
/// callers get UNAVAILABLE) and commits those it had already accepted.
pub(crate) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<BoxedOp>,
    stop: CancellationToken,
    feed: Feed,
    mut next_seq: i64,
    stats: Arc<WriterStats>,
) {
    let mut cache = RunCache::new(NonZeroUsize::new(CACHED_RUNS).expect("non-zero"));
    let mut batch: Vec<BoxedOp> = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    loop {
        let received = tokio::select! {
            biased;
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                rx.close();
                continue;
            }
            n = rx.recv_many(&mut batch, MAX_BATCH) => n,
        };
        if received == 0 {
            break;
        }
        match commit(&mut conn, &mut cache, &mut batch, next_seq).await {
            Ok(events) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                next_seq += events.len() as i64;
                feed.publish(events);
                for op in batch.drain(..) {
                    op.finish(None);
                }
            }
            Err(e) => {
                warn!(error = %e, ops = batch.len(), "batch failed; retrying its operations one by one");
                stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                for op in batch.drain(..) {
                    let mut one = vec![op];
                    match commit(&mut conn, &mut cache, &mut one, next_seq).await {
                        Ok(events) => {
                            stats.commits.fetch_add(1, Ordering::Relaxed);
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

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Applies `ops` in one transaction and commits it, returning the events
/// written; on error everything is rolled back.
async fn commit(
    conn: &mut SqliteConnection,
    cache: &mut RunCache,
    ops: &mut [BoxedOp],
    next_seq: i64,
) -> Result<Vec<Arc<LoggedEvent>>> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let mut tx = WriteTx::new(conn, cache, next_seq);
    tx.careful = ops.len() == 1;
    // A panic in an operation (or in flushing its writes) fails the
    // transaction like any other error, and the writer carries on.
    let applied = AssertUnwindSafe(apply_all(&mut tx, ops))
        .catch_unwind()
        .await;
    let (events, runs) = tx.into_parts();
    let result = applied.unwrap_or_else(|panic| {
        error!(
            panic = panic_message(&*panic),
            "a write operation panicked; rolling back"
        );
        // The panic may have come in the middle of updating the cache.
        cache.clear();
        Err(Error::Internal("a write operation panicked".into()))
    });
    if let Err(e) = result {
        rollback(conn).await;
        return Err(e);
    }
    if let Err(e) = sqlx::query("COMMIT").execute(&mut *conn).await {
        rollback(conn).await;
        return Err(e.into());
    }
    for (id, run) in runs {
        cache.put(id, run);
    }
    Ok(events)
}

async fn apply_all(tx: &mut WriteTx<'_>, ops: &mut [BoxedOp]) -> Result<()> {
    for (i, op) in ops.iter_mut().enumerate() {
        tx.op = i;
        op.apply(tx).await?;
    }
    tx.flush().await?;
    // Operations whose new run met one already stored under the same
    // idempotency key run again, carefully, and find the stored run.
    loop {
        let rerun = tx.take_rerun();
        if rerun.is_empty() {
            return Ok(());
        }
        tx.careful = true;
        for i in rerun {
            tx.op = i;
            ops[i].apply(tx).await?;
        }
        tx.flush().await?;
    }
}

async fn rollback(conn: &mut SqliteConnection) {
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
        // Nothing was open (the failure ended the transaction already).
        warn!(error = %e, "rollback");
    }
}

/// Faults for tests of the writer's supervision. They are not part of the
/// service: nothing a client sends reaches them.
impl Store {
    /// A write that records a day's request count for `key_id` and then
    /// panics, as a defect in an operation would.
    #[doc(hidden)]
    pub async fn write_then_panic(&self, key_id: String, day: i64) -> Result<()> {
        let counts = Arc::new(vec![(key_id, day, 1)]);
        self.write(move |tx| {
            let counts = Arc::clone(&counts);
            Box::pin(async move { record_then_panic(tx, &counts).await })
        })
        .await
    }

    /// Stops the writer thread as a defect in the writer itself would: the
    /// operation commits, and answering it panics.
    #[doc(hidden)]
    pub async fn crash_writer(&self) {
        let _ = self.writes.send(Box::new(PanicOnAnswer)).await;
    }
}

async fn record_then_panic(tx: &mut WriteTx<'_>, counts: &[(String, i64, i64)]) -> Result<()> {
    tx.record_key_usage(counts).await?;
    panic!("a defect in a write operation");
}

struct PanicOnAnswer;

impl WriteOp for PanicOnAnswer {
    fn apply<'a, 'c>(&'a mut self, _tx: &'a mut WriteTx<'c>) -> TxFuture<'a, ()>
    where
        'c: 'a,
    {
        Box::pin(async { Ok(()) })
    }

    fn finish(self: Box<Self>, _failure: Option<Error>) {
        panic!("a defect in the writer");
    }
}
