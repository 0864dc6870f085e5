//! Per-run streams: what belongs to a run's stream, and how it ends when
//! the run is terminal and then deleted.

use pb::StateType::*;
use runledger::grpc::pb;
use tonic::Streaming;

use crate::{helpers::*, streams::*};

async fn stream_task_run(
    app: &TestApp,
    id: &str,
    after: i64,
) -> Streaming<pb::StreamTaskRunStatusResponse> {
    app.task_runs
        .clone()
        .stream_task_run_status(pb::StreamTaskRunStatusRequest {
            id: id.into(),
            after_sequence: after,
        })
        .await
        .expect("the stream opens")
        .into_inner()
}

/// Every event a finite stream delivers until it ends.
async fn all_of<R>(mut s: Streaming<R>, event: fn(R) -> pb::StatusEvent) -> Vec<pb::StatusEvent> {
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("the stream moves on")
        .expect("no error")
    {
        out.push(event(m));
    }
    out
}

fn resource_id(e: &pb::StatusEvent) -> &str {
    match e.resource.as_ref().unwrap() {
        pb::status_event::Resource::Execution(x) => &x.id,
        pb::status_event::Resource::TaskRun(t) => &t.id,
    }
}

fn kinds(events: &[pb::StatusEvent]) -> Vec<pb::EventKind> {
    events.iter().map(event_kind).collect()
}

#[tokio::test]
async fn a_task_run_stream_carries_only_its_own_task_run() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    let other_exec = create_execution(&app).await;
    set_execution_state(&app, &other_exec.id, Running).await;
    let mine = create_task_run(&app, &exec.id, "mine").await;
    let sibling = create_task_run(&app, &exec.id, "sibling").await;
    let stranger = create_task_run(&app, &other_exec.id, "stranger").await;

    // One stream from a snapshot (live), one resumed from the log.
    let mut live = stream_task_run(&app, &mine.id, 0).await;
    let snap = take(&mut live, 1, ev_task).await.remove(0);
    assert_eq!(event_kind(&snap), pb::EventKind::Snapshot);
    let resumed = stream_task_run(&app, &mine.id, snap.sequence - 1).await;

    set_task_run_state(&app, &sibling.id, Running).await;
    set_task_run_state(&app, &stranger.id, Running).await;
    set_task_run_state(&app, &mine.id, Running).await;
    set_task_run_state(&app, &sibling.id, Completed).await;
    set_task_run_state(&app, &stranger.id, Completed).await;
    set_task_run_state(&app, &mine.id, Completed).await;

    let live = all_of(live, ev_task).await;
    let resumed = all_of(resumed, ev_task).await;
    for events in [&live, &resumed[1..]] {
        assert!(
            events.iter().all(|e| resource_id(e) == mine.id),
            "only the stream's task run: {:?}",
            events.iter().map(resource_id).collect::<Vec<_>>()
        );
        assert_eq!(
            events.iter().map(exec_state).collect::<Vec<_>>(),
            [Running, Completed]
        );
    }
    assert_eq!(event_kind(&resumed[0]), pb::EventKind::Created);
}

/// After each event of `full`, a stream resumed there delivers exactly
/// the rest, then ends.
async fn assert_resumes_exactly<R>(
    full: &[pb::StatusEvent],
    open: impl AsyncFn(i64) -> Streaming<R>,
    event: fn(R) -> pb::StatusEvent,
) {
    for (i, cut) in full.iter().enumerate() {
        let rest = all_of(open(cut.sequence).await, event).await;
        assert_eq!(
            seqs(&rest),
            seqs(&full[i + 1..]),
            "resuming after {}",
            cut.sequence
        );
    }
}

