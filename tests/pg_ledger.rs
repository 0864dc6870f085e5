//! The ledger on PostgreSQL: the real server (or several sharing one
//! database) on a database of its own, called through the generated
//! clients.

use std::{collections::HashSet, sync::Arc, time::Duration};

use pb::StateType::*;
use runledger::{App, Config, grpc::pb, keys};
use sqlx::PgConnection;
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{
    helpers::*,
    postgres::{TestDatabase, server_url, with_database},
    streams::{WAIT, ev_exec, ev_sub, seqs, take},
};

/// The tenant of a server without API keys.
const OPEN_TENANT: &str = "default";

fn json(v: serde_json::Value) -> prost_types::Value {
    runledger::grpc::convert::value(&v)
}

async fn get_execution(app: &TestApp, id: &str) -> pb::Execution {
    app.executions
        .clone()
        .get_execution(pb::GetExecutionRequest { id: id.into() })
        .await
        .expect("found")
        .into_inner()
        .execution
        .unwrap()
}

async fn list_executions(app: &TestApp, req: pb::ListExecutionsRequest) -> Vec<String> {
    app.executions
        .clone()
        .list_executions(req)
        .await
        .expect("listed")
        .into_inner()
        .executions
        .into_iter()
        .map(|e| e.id)
        .collect()
}

async fn list_task_runs(app: &TestApp, req: pb::ListTaskRunsRequest) -> Vec<String> {
    app.task_runs
        .clone()
        .list_task_runs(req)
        .await
        .expect("listed")
        .into_inner()
        .task_runs
        .into_iter()
        .map(|t| t.id)
        .collect()
}

/// The sequences of a tenant's log, in order, as the database holds them.
async fn logged_seqs(conn: &mut PgConnection, tenant: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM events WHERE tenant_id = $1 ORDER BY seq")
        .bind(tenant)
        .fetch_all(conn)
        .await
        .unwrap()
}

