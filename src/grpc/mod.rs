//! The gRPC edge: generated code, conversions between protobuf and the
//! domain, the one mapping from errors to `Status`, and the services.

pub mod auth;
pub mod codec;
pub mod convert;
mod events;
mod execution;
pub mod limits;
mod requests;
pub mod send_budget;
mod status;
mod streams;
mod task_run;

pub use events::EventApi;
pub use execution::ExecutionApi;
pub(crate) use streams::Streams;
pub use task_run::TaskRunApi;

/// Code generated from `proto/runledger/v1`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("runledger.v1");

    /// `{StatusEvent event = 1}`: see `stream::EventMessage`.
    pub type StreamExecutionStatusResponse = crate::stream::EventMessage;
    pub type StreamTaskRunStatusResponse = crate::stream::EventMessage;
    pub type SubscribeResponse = crate::stream::EventMessage;

    /// The encoded descriptors of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/runledger_descriptor.bin"));
}

/// The fully qualified names of the services, for health reporting.
pub const SERVICE_NAMES: [&str; 3] = [
    "runledger.v1.ExecutionService",
    "runledger.v1.TaskRunService",
    "runledger.v1.EventService",
];
