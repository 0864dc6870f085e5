//! Retries, caching, templates, cancellation, pause and resume, soft
//! delete and stale marking, through the gRPC API.

use std::time::Duration;

use pb::StateType::*;
use prost_types::{Struct, Value, value::Kind};
use runledger::grpc::pb;
use tonic::Code;

use crate::helpers::*;

fn json(v: serde_json::Value) -> Value {
    runledger::grpc::convert::value(&v)
}

fn to_json(v: &Value) -> serde_json::Value {
    runledger::grpc::convert::from_value(v).unwrap()
}

fn obj(v: serde_json::Value) -> Struct {
    match json(v).kind {
        Some(Kind::StructValue(s)) => s,
        _ => panic!("not an object"),
    }
}

fn type_of(s: &Option<pb::State>) -> pb::StateType {
    pb::StateType::try_from(s.as_ref().unwrap().r#type).unwrap()
}

fn name_of(s: &Option<pb::State>) -> &str {
    &s.as_ref().unwrap().name
}

fn status(r: i32) -> pb::SetStateStatus {
    pb::SetStateStatus::try_from(r).unwrap()
}

async fn running_execution(app: &TestApp) -> pb::Execution {
    let e = create_execution(app).await;
    set_execution_state(app, &e.id, Running)
        .await
        .execution
        .unwrap()
}

async fn task_run(app: &TestApp, req: pb::CreateTaskRunRequest) -> pb::TaskRun {
    app.task_runs
        .clone()
        .create_task_run(req)
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap()
}

async fn propose(app: &TestApp, id: &str, state: pb::StateCreate) -> pb::SetTaskRunStateResponse {
    app.task_runs
        .clone()
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: id.into(),
            state: Some(state),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn complete(
    app: &TestApp,
    id: &str,
    output: serde_json::Value,
) -> pb::SetTaskRunStateResponse {
    app.task_runs
        .clone()
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: id.into(),
            state: state(Completed),
            output: Some(json(output)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn fail(app: &TestApp, id: &str, retriable: Option<bool>) -> pb::SetTaskRunStateResponse {
    app.task_runs
        .clone()
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: id.into(),
            state: Some(pb::StateCreate {
                r#type: Failed as i32,
                details: Some(pb::StateDetails {
                    retriable,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            error: Some(pb::ErrorInfo {
                message: "boom".into(),
                r#type: "IOError".into(),
                traceback: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn plain(t: pb::StateType) -> pb::StateCreate {
    pb::StateCreate {
        r#type: t as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn failures_are_retried_per_the_policy_then_fail() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let run = task_run(
        &app,
        pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "fetch".into(),
            retry_policy: Some(pb::RetryPolicy {
                retries: 2,
                retry_delay_seconds: vec![0.3, 0.0],
                retry_jitter_factor: 0.0,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        status(propose(&app, &run.id, plain(Running)).await.status),
        pb::SetStateStatus::Accept
    );

    let r = fail(&app, &run.id, None).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Reject);
    assert_eq!(
        (type_of(&r.state), name_of(&r.state)),
        (Scheduled, "AwaitingRetry")
    );
    let t = r.task_run.unwrap();
    assert_eq!(t.updated_by, "system");
    assert_eq!(
        t.error.as_ref().unwrap().message,
        "boom",
        "the failed attempt's error is kept"
    );
    assert!(t.next_scheduled_start_time.is_some());

    // Too early: WAIT for the rest of the delay.
    let early = propose(&app, &run.id, plain(Running)).await;
    assert_eq!(status(early.status), pb::SetStateStatus::Wait);
    let wait = early.retry_after.unwrap();
    let wait = Duration::new(wait.seconds as u64, wait.nanos as u32);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(300),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;

    let again = propose(&app, &run.id, plain(Running)).await;
    assert_eq!(
        (status(again.status), name_of(&again.state)),
        (pb::SetStateStatus::Accept, "Retrying")
    );
    assert_eq!(again.task_run.as_ref().unwrap().run_count, 2);
    // The second retry has no delay.
    assert_eq!(
        name_of(&fail(&app, &run.id, None).await.state),
        "AwaitingRetry"
    );
    assert_eq!(
        status(propose(&app, &run.id, plain(Running)).await.status),
        pb::SetStateStatus::Accept
    );
    // Out of retries: the failure stands.
    let last = fail(&app, &run.id, None).await;
    assert_eq!(
        (status(last.status), type_of(&last.state)),
        (pb::SetStateStatus::Accept, Failed)
    );
    assert_eq!(last.task_run.unwrap().run_count, 3);

    // retriable=false skips the retry.
    let other = task_run(
        &app,
        pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "other".into(),
            retry_policy: Some(pb::RetryPolicy {
                retries: 5,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    propose(&app, &other.id, plain(Running)).await;
    assert_eq!(
        type_of(&fail(&app, &other.id, Some(false)).await.state),
        Failed
    );
}

#[tokio::test]
async fn a_cached_result_completes_later_runs_with_the_same_key() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let keyed = |key: &str, expiration: Option<prost_types::Timestamp>| pb::CreateTaskRunRequest {
        execution_id: exec.id.clone(),
        task_key: format!("t-{}", uuid::Uuid::now_v7()),
        cache_key: key.into(),
        cache_expiration: expiration,
        ..Default::default()
    };
    let first = task_run(&app, keyed("summary-v1", None)).await;
    propose(&app, &first.id, plain(Running)).await;
    complete(&app, &first.id, serde_json::json!({"summary": "short"})).await;

    let second = task_run(&app, keyed("summary-v1", None)).await;
    let r = propose(&app, &second.id, plain(Running)).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Reject);
    assert_eq!(
        (type_of(&r.state), name_of(&r.state)),
        (Completed, "Cached")
    );
    let cached = r.task_run.unwrap();
    assert_eq!(
        to_json(cached.output.as_ref().unwrap()),
        serde_json::json!({"summary": "short"})
    );
    assert_eq!(cached.run_count, 0, "a cached run never ran");

    // refresh_cache runs it anyway, and its result replaces the entry.
    let third = task_run(&app, keyed("summary-v1", None)).await;
    let refresh = pb::StateCreate {
        r#type: Running as i32,
        details: Some(pb::StateDetails {
            refresh_cache: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        status(propose(&app, &third.id, refresh).await.status),
        pb::SetStateStatus::Accept
    );
    complete(&app, &third.id, serde_json::json!({"summary": "longer"})).await;
    let fourth = task_run(&app, keyed("summary-v1", None)).await;
    let r = propose(&app, &fourth.id, plain(Running)).await;
    assert_eq!(
        to_json(r.task_run.unwrap().output.as_ref().unwrap())["summary"],
        "longer"
    );

    // An expired entry is ignored.
    let past = prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    let old = task_run(&app, keyed("expiring", Some(past))).await;
    propose(&app, &old.id, plain(Running)).await;
    complete(&app, &old.id, serde_json::json!(1)).await;
    let next = task_run(&app, keyed("expiring", None)).await;
    assert_eq!(
        status(propose(&app, &next.id, plain(Running)).await.status),
        pb::SetStateStatus::Accept
    );
}

#[tokio::test]
async fn templates_resolve_from_upstream_outputs_when_running() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let fetch = create_task_run(&app, &exec.id, "fetch").await;
    let input = serde_json::json!({
        "all": "{{fetch.output}}",
        "second": "{{fetch.output.items.1}}",
        "text": "name is {{fetch.output.name}}",
        "fixed": 5
    });
    let consumer = task_run(
        &app,
        pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "use".into(),
            input: Some(json(input)),
            ..Default::default()
        },
    )
    .await;

    let waiting = propose(&app, &consumer.id, plain(Running)).await;
    assert_eq!(status(waiting.status), pb::SetStateStatus::Wait);
    assert!(
        waiting.reason.contains("{{fetch.output"),
        "{}",
        waiting.reason
    );

    propose(&app, &fetch.id, plain(Running)).await;
    complete(
        &app,
        &fetch.id,
        serde_json::json!({"items": [10, 20], "name": "x"}),
    )
    .await;
    let ran = propose(&app, &consumer.id, plain(Running)).await;
    assert_eq!(status(ran.status), pb::SetStateStatus::Accept);
    let t = ran.task_run.unwrap();
    assert_eq!(
        to_json(t.resolved_input.as_ref().unwrap()),
        serde_json::json!({"all": {"items": [10, 20], "name": "x"}, "second": 20, "text": "name is x", "fixed": 5})
    );
    assert_eq!(t.task_inputs, std::slice::from_ref(&fetch.id));

    // An unresolvable reference fails the run, naming the reference.
    let broken = task_run(
        &app,
        pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "broken".into(),
            input: Some(json(serde_json::json!({"x": "{{nope.output}}"}))),
            ..Default::default()
        },
    )
    .await;
    let r = propose(&app, &broken.id, plain(Running)).await;
    assert_eq!(
        (status(r.status), type_of(&r.state)),
        (pb::SetStateStatus::Reject, Failed)
    );
    let error = r.task_run.unwrap().error.unwrap();
    assert_eq!(error.r#type, "TemplateError");
    assert!(
        error.message.contains("{{nope.output}}"),
        "{}",
        error.message
    );

    // A malformed template is refused at create.
    let bad = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "bad".into(),
            input: Some(json(serde_json::json!({"x": "{{fetch}}"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["input"]);
}

#[tokio::test]
async fn cancelling_a_pending_execution_cancels_it_and_its_task_runs_at_once() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let a = create_task_run(&app, &exec.id, "a").await;
    let b = create_task_run(&app, &exec.id, "b").await;
    let mut stream = app
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id.clone(),
            include_task_runs: true,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let cancelled = app
        .executions
        .clone()
        .cancel_execution(pb::CancelExecutionRequest {
            id: exec.id.clone(),
            reason: "no longer needed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(state_of(&cancelled), Cancelled);
    assert_eq!(
        cancelled.state.as_ref().unwrap().message,
        "no longer needed"
    );
    // One event per run changed, the execution's last; then the stream ends.
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        let e = m.event.unwrap();
        ids.push(match e.resource.unwrap() {
            pb::status_event::Resource::Execution(x) => x.id,
            pb::status_event::Resource::TaskRun(t) => t.id,
        });
    }
    assert_eq!(ids, [a.id.clone(), b.id.clone(), exec.id.clone()]);
    for id in [&a.id, &b.id] {
        let t = app
            .task_runs
            .clone()
            .get_task_run(pb::GetTaskRunRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(type_of(&t.task_run.unwrap().state), Cancelled);
    }
    let again = app
        .executions
        .clone()
        .cancel_execution(pb::CancelExecutionRequest {
            id: exec.id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn cancelling_a_running_execution_waits_for_its_executor() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let busy = create_task_run(&app, &exec.id, "busy").await;
    propose(&app, &busy.id, plain(Running)).await;
    let idle = create_task_run(&app, &exec.id, "idle").await;

    let e = app
        .executions
        .clone()
        .cancel_execution(pb::CancelExecutionRequest {
            id: exec.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(state_of(&e), Cancelling);
    let get = |id: String| {
        let mut c = app.task_runs.clone();
        async move {
            c.get_task_run(pb::GetTaskRunRequest { id })
                .await
                .unwrap()
                .into_inner()
                .task_run
                .unwrap()
        }
    };
    assert_eq!(type_of(&get(busy.id.clone()).await.state), Cancelling);
    assert_eq!(type_of(&get(idle.id.clone()).await.state), Cancelled);

    // No new work; only CANCELLED from CANCELLING.
    let refused = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        status(set_execution_state(&app, &exec.id, Completed).await.status),
        pb::SetStateStatus::Reject
    );
    assert_eq!(
        status(propose(&app, &busy.id, plain(Cancelled)).await.status),
        pb::SetStateStatus::Accept
    );
    assert_eq!(
        status(set_execution_state(&app, &exec.id, Cancelled).await.status),
        pb::SetStateStatus::Accept
    );
}

async fn pause(
    app: &TestApp,
    id: &str,
    details: pb::StateDetails,
    data: serde_json::Value,
) -> pb::SetExecutionStateResponse {
    app.executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: id.into(),
            state: Some(pb::StateCreate {
                r#type: Paused as i32,
                name: "PendingReview".into(),
                data: Some(json(data)),
                details: Some(details),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn the_review_flow_pauses_for_confirmation_then_resumes_with_it() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let resume = |input: serde_json::Value| {
        let mut c = app.executions.clone();
        let id = exec.id.clone();
        async move {
            c.resume_execution(pb::ResumeExecutionRequest {
                id,
                run_input: Some(obj(input)),
            })
            .await
        }
    };
    let not_paused = resume(serde_json::json!({})).await.unwrap_err();
    assert_eq!(not_paused.code(), Code::FailedPrecondition);

    let details = pb::StateDetails {
        pause_key: "review-1".into(),
        run_input_keyset: [(
            "confirmed".to_owned(),
            "the data as the reviewer confirmed it".to_owned(),
        )]
        .into(),
        ..Default::default()
    };
    let p = pause(
        &app,
        &exec.id,
        details,
        serde_json::json!({"invoice_total": 120.5}),
    )
    .await;
    assert_eq!(
        (type_of(&p.state), name_of(&p.state)),
        (Paused, "PendingReview")
    );
    assert_eq!(
        to_json(p.state.as_ref().unwrap().data.as_ref().unwrap())["invoice_total"],
        120.5
    );

    let missing = resume(serde_json::json!({"other": 1})).await.unwrap_err();
    assert_eq!(violated_fields(&missing), ["run_input"]);
    assert!(
        missing.message().contains("confirmed"),
        "{}",
        missing.message()
    );

    let resumed = resume(serde_json::json!({"confirmed": {"invoice_total": 121.0}}))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(state_of(&resumed), Running);
    assert_eq!(
        to_json(resumed.state.as_ref().unwrap().data.as_ref().unwrap()),
        serde_json::json!({"confirmed": {"invoice_total": 121}})
    );
    assert_eq!(
        state_of(
            &set_execution_state(&app, &exec.id, Completed)
                .await
                .execution
                .unwrap()
        ),
        Completed
    );
}

#[tokio::test]
async fn a_resume_missing_many_long_keys_gets_a_short_message() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let keyset = |len: usize| pb::StateDetails {
        run_input_keyset: (0..100)
            .map(|i| {
                (
                    format!("{i:03}{}", "k".repeat(len - 3)),
                    "wanted".to_owned(),
                )
            })
            .collect(),
        ..Default::default()
    };
    // A key longer than any key may be is refused, and the run stays.
    let refused = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: Some(pb::StateCreate {
                r#type: Paused as i32,
                details: Some(keyset(10_000)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&refused),
        ["state.details.run_input_keyset"]
    );
    assert!(refused.message().len() < 1_000, "{}", refused.message());

    // The longest keys allowed, all missing: the message names a few.
    let p = pause(&app, &exec.id, keyset(200), serde_json::json!({})).await;
    assert_eq!(type_of(&p.state), Paused);
    let missing = app
        .executions
        .clone()
        .resume_execution(pb::ResumeExecutionRequest {
            id: exec.id.clone(),
            run_input: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&missing), ["run_input"]);
    let message = missing.message();
    assert!(message.len() < 1_000, "{} bytes: {message}", message.len());
    assert!(message.contains("\"000kkk"), "{message}");
    assert!(message.contains(" more"), "{message}");
}

#[tokio::test]
async fn a_pause_that_times_out_fails_the_run() {
    let app = spawn_app_with(|c| c.pause_sweep_interval = Duration::from_millis(20)).await;
    let exec = running_execution(&app).await;
    let mut stream = app
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id.clone(),
            include_task_runs: false,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap();
    let soon = std::time::SystemTime::now() + Duration::from_millis(200);
    let details = pb::StateDetails {
        pause_timeout: Some(soon.into()),
        ..Default::default()
    };
    pause(&app, &exec.id, details, serde_json::json!(null)).await;
    // PAUSED, then the sweeper's FAILED: the stream ends after it.
    let mut last = None;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        last = m.event;
    }
    let Some(pb::status_event::Resource::Execution(e)) = last.unwrap().resource else {
        panic!()
    };
    assert_eq!(
        (state_of(&e), e.state.as_ref().unwrap().name.as_str()),
        (Failed, "PauseTimeout")
    );
    assert_eq!(e.updated_by, "system");
}

#[tokio::test]
async fn soft_deleted_runs_leave_lists_but_stay_readable() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let run = create_task_run(&app, &exec.id, "k").await;
    let mut sub = app
        .events
        .clone()
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            kinds: vec![pb::EventKind::Deleted as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let deleted = app
        .task_runs
        .clone()
        .delete_task_run(pb::DeleteTaskRunRequest { id: run.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.task_run.unwrap().deleted_at.is_some());
    let e = app
        .executions
        .clone()
        .delete_execution(pb::DeleteExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(e.execution.unwrap().deleted_at.is_some());

    let list = |show_deleted| {
        let mut c = app.executions.clone();
        async move {
            c.list_executions(pb::ListExecutionsRequest {
                show_deleted,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .executions
            .len()
        }
    };
    assert_eq!((list(false).await, list(true).await), (0, 1));
    let runs = app
        .task_runs
        .clone()
        .list_task_runs(pb::ListTaskRunsRequest {
            execution_id: exec.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(runs.task_runs.is_empty());
    let got = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.execution.unwrap().deleted_at.is_some());
    // Two DELETED events, one per run.
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event_kind(&m.event.unwrap()), pb::EventKind::Deleted);
    }
}

#[tokio::test]
async fn only_finished_task_runs_can_be_marked_stale() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let run = create_task_run(&app, &exec.id, "k").await;
    let stale = |id: String| {
        let mut c = app.task_runs.clone();
        async move {
            c.mark_task_run_stale(pb::MarkTaskRunStaleRequest { id })
                .await
        }
    };
    assert_eq!(
        stale(run.id.clone()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    propose(&app, &run.id, plain(Running)).await;
    complete(&app, &run.id, serde_json::json!(1)).await;
    assert!(
        stale(run.id.clone())
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap()
            .stale
    );
    let fresh = create_task_run(&app, &exec.id, "k2").await;
    let only = |flag: bool| {
        let mut c = app.task_runs.clone();
        let exec_id = exec.id.clone();
        async move {
            c.list_task_runs(pb::ListTaskRunsRequest {
                execution_id: exec_id,
                stale: Some(flag),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_runs
            .into_iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(only(true).await, std::slice::from_ref(&run.id));
    assert_eq!(only(false).await, std::slice::from_ref(&fresh.id));
}

#[tokio::test]
async fn run_time_estimates_follow_the_run() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let run = create_task_run(&app, &exec.id, "k").await;
    assert!(run.expected_start_time.is_some());
    propose(&app, &run.id, plain(Running)).await;
    // While running, the estimate grows with the current run.
    let get = || {
        let mut c = app.task_runs.clone();
        let id = run.id.clone();
        async move {
            c.get_task_run(pb::GetTaskRunRequest { id })
                .await
                .unwrap()
                .into_inner()
                .task_run
                .unwrap()
        }
    };
    let a = get().await.estimated_run_time.unwrap();
    let b = get().await.estimated_run_time.unwrap();
    assert!(
        (b.seconds, b.nanos) > (a.seconds, a.nanos),
        "{a:?} then {b:?}"
    );
    let done = complete(&app, &run.id, serde_json::json!(1))
        .await
        .task_run
        .unwrap();
    assert_eq!(
        done.estimated_run_time, done.total_run_time,
        "a finished run's estimate is its total"
    );
    assert!(done.estimated_start_time_delta.is_some());
}

#[tokio::test]
async fn replays_mixed_into_busy_batches_return_the_original_runs() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let original = task_run(
        &app,
        pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "k".into(),
            dynamic_key: "7".into(),
            ..Default::default()
        },
    )
    .await;
    let first = app
        .executions
        .clone()
        .create_execution(pb::CreateExecutionRequest {
            goal: "g".into(),
            request_id: "req-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();

    // Replays and new creates arrive together, so they share batches.
    let mut calls = Vec::new();
    for i in 0..60 {
        let (mut tasks, mut execs, exec_id) = (
            app.task_runs.clone(),
            app.executions.clone(),
            exec.id.clone(),
        );
        calls.push(tokio::spawn(async move {
            let dynamic_key = if i % 2 == 0 {
                "7".to_owned()
            } else {
                format!("new-{i}")
            };
            let t = tasks
                .create_task_run(pb::CreateTaskRunRequest {
                    execution_id: exec_id,
                    task_key: "k".into(),
                    dynamic_key,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let request_id = if i % 3 == 0 {
                "req-1".to_owned()
            } else {
                format!("req-new-{i}")
            };
            let e = execs
                .create_execution(pb::CreateExecutionRequest {
                    goal: "g".into(),
                    request_id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (i, t, e)
        }));
    }
    for c in calls {
        let (i, t, e) = c.await.unwrap();
        let run = t.task_run.unwrap();
        if i % 2 == 0 {
            assert_eq!(
                (run.id.as_str(), t.created),
                (original.id.as_str(), false),
                "replay {i}"
            );
        } else {
            assert!(t.created, "new {i}");
        }
        let execution = e.execution.unwrap();
        if i % 3 == 0 {
            assert_eq!(
                (execution.id.as_str(), e.created),
                (first.id.as_str(), false),
                "replay {i}"
            );
        } else {
            assert!(e.created);
        }
    }
    let runs = app
        .task_runs
        .clone()
        .list_task_runs(pb::ListTaskRunsRequest {
            execution_id: exec.id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_runs;
    assert_eq!(runs.len(), 31, "the original and 30 new ones");
}

/// Tenants meet only through API keys; until a server has keys, this test
/// drives the ledger itself with two callers against a real store.
#[tokio::test]
async fn cached_results_belong_to_their_tenant() {
    use runledger::{
        domain::{Caller, NewExecution, NewTaskRun, StateProposal, StateType},
        orchestration::{
            Ledger,
            rules::{Payload, Proposal, Status},
        },
        store::{Durability, Store},
        stream::Feed,
    };
    let storage = Storage::fresh().await;
    let (store, _writer) = Store::open(
        &storage.database(),
        Durability::Process,
        Feed::new(64).listener().unwrap(),
    )
    .await
    .unwrap();
    let ledger = Ledger::new(store);
    let propose = |t: StateType, output: Option<serde_json::Value>| Proposal {
        state: StateProposal::of_type(t),
        force: false,
        expected_state_id: None,
        payload: Payload {
            output,
            error: None,
        },
    };
    let run_in = |tenant: &'static str| {
        let ledger = ledger.clone();
        async move {
            let caller = Caller {
                tenant_id: tenant.into(),
                name: format!("{tenant}-key"),
            };
            let new = NewExecution {
                task_id: None,
                name: String::new(),
                input: Default::default(),
                goal: None,
                max_depth: 3,
                config_profile: runledger::domain::ConfigProfile::General,
                config_overrides: Default::default(),
                metadata: Default::default(),
                request_id: None,
                initial_state: None,
            };
            let (exec, _) = ledger.create_execution(&caller, new).await.unwrap();
            ledger
                .set_execution_state(&caller, exec.id, propose(StateType::Running, None))
                .await
                .unwrap();
            let new_run = NewTaskRun {
                execution_id: exec.id,
                task_key: format!("k-{}", uuid::Uuid::now_v7()),
                dynamic_key: None,
                name: String::new(),
                parent_task_run_id: None,
                task_version: None,
                cache_key: Some("shared-key".into()),
                cache_expiration: None,
                retry_policy: Default::default(),
                tags: vec![],
                labels: Default::default(),
                input: serde_json::json!({}),
                initial_state: None,
            };
            let (run, _) = ledger.create_task_run(&caller, new_run).await.unwrap();
            let outcome = ledger
                .set_task_run_state(&caller, run.id, propose(StateType::Running, None))
                .await
                .unwrap();
            (ledger, caller, run, outcome)
        }
    };

    let (ledger, a, run, first) = run_in("tenant-a").await;
    assert_eq!(first.status, Status::Accept);
    ledger
        .set_task_run_state(
            &a,
            run.id,
            propose(StateType::Completed, Some(serde_json::json!("a's result"))),
        )
        .await
        .unwrap();
    // The same key in tenant A is a cache hit...
    let (_, _, _, again) = run_in("tenant-a").await;
    assert_eq!(
        (again.status, again.state.name.as_str()),
        (Status::Reject, "Cached")
    );
    assert_eq!(again.run.run.output, Some(serde_json::json!("a's result")));
    // ...and in tenant B it is not: B runs its own task.
    let (_, b, _, other) = run_in("tenant-b").await;
    assert_eq!(
        (other.status, other.state.state_type),
        (Status::Accept, StateType::Running)
    );
    // B cannot see A's runs at all.
    assert!(matches!(
        ledger.task_run(&b, run.id).await,
        Err(runledger::Error::NotFound(_))
    ));
}
