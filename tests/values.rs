//! What the server keeps and sends back stays within what a client can
//! read: resolved templates are bounded, errors quote only a short prefix
//! of the client's text, and a run's error belongs to the state it failed
//! in.

use prost_types::Value;
use runledger::grpc::pb;
use tonic::Code;

use crate::helpers::*;

fn json(v: serde_json::Value) -> Value {
    runledger::grpc::convert::value(&v)
}

fn status(r: i32) -> pb::SetStateStatus {
    pb::SetStateStatus::try_from(r).unwrap()
}

fn type_of(s: &Option<pb::State>) -> pb::StateType {
    pb::StateType::try_from(s.as_ref().unwrap().r#type).unwrap()
}

async fn running_execution(app: &TestApp) -> pb::Execution {
    let e = create_execution(app).await;
    set_execution_state(app, &e.id, pb::StateType::Running)
        .await
        .execution
        .unwrap()
}

async fn task_run_with(
    app: &TestApp,
    execution_id: &str,
    task_key: &str,
    input: serde_json::Value,
) -> pb::TaskRun {
    app.task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: execution_id.into(),
            task_key: task_key.into(),
            input: Some(json(input)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap()
}

async fn propose(
    app: &TestApp,
    id: &str,
    req: pb::SetTaskRunStateRequest,
) -> Result<pb::SetTaskRunStateResponse, tonic::Status> {
    app.task_runs
        .clone()
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: id.into(),
            ..req
        })
        .await
        .map(|r| r.into_inner())
}

async fn run(app: &TestApp, id: &str) -> pb::SetTaskRunStateResponse {
    propose(
        app,
        id,
        pb::SetTaskRunStateRequest {
            state: state(pb::StateType::Running),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn complete(app: &TestApp, id: &str, output: serde_json::Value) -> pb::TaskRun {
    propose(
        app,
        id,
        pb::SetTaskRunStateRequest {
            state: state(pb::StateType::Completed),
            output: Some(json(output)),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .task_run
    .unwrap()
}

#[tokio::test]
async fn a_huge_malformed_template_is_refused_with_a_short_message() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let template = format!("{{{{{}", "x".repeat(200 * 1024));
    let key = "k".repeat(100 * 1024);
    for input in [
        serde_json::json!({ "x": template }),
        serde_json::json!({ key: "{{a.result}}" }),
    ] {
        let err = app
            .task_runs
            .clone()
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: "t".into(),
                input: Some(json(input)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(violated_fields(&err), ["input"]);
        assert!(err.message().len() < 500, "{}", err.message());
    }
    // A long metadata key is not echoed whole in the field name either.
    let err = app
        .executions
        .clone()
        .create_execution(pb::CreateExecutionRequest {
            metadata: [("m".repeat(100 * 1024), String::new())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 500, "{}", err.message());
}
