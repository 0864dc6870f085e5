//! Limits on the size of what a client may send.

use runledger::grpc::pb;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_clearly() {
    let app = spawn_app().await;
    let huge = pb::CreateExecutionRequest {
        goal: "g".repeat(5 * 1024 * 1024),
        ..Default::default()
    };
    let err = app
        .executions
        .clone()
        .create_execution(huge)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("limit"), "{}", err.message());
    // Nothing was created, and the server goes on serving.
    let list = app
        .executions
        .clone()
        .list_executions(pb::ListExecutionsRequest::default())
        .await
        .unwrap();
    assert!(list.into_inner().executions.is_empty());
    create_execution(&app).await;
}