async fn head_of(conn: &mut PgConnection, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT head FROM tenant_heads WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Ends every other connection to the database (the servers' writers and
/// read pools), as an administrator or a server restart would; returns how
/// many it ended.
async fn terminate_other_connections(conn: &mut PgConnection, db: &TestDatabase) -> i64 {
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db.name())
    .fetch_all(conn)
    .await
    .unwrap();
    ended.into_iter().filter(|e| *e).count() as i64
}

#[tokio::test]
async fn executions_and_task_runs_are_created_read_listed_and_moved() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let exec = running_execution_via(&mut app.executions.clone(), "on postgres").await;
    let got = get_execution(&app, &exec.id).await;
    assert_eq!(got.id, exec.id);
    assert_eq!(state_of(&got), Running);
    let run = create_task_run(&app, &exec.id, "fetch").await;
    let moved = set_task_run_state(&app, &run.id, Running).await;
    assert_eq!(moved.status, pb::SetStateStatus::Accept as i32, "{moved:?}");
    let done = set_task_run_state(&app, &run.id, Completed).await;
    assert_eq!(done.status, pb::SetStateStatus::Accept as i32, "{done:?}");
    let got = app
        .task_runs
        .clone()
        .get_task_run(pb::GetTaskRunRequest { id: run.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    assert_eq!(got.state.unwrap().r#type, Completed as i32);
    // The same task key and dynamic key name the same run.
    let again = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "fetch".into(),
            dynamic_key: run.dynamic_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.task_run.unwrap().id, run.id);

    let states: Vec<i32> = app
        .task_runs
        .clone()
        .list_states(pb::ListStatesRequest {
            task_run_id: run.id.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .states
        .iter()
        .map(|s| s.r#type)
        .collect();
    assert_eq!(states, [Pending as i32]);
    assert_eq!(
        list_executions(&app, pb::ListExecutionsRequest::default()).await,
        [exec.id.as_str()]
    );
    assert_eq!(
        list_task_runs(&app, pb::ListTaskRunsRequest::default()).await,
        [run.id.as_str()]
    );
    app.stop().await;
}

#[tokio::test]
async fn lists_filter_and_page_and_histories_page_in_order() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let mut execs = app.executions.clone();
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let mut r = goal(&format!("g{i}"));
        r.metadata.insert("team".into(), team.into());
        r.task_id = format!("task-{team}");
        if i == 4 {
            // A document holding a "\u0000" escape: filters must still
            // work on the table that holds it.
            r.input = Some(prost_types::Struct {
                fields: [("note".to_owned(), json(serde_json::json!("a\u{0}b")))].into(),
            });
        }
        let e = execs
            .create_execution(r)
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap();
        ids.push(e.id);
    }
    let newest_first = |picked: &[usize]| -> Vec<String> {
        picked.iter().rev().map(|i| ids[*i].clone()).collect()
    };
    let by_team = |team: &str| pb::ListExecutionsRequest {
        metadata: [("team".to_owned(), team.to_owned())].into(),
        ..Default::default()
    };
    assert_eq!(
        list_executions(&app, by_team("a")).await,
        newest_first(&[0, 2, 4])
    );
    assert_eq!(
        list_executions(&app, by_team("b")).await,
        newest_first(&[1, 3])
    );
    assert!(list_executions(&app, by_team("c")).await.is_empty());
    assert_eq!(
        list_executions(
            &app,
            pb::ListExecutionsRequest {
                task_id: "task-b".into(),
                ..Default::default()
            }
        )
        .await,
        newest_first(&[1, 3])
    );
    for i in [1, 4] {
        set_execution_state(&app, &ids[i], Running).await;
    }
    assert_eq!(
        list_executions(
            &app,
            pb::ListExecutionsRequest {
                state_types: vec![Running as i32],
                ..Default::default()
            }
        )
        .await,
        newest_first(&[1, 4])
    );

    // Pages of two: every execution once, newest first.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = execs
            .list_executions(pb::ListExecutionsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.executions.len() <= 2);
        paged.extend(page.executions.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, newest_first(&[0, 1, 2, 3, 4]));

    // Task runs by execution, key, labels and state.
    let exec = &ids[4];
    let mut runs = Vec::new();
    for (key, label) in [("fetch", "x"), ("parse", "y"), ("fetch", "y")] {
        let t = app
            .task_runs
            .clone()
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.clone(),
                task_key: key.into(),
                labels: [("kind".to_owned(), label.to_owned())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        runs.push(t.id);
    }
    set_task_run_state(&app, &runs[1], Running).await;
    let runs_newest_first = |picked: &[usize]| -> Vec<String> {
        picked.iter().rev().map(|i| runs[*i].clone()).collect()
    };
    assert_eq!(
        list_task_runs(
            &app,
            pb::ListTaskRunsRequest {
                execution_id: exec.clone(),
                ..Default::default()
            }
        )
        .await,
        runs_newest_first(&[0, 1, 2])
    );
    assert_eq!(
        list_task_runs(
            &app,
            pb::ListTaskRunsRequest {
                task_key: "fetch".into(),
                ..Default::default()
            }
        )
        .await,
        runs_newest_first(&[0, 2])
    );
    assert_eq!(
        list_task_runs(
            &app,
            pb::ListTaskRunsRequest {
                labels: [("kind".to_owned(), "y".to_owned())].into(),
                ..Default::default()
            }
        )
        .await,
        runs_newest_first(&[1, 2])
    );
    assert_eq!(
        list_task_runs(
            &app,
            pb::ListTaskRunsRequest {
                state_types: vec![Running as i32],
                ..Default::default()
            }
        )
        .await,
        runs_newest_first(&[1])
    );

    // A long history, a state per page: in order, without gaps.
    let long = &ids[1];
    for t in [Paused, Running, Paused, Running, Completed] {
        let r = set_execution_state(&app, long, t).await;
        assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .task_runs
            .clone()
            .list_states(pb::ListStatesRequest {
                execution_id: long.clone(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.states.iter().map(|s| s.r#type));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        [
            Pending, Running, Paused, Running, Paused, Running, Completed
        ]
        .map(|t| t as i32)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_template_reads_an_upstream_output_holding_a_nul_character() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let exec = running_execution_via(&mut app.executions.clone(), "nul output").await;
    let mut runs = app.task_runs.clone();
    let upstream = create_task_run(&app, &exec.id, "step").await;
    set_task_run_state(&app, &upstream.id, Running).await;
    let output = serde_json::json!({ "s": "a\u{0}b", "n": [1, 2.5] });
    let done = runs
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: upstream.id.clone(),
            state: state(Completed),
            output: Some(json(output.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, pb::SetStateStatus::Accept as i32, "{done:?}");
    let consumer = runs
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "consumer".into(),
            input: Some(json(serde_json::json!({ "got": "{{step.output}}" }))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    let started = set_task_run_state(&app, &consumer.id, Running).await;
    assert_eq!(
        started.status,
        pb::SetStateStatus::Accept as i32,
        "{started:?}"
    );
    let t = started.task_run.unwrap();
    assert_eq!(
        runledger::grpc::convert::from_value(t.resolved_input.as_ref().unwrap()).unwrap(),
        serde_json::json!({ "got": output })
    );
    assert_eq!(t.task_inputs, [upstream.id.as_str()]);
    app.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_creates_with_one_request_id_make_one_execution_across_two_servers() {
    let first = spawn_app_on_postgres(|_| {}).await;
    let second = spawn_on_database(Arc::clone(&first.db), |_| {}).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut client = if i % 2 == 0 {
            first.executions.clone()
        } else {
            second.executions.clone()
        };
        calls.push(tokio::spawn(async move {
            let mut r = goal("once");
            r.request_id = "req-1".into();
            client
                .create_execution(r)
                .await
                .expect("created or found")
                .into_inner()
                .execution
                .unwrap()
                .id
        }));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let listed = list_executions(&first, pb::ListExecutionsRequest::default()).await;
    assert_eq!(listed.len(), 1);
    assert!(ids.contains(&listed[0]));
    // One CREATED event: the others found the stored execution.
    let mut conn = first.db.connect().await;
    assert_eq!(logged_seqs(&mut conn, OPEN_TENANT).await, [1]);

    // A request_id one server stored, replayed on the other by many
    // callers at once (their batch meets the stored execution when it
    // writes, and its operations run again and find it).
    let mut r = goal("twice");
    r.request_id = "req-2".into();
    let stored = first
        .executions
        .clone()
        .create_execution(r.clone())
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let replays: Vec<_> = (0..20)
        .map(|_| {
            let mut client = second.executions.clone();
            let r = r.clone();
            tokio::spawn(async move { client.create_execution(r).await })
        })
        .collect();
    for replay in replays {
        let found = replay.await.unwrap().expect("found").into_inner();
        assert_eq!(found.execution.unwrap().id, stored.id);
    }
    assert_eq!(logged_seqs(&mut conn, OPEN_TENANT).await, [1, 2]);

    // The same request_id with another request is refused.
    let mut r = goal("another");
    r.request_id = "req-1".into();
    let err = second
        .executions
        .clone()
        .create_execution(r)
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Internal, "{err:?}");
    second.stop().await;
    first.stop().await;
}

/// Sends one API key with every call.
#[derive(Clone, Debug)]
struct Key(MetadataValue<Ascii>);

impl Interceptor for Key {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn executions_with_key(
    channel: &Channel,
    secret: &str,
) -> pb::execution_service_client::ExecutionServiceClient<InterceptedService<Channel, Key>> {
    let key = Key(format!("Bearer {secret}").parse().unwrap());
    pb::execution_service_client::ExecutionServiceClient::with_interceptor(channel.clone(), key)
}

fn events_with_key(
    channel: &Channel,
    secret: &str,
) -> pb::event_service_client::EventServiceClient<InterceptedService<Channel, Key>> {
    let key = Key(format!("Bearer {secret}").parse().unwrap());
    pb::event_service_client::EventServiceClient::with_interceptor(channel.clone(), key)
}

/// A fresh database with a key for each of `tenants`; their secrets.
async fn database_with_keys(tenants: &[&str]) -> (Arc<TestDatabase>, Vec<String>) {
    let db = TestDatabase::create().await;
    let mut conn = keys::connect(db.url()).await.expect("keys connect");
    let mut secrets = Vec::new();
    for tenant in tenants {
        let new = keys::NewKey {
            tenant: (*tenant).into(),
            name: format!("{tenant}-worker"),
            ..Default::default()
        };
        secrets.push(keys::create(&mut conn, new).await.unwrap().1);
    }
    (Arc::new(db), secrets)
}

#[tokio::test]
async fn each_tenant_numbers_its_events_densely_while_two_servers_write_at_once() {
    let (db, secrets) = database_with_keys(&["acme", "globex"]).await;
    let a = spawn_on_database(Arc::clone(&db), |_| {}).await;
    let b = spawn_on_database(Arc::clone(&db), |_| {}).await;
    let channels = [connect(a.addr).await, connect(b.addr).await];
    const PER_WRITER: usize = 8;
    let mut writers = Vec::new();
    for channel in &channels {
        for secret in &secrets {
            let mut client = executions_with_key(channel, secret);
            writers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_WRITER {
                    let e = client
                        .create_execution(goal(&format!("g{i}")))
                        .await
                        .expect("created")
                        .into_inner()
                        .execution
                        .unwrap();
                    let r = client
                        .set_execution_state(pb::SetExecutionStateRequest {
                            id: e.id.clone(),
                            state: state(Running),
                            ..Default::default()
                        })
                        .await
                        .expect("moved")
                        .into_inner();
                    assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
                    ids.push(e.id);
                }
                ids
            }));
        }
    }
    for w in writers {
        assert_eq!(w.await.unwrap().len(), PER_WRITER);
    }
    // Two servers, two events per execution.
    let per_tenant = (2 * PER_WRITER * 2) as i64;
    let mut conn = db.connect().await;
    for tenant in ["acme", "globex"] {
        assert_eq!(
            logged_seqs(&mut conn, tenant).await,
            (1..=per_tenant).collect::<Vec<_>>(),
            "{tenant}"
        );
        assert_eq!(head_of(&mut conn, tenant).await, per_tenant);
    }
    // Each server streams a tenant's log (after its first event: 0 is
    // live from now), written by either server.
    for (channel, secret) in channels.iter().zip(&secrets) {
        let mut sub = events_with_key(channel, secret)
            .subscribe(pb::SubscribeRequest {
                include_task_runs: true,
                after_sequence: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let events = take(&mut sub, per_tenant as usize - 1, ev_sub).await;
        assert_eq!(seqs(&events), (2..=per_tenant).collect::<Vec<_>>());
    }

    // A server started again continues each tenant's numbering.
    let b_db = b.stop().await;
    let b = spawn_on_database(b_db, |_| {}).await;
    let channel = connect(b.addr).await;
    executions_with_key(&channel, &secrets[0])
        .create_execution(goal("after restart"))
        .await
        .unwrap();
    assert_eq!(head_of(&mut conn, "acme").await, per_tenant + 1);
    assert_eq!(
        logged_seqs(&mut conn, "acme").await,
        (1..=per_tenant + 1).collect::<Vec<_>>()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn servers_starting_together_on_a_fresh_database_migrate_it_once() {
    let db = Arc::new(TestDatabase::create().await);
    let (a, b, c) = tokio::join!(
        spawn_on_database(Arc::clone(&db), |_| {}),
        spawn_on_database(Arc::clone(&db), |_| {}),
        spawn_on_database(Arc::clone(&db), |_| {}),
    );
    let made = create_execution(&a).await;
    for app in [&b, &c] {
        assert_eq!(get_execution(app, &made.id).await.id, made.id);
    }
    let mut conn = db.connect().await;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, crate::postgres::MIGRATOR.iter().count() as i64);
    for app in [a, b, c] {
        app.stop().await;
    }
}

#[tokio::test]
async fn two_servers_sweeping_time_each_pause_out_once() {
    let sweep = |c: &mut Config| c.pause_sweep_interval = Duration::from_millis(5);
    let a = spawn_app_on_postgres(sweep).await;
    let b = spawn_on_database(Arc::clone(&a.db), sweep).await;
    const RUNS: usize = 12;
    let soon = std::time::SystemTime::now() + Duration::from_millis(300);
    let soon = prost_types::Timestamp::from(soon);
    let mut ids = Vec::new();
    for i in 0..RUNS {
        let app = if i % 2 == 0 { &a } else { &b };
        let e = running_execution_via(&mut app.executions.clone(), "paused").await;
        let r = app
            .executions
            .clone()
            .set_execution_state(pb::SetExecutionStateRequest {
                id: e.id.clone(),
                state: Some(pb::StateCreate {
                    r#type: Paused as i32,
                    details: Some(pb::StateDetails {
                        pause_timeout: Some(soon),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
        ids.push(e.id);
    }
    tokio::time::timeout(WAIT, async {
        loop {
            let paused = list_executions(
                &a,
                pb::ListExecutionsRequest {
                    state_types: vec![Paused as i32],
                    ..Default::default()
                },
            )
            .await;
            if paused.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every pause times out");
    // Let any late sweep finish before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in &ids {
        let history: Vec<i32> = a
            .task_runs
            .clone()
            .list_states(pb::ListStatesRequest {
                execution_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .states
            .iter()
            .map(|s| s.r#type)
            .collect();
        assert_eq!(
            history,
            [Pending, Running, Paused, Failed].map(|t| t as i32),
            "{id}"
        );
    }
    let mut conn = a.db.connect().await;
    let events = (RUNS * 4) as i64;
    assert_eq!(
        logged_seqs(&mut conn, OPEN_TENANT).await,
        (1..=events).collect::<Vec<_>>()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_stream_resumes_after_the_sequence_it_names() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let exec = create_execution(&app).await;
    for t in [Running, Paused, Running] {
        set_execution_state(&app, &exec.id, t).await;
    }
    // Events 1..=4: CREATED and three state changes. Resume after 2.
    let mut sub = app
        .events
        .clone()
        .subscribe(pb::SubscribeRequest {
            after_sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let replayed = take(&mut sub, 2, ev_sub).await;
    assert_eq!(seqs(&replayed), [3, 4]);
    // Then live.
    set_execution_state(&app, &exec.id, Completed).await;
    let live = take(&mut sub, 1, ev_sub).await;
    assert_eq!(seqs(&live), [5]);

    // A run's own stream resumes too: a snapshot would come first only
    // without a sequence to resume from.
    let mut own = app
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id.clone(),
            include_task_runs: false,
            after_sequence: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let events = take(&mut own, 2, ev_exec).await;
    assert_eq!(seqs(&events), [4, 5]);
    app.stop().await;
}

#[tokio::test]
async fn commits_announce_each_tenants_head_to_listeners() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let mut listener = sqlx::postgres::PgListener::connect(app.db.url())
        .await
        .unwrap();
    listener
        .listen(runledger::store::EVENTS_CHANNEL)
        .await
        .unwrap();
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let n = tokio::time::timeout(WAIT, listener.recv())
            .await
            .expect("a notification")
            .unwrap();
        heard.push(n.payload().to_owned());
    }
    assert_eq!(
        heard,
        [format!("{OPEN_TENANT}:1"), format!("{OPEN_TENANT}:2")]
    );
    app.stop().await;
}

#[tokio::test]
async fn writes_and_reads_go_on_after_the_servers_connections_are_ended() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let exec = create_execution(&app).await;
    let mut admin = app.db.connect().await;
    let ended = terminate_other_connections(&mut admin, &app.db).await;
    assert!(ended >= 2, "the writer and a read connection: {ended}");

    // The next writes reconnect, and nothing is lost or repeated.
    let moved = set_execution_state(&app, &exec.id, Running).await;
    assert_eq!(moved.status, pb::SetStateStatus::Accept as i32, "{moved:?}");
    let second = create_execution(&app).await;
    assert_eq!(state_of(&get_execution(&app, &exec.id).await), Running);
    assert_eq!(
        list_executions(&app, pb::ListExecutionsRequest::default()).await,
        [second.id.clone(), exec.id.clone()]
    );
    assert_eq!(logged_seqs(&mut admin, OPEN_TENANT).await, [1, 2, 3]);

    // Again, with the server idle in between.
    tokio::time::sleep(Duration::from_millis(100)).await;
    terminate_other_connections(&mut admin, &app.db).await;
    let moved = set_execution_state(&app, &second.id, Running).await;
    assert_eq!(moved.status, pb::SetStateStatus::Accept as i32, "{moved:?}");
    assert_eq!(logged_seqs(&mut admin, OPEN_TENANT).await, [1, 2, 3, 4]);
    app.stop().await;
}

#[tokio::test]
async fn while_the_database_refuses_connections_calls_are_unavailable_and_then_served_again() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let exec = create_execution(&app).await;
    // On the server's own database: one may not close the current one.
    let mut admin = <PgConnection as sqlx::Connection>::connect(app.db.server())
        .await
        .unwrap();
    let allow = |on: bool| {
        // The name is made of [a-z0-9_] alone.
        sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {on}",
            app.db.name()
        ))
    };
    sqlx::query(allow(false)).execute(&mut admin).await.unwrap();
    terminate_other_connections(&mut admin, &app.db).await;

    let write = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: state(Running),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");
    let read = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::Unavailable, "{read:?}");

    sqlx::query(allow(true)).execute(&mut admin).await.unwrap();
    let moved = set_execution_state(&app, &exec.id, Running).await;
    assert_eq!(moved.status, pb::SetStateStatus::Accept as i32, "{moved:?}");
    assert_eq!(state_of(&get_execution(&app, &exec.id).await), Running);
    let mut conn = app.db.connect().await;
    assert_eq!(logged_seqs(&mut conn, OPEN_TENANT).await, [1, 2]);
    app.stop().await;
}

#[tokio::test]
async fn a_commit_whose_outcome_is_unknown_is_answered_unavailable_and_the_writer_goes_on() {
    let app = spawn_app_on_postgres(|_| {}).await;
    let mut admin = app.db.connect().await;
    // A check that runs at COMMIT and ends the connection committing a
    // marked execution: the server cannot know whether it committed.
    sqlx::raw_sql(
        "CREATE FUNCTION end_my_connection() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF NEW.request_id = 'lost-at-commit' THEN \
                 PERFORM pg_terminate_backend(pg_backend_pid()); \
             END IF; \
             RETURN NULL; \
         END $$; \
         CREATE CONSTRAINT TRIGGER end_at_commit AFTER INSERT ON executions \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION end_my_connection();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let marked = || {
        let mut r = goal("marked");
        r.request_id = "lost-at-commit".into();
        r
    };
    let err = app
        .executions
        .clone()
        .create_execution(marked())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("retry"), "{}", err.message());

    // The writer connects again; the retry (same request_id) is applied
    // once.
    sqlx::raw_sql("DROP TRIGGER end_at_commit ON executions")
        .execute(&mut admin)
        .await
        .unwrap();
    let created = app
        .executions
        .clone()
        .create_execution(marked())
        .await
        .expect("the retry succeeds")
        .into_inner();
    let again = app
        .executions
        .clone()
        .create_execution(marked())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.execution.unwrap().id, again.execution.unwrap().id);
    assert_eq!(
        list_executions(&app, pb::ListExecutionsRequest::default())
            .await
            .len(),
        1
    );
    assert_eq!(logged_seqs(&mut admin, OPEN_TENANT).await, [1]);
    app.stop().await;
}

async fn count(db: &mut PgConnection, sql: &'static str, id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn retention_removes_old_events_and_the_history_of_finished_runs() {
    let app = spawn_app_on_postgres(|c| {
        c.event_retention = Duration::ZERO;
        c.prune_interval = Duration::from_millis(20);
    })
    .await;
    let force = |id: String, t: pb::StateType, transition_id: &'static str| {
        let mut execs = app.executions.clone();
        async move {
            let r = execs
                .set_execution_state(pb::SetExecutionStateRequest {
                    id,
                    state: Some(pb::StateCreate {
                        r#type: t as i32,
                        details: Some(pb::StateDetails {
                            transition_id: transition_id.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    force: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
        }
    };
    let finished = create_execution(&app).await;
    force(finished.id.clone(), Running, "start-finished").await;
    force(finished.id.clone(), Completed, "").await;
    let running = create_execution(&app).await;
    force(running.id.clone(), Running, "start-running").await;
    // A cache entry that has expired.
    let cached = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: running.id.clone(),
            task_key: "cached".into(),
            cache_key: "expired".into(),
            cache_expiration: Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    set_task_run_state(&app, &cached.id, Running).await;
    set_task_run_state(&app, &cached.id, Completed).await;

    let mut db = app.db.connect().await;
    let history = "SELECT COUNT(*) FROM states WHERE run_id = $1";
    let transitions = "SELECT COUNT(*) FROM transitions WHERE run_id = $1";
    tokio::time::timeout(WAIT, async {
        loop {
            let (events, entries): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM cache_entries)",
            )
            .fetch_one(&mut db)
            .await
            .unwrap();
            if events == 0 && entries == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("retention empties the log and the expired cache entry");
    assert_eq!(count(&mut db, history, &finished.id).await, 1);
    assert_eq!(count(&mut db, history, &running.id).await, 2);
    assert_eq!(count(&mut db, transitions, &finished.id).await, 0);
    assert_eq!(count(&mut db, transitions, &running.id).await, 1);
    let (head, compacted): (i64, i64) =
        sqlx::query_as("SELECT head, compacted FROM tenant_heads WHERE tenant_id = $1")
            .bind(OPEN_TENANT)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(compacted, head);

    // Through the API: the finished run keeps its current state; a
    // stream from before the mark is told the events are gone.
    let got = get_execution(&app, &finished.id).await;
    assert_eq!(state_of(&got), Completed);
    let refused = app
        .events
        .clone()
        .subscribe(pb::SubscribeRequest {
            after_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    // New events continue the numbering.
    force(running.id.clone(), Completed, "").await;
    assert_eq!(head_of(&mut db, OPEN_TENANT).await, head + 1);
    app.stop().await;
}

/// Runs `runledger keys ...`; returns its exit success, stdout and stderr.
/// The test's runtime (which also runs the server) goes on meanwhile.
async fn keys_command(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .arg("keys")
            .args(args)
            .env_remove("RUNLEDGER_DATABASE")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn the_keys_commands_work_on_postgres_and_the_server_honours_them() {
    let db = Arc::new(TestDatabase::create().await);
    let url = db.url().to_owned();
    let (ok, out, err) = keys_command(&[
        "create",
        "--database",
        &url,
        "--tenant",
        "acme",
        "--name",
        "ci",
    ])
    .await;
    assert!(ok, "{err}");
    let secret = out.lines().last().unwrap().trim().to_owned();
    assert!(keys::looks_like_secret(&secret), "{out}");
    // Nothing was made on disk for it.
    assert!(!std::path::Path::new(&url).exists());

    let (ok, out, err) = keys_command(&["list", "--database", &url]).await;
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains(" ci ")).expect("listed");
    assert!(row.contains("acme"), "{row}");
    assert!(!out.contains(&secret[3..]), "{out}");

    let app = spawn_on_database(Arc::clone(&db), |_| {}).await;
    let channel = connect(app.addr).await;
    let made = executions_with_key(&channel, &secret)
        .create_execution(goal("with a key"))
        .await
        .expect("the key works")
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(made.tenant_id, "acme");
    let unkeyed = app
        .executions
        .clone()
        .create_execution(goal("without"))
        .await
        .unwrap_err();
    assert_eq!(unkeyed.code(), Code::Unauthenticated);

    let (ok, out, err) = keys_command(&["revoke", "--database", &url, "ci"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            let r = executions_with_key(&channel, &secret)
                .create_execution(goal("after revoke"))
                .await;
            if let Err(e) = r {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a revoked key stops working");
    assert_eq!(refused.code(), Code::Unauthenticated);
    // The key's use was recorded in the database.
    let mut conn = db.connect().await;
    let used: Option<i64> =
        sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE name = 'ci'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(used.is_some());
    app.stop().await;
}

/// `server` with `user` (and its password) in place of its own.
pub fn with_user(server: &str, user: &str) -> String {
    let start = server.find("://").unwrap() + 3;
    let rest = &server[start..];
    let host = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    format!("{}{user}@{host}", &server[..start])
}

/// The message App::build gives for `url`.
async fn open_error(url: &str) -> String {
    let config = Config::new("127.0.0.1:0".parse().unwrap(), url).unwrap();
    match App::build(config).await {
        Ok(_) => panic!("the database cannot be opened"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn opening_fails_clearly_and_never_shows_the_password() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        format!("postgres://ledger:hunter2@127.0.0.1:{port}/ledger")
    };
    let message = open_error(&closed).await;
    assert!(message.contains("does not answer"), "{message}");
    assert!(
        message.contains("postgres://ledger:***@127.0.0.1"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");

    let missing = with_database(&server_url(), "runledger_no_such_database");
    let message = open_error(&missing).await;
    assert!(message.contains("does not exist"), "{message}");
    assert!(message.contains("runledger_no_such_database"), "{message}");

    let stranger = with_user(&server_url(), "runledger_no_such_role:hunter2");
    let message = open_error(&stranger).await;
    assert!(message.contains("refused the login"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");

    // The key commands say the same.
    let (ok, _, err) = keys_command(&["list", "--database", &closed]).await;
    assert!(!ok);
    assert!(err.contains("does not answer"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
