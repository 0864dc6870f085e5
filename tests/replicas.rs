//! Three servers (replicas) on one PostgreSQL database, each a process of
//! the real binary: writers spread across them and a subscriber on each.
//! Every subscriber sees the tenant's log as 1..N, the same on every
//! replica, with every acknowledged write in it; dropping every database
//! connection, or killing a replica, mid-load loses nothing acknowledged
//! and duplicates nothing; the same idempotency key sent to every replica
//! at once acts once.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use runledger::grpc::pb::{
    self, StateType::*, event_service_client::EventServiceClient,
    execution_service_client::ExecutionServiceClient,
    task_run_service_client::TaskRunServiceClient,
};
use tonic::transport::Channel;

use crate::{
    helpers::{Process, connect, goal, state},
    postgres::TestDatabase,
};

/// What a subscriber saw: each event's sequence, run id and kind.
type Seen = Arc<Mutex<Vec<(i64, String, i32)>>>;

fn run_id(e: &pb::StatusEvent) -> String {
    match &e.resource {
        Some(pb::status_event::Resource::Execution(x)) => x.id.clone(),
        Some(pb::status_event::Resource::TaskRun(t)) => t.id.clone(),
        None => String::new(),
    }
}

/// Follows the tenant's log live on `channel`, recording what it sees.
async fn follow(channel: Channel) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let mut events = EventServiceClient::new(channel);
    let mut stream = events
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            ..Default::default()
        })
        .await
        .expect("subscribes")
        .into_inner();
    let out = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let e = m.event.expect("an event");
            out.lock().unwrap().push((e.sequence, run_id(&e), e.kind));
        }
    });
    (seen, task)
}

