use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use super::message::{EventMessage, encode_event};

use crate::{
    domain::Event,
    grpc::{convert, pb},
};

/// An event as the log holds it: its sequence, the ids streams select on,
/// and the wire form of the event.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub seq: i64,
    pub tenant_id: String,
    pub execution_id: String,
    pub task_run_id: Option<String>,
    /// The task_id of the execution the event belongs to.
    pub task_id: Option<String>,
    /// The event decoded, when something needed it: live events are built
    /// that way; events read back from the log are decoded only if a
    /// filter or an ending looks inside them.
    event: OnceLock<pb::StatusEvent>,
    /// The stream message carrying the event, encoded once for everyone.
    wire: Bytes,
    /// Where the event's own encoding starts in `wire`.
    payload_start: usize,
}

impl LoggedEvent {
    pub fn new(seq: i64, event: &Event<'_>) -> Self {
        let status_event = convert::status_event(seq, event);
        let (wire, payload_start) = encode_event(&status_event);
        LoggedEvent {
            seq,
            tenant_id: event.resource.tenant_id().to_owned(),
            execution_id: event.resource.execution_id().to_string(),
            task_run_id: event.resource.task_run_id().map(|id| id.to_string()),
            task_id: event.task_id.map(str::to_owned),
            event: OnceLock::from(status_event),
            wire,
            payload_start,
        }
    }

    /// The encoded StatusEvent, as the log stores it.
    pub fn payload(&self) -> Bytes {
        self.wire.slice(self.payload_start..)
    }

    /// The stream message to send: shared bytes, no copy.
    pub fn message(&self) -> EventMessage {
        EventMessage::encoded(self.wire.clone())
    }

    /// An event read back from the log.
    pub fn from_log(
        seq: i64,
        tenant_id: String,
        execution_id: String,
        task_run_id: Option<String>,
        task_id: Option<String>,
        payload: &[u8],
    ) -> Self {
        // The stored bytes are the event's encoding: wrap them, do not
        // encode again, and decode them only on demand.
        let mut wire = Vec::with_capacity(payload.len() + 6);
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut wire);
        prost::encoding::encode_varint(payload.len() as u64, &mut wire);
        let payload_start = wire.len();
        wire.extend_from_slice(payload);
        LoggedEvent {
            seq,
            tenant_id,
            execution_id,
            task_run_id,
            task_id,
            event: OnceLock::new(),
            wire: Bytes::from(wire),
            payload_start,
        }
    }

    /// The event. The log's bytes were written by this server from a
    /// valid event; should they not decode, the event reads as empty and
    /// matches no filter that looks inside it.
    pub fn event(&self) -> &pb::StatusEvent {
        self.event.get_or_init(|| {
            pb::StatusEvent::decode(self.payload()).unwrap_or_else(|e| {
                tracing::error!(seq = self.seq, error = %e, "undecodable event in the log");
                pb::StatusEvent::default()
            })
        })
    }

    /// About what holding the event costs: its encoding, and its decoded
    /// form when something decoded it.
    pub fn held_bytes(&self) -> usize {
        2 * self.wire.len() + 256
    }

    /// The state type of the run after this event.
    pub fn state_type(&self) -> i32 {
        let state = match &self.event().resource {
            Some(pb::status_event::Resource::Execution(e)) => e.state.as_ref(),
            Some(pb::status_event::Resource::TaskRun(t)) => t.state.as_ref(),
            None => None,
        };
        state.map_or(0, |s| s.r#type)
    }
}

/// Committed events, fanned out to every live subscriber: the latest of
/// them, bounded by count and by bytes, shared by all. A subscriber that
/// falls further behind than the feed holds reads from the log instead,
/// so one that does not read costs only its position.
#[derive(Debug, Clone)]
pub struct Feed {
    ring: Arc<Mutex<Ring>>,
    /// The latest sequence published; subscribers wait on it. Dropped with
    /// the last handle, which ends every subscriber.
    head: Arc<watch::Sender<i64>>,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<LoggedEvent>>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// The highest sequence no longer held.
    dropped: i64,
}

/// What a subscriber gets from the feed.
#[derive(Debug)]
pub enum Received {
    /// The first event after the position asked for.
    Event(Arc<LoggedEvent>),
    /// The feed no longer holds every event after that position.
    Lagged,
    /// The feed is gone: the server is stopping.
    Closed,
}

/// The default bound on the bytes the feed holds.
pub const LIVE_BUFFER_BYTES: usize = 16 * 1024 * 1024;

impl Feed {
    /// Holds the latest `max_events` events, within the default bytes.
    pub fn new(max_events: usize) -> Self {
        Self::with_limits(max_events, LIVE_BUFFER_BYTES)
    }

