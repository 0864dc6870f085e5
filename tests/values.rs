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

async fn get(app: &TestApp, id: &str) -> pb::TaskRun {
    app.task_runs
        .clone()
        .get_task_run(pb::GetTaskRunRequest { id: id.into() })
        .await
        .expect("the run can be read back")
        .into_inner()
        .task_run
        .unwrap()
}

/// Every event of a task run's stream, from the log (after the first
/// event of all, which is its execution's), to its end.
async fn stream_to_end(app: &TestApp, id: &str) -> Vec<pb::StatusEvent> {
    let mut stream = app
        .task_runs
        .clone()
        .stream_task_run_status(pb::StreamTaskRunStatusRequest {
            id: id.into(),
            after_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.expect("every event decodes") {
        events.push(e.event.unwrap());
    }
    events
}

fn template_error(t: &pb::TaskRun) -> String {
    assert_eq!(
        pb::StateType::try_from(t.state.as_ref().unwrap().r#type).unwrap(),
        pb::StateType::Failed
    );
    let e = t.error.as_ref().expect("an error");
    assert_eq!(e.r#type, "TemplateError");
    e.message.clone()
}

#[tokio::test]
async fn a_resolved_input_over_the_value_limit_fails_the_run() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let big = task_run_with(&app, &exec.id, "big", serde_json::json!({})).await;
    run(&app, &big.id).await;
    complete(
        &app,
        &big.id,
        serde_json::json!({ "blob": "x".repeat(200 * 1024) }),
    )
    .await;

    let refs: Vec<serde_json::Value> = (0..60)
        .map(|_| serde_json::json!("{{big.output}}"))
        .collect();
    let consumer = task_run_with(&app, &exec.id, "use", serde_json::json!({ "all": refs })).await;
    let r = run(&app, &consumer.id).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Reject);
    let message = template_error(r.task_run.as_ref().unwrap());
    assert!(message.contains("larger than 1048576 bytes"), "{message}");
    let t = get(&app, &consumer.id).await;
    assert_eq!(t.resolved_input, None);

    // A few references fit.
    let refs: Vec<serde_json::Value> = (0..4)
        .map(|_| serde_json::json!("{{big.output.blob}}"))
        .collect();
    let few = task_run_with(&app, &exec.id, "few", serde_json::json!({ "all": refs })).await;
    let r = run(&app, &few.id).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Accept);
    assert!(get(&app, &few.id).await.resolved_input.is_some());
}

#[tokio::test]
async fn a_template_cannot_nest_a_value_deeper_than_a_client_reads() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    // The deepest output accepted: 32 levels.
    let mut deep = serde_json::json!("leaf");
    for _ in 1..32 {
        deep = serde_json::json!({ "d": deep });
    }
    let up = task_run_with(&app, &exec.id, "deep", serde_json::json!({})).await;
    run(&app, &up.id).await;
    complete(&app, &up.id, deep).await;

    // Placed four levels down, it would be 35 deep.
    let input = serde_json::json!({"a": {"b": {"c": ["{{deep.output}}"]}}});
    let consumer = task_run_with(&app, &exec.id, "use", input).await;
    let r = run(&app, &consumer.id).await;
    let message = template_error(r.task_run.as_ref().unwrap());
    assert!(message.contains("more than 32 deep"), "{message}");
    // The run and its stream read back whole.
    assert_eq!(get(&app, &consumer.id).await.resolved_input, None);
    let events = stream_to_end(&app, &consumer.id).await;
    assert!(!events.is_empty());

    // At the top it fits, and reads back.
    let whole = task_run_with(
        &app,
        &exec.id,
        "whole",
        serde_json::json!("{{deep.output}}"),
    )
    .await;
    let r = run(&app, &whole.id).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Accept);
    assert!(get(&app, &whole.id).await.resolved_input.is_some());
    complete(&app, &whole.id, serde_json::json!(1)).await;
    assert!(!stream_to_end(&app, &whole.id).await.is_empty());
}