/// Waits until every one of `seen` holds an event of run `id`.
async fn wait_for(seen: &[&Seen], id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if seen
            .iter()
            .all(|s| s.lock().unwrap().iter().any(|(_, r, _)| r == id))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a subscriber never saw {id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drops every connection any server holds to the database.
async fn drop_connections(db: &TestDatabase) {
    let mut conn = db.connect().await;
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db.name())
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(!dropped.is_empty(), "the servers held connections");
}

/// Creates executions and moves each to RUNNING through `channel`; returns
/// what was acknowledged: (execution id, acknowledged events of it).
async fn write(channel: Channel, writer: usize, n: usize) -> Vec<(String, usize)> {
    let mut execs = ExecutionServiceClient::new(channel);
    let mut acked = Vec::new();
    for i in 0..n {
        let mut request = goal(&format!("w{writer}-{i}"));
        request.request_id = format!("w{writer}-{i}");
        let Ok(created) = execs.create_execution(request).await else {
            continue;
        };
        let e = created.into_inner().execution.unwrap();
        let moved = execs
            .set_execution_state(pb::SetExecutionStateRequest {
                id: e.id.clone(),
                state: state(Running),
                ..Default::default()
            })
            .await
            .is_ok_and(|r| r.into_inner().status == pb::SetStateStatus::Accept as i32);
        acked.push((e.id, if moved { 2 } else { 1 }));
    }
    acked
}

/// The log `seen` must be: 1..N in order, no duplicate.
fn assert_dense(name: &str, seen: &[(i64, String, i32)]) {
    for (i, (seq, _, _)) in seen.iter().enumerate() {
        assert_eq!(
            *seq,
            i as i64 + 1,
            "{name}: the log has a gap or a duplicate"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_dense_log_through_dropped_connections_and_a_kill() {
    let db = TestDatabase::create().await;
    let url = db.url().to_owned();
    let mut replicas: Vec<Process> = (0..3).map(|_| Process::start(Path::new(&url))).collect();
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(connect(r.addr).await);
    }
    let mut seen = Vec::new();
    for c in &channels {
        seen.push(follow(c.clone()).await);
    }

    // Writers spread over the replicas; mid-load every database
    // connection drops, then replica 2 is killed.
    let writers: Vec<_> = (0..9)
        .map(|w| tokio::spawn(write(channels[w % 3].clone(), w, 40)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop_connections(&db).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas.pop().unwrap().kill();
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    // The survivors keep serving, reads and writes.
    let mut execs = ExecutionServiceClient::new(channels[0].clone());
    let marker = execs
        .create_execution(goal("marker"))
        .await
        .expect("a survivor takes writes")
        .into_inner()
        .execution
        .unwrap();
    let survivors = [&seen[0].0, &seen[1].0];
    wait_for(&survivors, &marker.id).await;

    let a = seen[0].0.lock().unwrap().clone();
    let b = seen[1].0.lock().unwrap().clone();
    assert_dense("replica 0", &a);
    assert_eq!(a, b, "the survivors saw different logs");
    // What the killed replica's subscriber saw is a prefix of the same log.
    let c = seen[2].0.lock().unwrap().clone();
    assert_eq!(c[..], a[..c.len()], "replica 2 saw another log");
    // Every acknowledged write is in the log.
    for (id, events) in &acked {
        let n = a.iter().filter(|(_, r, _)| r == id).count();
        assert!(n >= *events, "{id}: {events} acknowledged, {n} in the log");
    }
    assert!(
        acked.len() > 100,
        "most writes went through: {} of 360",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_sent_to_every_replica_at_once_acts_once() {
    let db = TestDatabase::create().await;
    let url = db.url().to_owned();
    let replicas: Vec<Process> = (0..3).map(|_| Process::start(Path::new(&url))).collect();
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(connect(r.addr).await);
    }

    // request_id: one execution, whichever replica each call reaches.
    let mut request = goal("once");
    request.request_id = "same-everywhere".into();
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let mut execs = ExecutionServiceClient::new(channels[i % 3].clone());
            let request = request.clone();
            tokio::spawn(async move { execs.create_execution(request).await.unwrap().into_inner() })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for c in calls {
        let answer = c.await.unwrap();
        created += usize::from(answer.created);
        ids.insert(answer.execution.unwrap().id);
    }
    assert_eq!((ids.len(), created), (1, 1));
    let execution_id = ids.into_iter().next().unwrap();
    let mut execs = ExecutionServiceClient::new(channels[0].clone());
    execs
        .set_execution_state(pb::SetExecutionStateRequest {
            id: execution_id.clone(),
            state: state(Running),
            ..Default::default()
        })
        .await
        .unwrap();

    // Task-run key: one task run.
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let mut runs = TaskRunServiceClient::new(channels[i % 3].clone());
            let execution_id = execution_id.clone();
            tokio::spawn(async move {
                runs.create_task_run(pb::CreateTaskRunRequest {
                    execution_id,
                    task_key: "k".into(),
                    dynamic_key: "0".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for c in calls {
        ids.insert(c.await.unwrap().task_run.unwrap().id);
    }
    assert_eq!(ids.len(), 1);
    let task_run_id = ids.into_iter().next().unwrap();

    // transition_id: one transition, every caller gets its result.
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let mut runs = TaskRunServiceClient::new(channels[i % 3].clone());
            let id = task_run_id.clone();
            tokio::spawn(async move {
                let mut s = state(Running).unwrap();
                s.details = Some(pb::StateDetails {
                    transition_id: "t-1".into(),
                    ..Default::default()
                });
                runs.set_task_run_state(pb::SetTaskRunStateRequest {
                    id,
                    state: Some(s),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            })
        })
        .collect();
    let mut states = HashSet::new();
    for c in calls {
        let answer = c.await.unwrap();
        assert_eq!(answer.status, pb::SetStateStatus::Accept as i32);
        states.insert(answer.state.unwrap().id);
    }
    assert_eq!(states.len(), 1, "one transition");
    let history = TaskRunServiceClient::new(channels[1].clone())
        .list_states(pb::ListStatesRequest {
            task_run_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history
            .states
            .iter()
            .filter(|s| s.r#type == Running as i32)
            .count(),
        1
    );
}

/// Sends `n` ListExecutions calls with `secret`, spread over `channels`, all
/// at once; how many were served and how many refused as exhausted.
async fn burst(channels: &[Channel], secret: &str, n: usize) -> (usize, usize) {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut execs = ExecutionServiceClient::new(channels[i % channels.len()].clone());
            let mut request = tonic::Request::new(pb::ListExecutionsRequest::default());
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {secret}").parse().unwrap());
            tokio::spawn(async move { execs.list_executions(request).await })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => served += 1,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => refused += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    (served, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_quota_and_rate_hold_for_all_replicas_together() {
    let db = TestDatabase::create().await;
    let mut conn = runledger::keys::connect(db.url())
        .await
        .expect("keys connect");
    let key = |name: &str, rate: Option<f64>, daily_quota: Option<i64>| runledger::keys::NewKey {
        tenant: "acme".into(),
        name: name.into(),
        rate,
        daily_quota,
    };
    let quota = runledger::keys::create(&mut conn, key("quota", None, Some(20)))
        .await
        .unwrap()
        .1;
    let rate = runledger::keys::create(&mut conn, key("rate", Some(3.0), None))
        .await
        .unwrap()
        .1;
    let url = db.url().to_owned();
    let replicas: Vec<Process> = (0..3).map(|_| Process::start(Path::new(&url))).collect();
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(connect(r.addr).await);
    }

    // 20 a day: 45 calls over three servers at once get 20 answers, not 45
    // (three servers each counting 20 alone would serve all of them).
    assert_eq!(burst(&channels, &quota, 45).await, (20, 25));
    // And the day's quota stays spent on every server.
    assert_eq!(burst(&channels, &quota, 3).await, (0, 3));

    // 3 a second, as many at once: a burst of 30 gets about 3, not 9.
    let (served, refused) = burst(&channels, &rate, 30).await;
    assert!(
        (3..=4).contains(&served),
        "{served} served, {refused} refused"
    );
}
