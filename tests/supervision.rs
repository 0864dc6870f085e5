//! Health follows reality: NOT_SERVING once shutdown begins or the writer
//! is gone; a defect in one write fails that write only.

use std::time::Duration;

use runledger::{StartError, store::Store};
use tonic::Streaming;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

use crate::helpers::*;

async fn watch_health(app: &TestApp) -> Streaming<HealthCheckResponse> {
    let mut watch = HealthClient::new(connect(app.addr).await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    watch
}

async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let answer = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("health changes within 10 s")
        .expect("the watch goes on")
        .expect("a status");
    ServingStatus::try_from(answer.status).unwrap()
}

/// A server on a fresh database, with a handle on its store.
async fn spawn_with_store() -> (TestApp, Store) {
    spawn_app_hooked(|app| app.store().clone()).await
}

#[tokio::test]
async fn health_turns_not_serving_as_soon_as_shutdown_begins() {
    let app = spawn_app().await;
    let mut watch = watch_health(&app).await;
    app.shutdown.cancel();
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    drop(watch);
    app.stop().await;
}

#[tokio::test]
async fn a_panicking_write_fails_alone_rolls_back_and_the_writer_carries_on() {
    let (app, store) = spawn_with_store().await;

    // Ordinary writes around the failing one, some likely in its batch.
    let creates = (0..20).map(|i| {
        let mut execs = app.executions.clone();
        async move { execs.create_execution(goal(&format!("g{i}"))).await }
    });
    let (created, failed) = tokio::join!(
        futures::future::join_all(creates),
        store.write_then_panic("probe".into(), 7),
    );
    for c in created {
        c.expect("writes beside the failing one succeed");
    }
    match failed {
        Err(runledger::Error::Internal(_)) => {}
        other => panic!("expected an internal error, got {other:?}"),
    }
    // What it wrote before panicking was rolled back.
    assert!(!store.key_usage(7).await.unwrap().contains_key("probe"));

    // Later writes go through, and the service says it serves.
    create_execution(&app).await;
    let mut health = HealthClient::new(connect(app.addr).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    drop(store);
    app.stop().await;
}

#[tokio::test]
async fn a_writer_that_dies_turns_health_not_serving_and_ends_the_server_with_an_error() {
    let (app, store) = spawn_with_store().await;
    let mut watch = watch_health(&app).await;
    store.crash_writer().await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    drop(watch);
    let err = app
        .executions
        .clone()
        .create_execution(goal("after"))
        .await
        .expect_err("no write can be made");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    drop(store);
    let ended = tokio::time::timeout(Duration::from_secs(10), app.server)
        .await
        .expect("the server stops within 10 s")
        .expect("the server task ends");
    assert!(
        matches!(ended, Err(StartError::WriterStopped(_))),
        "{ended:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_the_writer_while_a_store_handle_is_still_held() {
    let (app, store) = spawn_with_store().await;
    create_execution(&app).await;
    // The store stays held, as by a call whose client went quiet.
    app.stop().await;
    match store
        .record_key_usage(vec![("t".into(), "k".into(), 1, 1)])
        .await
    {
        Err(runledger::Error::Unavailable) => {}
        other => panic!("expected UNAVAILABLE after shutdown, got {other:?}"),
    }
    assert!(store.head("t").await.is_err(), "the read pool is closed");
}
