//! The writer: every change goes through one task that commits the
//! operations waiting at that moment together (group commit): in one
//! transaction when it is the database's only writer, or one transaction
//! per tenant when it shares the database with other servers' writers (a
//! transaction holds its tenant's log counter, see `batch`). A caller is
//! answered only after its transaction commits, and subscribers hear of
//! the events only then.
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
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{
    CommitListener, Store, StoredEvent,
    backend::{BesideFuture, TxBackend},
    batch::{RunCache, WriteTx},
};
use crate::{Error, Result};

/// How many times a transaction that lost a race with another writer
/// (deadlock, serialization failure) runs again before its operations run
/// one by one.
const RACE_RETRIES: usize = 5;

/// The most operations one transaction commits.
const MAX_BATCH: usize = 512;

/// How many runs the writer remembers between batches.
const CACHED_RUNS: usize = 16_384;

/// A boxed future borrowing the write transaction.
pub(crate) type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One unit of work for the writer.
pub(crate) trait WriteOp: Send {
    /// The tenant whose runs the operation changes, if it is one tenant's.
    fn tenant(&self) -> Option<&str>;

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
    tenant: Option<Arc<str>>,
    f: F,
    answer: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> ClosureOp<T, F> {
    pub(crate) fn new(tenant: Option<Arc<str>>, f: F, reply: oneshot::Sender<Result<T>>) -> Self {
        Self {
            tenant,
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
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

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

/// Starts the writer on a new thread with its own single-threaded
/// runtime; `guard` (a database lock) is released when the writer ends (or
/// the thread dies), and `beside` runs next to it until then.
#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    backend: Box<dyn TxBackend>,
    guard: Option<Box<dyn Any + Send>>,
    beside: Option<Box<dyn FnOnce(oneshot::Receiver<()>) -> BesideFuture + Send>>,
    rx: mpsc::Receiver<BoxedOp>,
    stop: CancellationToken,
    listener: Arc<dyn CommitListener>,
    stats: Arc<WriterStats>,
) -> std::io::Result<WriterTask> {
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
            runtime.block_on(async move {
                let (end, ended) = oneshot::channel();
                let beside = beside.map(|b| tokio::spawn(b(ended)));
                run(backend, rx, stop, listener, stats).await;
                let _ = end.send(());
                if let Some(beside) = beside {
                    let _ = beside.await;
                }
            });
            drop(runtime);
            // Free the database for the next server before saying so.
            drop(guard);
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
    races: AtomicU64,
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

    /// Transactions that lost a race with another writer and ran again.
    pub fn races(&self) -> u64 {
        self.races.load(Ordering::Relaxed)
    }
}

/// Runs until every sender is gone or `stop` fires, then returns after
/// the last commit. Once stopped it takes no more operations (their
/// callers get UNAVAILABLE) and commits those it had already accepted.
async fn run(
    mut backend: Box<dyn TxBackend>,
    mut rx: mpsc::Receiver<BoxedOp>,
    stop: CancellationToken,
    listener: Arc<dyn CommitListener>,
    stats: Arc<WriterStats>,
) {
    let sole = backend.sole_writer();
    let mut cache = sole.then(|| RunCache::new(NonZeroUsize::new(CACHED_RUNS).expect("non-zero")));
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
        if sole {
            let ops = std::mem::take(&mut batch);
            commit_group(&mut *backend, cache.as_mut(), ops, &*listener, &stats).await;
        } else {
            for group in by_tenant(std::mem::take(&mut batch)) {
                commit_group(&mut *backend, cache.as_mut(), group, &*listener, &stats).await;
            }
        }
    }
    backend.close().await;
}

/// Splits operations into one group per tenant (and one for those of no
/// one tenant), each in the order received.
fn by_tenant(ops: Vec<BoxedOp>) -> Vec<Vec<BoxedOp>> {
    let mut groups: Vec<(Option<String>, Vec<BoxedOp>)> = Vec::new();
    for op in ops {
        let tenant = op.tenant().map(str::to_owned);
        match groups.iter_mut().find(|(t, _)| *t == tenant) {
            Some((_, group)) => group.push(op),
            None => groups.push((tenant, vec![op])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// Commits `ops` in one transaction, running it again while it loses races
/// with other writers; should it fail otherwise, each operation runs alone
/// so that one bad operation fails only itself.
async fn commit_group(
    backend: &mut dyn TxBackend,
    mut cache: Option<&mut RunCache>,
    mut ops: Vec<BoxedOp>,
    listener: &dyn CommitListener,
    stats: &WriterStats,
) {
    let mut attempt = 0;
    let failed = loop {
        match commit(backend, cache.as_deref_mut(), &mut ops).await {
            Ok(events) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                listener.committed(
                    events,
                    Box::new(move || {
                        for op in ops {
                            op.finish(None);
                        }
                    }),
                );
                return;
            }
            Err(e) if backend.is_retryable(&e) && attempt < RACE_RETRIES => {
                attempt += 1;
                stats.races.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => break e,
        }
    };
    if matches!(failed, Error::Unavailable) {
        // The database cannot be reached, or a commit's outcome is unknown
        // (the connection went while committing): running the operations
        // again could apply them twice. Their callers retry, with their
        // idempotency keys.
        warn!(
            ops = ops.len(),
            "the database is unavailable; the operations are refused"
        );
        for op in ops {
            op.finish(Some(Error::Unavailable));
        }
        return;
    }
    if ops.len() == 1 {
        error!(error = %failed, "write failed");
        if let Some(op) = ops.pop() {
            op.finish(Some(Error::Internal(failed.to_string())));
        }
        return;
    }
    warn!(error = %failed, ops = ops.len(), "batch failed; retrying its operations one by one");
    stats.batches_retried.fetch_add(1, Ordering::Relaxed);
    for op in ops {
        Box::pin(commit_group(
            backend,
            cache.as_deref_mut(),
            vec![op],
            listener,
            stats,
        ))
        .await;
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
    backend: &mut dyn TxBackend,
    mut cache: Option<&mut RunCache>,
    ops: &mut [BoxedOp],
) -> Result<Vec<StoredEvent>> {
    backend.begin().await?;
    let tenants: Vec<String> = ops
        .iter()
        .filter_map(|op| op.tenant().map(str::to_owned))
        .collect();
    let mut tx = WriteTx::new(&mut *backend, cache.as_deref_mut());
    // An operation alone asks the database for its idempotency keys
    // first, rather than meet a stored run when it writes and run again;
    // unless that would take its tenant's counter row for the whole
    // transaction (see `batch`).
    tx.careful = ops.len() == 1 && !tx.late;
    // A panic in an operation (or in flushing its writes) fails the
    // transaction like any other error, and the writer carries on.
    let applied = AssertUnwindSafe(apply_all(&mut tx, &tenants, ops))
        .catch_unwind()
        .await;
    let (events, runs) = tx.into_parts();
    let result = applied.unwrap_or_else(|panic| {
        error!(
            panic = panic_message(&*panic),
            "a write operation panicked; rolling back"
        );
        // The panic may have come in the middle of updating the cache.
        if let Some(cache) = cache.as_deref_mut() {
            cache.clear();
        }
        Err(Error::Internal("a write operation panicked".into()))
    });
    if let Err(e) = result {
        backend.rollback().await;
        return Err(e);
    }
    if let Err(e) = backend.commit().await {
        backend.rollback().await;
        return Err(e);
    }
    if let Some(cache) = cache {
        for (id, run) in runs {
            cache.put(id, run);
        }
    }
    Ok(events)
}

async fn apply_all(tx: &mut WriteTx<'_>, tenants: &[String], ops: &mut [BoxedOp]) -> Result<()> {
    // The tenants' counters are taken before anything of theirs is read
    // (or, when events are numbered at commit, by the first read).
    let tenants: Vec<&str> = tenants.iter().map(String::as_str).collect();
    tx.lock_up_front(&tenants).await?;
    for (i, op) in ops.iter_mut().enumerate() {
        tx.op = i;
        op.apply(tx).await?;
    }
    tx.settle().await?;
    // Operations whose new run met one already stored under the same
    // idempotency key run again, carefully, and find the stored run.
    loop {
        let rerun = tx.take_rerun();
        if rerun.is_empty() {
            break;
        }
        tx.careful = true;
        for i in rerun {
            tx.op = i;
            ops[i].apply(tx).await?;
        }
        tx.settle().await?;
    }
    tx.finish().await
}

/// Faults for tests of the writer's supervision. They are not part of the
/// service: nothing a client sends reaches them.
impl Store {
    /// A write that records a day's request count for `key_id` and then
    /// panics, as a defect in an operation would.
    #[doc(hidden)]
    pub async fn write_then_panic(&self, key_id: String, day: i64) -> Result<()> {
        let counts = Arc::new(vec![(String::new(), key_id, day, 1)]);
        self.write_system(move |tx| {
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

async fn record_then_panic(
    tx: &mut WriteTx<'_>,
    counts: &[(String, String, i64, i64)],
) -> Result<()> {
    tx.record_key_usage(counts).await?;
    panic!("a defect in a write operation");
}

struct PanicOnAnswer;

impl WriteOp for PanicOnAnswer {
    fn tenant(&self) -> Option<&str> {
        None
    }

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