    /// Holds the latest events, at most `max_events` of them and at most
    /// `max_bytes` (the newest event is held whatever its size).
    pub fn with_limits(max_events: usize, max_bytes: usize) -> Self {
        let (head, _) = watch::channel(0);
        Feed {
            ring: Arc::new(Mutex::new(Ring {
                events: VecDeque::new(),
                bytes: 0,
                max_events: max_events.max(1),
                max_bytes,
                dropped: 0,
            })),
            head: Arc::new(head),
        }
    }

    pub fn subscribe(&self) -> FeedReceiver {
        FeedReceiver {
            ring: Arc::clone(&self.ring),
            head: self.head.subscribe(),
        }
    }

    /// Called by the writer after commit, in sequence order.
    pub(crate) fn publish(&self, events: Vec<Arc<LoggedEvent>>) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        {
            let mut ring = lock(&self.ring);
            for e in events {
                ring.bytes += e.held_bytes();
                ring.events.push_back(e);
            }
            while ring.events.len() > 1
                && (ring.events.len() > ring.max_events || ring.bytes > ring.max_bytes)
            {
                if let Some(old) = ring.events.pop_front() {
                    ring.bytes -= old.held_bytes();
                    ring.dropped = old.seq;
                }
            }
        }
        self.head.send_replace(last);
    }

    /// The bytes and the number of events held.
    pub fn held(&self) -> (usize, usize) {
        let ring = lock(&self.ring);
        (ring.bytes, ring.events.len())
    }
}

fn lock(ring: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    // The ring is consistent between statements; a panic elsewhere while
    // holding the lock leaves nothing half done.
    ring.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One subscriber's view of the feed.
#[derive(Debug)]
pub struct FeedReceiver {
    ring: Arc<Mutex<Ring>>,
    head: watch::Receiver<i64>,
}

impl FeedReceiver {
    /// The first event after sequence `after`, once there is one.
    pub async fn next_after(&mut self, after: i64) -> Received {
        loop {
            // Marked seen before looking, so a publish after the look
            // wakes the wait below.
            self.head.borrow_and_update();
            {
                let ring = lock(&self.ring);
                if ring.dropped > after {
                    return Received::Lagged;
                }
                let i = ring.events.partition_point(|e| e.seq <= after);
                if let Some(e) = ring.events.get(i) {
                    return Received::Event(Arc::clone(e));
                }
            }
            if self.head.changed().await.is_err() {
                return Received::Closed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, payload: usize) -> Arc<LoggedEvent> {
        let status = pb::StatusEvent {
            sequence: seq,
            ..Default::default()
        };
        let mut bytes = status.encode_to_vec();
        // Padding in an unknown field keeps it a valid event of that size.
        prost::encoding::bytes::encode(1000, &vec![0u8; payload], &mut bytes);
        Arc::new(LoggedEvent::from_log(
            seq,
            "t".into(),
            "e".into(),
            None,
            None,
            &bytes,
        ))
    }

    #[tokio::test]
    async fn the_feed_holds_the_latest_events_within_its_bytes() {
        let feed = Feed::with_limits(1000, 1024 * 1024);
        let mut rx = feed.subscribe();
        for seq in 1..=100 {
            feed.publish(vec![event(seq, 64 * 1024)]);
        }
        let (bytes, count) = feed.held();
        assert!(bytes <= 1024 * 1024, "{bytes} bytes held");
        assert!(count < 100 && count > 1, "{count} events held");
        // Behind what it holds: lagged, read the log.
        assert!(matches!(rx.next_after(0).await, Received::Lagged));
        // Within it: the next event, in order.
        let first = 100 - count as i64 + 1;
        match rx.next_after(first - 1).await {
            Received::Event(e) => assert_eq!(e.seq, first),
            other => panic!("{other:?}"),
        }
        // An event larger than the bound is still held, alone.
        feed.publish(vec![event(101, 2 * 1024 * 1024)]);
        assert_eq!(feed.held().1, 1);
        match rx.next_after(100).await {
            Received::Event(e) => assert_eq!(e.seq, 101),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_subscriber_waits_for_the_next_event_and_ends_with_the_feed() {
        let feed = Feed::new(16);
        let mut rx = feed.subscribe();
        let waiting = tokio::spawn(async move {
            let got = rx.next_after(0).await;
            (got, rx)
        });
        tokio::task::yield_now().await;
        feed.publish(vec![event(1, 10)]);
        let (got, mut rx) = waiting.await.unwrap();
        assert!(matches!(got, Received::Event(e) if e.seq == 1));
        drop(feed);
        assert!(matches!(rx.next_after(1).await, Received::Closed));
    }
}
