//! Streams of a quiet scope while the rest of the log is busy: a stream
//! behind the live buffer reads the log and then follows the feed from
//! the present, not from its scope's last event.

use std::{sync::Arc, time::Duration};

use pb::StateType::*;
use runledger::{App, Config, grpc::pb, keys, store::ReadStats};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{helpers::*, streams::*};

/// Sends one API key with every call.
#[derive(Clone, Debug)]
struct Key(MetadataValue<Ascii>);

impl Interceptor for Key {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Key>;

struct Tenant {
    executions: pb::execution_service_client::ExecutionServiceClient<Svc>,
    events: pb::event_service_client::EventServiceClient<Svc>,
}

impl Tenant {
    fn new(channel: &Channel, secret: &str) -> Self {
        let key = Key(format!("Bearer {secret}").parse().unwrap());
        Tenant {
            executions: pb::execution_service_client::ExecutionServiceClient::with_interceptor(
                channel.clone(),
                key.clone(),
            ),
            events: pb::event_service_client::EventServiceClient::with_interceptor(
                channel.clone(),
                key,
            ),
        }
    }

    async fn create(&self) -> String {
        self.executions
            .clone()
            .create_execution(goal("g"))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap()
            .id
    }

    async fn set(&self, id: &str, t: pb::StateType) {
        self.executions
            .clone()
            .set_execution_state(pb::SetExecutionStateRequest {
                id: id.into(),
                state: state(t),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// A server with a live buffer of 16 events, keys for two tenants, and
/// its log reads counted.
async fn spawn_two_tenants() -> (TestApp, Arc<ReadStats>, Tenant, Tenant) {
    let dir = Storage::fresh().await;
    let mut conn = keys::connect(&dir.url()).await.unwrap();
    let mut secrets = Vec::new();
    for tenant in ["acme", "globex"] {
        let new = keys::NewKey {
            tenant: tenant.into(),
            name: format!("{tenant}-worker"),
            ..Default::default()
        };
        secrets.push(keys::create(&mut conn, new).await.unwrap().1);
    }
    drop(conn);
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.database()).unwrap();
    config.live_buffer = 16;
    let app = App::build(config).await.expect("the app builds");
    let stats = app.read_stats();
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let channel = connect(addr).await;
    let a = Tenant::new(&channel, &secrets[0]);
    let b = Tenant::new(&channel, &secrets[1]);
    let app = TestApp {
        addr,
        executions: ExecutionServiceClient::new(channel.clone()),
        task_runs: TaskRunServiceClient::new(channel.clone()),
        events: EventServiceClient::new(channel),
        shutdown,
        server,
        storage: dir,
    };
    (app, stats, a, b)
}

#[tokio::test]
async fn streams_of_a_quiet_scope_behind_the_live_buffer_wait_instead_of_rereading_the_log() {
    let (app, stats, a, b) = spawn_two_tenants().await;
    let quiet = a.create().await;
    a.set(&quiet, Running).await;
    // The quiet execution's position: the sequence of its snapshot.
    let mut live = a
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: quiet.clone(),
            include_task_runs: true,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let position = take(&mut live, 1, ev_exec).await[0].sequence;
    drop(live);

    // The other tenant writes far more than the live buffer holds.
    for _ in 0..40 {
        let id = b.create().await;
        b.set(&id, Running).await;
        b.set(&id, Completed).await;
    }

    // Both streams resume at the quiet tenant's position, long gone from
    // the live buffer: they read the log once and then wait.
    let before = stats.log_reads();
    let mut tenant = a
        .events
        .clone()
        .subscribe(pb::SubscribeRequest {
            after_sequence: position,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut run = a
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: quiet.clone(),
            include_task_runs: true,
            after_sequence: position,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..5 {
        let id = b.create().await;
        b.set(&id, Running).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_reads = stats.log_reads() - before;
    assert!(
        idle_reads <= 8,
        "{idle_reads} log reads by two streams with nothing to deliver"
    );

    // They still deliver their own next events, and only those.
    a.set(&quiet, Completed).await;
    let got = take(&mut tenant, 1, ev_sub).await.remove(0);
    assert_eq!(
        (exec_state(&got), got.sequence > position),
        (Completed, true)
    );
    let got = take(&mut run, 1, ev_exec).await.remove(0);
    assert_eq!(
        (exec_state(&got), got.sequence > position),
        (Completed, true)
    );
    assert_ends(&mut run).await;
    let reads = stats.log_reads() - before;
    assert!(reads <= 12, "{reads} log reads in all");

    app.stop().await;
}
