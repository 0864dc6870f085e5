//! Compiles the protobuf contract with protox (no system protoc) and keeps
//! the descriptor set for server reflection.

use std::{env, fs, path::PathBuf};

use anyhow::Context;
use prost::Message;

const PROTOS: &[&str] = &[
    "runledger/v1/types.proto",
    "runledger/v1/execution_service.proto",
    "runledger/v1/task_run_service.proto",
    "runledger/v1/event_service.proto",
    // Not compiled into Rust (tonic-types has it): listed so reflection
    // can describe the error details runledger sends.
    "google/rpc/error_details.proto",
];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    let fds = protox::compile(PROTOS, ["proto"]).context("compiling proto/")?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("runledger_descriptor.bin"), fds.encode_to_vec())?;

    // The three stream responses are `{StatusEvent event = 1}`: one Rust
    // type serves them, so that an event is encoded once for every
    // subscriber (see src/stream/message.rs).
    let mut config = tonic_prost_build::configure();
    for response in [
        "StreamExecutionStatusResponse",
        "StreamTaskRunStatusResponse",
        "SubscribeResponse",
    ] {
        config = config.extern_path(
            format!(".runledger.v1.{response}"),
            "crate::stream::EventMessage",
        );
    }
    config
        .codec_path("crate::grpc::codec::ProtoCodec")
        .btree_map(".")
        .compile_fds(fds)
        .context("generating Rust from the descriptors")?;
    Ok(())
}
