//! Delivery across replicas: subscribers on every server follow one
//! execution; a writer on replica 0 changes its state one change at a
//! time, waiting until every subscriber has each change and a short,
//! varying pause before the next, so that the figures are the latency of
//! one change reaching each server's subscribers, not a backlog.
//!
//! Replica 0's own subscribers measure local delivery (the only kind with
//! one server), the others delivery through the shared database.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;

use super::{BenchError, Conn, fanout::STREAMS_PER_CONNECTION, status};
use crate::grpc::pb;

/// The pause between one change reaching everyone and the next, drawn
/// afresh each time so that changes do not keep step with any timer of
/// the servers.
const PAUSE_MS: std::ops::Range<u64> = 5..25;

/// How long one change may take to reach every subscriber.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);

/// The latency of delivery to some subscribers, in ms.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Latency {
    pub(super) subscribers: usize,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
}

/// Delivery to the subscribers of one server.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ReplicaDelivery {
    pub(super) replica: usize,
    /// Whether this is the writer's server.
    pub(super) local: bool,
    #[serde(flatten)]
    pub(super) latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct DeliveryResult {
    /// The replica the writer calls.
    pub(super) writer_replica: usize,
    /// State changes made, one at a time.
    pub(super) changes: usize,
    pub(super) per_replica: Vec<ReplicaDelivery>,
    /// Every replica but the writer's together; none with one server.
    pub(super) other_replicas: Option<Latency>,
}

/// `channels[i]`: a connection to server `i % servers`, as many as
/// [`connections`] says. `per_replica` subscribers on each server; the
/// writer is on server 0.
pub(super) async fn run(
    channels: &[Conn],
    servers: usize,
    per_replica: usize,
    changes: usize,
) -> Result<DeliveryResult, BenchError> {
    let mut writer = pb::execution_service_client::ExecutionServiceClient::new(channels[0].clone());
    let exec = writer
        .create_execution(pb::CreateExecutionRequest {
            task_id: "bench-delivery".into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner()
        .execution
        .ok_or_else(|| BenchError::Client("no execution in the answer".into()))?;

    let subscribers = servers * per_replica;
    let ready = Arc::new(AtomicUsize::new(0));
    // received[r]: how many subscribers hold change r.
    let received: Arc<Vec<AtomicUsize>> = Arc::new((0..changes).map(|_| 0.into()).collect());
    let mut tasks = Vec::with_capacity(subscribers);
    for replica in 0..servers {
        for j in 0..per_replica {
            let channel = channels[replica + servers * (j / STREAMS_PER_CONNECTION)].clone();
            let (ready, received) = (Arc::clone(&ready), Arc::clone(&received));
            let id = exec.id.clone();
            tasks.push((
                replica,
                tokio::spawn(async move {
                    let mut client =
                        pb::execution_service_client::ExecutionServiceClient::new(channel);
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
                    let mut at = Vec::with_capacity(changes);
                    while at.len() < changes {
                        if stream.message().await?.is_none() {
                            break;
                        }
                        at.push(Instant::now());
                        received[at.len() - 1].fetch_add(1, Ordering::Release);
                    }
                    Ok::<_, tonic::Status>(at)
                }),
            ));
        }
    }
    super::fanout::wait_for(&ready, subscribers, Duration::from_secs(60)).await?;

    let mut acknowledged = Vec::with_capacity(changes);
    for r in 0..changes {
        let to = if r % 2 == 0 {
            pb::StateType::Running
        } else {
            pb::StateType::Paused
        };
        writer
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
        acknowledged.push(Instant::now());
        super::fanout::wait_for(&received[r], subscribers, CHANGE_LIMIT)
            .await
            .map_err(|e| BenchError::Client(format!("change {r} of {changes}: {e}")))?;
        let pause = rand::rng().random_range(PAUSE_MS);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }

    let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut per_server: Vec<Histogram<u64>> = (0..servers).map(|_| new_hist()).collect();
    for (replica, task) in tasks {
        let at = task
            .await
            .map_err(|e| BenchError::Client(e.to_string()))?
            .map_err(status)?;
        for (r, when) in at.iter().enumerate() {
            // Delivery may beat the unary answer home: that counts as 0.
            let us = when.saturating_duration_since(acknowledged[r]).as_micros() as u64;
            per_server[replica].saturating_record(us.max(1));
        }
    }
    let mut others = new_hist();
    for h in &per_server[1..] {
        others
            .add(h)
            .map_err(|e| BenchError::Client(e.to_string()))?;
    }
    Ok(DeliveryResult {
        writer_replica: 0,
        changes,
        per_replica: per_server
            .iter()
            .enumerate()
            .map(|(replica, h)| ReplicaDelivery {
                replica,
                local: replica == 0,
                latency: latency(h, per_replica),
            })
            .collect(),
        other_replicas: (servers > 1).then(|| latency(&others, per_replica * (servers - 1))),
    })
}

/// The connections for `per_replica` subscribers on each of `servers`.
pub(super) fn connections(servers: usize, per_replica: usize) -> usize {
    servers * per_replica.div_ceil(STREAMS_PER_CONNECTION).max(1)
}

fn latency(h: &Histogram<u64>, subscribers: usize) -> Latency {
    Latency {
        subscribers,
        p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
    }
}
