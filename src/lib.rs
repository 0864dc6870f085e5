//! runledger: a gRPC service that records, orchestrates and streams the
//! state of executions and their task runs.
//!
//! Data flows one way: `grpc` decodes and validates, `orchestration`
//! decides, `store` commits, `stream` publishes, `grpc` encodes.

pub mod app;
pub mod bench;
pub mod config;
pub mod database_url;
pub mod domain;
mod error;
pub mod grpc;
pub mod keys;
pub mod orchestration;
pub mod store;
pub mod stream;
pub mod telemetry;

pub use app::{App, StartError};
pub use config::Config;
pub use error::{Error, Result};
