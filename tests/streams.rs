//! The stream guarantees: snapshot then live, exact resume, order without
//! gaps or duplicates, slow subscribers, restarts, retention, shutdown.

use std::time::Duration;

use pb::StateType::*;
use runledger::grpc::pb;
use tonic::{Code, Streaming};

use crate::helpers::*;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// The next `n` events of a stream.
pub(crate) async fn take<R>(
    s: &mut Streaming<R>,
    n: usize,
    event: fn(R) -> pb::StatusEvent,
) -> Vec<pb::StatusEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let msg = tokio::time::timeout(WAIT, s.message())
            .await
            .expect("an event within the wait")
            .expect("no error")
            .expect("the stream is still open");
        out.push(event(msg));
    }
    out
}

pub(crate) fn ev_exec(r: pb::StreamExecutionStatusResponse) -> pb::StatusEvent {
    r.event.unwrap()
}
pub(crate) fn ev_task(r: pb::StreamTaskRunStatusResponse) -> pb::StatusEvent {
    r.event.unwrap()
}
pub(crate) fn ev_sub(r: pb::SubscribeResponse) -> pb::StatusEvent {
    r.event.unwrap()
}

/// Asserts the stream ends cleanly (OK) next.
pub(crate) async fn assert_ends<R>(s: &mut Streaming<R>) {
    let next = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("the stream ends");
    assert!(matches!(next, Ok(None)), "expected the end of the stream");
}

pub(crate) async fn stream_execution(
    app: &TestApp,
    id: &str,
    include_task_runs: bool,
    after: i64,
) -> Streaming<pb::StreamExecutionStatusResponse> {
    app.executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: id.into(),
            include_task_runs,
            after_sequence: after,
        })
        .await
        .expect("the stream opens")
        .into_inner()
}

pub(crate) async fn subscribe(
    app: &TestApp,
    req: pb::SubscribeRequest,
) -> Streaming<pb::SubscribeResponse> {
    app.events
        .clone()
        .subscribe(req)
        .await
        .expect("subscribed")
        .into_inner()
}

pub(crate) fn exec_state(e: &pb::StatusEvent) -> pb::StateType {
    match e.resource.as_ref().unwrap() {
        pb::status_event::Resource::Execution(x) => state_of(x),
        pb::status_event::Resource::TaskRun(t) => {
            pb::StateType::try_from(t.state.as_ref().unwrap().r#type).unwrap()
        }
    }
}

pub(crate) fn seqs(events: &[pb::StatusEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

#[tokio::test]
async fn a_stream_starts_with_a_snapshot_then_follows_live_and_ends_at_terminal() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let mut s = stream_execution(&app, &exec.id, false, 0).await;

    let snap = take(&mut s, 1, ev_exec).await.remove(0);
    assert_eq!(event_kind(&snap), pb::EventKind::Snapshot);
    assert_eq!(exec_state(&snap), Pending);
    assert!(
        snap.sequence > 0,
        "the snapshot carries the run's latest sequence"
    );

    set_execution_state(&app, &exec.id, Running).await;
    set_execution_state(&app, &exec.id, Completed).await;
    let live = take(&mut s, 2, ev_exec).await;
    assert_eq!(
        live.iter().map(exec_state).collect::<Vec<_>>(),
        [Running, Completed]
    );
    assert!(
        live.iter()
            .all(|e| event_kind(e) == pb::EventKind::StateChanged)
    );
    assert_eq!(
        pb::StateType::try_from(live[1].previous_state_type).unwrap(),
        Running
    );
    assert!(snap.sequence < live[0].sequence && live[0].sequence < live[1].sequence);
    assert_ends(&mut s).await;

    // A terminal run's stream gives its snapshot and ends.
    let mut s = stream_execution(&app, &exec.id, false, 0).await;
    assert_eq!(exec_state(&take(&mut s, 1, ev_exec).await[0]), Completed);
    assert_ends(&mut s).await;
}

#[tokio::test]
async fn an_execution_stream_can_include_its_task_runs() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let first = create_task_run(&app, &exec.id, "extract").await;
    let mut s = stream_execution(&app, &exec.id, true, 0).await;
    let snap = take(&mut s, 2, ev_exec).await;
    assert!(
        snap.iter()
            .all(|e| event_kind(e) == pb::EventKind::Snapshot)
    );
    assert!(
        matches!(&snap[1].resource, Some(pb::status_event::Resource::TaskRun(t)) if t.id == first.id)
    );

    set_execution_state(&app, &exec.id, Running).await;
    let second = create_task_run(&app, &exec.id, "load").await;
    set_task_run_state(&app, &second.id, Running).await;
    set_execution_state(&app, &exec.id, Completed).await;
    let live = take(&mut s, 4, ev_exec).await;
    let kinds: Vec<_> = live.iter().map(event_kind).collect();
    assert_eq!(
        kinds,
        [
            pb::EventKind::StateChanged,
            pb::EventKind::Created,
            pb::EventKind::StateChanged,
            pb::EventKind::StateChanged
        ]
    );
    assert!(
        matches!(&live[2].resource, Some(pb::status_event::Resource::TaskRun(t)) if t.id == second.id)
    );
    assert_ends(&mut s).await;

    // Without include_task_runs the same history has only the execution.
    let mut s = stream_execution(&app, &exec.id, false, 1).await;
    let only = take(&mut s, 2, ev_exec).await;
    assert_eq!(
        only.iter().map(exec_state).collect::<Vec<_>>(),
        [Running, Completed]
    );
    assert_ends(&mut s).await;
}

/// Writes a mixed history into one execution and returns its id.
async fn mixed_history(app: &TestApp) -> String {
    let exec = create_execution(app).await;
    set_execution_state(app, &exec.id, Running).await;
    for i in 0..10 {
        let t = create_task_run(app, &exec.id, &format!("step-{}", i % 3)).await;
        set_task_run_state(app, &t.id, Running).await;
        set_task_run_state(app, &t.id, Completed).await;
    }
    set_execution_state(app, &exec.id, Completed).await;
    exec.id
}

/// Every sequence a finite stream delivers until it ends.
pub(crate) async fn drain(mut s: Streaming<pb::StreamExecutionStatusResponse>) -> Vec<i64> {
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, s.message())
        .await
        .unwrap()
        .unwrap()
    {
        out.push(m.event.unwrap().sequence);
    }
    out
}