#[tokio::test]
async fn a_change_that_would_make_a_run_too_large_to_send_is_refused() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let blob = || serde_json::json!("x".repeat(1_040_000));
    let t = task_run_with(
        &app,
        &exec.id,
        "large",
        serde_json::json!({ "blob": blob() }),
    )
    .await;
    run(&app, &t.id).await;

    // Each value is within its own limit; together, with the state sent
    // twice in the answer, they are over what a client accepts.
    let too_much = propose(
        &app,
        &t.id,
        pb::SetTaskRunStateRequest {
            state: Some(pb::StateCreate {
                r#type: pb::StateType::Completed as i32,
                message: "\u{1d11e}".repeat(10_000),
                data: Some(json(blob())),
                ..Default::default()
            }),
            output: Some(json(blob())),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(too_much.code(), Code::InvalidArgument, "{too_much:?}");
    assert_eq!(violated_fields(&too_much), ["state"]);
    assert!(too_much.message().len() < 500, "{}", too_much.message());
    // Nothing changed.
    let still = get(&app, &t.id).await;
    assert_eq!(type_of(&still.state), pb::StateType::Running);
    assert_eq!(still.output, None);

    // Without the extra state data it fits, and every event reads back.
    let done = complete(&app, &t.id, blob()).await;
    assert_eq!(type_of(&done.state), pb::StateType::Completed);
    let events = stream_to_end(&app, &t.id).await;
    let kinds: Vec<i32> = events.iter().map(|e| e.kind).collect();
    use pb::EventKind::*;
    assert_eq!(
        kinds,
        [Created as i32, StateChanged as i32, StateChanged as i32]
    );
}

/// Overwrites the payload of the second logged event of task run `id`
/// with bytes that decode as nothing, in the stopped server's storage;
/// hands back the sequences of its events.
async fn damage_second_event_of(storage: &Storage, id: &str) -> Vec<i64> {
    use sqlx::Connection;
    const GARBAGE: &[u8] = &[0xFF; 4];
    match &storage.pg {
        None => {
            let url = format!("sqlite://{}", db_path(storage.path()).display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let seqs: Vec<i64> =
                sqlx::query_scalar("SELECT seq FROM events WHERE task_run_id = ? ORDER BY seq")
                    .bind(id)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            assert_eq!(seqs.len(), 3);
            sqlx::query("UPDATE events SET payload = ? WHERE seq = ?")
                .bind(GARBAGE)
                .bind(seqs[1])
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
            seqs
        }
        Some(db) => {
            let mut conn = db.connect().await;
            let keys: Vec<(String, i64)> = sqlx::query_as(
                "SELECT tenant_id, seq FROM events WHERE task_run_id = $1 ORDER BY seq",
            )
            .bind(id)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            assert_eq!(keys.len(), 3);
            let (tenant, seq) = &keys[1];
            sqlx::query("UPDATE events SET payload = $1 WHERE tenant_id = $2 AND seq = $3")
                .bind(GARBAGE)
                .bind(tenant)
                .bind(seq)
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
            keys.into_iter().map(|(_, seq)| seq).collect()
        }
    }
}

#[tokio::test]
async fn a_logged_event_that_cannot_be_read_is_delivered_as_a_stand_in() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let t = task_run_with(&app, &exec.id, "t", serde_json::json!({})).await;
    run(&app, &t.id).await;
    complete(&app, &t.id, serde_json::json!(1)).await;
    let dir = app.stop().await;

    // Damage the stored RUNNING event of the task run.
    let seqs = damage_second_event_of(&dir, &t.id).await;

    let app = spawn_in(dir, |_| {}).await;
    // The run's stream gets past it, to its end.
    let events = stream_to_end(&app, &t.id).await;
    let seen: Vec<(i64, i32)> = events.iter().map(|e| (e.sequence, e.kind)).collect();
    use pb::EventKind::*;
    assert_eq!(
        seen,
        [
            (seqs[0], Created as i32),
            (seqs[1], Unspecified as i32),
            (seqs[2], StateChanged as i32)
        ]
    );
    match &events[1].resource {
        Some(pb::status_event::Resource::TaskRun(r)) => {
            assert_eq!((&r.id, &r.execution_id), (&t.id, &exec.id))
        }
        other => panic!("{other:?}"),
    }
    // A filter that would look inside the event cannot rule it out.
    let mut sub = app
        .events
        .clone()
        .subscribe(pb::SubscribeRequest {
            after_sequence: seqs[0],
            include_task_runs: true,
            state_types: vec![pb::StateType::Running as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), sub.message())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
        .event
        .unwrap();
    assert_eq!((first.sequence, first.kind), (seqs[1], Unspecified as i32));
}

#[tokio::test]
async fn a_page_of_large_runs_is_cut_to_what_a_client_accepts() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let mut created = Vec::new();
    for i in 0..5 {
        let input = serde_json::json!({ "blob": "x".repeat(1_000_000) });
        created.push(
            task_run_with(&app, &exec.id, &format!("t{i}"), input)
                .await
                .id,
        );
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .task_runs
            .clone()
            .list_task_runs(pb::ListTaskRunsRequest {
                execution_id: exec.id.clone(),
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("every page decodes")
            .into_inner();
        pages += 1;
        listed.extend(page.task_runs.into_iter().map(|t| t.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(pages > 1, "five 1 MB runs take more than one page");
    created.reverse();
    assert_eq!(listed, created, "every run once, newest first");
}

#[tokio::test]
async fn templates_read_at_most_a_bounded_total_of_upstream_outputs() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    // Seventeen upstreams of about 1 MB each: more than 16 MiB together.
    for i in 0..17 {
        let up = task_run_with(&app, &exec.id, &format!("k{i}"), serde_json::json!({})).await;
        run(&app, &up.id).await;
        complete(
            &app,
            &up.id,
            serde_json::json!({ "n": i, "blob": "x".repeat(1_000_000) }),
        )
        .await;
    }
    let refs = |n: usize| -> serde_json::Value {
        (0..n)
            .map(|i| serde_json::json!(format!("{{{{k{i}.output.n}}}}")))
            .collect()
    };

    // Small as the resolved input would be, reading every output is
    // refused.
    let all = task_run_with(&app, &exec.id, "all", serde_json::json!({ "n": refs(17) })).await;
    let r = run(&app, &all.id).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Reject);
    let message = template_error(r.task_run.as_ref().unwrap());
    assert!(message.contains("larger than 16777216 bytes"), "{message}");

    // Sixteen of them fit.
    let some = task_run_with(&app, &exec.id, "some", serde_json::json!({ "n": refs(16) })).await;
    let r = run(&app, &some.id).await;
    assert_eq!(status(r.status), pb::SetStateStatus::Accept);
    let resolved = get(&app, &some.id).await.resolved_input.unwrap();
    let expected: Vec<serde_json::Value> = (0..16).map(|i| serde_json::json!(i)).collect();
    assert_eq!(
        runledger::grpc::convert::from_value(&resolved).unwrap(),
        serde_json::json!({ "n": expected })
    );
}

#[tokio::test]
async fn a_template_reads_the_latest_completed_run_of_its_key() {
    let app = spawn_app().await;
    let exec = running_execution(&app).await;
    let keyed = |dynamic_key: &str| pb::CreateTaskRunRequest {
        execution_id: exec.id.clone(),
        task_key: "step".into(),
        dynamic_key: dynamic_key.into(),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for d in ["a", "b", "c"] {
        let t = app
            .task_runs
            .clone()
            .create_task_run(keyed(d))
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        ids.push(t.id);
    }
    let consumer = |key: &'static str| {
        let app = &app;
        let exec = &exec;
        async move {
            let t = task_run_with(app, &exec.id, key, serde_json::json!("{{step.output}}")).await;
            run(app, &t.id).await
        }
    };
    // Not one has ended: the consumer waits.
    let r = consumer("first").await;
    assert_eq!(status(r.status), pb::SetStateStatus::Wait);
    // The older two complete, the newest still runs: the newer completed
    // output is used.
    for (id, n) in ids.iter().zip([1, 2]) {
        run(&app, id).await;
        complete(&app, id, serde_json::json!(n)).await;
    }
    run(&app, &ids[2]).await;
    let r = consumer("second").await;
    assert_eq!(status(r.status), pb::SetStateStatus::Accept);
    let t = r.task_run.unwrap();
    assert_eq!(
        runledger::grpc::convert::from_value(t.resolved_input.as_ref().unwrap()).unwrap(),
        serde_json::json!(2)
    );
    assert_eq!(t.task_inputs, [ids[1].clone()]);
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_reads_one_run_of_a_key_however_many_it_has() {
    const RUNS: usize = 60;
    let storage = Storage::fresh().await;
    let server = Process::start(storage.database());
    let pid = server.child.id();
    let channel = connect(server.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());
    let mut tasks = TaskRunServiceClient::new(channel);
    let exec = running_execution_via(&mut execs, "many runs of one key").await;
    let propose = |id: &str, t: pb::StateType, output: Option<serde_json::Value>| {
        pb::SetTaskRunStateRequest {
            id: id.into(),
            state: state(t),
            output: output.map(json),
            ..Default::default()
        }
    };
    // Sixty COMPLETED runs of one key, about 1 MB of output each.
    for i in 0..RUNS {
        let t = tasks
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: "big".into(),
                dynamic_key: i.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        tasks
            .set_task_run_state(propose(&t.id, pb::StateType::Running, None))
            .await
            .unwrap();
        let output = serde_json::json!({ "n": i, "blob": "x".repeat(1_000_000) });
        tasks
            .set_task_run_state(propose(&t.id, pb::StateType::Completed, Some(output)))
            .await
            .unwrap();
    }
    let consumer = tasks
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "use".into(),
            input: Some(json(serde_json::json!({ "n": "{{big.output.n}}" }))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    // The peak so far came from writing the upstreams: start afresh.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("peak reset");
    let before = proc_kib(pid, "VmHWM:");
    let r = tasks
        .set_task_run_state(propose(&consumer.id, pb::StateType::Running, None))
        .await
        .unwrap()
        .into_inner();
    let peak = proc_kib(pid, "VmHWM:");
    server.kill();
    assert_eq!(status(r.status), pb::SetStateStatus::Accept);
    let resolved = r.task_run.unwrap().resolved_input.unwrap();
    assert_eq!(
        runledger::grpc::convert::from_value(&resolved).unwrap(),
        serde_json::json!({ "n": RUNS - 1 })
    );
    // Reading every run of the key would take over 100 MB; one run's
    // output is about 1 MB.
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 30 * 1024,
        "the server's peak memory grew by {grew} KiB resolving one reference"
    );
}
