//! Create, get, list, pagination, idempotency, hierarchy, the transition
//! rules, and validation, through the gRPC API.

use std::collections::HashSet;

use pb::StateType::*;
use runledger::grpc::pb;
use tonic::Code;

use crate::helpers::*;

fn json(v: serde_json::Value) -> prost_types::Value {
    runledger::grpc::convert::value(&v)
}

fn object(v: serde_json::Value) -> prost_types::Struct {
    match json(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => panic!("not an object"),
    }
}

async fn list_ids(app: &TestApp, req: pb::ListExecutionsRequest) -> Vec<String> {
    app.executions
        .clone()
        .list_executions(req)
        .await
        .unwrap()
        .into_inner()
        .executions
        .into_iter()
        .map(|e| e.id)
        .collect()
}

#[tokio::test]
async fn an_execution_reads_back_as_created() {
    let app = spawn_app().await;
    let req = pb::CreateExecutionRequest {
        task_id: "invoice-agent".into(),
        name: "March invoices".into(),
        goal: "Analyze Bitcoin price".into(),
        config_profile: "crypto_agent".into(),
        config_overrides: Some(pb::ConfigOverrides {
            temperature: Some(0.5),
            max_tokens: Some(6000),
            model: None,
        }),
        metadata: [("user_id".to_owned(), "user_123".to_owned())].into(),
        input: Some(object(serde_json::json!({"pages": 3, "tags": ["a"]}))),
        ..Default::default()
    };
    let created = app
        .executions
        .clone()
        .create_execution(req)
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let e = created.execution.unwrap();
    assert_eq!(
        (e.max_depth, e.transition_count, e.tenant_id.as_str()),
        (3, 0, "default")
    );
    assert_eq!(
        (state_of(&e), e.state.as_ref().unwrap().name.as_str()),
        (Pending, "Pending")
    );
    let config = e.effective_config.clone().unwrap();
    assert_eq!(
        (config.temperature, config.max_tokens),
        (0.5, 6000),
        "overrides over the profile"
    );
    assert_eq!(
        config.model, "crypto-agent-default",
        "the profile's model where not overridden"
    );
    uuid::Uuid::parse_str(&e.id).unwrap();
    assert_eq!(e.id, e.id.to_lowercase());

    let got = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest { id: e.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.execution.unwrap(), e);
    let missing = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn pages_stay_exact_while_executions_are_created() {
    let app = spawn_app().await;
    let mut original = Vec::new();
    for i in 0..60 {
        original.push(
            app.executions
                .clone()
                .create_execution(goal(&format!("g{i}")))
                .await
                .unwrap()
                .into_inner()
                .execution
                .unwrap()
                .id,
        );
    }
    let inserting = {
        let mut execs = app.executions.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                execs
                    .create_execution(goal(&format!("late {i}")))
                    .await
                    .unwrap();
            }
        })
    };
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = app
            .executions
            .clone()
            .list_executions(pb::ListExecutionsRequest {
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.executions.len() <= 7);
        seen.extend(
            page.executions
                .into_iter()
                .map(|e| (e.created_at.unwrap(), e.id)),
        );
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    inserting.await.unwrap();
    assert!(pages >= 9);
    let ids: Vec<&String> = seen.iter().map(|(_, id)| id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no execution twice");
    for id in &original {
        assert!(
            unique.contains(id),
            "every execution that existed is listed"
        );
    }
    let keys: Vec<_> = seen
        .iter()
        .map(|(t, id)| (t.seconds, t.nanos, id.clone()))
        .collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "newest first");
}

