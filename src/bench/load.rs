//! Closed-loop load: `concurrency` workers, each issuing its next request
//! as soon as the previous one is answered, for a fixed time.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::BenchError;

/// Throughput and latency of one operation at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub(super) struct LoadResult {
    pub(super) operation: String,
    pub(super) concurrency: usize,
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) per_second: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// This figure over the health-check ceiling at the same concurrency.
    pub(super) vs_ceiling: Option<f64>,
}

/// Runs `op(worker, n)` from `concurrency` workers for `duration`; an op
/// may be several requests (`requests_per_op`), each counted.
pub(super) async fn run<F, Fut>(
    operation: &str,
    concurrency: usize,
    duration: Duration,
    requests_per_op: u64,
    op: F,
) -> Result<LoadResult, BenchError>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let op = Arc::clone(&op);
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut n, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = op(w, n).await.is_ok();
                let us = t.elapsed().as_micros() as u64;
                hist.saturating_record(us.max(1) / requests_per_op.max(1));
                if !ok {
                    errors += 1;
                }
                n += 1;
            }
            (hist, n, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut ops, mut errors) = (0, 0);
    for w in workers {
        let (h, n, e) = w.await.map_err(|e| BenchError::Client(e.to_string()))?;
        hist.add(h).map_err(|e| BenchError::Client(e.to_string()))?;
        ops += n;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = ops * requests_per_op;
    Ok(LoadResult {
        operation: operation.to_owned(),
        concurrency,
        requests,
        errors,
        per_second: requests as f64 / elapsed,
        p50_ms: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        vs_ceiling: None,
    })
}
