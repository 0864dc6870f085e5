//! Fan-out: many subscribers following one execution; how long after a
//! SetExecutionState call returns each of them has the event, and what an
//! idle stream costs the servers in memory. With several servers the
//! subscribers are spread over all of them and the writer calls the first.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{BenchError, Conn, status};
use crate::grpc::pb;

/// Streams multiplexed on one client connection.
pub(super) const STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub(super) struct FanoutResult {
    pub(super) subscribers: usize,
    pub(super) rounds: usize,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// Server resident memory added per open, idle stream (all servers'
    /// growth over all streams).
    pub(super) bytes_per_idle_stream: Option<f64>,
    /// The same for each server, with the streams it held.
    pub(super) per_replica: Vec<ReplicaStreams>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ReplicaStreams {
    pub(super) replica: usize,
    pub(super) streams: usize,
    pub(super) bytes_per_idle_stream: Option<f64>,
}

/// `channels[i]` is a connection to server `i % servers`; `servers_rss`
/// reads each server's resident memory.
pub(super) async fn run(
    channels: &[Conn],
    servers: usize,
    subscribers: usize,
    rounds: usize,
    servers_rss: &(dyn Fn() -> Vec<Option<u64>> + Sync),
) -> Result<FanoutResult, BenchError> {
    let mut executions =
        pb::execution_service_client::ExecutionServiceClient::new(channels[0].clone());
    let exec = executions
        .create_execution(pb::CreateExecutionRequest {
            task_id: "bench-fanout".into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner()
        .execution
        .ok_or_else(|| BenchError::Client("no execution in the answer".into()))?;

    let rss_before = servers_rss();
    let mut streams = vec![0usize; servers];
    let ready = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let c = (i / STREAMS_PER_CONNECTION) % channels.len();
        streams[c % servers] += 1;
        let channel = channels[c].clone();
        let (ready, received, id) = (Arc::clone(&ready), Arc::clone(&received), exec.id.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::execution_service_client::ExecutionServiceClient::new(channel);
            let mut stream = client
                .stream_execution_status(pb::StreamExecutionStatusRequest {
                    id,
                    include_task_runs: false,
                    after_sequence: 0,
                })
                .await?
                .into_inner();
            stream.message().await?; // the snapshot
            ready.fetch_add(1, Ordering::Release);
            let mut at = Vec::with_capacity(rounds);
            while at.len() < rounds {
                if stream.message().await?.is_none() {
                    break;
                }
                at.push(Instant::now());
                received.fetch_add(1, Ordering::Release);
            }
            Ok::<_, tonic::Status>(at)
        }));
    }
    wait_for(&ready, subscribers, Duration::from_secs(120)).await?;
    // Let the server settle before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = servers_rss();
    let growth: Vec<Option<u64>> = rss_before
        .iter()
        .zip(&rss_after)
        .map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?)))
        .collect();
    let per_replica = growth
        .iter()
        .zip(&streams)
        .enumerate()
        .map(|(replica, (g, &n))| ReplicaStreams {
            replica,
            streams: n,
            bytes_per_idle_stream: g.filter(|_| n > 0).map(|g| g as f64 / n as f64),
        })
        .collect();
    let bytes_per_idle_stream = growth
        .iter()
        .copied()
        .sum::<Option<u64>>()
        .filter(|_| !growth.is_empty())
        .map(|g| g as f64 / subscribers as f64);

    let mut returned = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let to = if r % 2 == 0 {
            pb::StateType::Running
        } else {
            pb::StateType::Paused
        };
        executions
            .set_execution_state(pb::SetExecutionStateRequest {
                id: exec.id.clone(),
                state: Some(pb::StateCreate {
                    r#type: to as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        returned.push(Instant::now());
        wait_for(&received, subscribers * (r + 1), Duration::from_secs(60)).await?;
    }

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for t in tasks {
        let at = t
            .await
            .map_err(|e| BenchError::Client(e.to_string()))?
            .map_err(status)?;
        for (r, when) in at.iter().enumerate() {
            // Delivery may beat the unary answer home: that counts as 0.
            let us = when.saturating_duration_since(returned[r]).as_micros() as u64;
            hist.saturating_record(us.max(1));
        }
    }
    Ok(FanoutResult {
        subscribers,
        rounds,
        p50_ms: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        bytes_per_idle_stream,
        per_replica,
    })
}

pub(super) async fn wait_for(
    counter: &AtomicUsize,
    target: usize,
    limit: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + limit;
    while counter.load(Ordering::Acquire) < target {
        if Instant::now() > deadline {
            return Err(BenchError::Client(format!(
                "only {} of {target} subscribers got there in {limit:?}",
                counter.load(Ordering::Acquire)
            )));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}
