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

/// Asserts `r` is refused as INVALID_ARGUMENT naming `field`.
fn refused_on<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) {
    let status = r.expect_err(field);
    let fields = violated_fields(&status);
    assert!(
        fields.iter().any(|f| f == field),
        "{field} not in {fields:?}"
    );
    assert!(status.message().contains("NUL"), "{}", status.message());
}

/// NUL characters in identifiers, keys, metadata, labels and filters are
/// refused by field, whatever the database (PostgreSQL cannot store them
/// in text), and the server goes on serving.
async fn nul_characters_are_refused_by_field(app: &TestApp) {
    let nul = "a\0b".to_owned();
    let mut execs = app.executions.clone();
    let mut runs = app.task_runs.clone();
    let create = |f: &dyn Fn(&mut pb::CreateExecutionRequest)| {
        let mut r = goal("g");
        f(&mut r);
        r
    };
    for (field, r) in [
        ("request_id", create(&|r| r.request_id = nul.clone())),
        ("task_id", create(&|r| r.task_id = nul.clone())),
        ("name", create(&|r| r.name = nul.clone())),
        (
            "metadata[k]",
            create(&|r| {
                r.metadata.insert("k".into(), nul.clone());
            }),
        ),
        (
            "metadata",
            create(&|r| {
                r.metadata.insert(nul.clone(), "v".into());
            }),
        ),
    ] {
        refused_on(execs.create_execution(r).await, field);
    }
    refused_on(
        execs
            .list_executions(pb::ListExecutionsRequest {
                task_id: nul.clone(),
                ..Default::default()
            })
            .await,
        "task_id",
    );
    refused_on(
        execs
            .list_executions(pb::ListExecutionsRequest {
                metadata: [("k".to_owned(), nul.clone())].into(),
                ..Default::default()
            })
            .await,
        "metadata",
    );

    let exec = running_execution_via(&mut execs, "nul").await;
    let task_run = |f: &dyn Fn(&mut pb::CreateTaskRunRequest)| {
        let mut r = pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "k".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (field, r) in [
        ("task_key", task_run(&|r| r.task_key = nul.clone())),
        ("dynamic_key", task_run(&|r| r.dynamic_key = nul.clone())),
        ("cache_key", task_run(&|r| r.cache_key = nul.clone())),
        ("tags", task_run(&|r| r.tags = vec![nul.clone()])),
        (
            "labels[k]",
            task_run(&|r| {
                r.labels.insert("k".into(), nul.clone());
            }),
        ),
    ] {
        refused_on(runs.create_task_run(r).await, field);
    }
    refused_on(
        runs.list_task_runs(pb::ListTaskRunsRequest {
            task_key: nul.clone(),
            ..Default::default()
        })
        .await,
        "task_key",
    );
    refused_on(
        runs.list_task_runs(pb::ListTaskRunsRequest {
            labels: [(nul.clone(), "v".to_owned())].into(),
            ..Default::default()
        })
        .await,
        "labels",
    );
    let with_details = |details: pb::StateDetails| pb::SetExecutionStateRequest {
        id: exec.id.clone(),
        state: Some(pb::StateCreate {
            r#type: pb::StateType::Paused as i32,
            details: Some(details),
            ..Default::default()
        }),
        ..Default::default()
    };
    refused_on(
        execs
            .set_execution_state(with_details(pb::StateDetails {
                transition_id: nul.clone(),
                ..Default::default()
            }))
            .await,
        "state.details.transition_id",
    );
    refused_on(
        execs
            .set_execution_state(with_details(pb::StateDetails {
                pause_key: nul.clone(),
                ..Default::default()
            }))
            .await,
        "state.details.pause_key",
    );

    // Nothing was written, and the server goes on serving.
    let listed = execs
        .list_executions(pb::ListExecutionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.executions.len(), 1);
    let run = create_task_run(app, &exec.id, "k").await;
    assert_eq!(run.task_key, "k");
}

#[tokio::test]
async fn a_nul_character_is_refused_by_field() {
    let app = spawn_app().await;
    nul_characters_are_refused_by_field(&app).await;
    app.stop().await;
}
