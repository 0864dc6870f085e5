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

async fn fail(app: &TestApp, id: &str) -> pb::SetTaskRunStateResponse {
    propose(
        app,
        id,
        pb::SetTaskRunStateRequest {
            state: state(pb::StateType::Failed),
            error: Some(pb::ErrorInfo {
                message: "boom".into(),
                r#type: "IOError".into(),
                traceback: String::new(),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn history(app: &TestApp, task_run_id: &str) -> Vec<pb::State> {
    app.task_runs
        .clone()
        .list_states(pb::ListStatesRequest {
            task_run_id: task_run_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .states
}

#[tokio::test]
async fn a_run_that_completes_after_a_failed_attempt_shows_no_error() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let t = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "flaky".into(),
            retry_policy: Some(pb::RetryPolicy {
                retries: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    run(&app, &t.id).await;
    let retry = fail(&app, &t.id).await;
    assert_eq!(type_of(&retry.state), pb::StateType::Scheduled);
    assert_eq!(retry.task_run.unwrap().error.unwrap().message, "boom");

    let again = run(&app, &t.id).await;
    assert_eq!(status(again.status), pb::SetStateStatus::Accept);
    assert_eq!(again.task_run.unwrap().error, None);
    let done = complete(&app, &t.id, serde_json::json!({"ok": true})).await;
    assert_eq!(done.error, None, "a COMPLETED run has no error");
    let fetched = app
        .task_runs
        .clone()
        .get_task_run(pb::GetTaskRunRequest { id: t.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    assert_eq!(fetched.error, None);

    // The failed attempt is still in the history, with its error.
    let states = history(&app, &t.id).await;
    let attempt = states
        .iter()
        .find(|s| s.name == "AwaitingRetry")
        .expect("the failed attempt's state");
    assert_eq!(attempt.message, "boom");

    // Out of retries the run is FAILED with its error, and a forced
    // completion clears it while the FAILED state keeps it.
    let other = task_run_with(&app, &exec.id, "once", serde_json::json!({})).await;
    run(&app, &other.id).await;
    let failed = fail(&app, &other.id).await;
    assert_eq!(type_of(&failed.state), pb::StateType::Failed);
    assert_eq!(failed.task_run.unwrap().error.unwrap().r#type, "IOError");
    let forced = propose(
        &app,
        &other.id,
        pb::SetTaskRunStateRequest {
            state: state(pb::StateType::Completed),
            force: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(forced.task_run.unwrap().error, None);
    let states = history(&app, &other.id).await;
    let failed_state = states
        .iter()
        .find(|s| s.r#type == pb::StateType::Failed as i32)
        .expect("the FAILED state");
    assert_eq!(failed_state.message, "boom");
}