#[tokio::test]
async fn lists_filter_by_task_state_metadata_and_time() {
    let app = spawn_app().await;
    let mk = |task_id: &str, team: &str| pb::CreateExecutionRequest {
        task_id: task_id.into(),
        metadata: [("team".to_owned(), team.to_owned())].into(),
        ..Default::default()
    };
    let a = app
        .executions
        .clone()
        .create_execution(mk("etl", "red"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let b = app
        .executions
        .clone()
        .create_execution(mk("etl", "blue"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let c = app
        .executions
        .clone()
        .create_execution(mk("report", "red"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    set_execution_state(&app, &b.id, Running).await;

    let by_task = list_ids(
        &app,
        pb::ListExecutionsRequest {
            task_id: "etl".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_task, [b.id.clone(), a.id.clone()]);
    let running = list_ids(
        &app,
        pb::ListExecutionsRequest {
            state_types: vec![Running as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(running, std::slice::from_ref(&b.id));
    let red = list_ids(
        &app,
        pb::ListExecutionsRequest {
            metadata: [("team".to_owned(), "red".to_owned())].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(red, [c.id.clone(), a.id.clone()]);
    let after_a = list_ids(
        &app,
        pb::ListExecutionsRequest {
            created_after: a.created_at,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(after_a, [c.id.clone(), b.id.clone()]);
    let before_c = list_ids(
        &app,
        pb::ListExecutionsRequest {
            created_before: c.created_at,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(before_c, [b.id.clone(), a.id.clone()]);
}

#[tokio::test]
async fn request_ids_make_creates_idempotent_even_when_concurrent() {
    let app = spawn_app().await;
    let req = pb::CreateExecutionRequest {
        goal: "once".into(),
        request_id: "r-1".into(),
        ..Default::default()
    };
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (mut c, req) = (app.executions.clone(), req.clone());
        calls.push(tokio::spawn(async move {
            c.create_execution(req).await.unwrap().into_inner()
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for c in calls {
        let r = c.await.unwrap();
        ids.insert(r.execution.unwrap().id);
        created += usize::from(r.created);
    }
    assert_eq!((ids.len(), created), (1, 1));
    assert_eq!(
        list_ids(&app, pb::ListExecutionsRequest::default())
            .await
            .len(),
        1
    );

    let id = ids.into_iter().next().unwrap();
    let different = pb::CreateExecutionRequest {
        goal: "another".into(),
        ..req
    };
    let err = app
        .executions
        .clone()
        .create_execution(different)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains(&id), "{}", err.message());
}

#[tokio::test]
async fn task_runs_get_dynamic_keys_and_are_idempotent_on_their_key() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let keys: Vec<String> = {
        let mut k = Vec::new();
        for key in ["fetch", "fetch", "load", "fetch"] {
            k.push(create_task_run(&app, &exec.id, key).await.dynamic_key);
        }
        k
    };
    assert_eq!(keys, ["0", "1", "0", "2"]);

    let req = pb::CreateTaskRunRequest {
        execution_id: exec.id.clone(),
        task_key: "once".into(),
        dynamic_key: "x".into(),
        ..Default::default()
    };
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (mut c, req) = (app.task_runs.clone(), req.clone());
        calls.push(tokio::spawn(async move {
            c.create_task_run(req).await.unwrap().into_inner()
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for c in calls {
        let r = c.await.unwrap();
        ids.insert(r.task_run.unwrap().id);
        created += usize::from(r.created);
    }
    assert_eq!((ids.len(), created), (1, 1));

    let missing = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: uuid::Uuid::now_v7().to_string(),
            task_key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn task_runs_nest_up_to_the_execution_max_depth() {
    let app = spawn_app().await;
    let exec = app
        .executions
        .clone()
        .create_execution(pb::CreateExecutionRequest {
            max_depth: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let child = |parent: &str, key: &str| pb::CreateTaskRunRequest {
        execution_id: exec.id.clone(),
        task_key: key.into(),
        parent_task_run_id: parent.into(),
        ..Default::default()
    };
    let root = create_task_run(&app, &exec.id, "root").await;
    assert_eq!(root.depth, 1);
    let sub = app
        .task_runs
        .clone()
        .create_task_run(child(&root.id, "sub"))
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    assert_eq!(
        (sub.depth, sub.parent_task_run_id.as_str()),
        (2, root.id.as_str())
    );
    let too_deep = app
        .task_runs
        .clone()
        .create_task_run(child(&sub.id, "deeper"))
        .await
        .unwrap_err();
    assert_eq!(too_deep.code(), Code::FailedPrecondition);
    assert!(
        too_deep.message().contains("max_depth of 2"),
        "{}",
        too_deep.message()
    );

    let other = create_execution(&app).await;
    let foreign = create_task_run(&app, &other.id, "elsewhere").await;
    let err = app
        .task_runs
        .clone()
        .create_task_run(child(&foreign.id, "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    set_execution_state(&app, &exec.id, Running).await;
    set_execution_state(&app, &exec.id, Completed).await;
    let closed = app
        .task_runs
        .clone()
        .create_task_run(child("", "late"))
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition);
}

async fn propose_exec(
    app: &TestApp,
    req: pb::SetExecutionStateRequest,
) -> pb::SetExecutionStateResponse {
    app.executions
        .clone()
        .set_execution_state(req)
        .await
        .unwrap()
        .into_inner()
}

fn status(r: &pb::SetExecutionStateResponse) -> pb::SetStateStatus {
    pb::SetStateStatus::try_from(r.status).unwrap()
}

#[tokio::test]
async fn the_transition_rules_hold_through_the_api() {
    let app = spawn_app().await;
    let e = create_execution(&app).await;
    let id = e.id.clone();
    let with = |t: pb::StateType, details: pb::StateDetails| pb::SetExecutionStateRequest {
        id: id.clone(),
        state: Some(pb::StateCreate {
            r#type: t as i32,
            details: Some(details),
            ..Default::default()
        }),
        ..Default::default()
    };
    let states = |app: &TestApp| {
        let mut c = app.task_runs.clone();
        let id = id.clone();
        async move {
            c.list_states(pb::ListStatesRequest {
                execution_id: id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .states
        }
    };

    // Rule 5: same type.
    assert_eq!(
        status(&set_execution_state(&app, &id, Pending).await),
        pb::SetStateStatus::Reject
    );
    // Rule 1: a repeated transition_id returns the first result, changing nothing.
    let tid = pb::StateDetails {
        transition_id: "t-1".into(),
        ..Default::default()
    };
    let first = propose_exec(&app, with(Running, tid.clone())).await;
    assert_eq!(status(&first), pb::SetStateStatus::Accept);
    let history = states(&app).await.len();
    let again = propose_exec(&app, with(Running, tid)).await;
    assert_eq!(
        (status(&again), again.state.clone()),
        (pb::SetStateStatus::Accept, first.state.clone())
    );
    assert_eq!(again.execution.unwrap().transition_count, 1);
    assert_eq!(states(&app).await.len(), history);
    // Rule 2: expected_state_id.
    let stale = propose_exec(
        &app,
        pb::SetExecutionStateRequest {
            expected_state_id: uuid::Uuid::now_v7().to_string(),
            ..with(Paused, Default::default())
        },
    )
    .await;
    assert_eq!(status(&stale), pb::SetStateStatus::Reject);
    assert_eq!(stale.state, first.state, "the current state comes back");
    let current_id = first.state.as_ref().unwrap().id.clone();
    let fresh = propose_exec(
        &app,
        pb::SetExecutionStateRequest {
            expected_state_id: current_id,
            ..with(Paused, Default::default())
        },
    )
    .await;
    assert_eq!(status(&fresh), pb::SetStateStatus::Accept);
    // Rule 3: terminal states absorb, unless forced (and a forced move is recorded).
    set_execution_state(&app, &id, Running).await;
    let done = set_execution_state(&app, &id, Completed).await;
    let exec = done.execution.unwrap();
    assert!(
        exec.end_time.is_some() && exec.total_run_time.unwrap() != prost_types::Duration::default()
    );
    assert_eq!((exec.run_count, exec.updated_by.as_str()), (2, "anonymous"));
    assert_eq!(
        status(&set_execution_state(&app, &id, Running).await),
        pb::SetStateStatus::Abort
    );
    let forced = propose_exec(
        &app,
        pb::SetExecutionStateRequest {
            force: true,
            ..with(Cancelling, Default::default())
        },
    )
    .await;
    assert_eq!(status(&forced), pb::SetStateStatus::Accept);
    assert_eq!(
        forced.execution.unwrap().transition_count,
        exec.transition_count + 1
    );
    // Rule 4: CANCELLING goes only to CANCELLED.
    assert_eq!(
        status(&set_execution_state(&app, &id, Running).await),
        pb::SetStateStatus::Reject
    );
    assert_eq!(
        status(&set_execution_state(&app, &id, Cancelled).await),
        pb::SetStateStatus::Accept
    );

    // Rule 6: SCHEDULED waits for its time.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    let scheduled = app
        .executions
        .clone()
        .create_execution(pb::CreateExecutionRequest {
            initial_state: Some(pb::StateCreate {
                r#type: Scheduled as i32,
                details: Some(pb::StateDetails {
                    scheduled_time: Some(later.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let wait = set_execution_state(&app, &scheduled.id, Running).await;
    assert_eq!(status(&wait), pb::SetStateStatus::Wait);
    let after = wait.retry_after.unwrap();
    assert!((55..=60).contains(&after.seconds), "{after:?}");

    // Rule 7: a task run runs only while its execution runs.
    let t = create_task_run(&app, &scheduled.id, "k").await;
    let r = set_task_run_state(&app, &t.id, Running).await;
    assert_eq!(
        pb::SetStateStatus::try_from(r.status).unwrap(),
        pb::SetStateStatus::Wait
    );
    assert!(r.retry_after.is_some());
    let failed_output = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: scheduled.id.clone(),
            state: state(Failed),
            error: Some(pb::ErrorInfo {
                message: "gave up".into(),
                r#type: "Timeout".into(),
                traceback: "…".into(),
            }),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        failed_output.execution.unwrap().error.unwrap().r#type,
        "Timeout"
    );
    let r = set_task_run_state(&app, &t.id, Running).await;
    assert_eq!(
        pb::SetStateStatus::try_from(r.status).unwrap(),
        pb::SetStateStatus::Abort
    );
    let unknown = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: uuid::Uuid::now_v7().to_string(),
            state: state(Running),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// One malformed request, the field its violation must name.
type Case = (&'static str, &'static str);

#[tokio::test]
async fn malformed_requests_name_the_field_and_change_nothing() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let task = create_task_run(&app, &exec.id, "k").await;
    // Lists nest two protobuf messages a level: 40 of them decode, and the
    // depth limit of 32 refuses them (objects that deep are refused by the
    // decoder itself, see the next test).
    let mut deep = serde_json::json!(1);
    for _ in 0..40 {
        deep = serde_json::json!([deep]);
    }
    let big = "x".repeat(1024 * 1024 + 10);
    let count = |app: &TestApp| {
        let (mut e, mut t) = (app.executions.clone(), app.task_runs.clone());
        async move {
            let n = e
                .list_executions(pb::ListExecutionsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .executions
                .len();
            let m = t
                .list_task_runs(pb::ListTaskRunsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .task_runs
                .len();
            (n, m)
        }
    };
    let before = count(&app).await;

    let base = || pb::CreateExecutionRequest {
        goal: "g".into(),
        ..Default::default()
    };
    let meta = |k: String, v: String| [(k, v)].into_iter().collect();
    let executions: Vec<(pb::CreateExecutionRequest, Case)> = vec![
        (
            pb::CreateExecutionRequest {
                goal: " \t".into(),
                ..base()
            },
            ("blank goal", "goal"),
        ),
        (
            pb::CreateExecutionRequest {
                goal: "g".repeat(10_001),
                ..base()
            },
            ("goal too long", "goal"),
        ),
        (
            pb::CreateExecutionRequest {
                max_depth: 11,
                ..base()
            },
            ("max_depth 11", "max_depth"),
        ),
        (
            pb::CreateExecutionRequest {
                max_depth: -1,
                ..base()
            },
            ("max_depth -1", "max_depth"),
        ),
        (
            pb::CreateExecutionRequest {
                config_profile: "turbo".into(),
                ..base()
            },
            ("unknown profile", "config_profile"),
        ),
        (
            pb::CreateExecutionRequest {
                config_overrides: Some(pb::ConfigOverrides {
                    temperature: Some(2.5),
                    ..Default::default()
                }),
                ..base()
            },
            ("temperature", "config_overrides.temperature"),
        ),
        (
            pb::CreateExecutionRequest {
                config_overrides: Some(pb::ConfigOverrides {
                    max_tokens: Some(0),
                    ..Default::default()
                }),
                ..base()
            },
            ("max_tokens 0", "config_overrides.max_tokens"),
        ),
        (
            pb::CreateExecutionRequest {
                config_overrides: Some(pb::ConfigOverrides {
                    max_tokens: Some(1_000_001),
                    ..Default::default()
                }),
                ..base()
            },
            ("max_tokens high", "config_overrides.max_tokens"),
        ),
        (
            pb::CreateExecutionRequest {
                config_overrides: Some(pb::ConfigOverrides {
                    model: Some(String::new()),
                    ..Default::default()
                }),
                ..base()
            },
            ("empty model", "config_overrides.model"),
        ),
        (
            pb::CreateExecutionRequest {
                config_overrides: Some(pb::ConfigOverrides {
                    model: Some("m".repeat(201)),
                    ..Default::default()
                }),
                ..base()
            },
            ("model too long", "config_overrides.model"),
        ),
        (
            pb::CreateExecutionRequest {
                metadata: (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..base()
            },
            ("11 pairs", "metadata"),
        ),
        (
            pb::CreateExecutionRequest {
                metadata: meta("k".repeat(51), "v".into()),
                ..base()
            },
            ("key too long", "metadata"),
        ),
        (
            pb::CreateExecutionRequest {
                metadata: meta("k".into(), String::new()),
                ..base()
            },
            ("empty value", "metadata[k]"),
        ),
        (
            pb::CreateExecutionRequest {
                metadata: meta("k".into(), "v".repeat(501)),
                ..base()
            },
            ("value too long", "metadata[k]"),
        ),
        (
            pb::CreateExecutionRequest {
                request_id: "r".repeat(101),
                ..base()
            },
            ("request_id too long", "request_id"),
        ),
        (
            pb::CreateExecutionRequest {
                task_id: "t".repeat(201),
                ..base()
            },
            ("task_id too long", "task_id"),
        ),
        (
            pb::CreateExecutionRequest {
                input: Some(object(serde_json::json!({ "x": deep.clone() }))),
                ..base()
            },
            ("input too deep", "input"),
        ),
        (
            pb::CreateExecutionRequest {
                input: Some(object(serde_json::json!({ "x": big.clone() }))),
                ..base()
            },
            ("input too big", "input"),
        ),
        (
            pb::CreateExecutionRequest {
                initial_state: Some(pb::StateCreate::default()),
                ..base()
            },
            ("unspecified state", "initial_state.type"),
        ),
        (
            pb::CreateExecutionRequest {
                initial_state: state(Cancelling),
                ..base()
            },
            ("start cancelling", "initial_state.type"),
        ),
        (
            pb::CreateExecutionRequest {
                initial_state: Some(pb::StateCreate {
                    r#type: 42,
                    ..Default::default()
                }),
                ..base()
            },
            ("unknown state", "initial_state.type"),
        ),
    ];
    for (req, (what, field)) in executions {
        let err = app
            .executions
            .clone()
            .create_execution(req)
            .await
            .unwrap_err();
        assert!(
            violated_fields(&err).contains(&field.to_owned()),
            "{what}: {:?}",
            violated_fields(&err)
        );
    }

    let task_base = || pb::CreateTaskRunRequest {
        execution_id: exec.id.clone(),
        task_key: "k".into(),
        ..Default::default()
    };
    let tasks: Vec<(pb::CreateTaskRunRequest, Case)> = vec![
        (
            pb::CreateTaskRunRequest {
                task_key: String::new(),
                ..task_base()
            },
            ("no task_key", "task_key"),
        ),
        (
            pb::CreateTaskRunRequest {
                execution_id: String::new(),
                ..task_base()
            },
            ("no execution_id", "execution_id"),
        ),
        (
            pb::CreateTaskRunRequest {
                execution_id: "nope".into(),
                ..task_base()
            },
            ("garbage execution_id", "execution_id"),
        ),
        (
            pb::CreateTaskRunRequest {
                parent_task_run_id: "nope".into(),
                ..task_base()
            },
            ("garbage parent", "parent_task_run_id"),
        ),
        (
            pb::CreateTaskRunRequest {
                retry_policy: Some(pb::RetryPolicy {
                    retries: -1,
                    ..Default::default()
                }),
                ..task_base()
            },
            ("negative retries", "retry_policy"),
        ),
        (
            pb::CreateTaskRunRequest {
                retry_policy: Some(pb::RetryPolicy {
                    retry_jitter_factor: 3.0,
                    ..Default::default()
                }),
                ..task_base()
            },
            ("jitter", "retry_policy"),
        ),
        (
            pb::CreateTaskRunRequest {
                tags: vec![String::new()],
                ..task_base()
            },
            ("empty tag", "tags"),
        ),
        (
            pb::CreateTaskRunRequest {
                labels: (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..task_base()
            },
            ("11 labels", "labels"),
        ),
        (
            pb::CreateTaskRunRequest {
                input: Some(json(serde_json::json!({"x": "{{broken"}))),
                ..task_base()
            },
            ("bad template", "input"),
        ),
        (
            pb::CreateTaskRunRequest {
                input: Some(json(deep.clone())),
                ..task_base()
            },
            ("deep input", "input"),
        ),
    ];
    for (req, (what, field)) in tasks {
        let err = app
            .task_runs
            .clone()
            .create_task_run(req)
            .await
            .unwrap_err();
        assert!(
            violated_fields(&err).contains(&field.to_owned()),
            "{what}: {:?}",
            violated_fields(&err)
        );
    }

    let set = |f: fn(&mut pb::SetExecutionStateRequest)| {
        let mut r = pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: state(Running),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let sets: Vec<(pb::SetExecutionStateRequest, Case)> = vec![
        (set(|r| r.state = None), ("no state", "state")),
        (set(|r| r.id = "nope".into()), ("garbage id", "id")),
        (
            set(|r| r.output = Some(json(serde_json::json!(1)))),
            ("output with RUNNING", "output"),
        ),
        (
            set(|r| r.error = Some(pb::ErrorInfo::default())),
            ("error with RUNNING", "error"),
        ),
        (
            set(|r| r.expected_state_id = "nope".into()),
            ("garbage expected_state_id", "expected_state_id"),
        ),
        (
            set(|r| {
                r.state = Some(pb::StateCreate {
                    r#type: Running as i32,
                    name: "n".repeat(201),
                    ..Default::default()
                })
            }),
            ("long name", "state.name"),
        ),
    ];
    for (req, (what, field)) in sets {
        let err = app
            .executions
            .clone()
            .set_execution_state(req)
            .await
            .unwrap_err();
        assert!(
            violated_fields(&err).contains(&field.to_owned()),
            "{what}: {:?}",
            violated_fields(&err)
        );
    }

    let mut others: Vec<(tonic::Status, Case)> = Vec::new();
    let mut e = app.executions.clone();
    let mut t = app.task_runs.clone();
    let mut ev = app.events.clone();
    others.push((
        e.get_execution(pb::GetExecutionRequest { id: "nope".into() })
            .await
            .unwrap_err(),
        ("get garbage", "id"),
    ));
    others.push((
        t.get_task_run(pb::GetTaskRunRequest { id: String::new() })
            .await
            .unwrap_err(),
        ("get empty", "id"),
    ));
    others.push((
        e.list_executions(pb::ListExecutionsRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("page size", "page_size"),
    ));
    others.push((
        e.list_executions(pb::ListExecutionsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("page token", "page_token"),
    ));
    others.push((
        t.list_task_runs(pb::ListTaskRunsRequest {
            execution_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("list by garbage", "execution_id"),
    ));
    others.push((
        t.list_states(pb::ListStatesRequest::default())
            .await
            .unwrap_err(),
        ("states of nothing", "execution_id"),
    ));
    others.push((
        t.list_states(pb::ListStatesRequest {
            execution_id: exec.id.clone(),
            task_run_id: task.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("states of both", "execution_id"),
    ));
    others.push((
        e.stream_execution_status(pb::StreamExecutionStatusRequest {
            id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("stream garbage", "id"),
    ));
    others.push((
        e.stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id.clone(),
            after_sequence: -1,
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("negative cursor", "after_sequence"),
    ));
    others.push((
        ev.subscribe(pb::SubscribeRequest {
            kinds: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("unknown kind", "kinds"),
    ));
    others.push((
        ev.subscribe(pb::SubscribeRequest {
            execution_ids: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("garbage execution id", "execution_ids"),
    ));
    others.push((
        e.resume_execution(pb::ResumeExecutionRequest {
            id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("resume garbage", "id"),
    ));
    others.push((
        e.cancel_execution(pb::CancelExecutionRequest {
            id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        ("cancel nothing", "id"),
    ));
    others.push((
        t.mark_task_run_stale(pb::MarkTaskRunStaleRequest { id: "nope".into() })
            .await
            .unwrap_err(),
        ("stale garbage", "id"),
    ));
    for (err, (what, field)) in others {
        assert!(
            violated_fields(&err).contains(&field.to_owned()),
            "{what}: {:?}",
            violated_fields(&err)
        );
    }

    assert_eq!(count(&app).await, before, "nothing was created");
    let unchanged = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(unchanged.transition_count, 0, "nothing was changed");
}

#[tokio::test]
async fn a_message_too_deep_to_decode_is_invalid_argument_not_internal() {
    let app = spawn_app().await;
    // 200 levels of nested lists: protobuf's decoder gives up first.
    let mut v = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(1.0)),
    };
    for _ in 0..200 {
        v = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue { values: vec![v] },
            )),
        };
    }
    let err = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: uuid::Uuid::now_v7().to_string(),
            task_key: "k".into(),
            input: Some(v),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Exactly the limit is fine: 32 levels.
    let exec = create_execution(&app).await;
    let mut ok = serde_json::json!(1);
    for _ in 0..31 {
        ok = serde_json::json!({ "a": ok });
    }
    app.task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "k".into(),
            input: Some(json(ok)),
            ..Default::default()
        })
        .await
        .expect("32 levels are accepted");
}
