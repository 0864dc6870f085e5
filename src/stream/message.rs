//! The message every status stream sends (`StreamExecutionStatusResponse`,
//! `StreamTaskRunStatusResponse`, `SubscribeResponse`: each is
//! `{StatusEvent event = 1}`). The server encodes an event once, when it
//! is logged, and every subscriber sends those same bytes; clients decode
//! it like any message.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{self, DecodeContext, WireType},
};

use crate::grpc::pb::StatusEvent;

/// `{StatusEvent event = 1}`, either decoded or already encoded.
#[derive(Clone, PartialEq, Default)]
pub struct EventMessage {
    /// The event, when built or received as a value.
    pub event: Option<StatusEvent>,
    /// The whole message, encoded, when the server has it that way.
    encoded: Option<Bytes>,
}

impl std::fmt::Debug for EventMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMessage")
            .field("event", &self.event)
            .field("encoded_len", &self.encoded.as_ref().map(Bytes::len))
            .finish()
    }
}

impl EventMessage {
    pub fn new(event: StatusEvent) -> Self {
        EventMessage {
            event: Some(event),
            encoded: None,
        }
    }

    /// A message whose encoding is `wire`, as made by [`encode_event`].
    pub(crate) fn encoded(wire: Bytes) -> Self {
        EventMessage {
            event: None,
            encoded: Some(wire),
        }
    }
}

/// Encodes `{event = 1}` around an encoded StatusEvent; returns the bytes
/// and where the event's own bytes start.
pub(crate) fn encode_event(event: &StatusEvent) -> (Bytes, usize) {
    let len = event.encoded_len();
    let mut buf = Vec::with_capacity(len + 6);
    encoding::encode_key(1, WireType::LengthDelimited, &mut buf);
    encoding::encode_varint(len as u64, &mut buf);
    let start = buf.len();
    event.encode_raw(&mut buf);
    (Bytes::from(buf), start)
}

impl Message for EventMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match (&self.encoded, &self.event) {
            (Some(wire), _) => buf.put_slice(wire),
            (None, Some(event)) => encoding::message::encode(1, event, buf),
            (None, None) => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == 1 {
            self.encoded = None;
            let event = self.event.get_or_insert_with(StatusEvent::default);
            encoding::message::merge(wire_type, event, buf, ctx)
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        match (&self.encoded, &self.event) {
            (Some(wire), _) => wire.len(),
            (None, Some(event)) => encoding::message::encoded_len(1, event),
            (None, None) => 0,
        }
    }

    fn clear(&mut self) {
        self.event = None;
        self.encoded = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::pb;

    #[test]
    fn pre_encoded_and_built_messages_are_the_same_bytes() {
        let event = pb::StatusEvent {
            sequence: 42,
            kind: pb::EventKind::Created as i32,
            ..Default::default()
        };
        let built = EventMessage::new(event.clone()).encode_to_vec();
        let (wire, start) = encode_event(&event);
        assert_eq!(EventMessage::encoded(wire.clone()).encode_to_vec(), built);
        assert_eq!(wire.slice(start..), event.encode_to_vec());
        let decoded = EventMessage::decode(&built[..]).unwrap();
        assert_eq!(decoded.event, Some(event));
        // The generated message of the contract decodes it too.
        let theirs = pb::StatusEvent::decode(&wire[start..]).unwrap();
        assert_eq!(theirs.sequence, 42);
    }
}
