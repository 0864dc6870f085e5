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

/// At most the first 64 bytes of a client's id, for logs and spans: an id
/// is a UUID when valid, and an invalid one must not make a log line long.
pub(crate) fn log_id(id: &str) -> &str {
    let mut end = id.len().min(64);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// The fully qualified names of the services, for health reporting.
pub const SERVICE_NAMES: [&str; 3] = [
    "runledger.v1.ExecutionService",
    "runledger.v1.TaskRunService",
    "runledger.v1.EventService",
];

#[cfg(test)]
mod tests {
    #[test]
    fn logged_ids_are_bounded() {
        let id = "0194f1d2-7b1c-7c3e-9a51-8f0e2d6c4b3a";
        assert_eq!(super::log_id(id), id);
        assert_eq!(super::log_id(&"x".repeat(200_000)).len(), 64);
        assert_eq!(super::log_id(&"é".repeat(100)).len(), 64);
    }
}
