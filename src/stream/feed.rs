use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use super::message::{EventMessage, encode_event};

use crate::{
    domain::{EventRecord, document::CLIENT_MESSAGE_LIMIT},
    grpc::{convert, pb},
    store::{Answer, CommitListener, EventBody, EventFormat, EventIds, StoredEvent},
};

/// An event as streams send it: its sequence in its tenant's log, the ids
/// streams select on, and the stream message, encoded once for every
/// subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub seq: i64,
    pub tenant_id: String,
    pub execution_id: String,
    pub task_run_id: Option<String>,
    /// The task_id of the execution the event belongs to.
    pub task_id: Option<String>,
    /// The event decoded, when something needed it: events from records
    /// are built that way; events of the earlier wire encoding read back
    /// from the log are decoded when a filter or an ending looks inside
    /// them, or when they are sent.
    event: OnceLock<Readable>,
    /// The stream message carrying the event, encoded once for everyone.
    wire: Bytes,
    /// Where the event's own encoding starts in `wire`.
    payload_start: usize,
}

impl LoggedEvent {
    /// The event as streams send it, from the log's record of it.
    pub fn from_stored(stored: StoredEvent) -> Self {
        let StoredEvent {
            seq,
            tenant_id,
            execution_id,
            task_run_id,
            task_id,
            body,
        } = stored;
        let record = match body {
            EventBody::Record(record) => Ok(record),
            EventBody::Stored {
                format: EventFormat::Record,
                bytes,
            } => EventRecord::decode(&bytes).map(Arc::new),
            EventBody::Stored {
                format: EventFormat::LegacyWire,
                bytes,
            } => {
                return Self::from_log(seq, tenant_id, execution_id, task_run_id, task_id, &bytes);
            }
            EventBody::Stored {
                format: EventFormat::Unknown(code),
                ..
            } => Err(format!("an event stored in unknown format {code}")),
        };
        match record {
            Ok(record) => {
                let status = convert::status_event(seq, &record.event());
                Self::built(seq, tenant_id, execution_id, task_run_id, task_id, status)
            }
            Err(e) => {
                tracing::error!(seq, tenant = %tenant_id, error = %e, "unreadable event in the log; sending a stand-in");
                let logged = LoggedEvent {
                    seq,
                    tenant_id,
                    execution_id,
                    task_run_id,
                    task_id,
                    event: OnceLock::new(),
                    wire: Bytes::new(),
                    payload_start: 0,
                };
                let readable = logged.stand_in(None);
                let _ = logged.event.set(readable);
                logged
            }
        }
    }

    /// An event just accepted, under sequence `seq`.
    pub fn new(seq: i64, event: &crate::domain::Event<'_>) -> Self {
        Self::built(
            seq,
            event.resource.tenant_id().to_owned(),
            event.resource.execution_id().to_string(),
            event.resource.task_run_id().map(|id| id.to_string()),
            event.task_id.map(str::to_owned),
            convert::status_event(seq, event),
        )
    }