#[tokio::test]
async fn resuming_after_any_sequence_yields_exactly_the_rest() {
    let app = spawn_app().await;
    let id = mixed_history(&app).await;
    // The snapshot: one event per run, each with its latest sequence, in
    // sequence order; the execution's completion is the latest.
    let snapshot = drain(stream_execution(&app, &id, true, 0).await).await;
    assert_eq!(snapshot.len(), 11);
    assert!(snapshot.windows(2).all(|w| w[0] < w[1]), "{snapshot:?}");

    // The log after the execution's CREATED event (the first, in a fresh
    // database): RUNNING, 10 task runs of 3 events, COMPLETED.
    let all = drain(stream_execution(&app, &id, true, 1).await).await;
    assert_eq!(all.len(), 32);
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "in order without duplicates"
    );
    assert_eq!(
        *all.last().unwrap(),
        snapshot[10],
        "the last event is the execution's latest"
    );

    for cut in [0, 1, 7, 15, 30] {
        let rest = drain(stream_execution(&app, &id, true, all[cut]).await).await;
        assert_eq!(rest, all[cut + 1..], "resuming after {}", all[cut]);
    }
    // After the terminal event there is nothing more: the stream ends.
    assert!(
        drain(stream_execution(&app, &id, true, all[31]).await)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn twenty_subscribers_receive_identical_sequences() {
    let app = spawn_app().await;
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(
            subscribe(
                &app,
                pb::SubscribeRequest {
                    include_task_runs: true,
                    ..Default::default()
                },
            )
            .await,
        );
    }
    let writer = {
        let app_exec = app.executions.clone();
        let app_task = app.task_runs.clone();
        tokio::spawn(async move {
            let mut execs = app_exec.clone();
            let mut tasks = app_task.clone();
            for i in 0..50 {
                let e = execs
                    .create_execution(goal(&format!("g{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .execution
                    .unwrap();
                tasks
                    .create_task_run(pb::CreateTaskRunRequest {
                        execution_id: e.id.clone(),
                        task_key: "k".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
    };
    let mut results = Vec::new();
    for mut s in subs {
        results.push(tokio::spawn(async move {
            seqs(&take(&mut s, 100, ev_sub).await)
        }));
    }
    writer.await.unwrap();
    let first = results.remove(0).await.unwrap();
    assert!(
        first.windows(2).all(|w| w[1] == w[0] + 1),
        "no gaps: every event of the tenant"
    );
    for r in results {
        assert_eq!(r.await.unwrap(), first);
    }
}

#[tokio::test]
async fn a_slow_subscriber_gets_all_of_ten_thousand_events_in_order() {
    // A small live buffer, so that falling behind it is certain.
    let app = spawn_app_with(|c| c.live_buffer = 64).await;
    let mut slow = subscribe(&app, pb::SubscribeRequest::default()).await;
    const N: usize = 10_000;
    // 16 concurrent writers: fast enough to overrun the live buffer.
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut execs = app.executions.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..N / 16 {
                execs
                    .create_execution(goal(&format!("w{w}-{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    // Read a little, then stop reading until every write is acknowledged:
    // far more than the live buffer and the connection's windows hold.
    let mut got = seqs(&take(&mut slow, 10, ev_sub).await);
    for w in writers {
        w.await.unwrap();
    }
    got.extend(seqs(&take(&mut slow, N - 10, ev_sub).await));
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "every event, in order, once"
    );
    assert_eq!(got.len(), N);
}

#[tokio::test]
async fn a_killed_server_restarts_and_streams_resume_without_gap_or_duplicate() {
    let storage = Storage::fresh().await;
    let db = storage.database();
    let first = Process::start(&db);
    let channel = connect(first.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());
    let mut events = EventServiceClient::new(channel);
    let mut sub = events
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    for i in 0..30 {
        let e = execs
            .create_execution(goal(&format!("before {i}")))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap();
        ids.push(e.id);
    }
    let before = seqs(&take(&mut sub, 30, ev_sub).await);
    first.kill();

    let second = Process::start(&db);
    let channel = connect(second.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());
    let mut events = EventServiceClient::new(channel);
    // Everything acknowledged before the kill is there.
    for id in &ids {
        execs
            .get_execution(pb::GetExecutionRequest { id: id.clone() })
            .await
            .expect("survived the kill");
    }
    let resume_after = before[9];
    let mut resumed = events
        .subscribe(pb::SubscribeRequest {
            after_sequence: resume_after,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        execs
            .create_execution(goal(&format!("after {i}")))
            .await
            .unwrap();
    }
    let got = seqs(&take(&mut resumed, 25, ev_sub).await);
    assert_eq!(got[..20], before[10..], "the rest of the old log");
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "new sequences continue without reuse: {got:?}"
    );
    second.kill();
}

#[tokio::test]
async fn a_cursor_past_retention_is_out_of_range_and_names_the_oldest_sequence() {
    let app = spawn_app_with(|c| {
        c.event_retention = Duration::ZERO;
        c.prune_interval = Duration::from_millis(20);
    })
    .await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    // Wait for the pruner to pass the first events.
    let status = tokio::time::timeout(WAIT, async {
        loop {
            let r = app
                .events
                .clone()
                .subscribe(pb::SubscribeRequest {
                    after_sequence: 1,
                    ..Default::default()
                })
                .await;
            match r {
                Err(s) => return s,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("retention removes old events");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("oldest sequence still held is 3"),
        "{}",
        status.message()
    );

    // A per-run stream from the snapshot still works: current state needs no log.
    let mut s = stream_execution(&app, &exec.id, false, 0).await;
    assert_eq!(exec_state(&take(&mut s, 1, ev_exec).await[0]), Running);
}

#[tokio::test]
async fn a_cursor_beyond_the_log_head_is_out_of_range_and_names_the_head() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let run = create_task_run(&app, &exec.id, "job").await;
    // The log's head: the sequence of the execution's latest event.
    let mut s = stream_execution(&app, &exec.id, true, 0).await;
    let head = take(&mut s, 2, ev_exec)
        .await
        .iter()
        .map(|e| e.sequence)
        .max()
        .unwrap();
    drop(s);

    let beyond = head + 1000;
    let refused = [
        app.events
            .clone()
            .subscribe(pb::SubscribeRequest {
                after_sequence: beyond,
                ..Default::default()
            })
            .await
            .map(drop),
        app.executions
            .clone()
            .stream_execution_status(pb::StreamExecutionStatusRequest {
                id: exec.id.clone(),
                include_task_runs: true,
                after_sequence: beyond,
            })
            .await
            .map(drop),
        app.task_runs
            .clone()
            .stream_task_run_status(pb::StreamTaskRunStatusRequest {
                id: run.id.clone(),
                after_sequence: beyond,
            })
            .await
            .map(drop),
    ];
    for r in refused {
        let status = r.expect_err("a cursor beyond the head is refused");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("latest sequence {head}")),
            "{}",
            status.message()
        );
    }

    // At the head itself the stream opens and delivers what comes next.
    let mut s = subscribe(
        &app,
        pb::SubscribeRequest {
            after_sequence: head,
            ..Default::default()
        },
    )
    .await;
    set_execution_state(&app, &exec.id, Running).await;
    let next = take(&mut s, 1, ev_sub).await.remove(0);
    assert_eq!((next.sequence, exec_state(&next)), (head + 1, Running));
}

#[tokio::test]
async fn subscribe_filters_by_task_kind_state_and_metadata() {
    let app = spawn_app().await;
    let mut by_task = subscribe(
        &app,
        pb::SubscribeRequest {
            task_ids: vec!["invoice".into()],
            include_task_runs: true,
            ..Default::default()
        },
    )
    .await;
    let mut by_kind = subscribe(
        &app,
        pb::SubscribeRequest {
            kinds: vec![pb::EventKind::StateChanged as i32],
            ..Default::default()
        },
    )
    .await;
    let mut by_state = subscribe(
        &app,
        pb::SubscribeRequest {
            state_types: vec![Completed as i32],
            ..Default::default()
        },
    )
    .await;
    let mut by_meta = subscribe(
        &app,
        pb::SubscribeRequest {
            metadata: [("team".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        },
    )
    .await;

    let mut execs = app.executions.clone();
    let invoice = execs
        .create_execution(pb::CreateExecutionRequest {
            task_id: "invoice".into(),
            metadata: [("team".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let other = execs
        .create_execution(pb::CreateExecutionRequest {
            task_id: "other".into(),
            metadata: [("team".to_owned(), "b".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let t = create_task_run(&app, &invoice.id, "parse").await;
    set_execution_state(&app, &other.id, Running).await;
    set_execution_state(&app, &other.id, Completed).await;
    set_execution_state(&app, &invoice.id, Running).await;

    let ids = |events: &[pb::StatusEvent]| -> Vec<String> {
        events
            .iter()
            .map(|e| match e.resource.as_ref().unwrap() {
                pb::status_event::Resource::Execution(x) => x.id.clone(),
                pb::status_event::Resource::TaskRun(t) => t.id.clone(),
            })
            .collect()
    };
    // invoice created, its task run created, invoice RUNNING.
    assert_eq!(
        ids(&take(&mut by_task, 3, ev_sub).await),
        [invoice.id.clone(), t.id.clone(), invoice.id.clone()]
    );
    // other RUNNING, other COMPLETED, invoice RUNNING: no CREATED.
    assert_eq!(
        ids(&take(&mut by_kind, 3, ev_sub).await),
        [other.id.clone(), other.id.clone(), invoice.id.clone()]
    );
    assert_eq!(
        ids(&take(&mut by_state, 1, ev_sub).await),
        std::slice::from_ref(&other.id)
    );
    // Executions with team=a only; task runs are excluded by default.
    assert_eq!(
        ids(&take(&mut by_meta, 2, ev_sub).await),
        [invoice.id.clone(), invoice.id.clone()]
    );
}

#[tokio::test]
async fn a_task_run_stream_ends_when_the_task_run_is_terminal() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    let t = create_task_run(&app, &exec.id, "k").await;
    let mut s = app
        .task_runs
        .clone()
        .stream_task_run_status(pb::StreamTaskRunStatusRequest {
            id: t.id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        event_kind(&take(&mut s, 1, ev_task).await[0]),
        pb::EventKind::Snapshot
    );
    set_task_run_state(&app, &t.id, Running).await;
    set_task_run_state(&app, &t.id, Failed).await;
    let live = take(&mut s, 2, ev_task).await;
    assert_eq!(
        live.iter().map(exec_state).collect::<Vec<_>>(),
        [Running, Failed]
    );
    assert_ends(&mut s).await;
    // An unknown task run is not found.
    let unknown = app
        .task_runs
        .clone()
        .stream_task_run_status(pb::StreamTaskRunStatusRequest {
            id: uuid::Uuid::now_v7().to_string(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_exits_promptly() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = stream_execution(&app, &exec.id, true, 0).await;
        take(&mut s, 1, ev_exec).await;
        streams.push(s);
    }
    let mut sub = subscribe(&app, pb::SubscribeRequest::default()).await;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(app.stop());
    for mut s in streams {
        let end = tokio::time::timeout(WAIT, s.message()).await.unwrap();
        assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    }
    let end = tokio::time::timeout(WAIT, sub.message()).await.unwrap();
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_ends_streams_and_the_process_exits_zero() {
    let storage = Storage::fresh().await;
    let server = Process::start(storage.database());
    let channel = connect(server.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());
    let exec = execs
        .create_execution(goal("long"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let mut stream = execs
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    take(&mut stream, 1, ev_exec).await;
    let mut sub = EventServiceClient::new(channel)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    for end in [
        stream.message().await.map(drop),
        sub.message().await.map(drop),
    ] {
        assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    }
}
