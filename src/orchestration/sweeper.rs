//! Fails PAUSED runs whose pause timed out, until shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Ledger;

pub async fn run(ledger: Ledger, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match ledger.expire_pauses().await {
            Ok(0) => {}
            Ok(n) => info!(runs = n, "failed runs whose pause timed out"),
            Err(e) => warn!(error = %e, "sweeping timed-out pauses"),
        }
    }
}