    /// The ids streams select the event by.
    pub fn ids(&self) -> EventIds<'_> {
        EventIds {
            tenant_id: &self.tenant_id,
            execution_id: &self.execution_id,
            task_run_id: self.task_run_id.as_deref(),
        }
    }

    fn built(
        seq: i64,
        tenant_id: String,
        execution_id: String,
        task_run_id: Option<String>,
        task_id: Option<String>,
        status_event: pb::StatusEvent,
    ) -> Self {
        let (wire, payload_start) = encode_event(&status_event);
        let logged = LoggedEvent {
            seq,
            tenant_id,
            execution_id,
            task_run_id,
            task_id,
            event: OnceLock::new(),
            wire,
            payload_start,
        };
        let readable = if logged.wire.len() > CLIENT_MESSAGE_LIMIT {
            tracing::error!(
                seq,
                bytes = logged.wire.len(),
                "event too large for a client; sending a stand-in"
            );
            logged.stand_in(Some(status_event))
        } else {
            Readable {
                event: status_event,
                stand_in: None,
            }
        };
        let _ = logged.event.set(readable);
        logged
    }

    /// The encoded StatusEvent.
    fn payload(&self) -> Bytes {
        self.wire.slice(self.payload_start..)
    }

    /// The stream message to send: shared bytes, no copy; or the stand-in
    /// of an event a client could not read (see [`LoggedEvent::event`]).
    pub fn message(&self) -> EventMessage {
        match &self.readable().stand_in {
            Some(wire) => EventMessage::encoded(wire.clone()),
            None => EventMessage::encoded(self.wire.clone()),
        }
    }

    /// Whether the stored event could not be read back whole, so that
    /// streams deliver a stand-in for it.
    pub fn is_stand_in(&self) -> bool {
        self.readable().stand_in.is_some()
    }

    /// An event the log holds in the earlier encoding: an encoded
    /// StatusEvent.
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

    /// The event. The server logs only events a client can read (runs are
    /// bounded in size and depth where they change). Should the stored
    /// bytes still not decode (a damaged database, or a log written before
    /// those bounds), or be too large for a client, the event reads as a
    /// stand-in: its sequence and its run's ids, with the kind, time and
    /// state when they are known and none of the run's values. A stream
    /// delivers the stand-in in the event's place, so that no client stops
    /// at it for ever and none misses it without a trace; it has no state
    /// type when the event did not decode, and kind UNSPECIFIED then.
    pub fn event(&self) -> &pb::StatusEvent {
        &self.readable().event
    }

    fn readable(&self) -> &Readable {
        self.event.get_or_init(|| {
            let decoded = pb::StatusEvent::decode(self.payload());
            let too_large = self.wire.len() > CLIENT_MESSAGE_LIMIT;
            match decoded {
                Ok(event) if !too_large => Readable {
                    event,
                    stand_in: None,
                },
                Ok(event) => {
                    tracing::error!(seq = self.seq, bytes = self.wire.len(), "logged event too large for a client; sending a stand-in");
                    self.stand_in(Some(event))
                }
                Err(e) => {
                    tracing::error!(seq = self.seq, error = %e, "undecodable event in the log; sending a stand-in");
                    self.stand_in(None)
                }
            }
        })
    }

    fn stand_in(&self, decoded: Option<pb::StatusEvent>) -> Readable {
        let mut event = decoded.unwrap_or_default();
        event.sequence = self.seq;
        event.resource = Some(match event.resource.take() {
            Some(pb::status_event::Resource::Execution(e)) => {
                pb::status_event::Resource::Execution(pb::Execution {
                    id: e.id,
                    tenant_id: e.tenant_id,
                    task_id: e.task_id,
                    state: e.state.map(without_data),
                    ..Default::default()
                })
            }
            Some(pb::status_event::Resource::TaskRun(t)) => {
                pb::status_event::Resource::TaskRun(pb::TaskRun {
                    id: t.id,
                    tenant_id: t.tenant_id,
                    execution_id: t.execution_id,
                    task_key: t.task_key,
                    state: t.state.map(without_data),
                    ..Default::default()
                })
            }
            None => match &self.task_run_id {
                Some(id) => pb::status_event::Resource::TaskRun(pb::TaskRun {
                    id: id.clone(),
                    tenant_id: self.tenant_id.clone(),
                    execution_id: self.execution_id.clone(),
                    ..Default::default()
                }),
                None => pb::status_event::Resource::Execution(pb::Execution {
                    id: self.execution_id.clone(),
                    tenant_id: self.tenant_id.clone(),
                    task_id: self.task_id.clone().unwrap_or_default(),
                    ..Default::default()
                }),
            },
        });
        let (wire, _) = encode_event(&event);
        Readable {
            event,
            stand_in: Some(wire),
        }
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

/// An event as decoded, and what to send instead when it cannot be sent.
#[derive(Debug, Clone, PartialEq)]
struct Readable {
    event: pb::StatusEvent,
    /// The stand-in's stream message, when the stored event cannot be
    /// sent as it is.
    stand_in: Option<Bytes>,
}

fn without_data(mut s: pb::State) -> pb::State {
    s.data = None;
    s
}

/// Committed events, fanned out to every live subscriber: the latest of
/// them, bounded by count and by bytes over all tenants, shared by all,
/// each tenant's in its log's order. A subscriber that falls further
/// behind than the feed holds reads from the log instead, so one that does
/// not read costs only its position.
#[derive(Debug, Clone)]
pub struct Feed {
    shared: Arc<Mutex<Shared>>,
    /// Bumped at every publish; subscribers wait on it. Dropped with the
    /// last handle, which ends every subscriber.
    version: Arc<watch::Sender<u64>>,
    /// Wakes the tailer: a tenant gained its first subscriber, or this
    /// server committed events the feed could not take in order.
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
struct Shared {
    tenants: HashMap<Arc<str>, TenantLog>,
    /// Every held event's tenant and sequence, oldest first: the order
    /// events leave in.
    order: VecDeque<(Arc<str>, i64)>,
    bytes: usize,
    count: usize,
    max_events: usize,
    max_bytes: usize,
    /// Whether other servers write to the database too: then events
    /// committed here join the feed only where they follow what it holds,
    /// and the tailer reads the rest from the log.
    shared_database: bool,
    /// Tenants whose events committed here did not follow what the feed
    /// held, with the latest such sequence: for the tailer.
    behind: HashMap<String, i64>,
}

/// The latest events of one tenant's log.
#[derive(Debug, Default)]
struct TenantLog {
    events: VecDeque<Arc<LoggedEvent>>,
    /// The highest sequence not held (every one up to it is in the log
    /// only); None until the first event arrives.
    dropped: Option<i64>,
    /// Subscribers following the tenant.
    receivers: usize,
}

impl TenantLog {
    /// The latest sequence the feed has taken in, if any.
    fn latest(&self) -> Option<i64> {
        self.events.back().map(|l| l.seq).or(self.dropped)
    }
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

/// How many committed batches wait at most for the feed's encoder; the
/// writer waits for room beyond that.
const ENCODER_QUEUE: usize = 1024;

impl Feed {
    /// Holds the latest `max_events` events, within the default bytes.
    pub fn new(max_events: usize) -> Self {
        Self::with_limits(max_events, LIVE_BUFFER_BYTES)
    }

    /// Holds the latest events, at most `max_events` of them and at most
    /// `max_bytes` (the newest event is held whatever its size).
    pub fn with_limits(max_events: usize, max_bytes: usize) -> Self {
        let (version, _) = watch::channel(0);
        Feed {
            shared: Arc::new(Mutex::new(Shared {
                tenants: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                count: 0,
                max_events: max_events.max(1),
                max_bytes,
                shared_database: false,
                behind: HashMap::new(),
            })),
            version: Arc::new(version),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Follows `tenant`'s events.
    pub fn subscribe(&self, tenant: &str) -> FeedReceiver {
        let tenant: Arc<str> = tenant.into();
        let first = {
            let mut shared = lock(&self.shared);
            let log = shared.tenants.entry(Arc::clone(&tenant)).or_default();
            log.receivers += 1;
            log.receivers == 1
        };
        if first {
            self.wake.notify_one();
        }
        FeedReceiver {
            shared: Arc::clone(&self.shared),
            tenant,
            version: self.version.subscribe(),
        }
    }

    /// Takes in events committed here only where they follow what the feed
    /// holds, leaving the rest to the tailer: for a database other servers
    /// write to too.
    pub fn set_shared_database(&self) {
        lock(&self.shared).shared_database = true;
    }

    /// Tenants with subscribers, with the latest sequence the feed has of
    /// each (None: none yet).
    pub(crate) fn followed(&self) -> Vec<(String, Option<i64>)> {
        lock(&self.shared)
            .tenants
            .iter()
            .filter(|(_, log)| log.receivers > 0)
            .map(|(t, log)| (t.to_string(), log.latest()))
            .collect()
    }

    /// The latest sequence the feed has of `tenant`.
    pub(crate) fn latest(&self, tenant: &str) -> Option<i64> {
        lock(&self.shared)
            .tenants
            .get(tenant)
            .and_then(TenantLog::latest)
    }

    /// Starts `tenant`'s part of the feed after `head`, if it has none yet:
    /// everything up to `head` is the log's to give.
    pub(crate) fn start_at(&self, tenant: &str, head: i64) {
        let mut shared = lock(&self.shared);
        let log = shared.tenants.entry(tenant.into()).or_default();
        if log.latest().is_none() {
            log.dropped = Some(head);
        }
    }

    /// Tenants whose events committed here the feed could not take in
    /// order, with the latest sequence of those.
    pub(crate) fn take_behind(&self) -> HashMap<String, i64> {
        std::mem::take(&mut lock(&self.shared).behind)
    }

    /// Resolves when the tailer has something to look at.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// Events committed by this server, in each tenant's order: published,
    /// or on a shared database left to the tailer where they do not follow
    /// what the feed holds of their tenant (other servers' events may come
    /// between) or where nobody follows their tenant.
    /// (Their callers are answered then: on a shared database an event left
    /// to the tailer reaches this server's subscribers one pass of the
    /// tailer later.)
    fn committed_here(&self, events: Vec<Arc<LoggedEvent>>) {
        let events = {
            let mut guard = lock(&self.shared);
            let shared = &mut *guard;
            if !shared.shared_database {
                events
            } else {
                let mut taken = Vec::with_capacity(events.len());
                let mut latest: HashMap<String, Option<i64>> = HashMap::new();
                let mut woke = false;
                for e in events {
                    let known = latest.entry(e.tenant_id.clone()).or_insert_with(|| {
                        shared
                            .tenants
                            .get(e.tenant_id.as_str())
                            .filter(|log| log.receivers > 0)
                            .map(|log| log.latest().unwrap_or(i64::MIN))
                    });
                    match known {
                        // Nobody follows the tenant here.
                        None => {}
                        Some(l) if *l == e.seq - 1 => {
                            *l = e.seq;
                            taken.push(e);
                        }
                        Some(_) => {
                            let b = shared.behind.entry(e.tenant_id.clone()).or_default();
                            *b = (*b).max(e.seq);
                            woke = true;
                        }
                    }
                }
                if woke {
                    self.wake.notify_one();
                }
                taken
            }
        };
        self.publish(events);
    }

    /// What the store tells of its commits: events go to a thread of their
    /// own that encodes each once, for every subscriber, and publishes them
    /// in the order committed. The thread ends when the store lets go.
    pub fn listener(&self) -> std::io::Result<Arc<dyn CommitListener>> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<StoredEvent>, Answer)>(ENCODER_QUEUE);
        let feed = self.clone();
        std::thread::Builder::new()
            .name("runledger-feed".into())
            .spawn(move || {
                while let Ok((events, answer)) = rx.recv() {
                    // A defect in one batch's events costs subscribers those
                    // events (they lag to the log), never the callers'
                    // answers or the feed itself.
                    let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let events = events
                            .into_iter()
                            .map(|e| Arc::new(LoggedEvent::from_stored(e)))
                            .collect();
                        feed.committed_here(events);
                    }));
                    if published.is_err() {
                        tracing::error!("publishing committed events panicked");
                    }
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(answer)).is_err() {
                        tracing::error!("answering committed calls panicked");
                    }
                }
            })?;
        Ok(Arc::new(Encoder { tx }))
    }

    /// Publishes events, each tenant's in its log's order. An event the
    /// feed holds already is passed over; one that does not follow the
    /// tenant's latest leaves a gap, which subscribers behind it read from
    /// the log.
    pub(crate) fn publish(&self, events: Vec<Arc<LoggedEvent>>) {
        if events.is_empty() {
            return;
        }
        {
            let mut guard = lock(&self.shared);
            let shared = &mut *guard;
            for e in events {
                let tenant: Arc<str> = match shared.tenants.get_key_value(e.tenant_id.as_str()) {
                    Some((k, _)) => Arc::clone(k),
                    None => e.tenant_id.as_str().into(),
                };
                let log = shared.tenants.entry(Arc::clone(&tenant)).or_default();
                match log.latest() {
                    Some(latest) if e.seq <= latest => continue,
                    Some(latest) if e.seq == latest + 1 => {}
                    _ => {
                        // A gap (or the tenant's first event): everything
                        // before it is the log's to give.
                        for old in log.events.drain(..) {
                            shared.bytes -= old.held_bytes();
                            shared.count -= 1;
                        }
                        log.dropped = Some(e.seq - 1);
                    }
                }
                shared.bytes += e.held_bytes();
                shared.count += 1;
                shared.order.push_back((Arc::clone(&tenant), e.seq));
                log.events.push_back(e);
            }
            while shared.count > 1
                && (shared.count > shared.max_events || shared.bytes > shared.max_bytes)
            {
                let Some((tenant, seq)) = shared.order.pop_front() else {
                    break;
                };
                let Some(log) = shared.tenants.get_mut(&tenant) else {
                    continue;
                };
                // Gone already if a gap cleared the tenant's events.
                if log.events.front().is_some_and(|e| e.seq == seq)
                    && let Some(old) = log.events.pop_front()
                {
                    shared.bytes -= old.held_bytes();
                    shared.count -= 1;
                    log.dropped = Some(old.seq);
                    // Nothing held and nobody following: the tenant's entry
                    // goes (it comes back with its next event).
                    if log.events.is_empty() && log.receivers == 0 {
                        shared.tenants.remove(&tenant);
                    }
                }
            }
            // Entries of events a gap cleared leave with the oldest.
            while let Some((tenant, seq)) = shared.order.front() {
                let held = shared
                    .tenants
                    .get(tenant)
                    .is_some_and(|log| log.events.front().is_some_and(|e| e.seq <= *seq));
                if held {
                    break;
                }
                shared.order.pop_front();
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The bytes and the number of events held.
    pub fn held(&self) -> (usize, usize) {
        let shared = lock(&self.shared);
        (shared.bytes, shared.count)
    }
}

/// Hands committed events to the feed's encoder thread, which answers
/// the callers once it has published them.
struct Encoder {
    tx: std::sync::mpsc::SyncSender<(Vec<StoredEvent>, Answer)>,
}

impl CommitListener for Encoder {
    fn committed(&self, events: Vec<StoredEvent>, answer: Answer) {
        if events.is_empty() {
            answer();
            return;
        }
        // Fails only once the feed is gone, at shutdown: answer anyway.
        if let Err(std::sync::mpsc::SendError((_, answer))) = self.tx.send((events, answer)) {
            answer();
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // The feed is consistent between statements; a panic elsewhere while
    // holding the lock leaves nothing half done.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One subscriber's view of one tenant's events in the feed.
#[derive(Debug)]
pub struct FeedReceiver {
    shared: Arc<Mutex<Shared>>,
    tenant: Arc<str>,
    version: watch::Receiver<u64>,
}

impl Drop for FeedReceiver {
    fn drop(&mut self) {
        let mut guard = lock(&self.shared);
        let shared = &mut *guard;
        let Some(log) = shared.tenants.get_mut(&self.tenant) else {
            return;
        };
        log.receivers = log.receivers.saturating_sub(1);
        // On a shared database nobody follows the tenant here any more: its
        // part of the feed goes, and the next subscriber starts it afresh
        // at the tenant's head (rather than the tailer reading everything
        // since). Elsewhere it goes once it holds no event.
        if log.receivers == 0
            && (shared.shared_database || log.events.is_empty())
            && let Some(log) = shared.tenants.remove(&self.tenant)
        {
            for old in log.events {
                shared.bytes -= old.held_bytes();
                shared.count -= 1;
            }
        }
    }
}

impl FeedReceiver {
    /// The tenant's first event after sequence `after`, once there is one.
    pub async fn next_after(&mut self, after: i64) -> Received {
        loop {
            // Marked seen before looking, so a publish after the look
            // wakes the wait below.
            self.version.borrow_and_update();
            {
                let shared = lock(&self.shared);
                if let Some(log) = shared.tenants.get(&self.tenant) {
                    if log.dropped.is_some_and(|d| d > after) {
                        return Received::Lagged;
                    }
                    let i = log.events.partition_point(|e| e.seq <= after);
                    if let Some(e) = log.events.get(i) {
                        return Received::Event(Arc::clone(e));
                    }
                }
            }
            if self.version.changed().await.is_err() {
                return Received::Closed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::EventFilter;

    fn from_log(payload: &[u8]) -> LoggedEvent {
        LoggedEvent::from_log(
            7,
            "t".into(),
            "e1".into(),
            Some("r1".into()),
            Some("job".into()),
            payload,
        )
    }

    #[test]
    fn a_readable_event_is_sent_as_stored() {
        let event = pb::StatusEvent {
            sequence: 7,
            kind: pb::EventKind::Created as i32,
            ..Default::default()
        };
        let logged = from_log(&event.encode_to_vec());
        assert_eq!(logged.event(), &event);
        assert!(!logged.is_stand_in());
        assert_eq!(logged.message().encode_to_vec(), logged.wire.to_vec());
    }

    #[test]
    fn an_unreadable_event_becomes_a_stand_in_every_stream_delivers() {
        let logged = from_log(&[0xff, 0xff, 0xff]);
        assert!(logged.is_stand_in());
        let sent = EventMessage::decode(logged.message().encode_to_vec().as_slice())
            .unwrap()
            .event
            .unwrap();
        assert_eq!(sent.sequence, 7);
        assert_eq!(sent.kind, pb::EventKind::Unspecified as i32);
        match sent.resource {
            Some(pb::status_event::Resource::TaskRun(t)) => {
                assert_eq!((t.id.as_str(), t.execution_id.as_str()), ("r1", "e1"))
            }
            other => panic!("{other:?}"),
        }
        // Filters that look inside cannot rule it out.
        let filter = EventFilter {
            state_types: vec![pb::StateType::Completed as i32],
            labels: vec![("a".into(), "b".into())],
            include_task_runs: true,
            ..Default::default()
        };
        assert!(filter.matches(&logged));
        // Filters on what the log row holds still apply.
        let other = EventFilter {
            execution_ids: vec!["e2".into()],
            include_task_runs: true,
            ..Default::default()
        };
        assert!(!other.matches(&logged));
    }

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
        let mut rx = feed.subscribe("t");
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
        let mut rx = feed.subscribe("t");
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

    fn event_of(tenant: &str, seq: i64) -> Arc<LoggedEvent> {
        let status = pb::StatusEvent {
            sequence: seq,
            ..Default::default()
        };
        Arc::new(LoggedEvent::from_log(
            seq,
            tenant.into(),
            "e".into(),
            None,
            None,
            &status.encode_to_vec(),
        ))
    }

    async fn next(rx: &mut FeedReceiver, after: i64) -> Option<i64> {
        match tokio::time::timeout(std::time::Duration::from_millis(50), rx.next_after(after)).await
        {
            Ok(Received::Event(e)) => Some(e.seq),
            Ok(Received::Lagged) => Some(-1),
            Ok(Received::Closed) => Some(-2),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn each_tenant_follows_its_own_log() {
        let feed = Feed::new(100);
        let mut a = feed.subscribe("a");
        let mut b = feed.subscribe("b");
        feed.publish(vec![event_of("a", 1), event_of("b", 1), event_of("a", 2)]);
        assert_eq!(next(&mut a, 0).await, Some(1));
        assert_eq!(next(&mut a, 1).await, Some(2));
        assert_eq!(next(&mut a, 2).await, None, "a has nothing more");
        assert_eq!(next(&mut b, 0).await, Some(1));
        assert_eq!(next(&mut b, 1).await, None, "a's events are not b's");
        // A tenant nobody wrote to waits.
        let mut c = feed.subscribe("c");
        assert_eq!(next(&mut c, 0).await, None);
    }

    #[tokio::test]
    async fn a_gap_or_a_late_start_sends_subscribers_behind_it_to_the_log() {
        let feed = Feed::new(100);
        let mut rx = feed.subscribe("t");
        // The first event the feed sees is 5: 1..4 are the log's.
        feed.publish(vec![event_of("t", 5)]);
        assert_eq!(next(&mut rx, 0).await, Some(-1));
        assert_eq!(next(&mut rx, 4).await, Some(5));
        // Held already: passed over.
        feed.publish(vec![event_of("t", 5), event_of("t", 6)]);
        assert_eq!(feed.held().1, 2);
        // 7 and 8 never arrived: 9 starts again, behind it is the log's.
        feed.publish(vec![event_of("t", 9)]);
        assert_eq!(feed.held().1, 1);
        assert_eq!(next(&mut rx, 6).await, Some(-1));
        assert_eq!(next(&mut rx, 8).await, Some(9));
    }

    #[tokio::test]
    async fn the_oldest_events_of_any_tenant_leave_first() {
        let feed = Feed::new(3);
        let mut a = feed.subscribe("a");
        let mut b = feed.subscribe("b");
        feed.publish(vec![event_of("a", 1), event_of("b", 1), event_of("a", 2)]);
        feed.publish(vec![event_of("b", 2)]);
        assert_eq!(feed.held().1, 3);
        // a's first event left: a subscriber before it reads the log.
        assert_eq!(next(&mut a, 0).await, Some(-1));
        assert_eq!(next(&mut a, 1).await, Some(2));
        assert_eq!(next(&mut b, 0).await, Some(1));
        assert_eq!(next(&mut b, 1).await, Some(2));
    }

    #[tokio::test]
    async fn on_a_shared_database_events_committed_here_join_only_in_order() {
        let feed = Feed::new(100);
        feed.set_shared_database();
        // Nobody follows the tenant: nothing is kept, nothing is asked for.
        feed.committed_here(vec![event_of("t", 1)]);
        assert_eq!(feed.held().1, 0);
        assert!(feed.take_behind().is_empty());

        let mut rx = feed.subscribe("t");
        assert_eq!(feed.followed(), [("t".to_owned(), None)]);
        // The tailer starts the tenant at its head.
        feed.start_at("t", 3);
        // 4 follows: taken in at once.
        feed.committed_here(vec![event_of("t", 4)]);
        assert_eq!(next(&mut rx, 3).await, Some(4));
        // 6 does not (another server's 5 comes first): left to the tailer.
        feed.committed_here(vec![event_of("t", 6)]);
        assert_eq!(next(&mut rx, 4).await, None);
        assert_eq!(feed.take_behind(), HashMap::from([("t".to_owned(), 6)]));
        // What the tailer reads from the log joins in order.
        feed.publish(vec![event_of("t", 5), event_of("t", 6)]);
        assert_eq!(next(&mut rx, 4).await, Some(5));
        assert_eq!(next(&mut rx, 5).await, Some(6));
        drop(rx);
        assert!(feed.followed().is_empty());
    }

    #[tokio::test]
    async fn a_tenant_nobody_follows_leaves_the_feed() {
        // Shared database: the last subscriber gone, the next one starts
        // afresh (the tailer starts it at the head, not at what was held).
        let feed = Feed::new(100);
        feed.set_shared_database();
        let rx = feed.subscribe("t");
        feed.start_at("t", 3);
        feed.publish(vec![event_of("t", 4)]);
        assert_eq!(feed.held().1, 1);
        drop(rx);
        assert_eq!(feed.held(), (0, 0));
        let _rx = feed.subscribe("t");
        assert_eq!(feed.followed(), [("t".to_owned(), None)]);

        // One server: a tenant's entry goes with its last held event.
        let feed = Feed::new(1);
        feed.publish(vec![event_of("x", 1)]);
        assert_eq!(feed.latest("x"), Some(1));
        feed.publish(vec![event_of("y", 1)]);
        assert_eq!(feed.latest("x"), None);
        assert_eq!(lock(&feed.shared).tenants.len(), 1);
    }
}
