//! The live feed of committed events and the subscriptions that follow it:
//! snapshot or log first, then live, falling back to the log whenever a
//! subscriber falls behind.

mod feed;
mod filter;
mod message;
mod service;
mod subscription;
pub mod tailer;

pub use feed::{Feed, FeedReceiver, LIVE_BUFFER_BYTES, LoggedEvent, Received};
pub use filter::EventFilter;
pub use message::EventMessage;
pub use service::Streams;
pub use subscription::Subscription;