#[tokio::test]
async fn an_execution_stream_resumed_before_its_end_ends_with_its_delete() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    let mut live = stream_execution(&app, &exec.id, false, 0).await;
    let created = take(&mut live, 1, ev_exec).await.remove(0).sequence;
    set_execution_state(&app, &exec.id, Running).await;
    let t = create_task_run(&app, &exec.id, "k").await;
    set_task_run_state(&app, &t.id, Running).await;
    set_task_run_state(&app, &t.id, Completed).await;
    set_execution_state(&app, &exec.id, Completed).await;
    // A live stream ends at the terminal event: the delete comes later.
    assert_eq!(
        take(&mut live, 2, ev_exec)
            .await
            .iter()
            .map(exec_state)
            .collect::<Vec<_>>(),
        [Running, Completed]
    );
    assert_ends(&mut live).await;
    app.executions
        .clone()
        .delete_execution(pb::DeleteExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap();

    // Resumed before COMPLETED: COMPLETED, then the delete, then the end.
    let full = all_of(
        stream_execution(&app, &exec.id, true, created).await,
        ev_exec,
    )
    .await;
    use pb::EventKind::*;
    assert_eq!(
        kinds(&full),
        [
            StateChanged,
            Created,
            StateChanged,
            StateChanged,
            StateChanged,
            Deleted
        ]
    );
    assert_eq!(resource_id(&full[5]), exec.id);
    assert_eq!(exec_state(&full[4]), Completed);
    // From any point, exactly the rest: after COMPLETED only the delete,
    // after the delete nothing.
    assert_resumes_exactly(
        &full,
        async |after| stream_execution(&app, &exec.id, true, after).await,
        ev_exec,
    )
    .await;
    let own = all_of(
        stream_execution(&app, &exec.id, false, created).await,
        ev_exec,
    )
    .await;
    assert_eq!(kinds(&own), [StateChanged, StateChanged, Deleted]);

    // A snapshot shows the deleted run as it is now, and the stream ends.
    // Its events come in sequence order: the execution's delete is last.
    let snap = all_of(stream_execution(&app, &exec.id, true, 0).await, ev_exec).await;
    assert_eq!(kinds(&snap), [Snapshot, Snapshot]);
    match snap[1].resource.as_ref().unwrap() {
        pb::status_event::Resource::Execution(x) => {
            assert!(x.deleted_at.is_some());
            assert_eq!(state_of(x), Completed);
        }
        other => panic!("not the execution: {other:?}"),
    }
    assert_eq!(snap[1].sequence, full[5].sequence);
}

#[tokio::test]
async fn a_task_run_stream_resumed_before_its_end_ends_with_its_delete() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    let t = create_task_run(&app, &exec.id, "k").await;
    let mut live = stream_task_run(&app, &t.id, 0).await;
    let created = take(&mut live, 1, ev_task).await.remove(0).sequence;
    set_task_run_state(&app, &t.id, Running).await;
    set_task_run_state(&app, &t.id, Completed).await;
    assert_eq!(take(&mut live, 2, ev_task).await.len(), 2);
    assert_ends(&mut live).await;
    let mut tasks = app.task_runs.clone();
    tasks
        .mark_task_run_stale(pb::MarkTaskRunStaleRequest { id: t.id.clone() })
        .await
        .unwrap();
    tasks
        .delete_task_run(pb::DeleteTaskRunRequest { id: t.id.clone() })
        .await
        .unwrap();

    // Everything up to the delete: the stale mark between is in order.
    let full = all_of(stream_task_run(&app, &t.id, created).await, ev_task).await;
    use pb::EventKind::*;
    assert_eq!(kinds(&full), [StateChanged, StateChanged, Updated, Deleted]);
    assert_resumes_exactly(
        &full,
        async |after| stream_task_run(&app, &t.id, after).await,
        ev_task,
    )
    .await;
    let snap = all_of(stream_task_run(&app, &t.id, 0).await, ev_task).await;
    assert_eq!(kinds(&snap), [Snapshot]);
    assert_eq!(snap[0].sequence, full[3].sequence);
}

#[tokio::test]
async fn a_delete_after_the_run_was_reopened_is_not_the_end_of_its_terminal_stream() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, Running).await;
    set_execution_state(&app, &exec.id, Completed).await;
    // Forced out of COMPLETED, then deleted: the delete is not the last
    // word of the terminal run, so the stream ends at COMPLETED.
    let reopened = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: state(Running),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(reopened.execution.as_ref().unwrap()), Running);
    app.executions
        .clone()
        .delete_execution(pb::DeleteExecutionRequest {
            id: exec.id.clone(),
        })
        .await
        .unwrap();
    let events = all_of(stream_execution(&app, &exec.id, false, 1).await, ev_exec).await;
    assert_eq!(
        events.iter().map(exec_state).collect::<Vec<_>>(),
        [Running, Completed]
    );
}
