use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message;
use tokio::sync::broadcast;

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

    /// The same event under another sequence number.
    pub(crate) fn with_seq(&self, seq: i64) -> Self {
        let mut status_event = self.event().clone();
        status_event.sequence = seq;
        let (wire, payload_start) = encode_event(&status_event);
        LoggedEvent {
            seq,
            tenant_id: self.tenant_id.clone(),
            execution_id: self.execution_id.clone(),
            task_run_id: self.task_run_id.clone(),
            task_id: self.task_id.clone(),
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

/// Committed events, fanned out to every live subscriber.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<LoggedEvent>>,
}

impl Feed {
    /// Holds the latest `buffer` events for subscribers that are behind;
    /// one further behind reads from the log instead.
    pub fn new(buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer);
        Feed { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.tx.subscribe()
    }

    /// Called by the writer after commit, in sequence order.
    pub(crate) fn publish(&self, events: Vec<Arc<LoggedEvent>>) {
        for e in events {
            // No receivers is fine: the log has it.
            let _ = self.tx.send(e);
        }
    }
}
