//! A per-run stream's sequences only go up, even while the task runs of a
//! long snapshot change as the client reads it.

use std::collections::HashMap;

use runledger::grpc::pb;

use crate::{helpers::*, streams::WAIT};

const RUNS: usize = 150;
/// Large task runs: a page of the snapshot holds only a few, so most pages
/// are read after the changes below.
const INPUT_BYTES: usize = 16 * 1024;

/// Every task run of the execution, as the server has it now.
async fn task_runs_of(app: &TestApp, execution_id: &str) -> HashMap<String, pb::TaskRun> {
    let mut all = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .task_runs
            .clone()
            .list_task_runs(pb::ListTaskRunsRequest {
                page_size: 1000,
                page_token,
                execution_id: execution_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.task_runs.into_iter().map(|t| (t.id.clone(), t)));
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_read_while_its_task_runs_change_keeps_sequences_increasing() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    set_execution_state(&app, &exec.id, pb::StateType::Running).await;
    let input = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            "x".repeat(INPUT_BYTES),
        )),
    };
    let mut created = Vec::new();
    for i in 0..RUNS {
        let t = app
            .task_runs
            .clone()
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: format!("k{i}"),
                input: Some(input.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        created.push(t);
    }

    // The snapshot is read a page at a time as the client takes it: take
    // its first event, and change task runs all over it before the rest.
    let mut stream = app
        .executions
        .clone()
        .stream_execution_status(pb::StreamExecutionStatusRequest {
            id: exec.id.clone(),
            include_task_runs: true,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the snapshot starts")
        .unwrap()
        .expect("an event");
    let mut events = vec![first.event.unwrap()];
    for (i, t) in created.iter().enumerate() {
        if i % 3 == 0 {
            set_task_run_state(&app, &t.id, pb::StateType::Running).await;
        }
        if i % 6 == 0 {
            set_task_run_state(&app, &t.id, pb::StateType::Completed).await;
        }
    }
    for i in 0..5 {
        create_task_run(&app, &exec.id, &format!("late{i}")).await;
    }
    let expected = task_runs_of(&app, &exec.id).await;
    // The execution's end ends the stream.
    set_execution_state(&app, &exec.id, pb::StateType::Completed).await;

    while let Some(m) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream moves on")
        .expect("no error")
    {
        events.push(m.event.unwrap());
    }

    let seqs: Vec<i64> = events.iter().map(event_seq).collect();
    for pair in seqs.windows(2) {
        assert!(
            pair[0] < pair[1],
            "sequences go {} then {}: {seqs:?}",
            pair[0],
            pair[1]
        );
    }
    let mut seen: HashMap<String, pb::TaskRun> = HashMap::new();
    let mut shown = 0;
    for e in events {
        if let Some(pb::status_event::Resource::TaskRun(t)) = e.resource {
            shown += 1;
            seen.insert(t.id.clone(), t);
        }
    }
    assert_eq!(expected.len(), RUNS + 5);
    assert_eq!(seen.len(), RUNS + 5, "every task run");
    // The estimates are worked out when a task run is read.
    let stored = |t: &pb::TaskRun| pb::TaskRun {
        estimated_run_time: None,
        estimated_start_time_delta: None,
        ..t.clone()
    };
    for (id, t) in &seen {
        assert!(
            stored(t) == stored(&expected[id]),
            "task run {id} ({}) is not seen as the server has it",
            t.task_key
        );
    }
    // Each task run once in the snapshot or by its creation, then once
    // per change after the snapshot's start: nothing twice.
    let changes =
        (0..RUNS).filter(|i| i % 3 == 0).count() + (0..RUNS).filter(|i| i % 6 == 0).count();
    assert!(
        shown <= RUNS + 5 + changes,
        "{shown} task run events for {} task runs and {changes} changes",
        RUNS + 5
    );
}
