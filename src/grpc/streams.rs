//! Status streams as gRPC response streams.

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

use crate::stream::{EventMessage, Subscription};

pub(crate) type EventStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// Serves a subscription as a response stream.
pub(crate) fn serve(sub: Subscription) -> EventStream<EventMessage> {
    Box::pin(futures::stream::unfold(sub, |mut sub| async move {
        let item = sub.next().await?;
        Some((item.map_err(Status::from), sub))
    }))
}
