use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::broadcast;

use super::message::{EventMessage, encode_event};

use crate::{
    Error, Result,
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
    pub event: pb::StatusEvent,
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
            event: status_event,
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

    pub fn decode(
        seq: i64,
        tenant_id: String,
        execution_id: String,
        task_run_id: Option<String>,
        task_id: Option<String>,
        payload: &[u8],
    ) -> Result<Self> {
        let event = pb::StatusEvent::decode(payload)
            .map_err(|e| Error::Internal(format!("decoding event {seq}: {e}")))?;
        // The stored bytes are the event's encoding: wrap them, do not
        // encode again.
        let mut wire = Vec::with_capacity(payload.len() + 6);
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut wire);
        prost::encoding::encode_varint(payload.len() as u64, &mut wire);
        let payload_start = wire.len();
        wire.extend_from_slice(payload);
        Ok(LoggedEvent {
            seq,
            tenant_id,
            execution_id,
            task_run_id,
            task_id,
            event,
            wire: Bytes::from(wire),
            payload_start,
        })
    }

    /// The state type of the run after this event.
    pub fn state_type(&self) -> i32 {
        let state = match &self.event.resource {
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
