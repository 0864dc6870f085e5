//! API keys and tenants: every RPC and stream keeps each tenant to its own
//! runs; keys are checked, revocations take effect; open mode's rules.

use std::time::{Duration, Instant};

use pb::StateType::*;
use runledger::{App, Config, StartError, grpc::pb, keys};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::helpers::*;

/// Sends one API key with every call.
#[derive(Clone, Debug)]
struct Key(Option<MetadataValue<Ascii>>);

impl Interceptor for Key {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Key>;

#[derive(Clone)]
struct Client {
    executions: pb::execution_service_client::ExecutionServiceClient<Svc>,
    task_runs: pb::task_run_service_client::TaskRunServiceClient<Svc>,
    events: pb::event_service_client::EventServiceClient<Svc>,
}

fn client(app: &TestApp, channel: &Channel, secret: Option<&str>) -> Client {
    let _ = app;
    let key = Key(secret.map(|s| format!("Bearer {s}").parse().unwrap()));
    Client {
        executions: pb::execution_service_client::ExecutionServiceClient::with_interceptor(
            channel.clone(),
            key.clone(),
        ),
        task_runs: pb::task_run_service_client::TaskRunServiceClient::with_interceptor(
            channel.clone(),
            key.clone(),
        ),
        events: pb::event_service_client::EventServiceClient::with_interceptor(
            channel.clone(),
            key,
        ),
    }
}

/// A server whose database holds a key for each of two tenants.
async fn two_tenants() -> (TestApp, Channel, String, String) {
    let dir = Storage::fresh().await;
    let url = dir.url();
    let mut conn = keys::connect(&url).await.unwrap();
    let secret = |tenant: &str, name: &str| {
        let new = keys::NewKey {
            tenant: tenant.into(),
            name: name.into(),
            ..Default::default()
        };
        (new, ())
    };
    let (a, _) = secret("acme", "acme-worker");
    let (b, _) = secret("globex", "globex-worker");
    let (_, sa) = keys::create(&mut conn, a).await.unwrap();
    let (_, sb) = keys::create(&mut conn, b).await.unwrap();
    drop(conn);
    let app = spawn_in(dir, |_| {}).await;
    let channel = connect(app.addr).await;
    (app, channel, sa, sb)
}

fn not_found<T: std::fmt::Debug>(r: Result<T, Status>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
}

#[tokio::test]
async fn calls_need_a_known_key_once_keys_exist_but_health_stays_open() {
    let (app, channel, a, _) = two_tenants().await;
    let mut none = client(&app, &channel, None);
    let err = none
        .executions
        .create_execution(goal("g"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("API key"), "{}", err.message());
    let mut wrong = client(&app, &channel, Some("rl_not-a-key"));
    assert_eq!(
        wrong
            .executions
            .create_execution(goal("g"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut sub = none.events.subscribe(pb::SubscribeRequest::default()).await;
    assert_eq!(sub.as_mut().unwrap_err().code(), Code::Unauthenticated);

    // x-api-key works as well as a bearer token.
    let mut execs = pb::execution_service_client::ExecutionServiceClient::new(channel.clone());
    let mut req = Request::new(goal("g"));
    req.metadata_mut().insert("x-api-key", a.parse().unwrap());
    let e = execs
        .create_execution(req)
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(
        (e.tenant_id.as_str(), e.updated_by.as_str()),
        ("acme", "acme-worker")
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
}

#[tokio::test]
async fn one_tenant_never_sees_another_tenants_runs_or_events() {
    let (app, channel, a_secret, b_secret) = two_tenants().await;
    let mut a = client(&app, &channel, Some(&a_secret));
    let mut b = client(&app, &channel, Some(&b_secret));

    // B's log holds one event of its own.
    let eb0 = b
        .executions
        .create_execution(goal("b's first"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();

    // B listens to everything it may see, live and from the log.
    let mut b_live = b
        .events
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // And from the log, after its own first event.
    let mut b_log = b
        .events
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            after_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let request = pb::CreateExecutionRequest {
        goal: "g".into(),
        request_id: "same-id".into(),
        ..Default::default()
    };
    let ea = a
        .executions
        .create_execution(request.clone())
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(ea.updated_by, "acme-worker");
    a.executions
        .set_execution_state(pb::SetExecutionStateRequest {
            id: ea.id.clone(),
            state: state(Running),
            ..Default::default()
        })
        .await
        .unwrap();
    let ta = a
        .task_runs
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: ea.id.clone(),
            task_key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    a.task_runs
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: ta.id.clone(),
            state: state(Running),
            ..Default::default()
        })
        .await
        .unwrap();

    // The same request_id in B is B's own execution.
    let eb = b
        .executions
        .create_execution(request)
        .await
        .unwrap()
        .into_inner();
    assert!(eb.created);
    let eb = eb.execution.unwrap();
    assert_ne!(eb.id, ea.id);
    assert_eq!(
        (eb.tenant_id.as_str(), eb.updated_by.as_str()),
        ("globex", "globex-worker")
    );

    // Another tenant's id is NOT_FOUND, worded as for an id that does not exist.
    let missing = uuid::Uuid::now_v7().to_string();
    let theirs = b
        .executions
        .get_execution(pb::GetExecutionRequest { id: ea.id.clone() })
        .await
        .unwrap_err();
    let nobodys = b
        .executions
        .get_execution(pb::GetExecutionRequest {
            id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (theirs.code(), theirs.message().replace(&ea.id, "ID")),
        (nobodys.code(), nobodys.message().replace(&missing, "ID"))
    );

    let e = ea.id.clone();
    let t = ta.id.clone();
    not_found(
        b.executions
            .get_execution(pb::GetExecutionRequest { id: e.clone() })
            .await,
        "GetExecution",
    );
    not_found(
        b.executions
            .set_execution_state(pb::SetExecutionStateRequest {
                id: e.clone(),
                state: state(Paused),
                ..Default::default()
            })
            .await,
        "SetExecutionState",
    );
    not_found(
        b.executions
            .cancel_execution(pb::CancelExecutionRequest {
                id: e.clone(),
                ..Default::default()
            })
            .await,
        "CancelExecution",
    );
    not_found(
        b.executions
            .resume_execution(pb::ResumeExecutionRequest {
                id: e.clone(),
                ..Default::default()
            })
            .await,
        "ResumeExecution",
    );
    not_found(
        b.executions
            .delete_execution(pb::DeleteExecutionRequest { id: e.clone() })
            .await,
        "DeleteExecution",
    );
    not_found(
        b.executions
            .stream_execution_status(pb::StreamExecutionStatusRequest {
                id: e.clone(),
                ..Default::default()
            })
            .await,
        "StreamExecutionStatus",
    );
    not_found(
        b.executions
            .stream_execution_status(pb::StreamExecutionStatusRequest {
                id: e.clone(),
                after_sequence: 1,
                include_task_runs: true,
            })
            .await,
        "StreamExecutionStatus after",
    );
    not_found(
        b.task_runs
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: e.clone(),
                task_key: "x".into(),
                ..Default::default()
            })
            .await,
        "CreateTaskRun",
    );
    not_found(
        b.task_runs
            .get_task_run(pb::GetTaskRunRequest { id: t.clone() })
            .await,
        "GetTaskRun",
    );
    not_found(
        b.task_runs
            .set_task_run_state(pb::SetTaskRunStateRequest {
                id: t.clone(),
                state: state(Completed),
                ..Default::default()
            })
            .await,
        "SetTaskRunState",
    );
    not_found(
        b.task_runs
            .delete_task_run(pb::DeleteTaskRunRequest { id: t.clone() })
            .await,
        "DeleteTaskRun",
    );
    not_found(
        b.task_runs
            .mark_task_run_stale(pb::MarkTaskRunStaleRequest { id: t.clone() })
            .await,
        "MarkTaskRunStale",
    );
    not_found(
        b.task_runs
            .stream_task_run_status(pb::StreamTaskRunStatusRequest {
                id: t.clone(),
                after_sequence: 0,
            })
            .await,
        "StreamTaskRunStatus",
    );
    not_found(
        b.task_runs
            .stream_task_run_status(pb::StreamTaskRunStatusRequest {
                id: t.clone(),
                after_sequence: 1,
            })
            .await,
        "StreamTaskRunStatus after",
    );
    not_found(
        b.task_runs
            .list_states(pb::ListStatesRequest {
                execution_id: e.clone(),
                ..Default::default()
            })
            .await,
        "ListStates execution",
    );
    not_found(
        b.task_runs
            .list_states(pb::ListStatesRequest {
                task_run_id: t.clone(),
                ..Default::default()
            })
            .await,
        "ListStates task run",
    );

    let listed = b
        .executions
        .list_executions(pb::ListExecutionsRequest {
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .executions
            .iter()
            .map(|x| x.id.clone())
            .collect::<Vec<_>>(),
        [eb.id.clone(), eb0.id.clone()]
    );
    let runs = b
        .task_runs
        .list_task_runs(pb::ListTaskRunsRequest {
            execution_id: e.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(runs.task_runs.is_empty());
    let all = b
        .task_runs
        .list_task_runs(pb::ListTaskRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.task_runs.is_empty());

    // A's runs are untouched by B's attempts.
    let still = a
        .executions
        .get_execution(pb::GetExecutionRequest { id: e.clone() })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!((state_of(&still), still.deleted_at), (Running, None));

    // B's streams carry B's event only: the first each delivers is B's
    // execution, although A's four events came before it; and B's log is
    // its own, numbered 1, 2, ... whatever A wrote in between.
    for s in [&mut b_live, &mut b_log] {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event = m.event.unwrap();
        assert_eq!(event.sequence, 2);
        match event.resource.unwrap() {
            pb::status_event::Resource::Execution(x) => assert_eq!(x.id, eb.id),
            other => panic!("another tenant's event: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_within_seconds() {
    let (app, channel, a_secret, _) = two_tenants().await;
    let mut a = client(&app, &channel, Some(&a_secret));
    a.executions.create_execution(goal("before")).await.unwrap();
    let url = app.storage.url();
    let mut conn = keys::connect(&url).await.unwrap();
    keys::revoke(&mut conn, "acme-worker").await.unwrap();
    let started = Instant::now();
    loop {
        match a.executions.create_execution(goal("after")).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            Err(e) => panic!("{e:?}"),
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the key still works"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let listed = keys::list(&mut conn).await.unwrap();
    let k = listed.iter().find(|k| k.name == "acme-worker").unwrap();
    assert!(k.revoked_at.is_some() && k.last_used_at.is_some(), "{k:?}");
}

#[tokio::test]
async fn without_keys_only_loopback_serves_open_and_a_new_key_closes_it() {
    // Not loopback, no keys, not allowed: refused at start.
    let dir = Storage::fresh().await;
    let mut config = Config::new("0.0.0.0:0".parse().unwrap(), dir.database()).unwrap();
    config.allow_plaintext = true;
    match App::build(config).await {
        Err(e @ StartError::Unauthenticated(_)) => {
            assert!(e.to_string().contains("--allow-unauthenticated"))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Loopback: open, as the default tenant, until a key exists.
    let app = spawn_app().await;
    let e = create_execution(&app).await;
    assert_eq!(
        (e.tenant_id.as_str(), e.updated_by.as_str()),
        ("default", "anonymous")
    );
    let url = app.storage.url();
    let mut conn = keys::connect(&url).await.unwrap();
    keys::create(
        &mut conn,
        keys::NewKey {
            tenant: "t".into(),
            name: "n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        match app.executions.clone().create_execution(goal("g")).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            Err(e) => panic!("{e:?}"),
            Ok(_) => {
                assert!(started.elapsed() < Duration::from_secs(5), "still open");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A server with one key of the given limits.
async fn with_limited_key(rate: Option<f64>, daily_quota: Option<i64>) -> (TestApp, String) {
    let dir = Storage::fresh().await;
    let url = dir.url();
    let mut conn = keys::connect(&url).await.unwrap();
    let new = keys::NewKey {
        tenant: "acme".into(),
        name: "limited".into(),
        rate,
        daily_quota,
    };
    let (_, secret) = keys::create(&mut conn, new).await.unwrap();
    (spawn_in(dir, |_| {}).await, secret)
}

fn retry_delay(s: &Status) -> Duration {
    use tonic_types::StatusExt;
    s.get_details_retry_info()
        .expect("a RetryInfo detail")
        .retry_delay
        .expect("a delay")
}

#[tokio::test]
async fn a_key_over_its_rate_is_told_when_to_retry() {
    let (app, secret) = with_limited_key(Some(2.0), None).await;
    let channel = connect(app.addr).await;
    let mut c = client(&app, &channel, Some(&secret));
    c.executions.create_execution(goal("1")).await.unwrap();
    c.executions.create_execution(goal("2")).await.unwrap();
    let refused = c.executions.create_execution(goal("3")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("rate limit of 2"),
        "{}",
        refused.message()
    );
    let wait = retry_delay(&refused);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    c.executions
        .create_execution(goal("4"))
        .await
        .expect("allowed again after the delay");
}

#[tokio::test]
async fn a_daily_quota_counts_streams_once_and_survives_a_restart() {
    let (app, secret) = with_limited_key(None, Some(3)).await;
    let channel = connect(app.addr).await;
    let mut c = client(&app, &channel, Some(&secret));
    let e = c
        .executions
        .create_execution(goal("1"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    // A stream is one request, however many events it carries.
    let mut stream = c
        .executions
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: e.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap();
    c.executions
        .get_execution(pb::GetExecutionRequest { id: e.id.clone() })
        .await
        .unwrap();
    let refused = c
        .executions
        .get_execution(pb::GetExecutionRequest { id: e.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(refused.message(), "daily limit of 3 requests exceeded");
    assert!(retry_delay(&refused) <= Duration::from_secs(86_400));
    drop(stream);

    let app = spawn_in(app.stop().await, |_| {}).await;
    let channel = connect(app.addr).await;
    let mut c = client(&app, &channel, Some(&secret));
    let still = c
        .executions
        .get_execution(pb::GetExecutionRequest { id: e.id })
        .await
        .unwrap_err();
    assert_eq!(
        still.code(),
        Code::ResourceExhausted,
        "the count survived the restart"
    );
}
