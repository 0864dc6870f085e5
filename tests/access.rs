//! Access with API keys as a client meets it: keys work as soon as they are
//! made, malformed credentials are named, daily quotas roll over at UTC
//! midnight, a key's open streams are capped, and the benchmark can
//! measure a server that has keys.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use runledger::{bench::BenchArgs, grpc::limits::Clock, grpc::pb, keys};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::helpers::*;

/// Sends one `authorization` header value with every call.
#[derive(Clone, Debug)]
struct Auth(MetadataValue<Ascii>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Auth>;

async fn executions(
    app: &TestApp,
    authorization: &str,
) -> pb::execution_service_client::ExecutionServiceClient<Svc> {
    pb::execution_service_client::ExecutionServiceClient::with_interceptor(
        connect(app.addr).await,
        Auth(authorization.parse().unwrap()),
    )
}

async fn events(app: &TestApp, secret: &str) -> pb::event_service_client::EventServiceClient<Svc> {
    pb::event_service_client::EventServiceClient::with_interceptor(
        connect(app.addr).await,
        Auth(format!("Bearer {secret}").parse().unwrap()),
    )
}

async fn new_key(storage: &Storage, name: &str, daily_quota: Option<i64>) -> String {
    let mut conn = keys::connect(&storage.url()).await.unwrap();
    let new = keys::NewKey {
        tenant: "acme".into(),
        name: name.into(),
        daily_quota,
        ..Default::default()
    };
    keys::create(&mut conn, new).await.unwrap().1
}

#[tokio::test]
async fn a_key_works_the_moment_it_is_made_and_garbage_is_still_refused() {
    // Open on loopback until the first key, then keyed.
    let app = spawn_app().await;
    let first = new_key(&app.storage, "first", None).await;
    let mut c = executions(&app, &format!("Bearer {first}")).await;
    let e = c
        .create_execution(goal("right away"))
        .await
        .expect("a key made a moment ago is accepted")
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(
        (e.tenant_id.as_str(), e.updated_by.as_str()),
        ("acme", "first")
    );
    // From then on a call without a key is refused.
    let keyless = app.executions.clone().create_execution(goal("g")).await;
    assert_eq!(keyless.unwrap_err().code(), Code::Unauthenticated);

    // Once keys are in force, a new one works at once too.
    let second = new_key(&app.storage, "second", None).await;
    let mut c = executions(&app, &format!("Bearer {second}")).await;
    c.create_execution(goal("right away"))
        .await
        .expect("a second new key is accepted");

    for garbage in [
        "rl_".to_owned() + &"0".repeat(64),
        "rl_nope".to_owned(),
        "x".repeat(4000),
    ] {
        let mut c = executions(&app, &format!("Bearer {garbage}")).await;
        let err = c.create_execution(goal("g")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "unknown or revoked API key");
    }
}

#[tokio::test]
async fn an_authorization_header_without_bearer_says_so() {
    let app = spawn_app().await;
    let secret = new_key(&app.storage, "k", None).await;
    for sent in [secret.clone(), format!("Token {secret}"), "Bearer ".into()] {
        let mut c = executions(&app, &sent).await;
        let err = c.create_execution(goal("g")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{sent}");
        assert_eq!(
            err.message(),
            "the authorization header must be `Bearer <key>`",
            "{sent}"
        );
    }
    let mut c = executions(&app, &format!("bearer {secret}")).await;
    c.create_execution(goal("g"))
        .await
        .expect("bearer in any case");
}

/// A clock the test moves.
fn settable_clock(start: SystemTime) -> (Clock, Arc<Mutex<SystemTime>>) {
    let now = Arc::new(Mutex::new(start));
    let read = Arc::clone(&now);
    (Clock::from_fn(move || *read.lock().unwrap()), now)
}

#[tokio::test]
async fn a_daily_quota_starts_afresh_after_midnight_even_across_a_restart() {
    let dir = Storage::fresh().await;
    let limited = new_key(&dir, "limited", Some(3)).await;
    let other = new_key(&dir, "other", None).await;
    let midnight = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400);
    let (clock, now) = settable_clock(midnight - Duration::from_millis(1500));
    let app = spawn_in(dir, |c| c.clock = clock.clone()).await;

    let mut a = executions(&app, &format!("Bearer {limited}")).await;
    for i in 0..3 {
        a.create_execution(goal(&i.to_string())).await.unwrap();
    }
    let refused = a.create_execution(goal("late")).await.unwrap_err();
    assert_eq!(refused.message(), "daily limit of 3 requests exceeded");
    let retry = {
        use tonic_types::StatusExt;
        refused
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap()
    };
    assert!(
        retry <= Duration::from_millis(1500),
        "until midnight: {retry:?}"
    );

    // Past midnight another key's call moves the server to the new day;
    // the limited key is not used again before the restart.
    *now.lock().unwrap() = midnight + Duration::from_secs(1);
    let mut b = executions(&app, &format!("Bearer {other}")).await;
    b.create_execution(goal("new day")).await.unwrap();
    let app = spawn_in(app.stop().await, |c| c.clock = clock.clone()).await;

    let mut a = executions(&app, &format!("Bearer {limited}")).await;
    for i in 0..3 {
        a.create_execution(goal(&i.to_string()))
            .await
            .expect("a new day's quota, whatever was counted yesterday");
    }
    assert_eq!(
        a.create_execution(goal("4")).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
}

#[tokio::test]
async fn a_key_holds_at_most_its_cap_of_open_streams() {
    let dir = Storage::fresh().await;
    let secret = new_key(&dir, "watcher", None).await;
    let other = new_key(&dir, "other", None).await;
    let app = spawn_in(dir, |c| c.max_streams_per_key = 2).await;
    let mut ev = events(&app, &secret).await;
    let open = |mut ev: pb::event_service_client::EventServiceClient<Svc>| async move {
        ev.subscribe(pb::SubscribeRequest::default())
            .await
            .map(tonic::Response::into_inner)
    };
    let first = open(ev.clone()).await.expect("first stream");
    let _second = open(ev.clone()).await.expect("second stream");
    let refused = open(ev.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("limit of 2 open streams per API key"),
        "{}",
        refused.message()
    );
    // Calls that are not streams still go through, and other keys have
    // their own streams.
    let mut c = executions(&app, &format!("Bearer {secret}")).await;
    c.create_execution(goal("g")).await.unwrap();
    let _elsewhere = open(events(&app, &other).await).await.expect("another key");

    // Closing a stream gives its place back once the server sees it close.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let _third = loop {
        match open(ev.clone()).await {
            Ok(s) => break s,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the closed stream's place was not given back: {e:?}"),
        }
    };
    assert_eq!(
        open(ev.clone()).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    ev.subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
}

#[tokio::test]
async fn the_benchmark_measures_a_server_that_has_keys() {
    let dir = Storage::fresh().await;
    let secret = new_key(&dir, "bench", None).await;
    let app = spawn_in(dir, |_| {}).await;
    let args = |api_key: Option<String>| BenchArgs {
        addr: Some(format!("http://{}", app.addr)),
        api_key,
        database: "sqlite".into(),
        replicas: 1,
        concurrency: vec![1],
        duration: Duration::from_millis(50),
        subscribers: vec![1],
        rounds: 1,
        catch_up: 0,
        delivery_changes: 2,
        delivery_subscribers: 1,
        durability: runledger::store::Durability::Process,
        json: true,
    };
    let without = runledger::bench::run(args(None)).await.unwrap_err();
    assert!(
        without.to_string().contains("API key"),
        "refused without a key: {without}"
    );
    runledger::bench::run(args(Some(secret)))
        .await
        .expect("every call and stream carries the key");
}
