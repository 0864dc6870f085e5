//! Following other servers' commits, for a database several servers
//! share: each server reads the log of every tenant its subscribers follow
//! into its own feed, in each tenant's order, so that a subscriber here
//! sees events committed anywhere, without gap or duplicate.
//!
//! Word of a commit (PostgreSQL's NOTIFY, through [`CommitSignal`]) wakes
//! the tailer at once, but is never the only path: notifications to a
//! dropped listener are lost, and a half-open connection hears nothing, so
//! the tailer also reads the heads of the tenants it follows every
//! [`POLL`], and all of them again after its listener reconnects.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Feed, LoggedEvent};
use crate::store::{CommitSignal, LogScope, Store};

/// How often the heads of followed tenants are read when no word comes.
pub const POLL: Duration = Duration::from_millis(250);

/// How many events one read of a tenant's log brings at most.
const PAGE: i64 = 1000;
/// About how many bytes one read brings at most.
const PAGE_BYTES: usize = 1024 * 1024;

/// Follows the database's commits into `feed` until `shutdown`.
pub async fn run(
    feed: Feed,
    store: Store,
    mut signals: Option<mpsc::Receiver<CommitSignal>>,
    shutdown: CancellationToken,
) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Sequences known committed, per tenant, not yet in the feed.
    let mut wanted: HashMap<String, i64> = HashMap::new();
    loop {
        let mut resync = false;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            signal = recv(&mut signals) => match signal {
                Some(CommitSignal::Head { tenant, head }) => {
                    let w = wanted.entry(tenant).or_default();
                    *w = (*w).max(head);
                }
                Some(CommitSignal::Resync) => resync = true,
                // No word comes any more: polling carries on alone.
                None => signals = None,
            },
            () = feed.woken() => {}
            _ = poll.tick() => resync = true,
        }
        for (tenant, head) in feed.take_behind() {
            let w = wanted.entry(tenant).or_default();
            *w = (*w).max(head);
        }
        let followed = feed.followed();
        // A tenant followed for the first time starts at its present head.
        let new: Vec<String> = followed
            .iter()
            .filter(|(_, latest)| latest.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        if resync || !new.is_empty() {
            let tenants: Vec<String> = if resync {
                followed.iter().map(|(t, _)| t.clone()).collect()
            } else {
                new.clone()
            };
            match store.heads(&tenants).await {
                Ok(heads) => {
                    for t in &new {
                        feed.start_at(t, heads.get(t).copied().unwrap_or(0));
                    }
                    for (t, head) in heads {
                        let w = wanted.entry(t).or_default();
                        *w = (*w).max(head);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reading the heads of followed tenants");
                    continue;
                }
            }
        }
        let followed: HashMap<String, Option<i64>> = followed.into_iter().collect();
        wanted.retain(|t, _| followed.contains_key(t));
        let mut done = Vec::new();
        for (tenant, head) in &wanted {
            match catch_up(&feed, &store, tenant, *head).await {
                Ok(()) => done.push(tenant.clone()),
                Err(e) => {
                    warn!(error = %e, tenant = %tenant, "reading a tenant's log into the feed")
                }
            }
        }
        for t in done {
            wanted.remove(&t);
        }
    }
}

async fn recv(signals: &mut Option<mpsc::Receiver<CommitSignal>>) -> Option<CommitSignal> {
    match signals {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads `tenant`'s log into the feed up to `head` at least.
async fn catch_up(feed: &Feed, store: &Store, tenant: &str, head: i64) -> crate::Result<()> {
    let scope = LogScope::Tenant(tenant.to_owned());
    loop {
        let Some(latest) = feed.latest(tenant) else {
            return Ok(());
        };
        if latest >= head {
            return Ok(());
        }
        let page = store.events_after(&scope, latest, PAGE, PAGE_BYTES).await?;
        if page.events.is_empty() {
            return Ok(());
        }
        let events = page
            .events
            .into_iter()
            .map(|e| Arc::new(LoggedEvent::from_stored(e)))
            .collect();
        feed.publish(events);
    }
}
