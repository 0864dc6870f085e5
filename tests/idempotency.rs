//! Idempotent creates under load: replays of request_ids and task-run keys
//! mixed into busy batches resolve to the stored run, and the batch they
//! share still commits as one transaction.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use runledger::grpc::pb;
use tokio::sync::Barrier;
use tonic::Code;

use crate::helpers::*;

fn create(goal: &str, request_id: &str) -> pb::CreateExecutionRequest {
    pb::CreateExecutionRequest {
        goal: goal.into(),
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// What one concurrent call was and what it got back.
#[derive(Debug)]
enum Call {
    Seeded { request_id: String },
    Fresh { request_id: String },
    Mismatch { request_id: String },
    Plain,
    TaskKey { key: String },
}

#[derive(Debug)]
enum Answer {
    Execution(pb::Execution, bool),
    TaskRun(pb::TaskRun, bool),
    Refused(tonic::Status),
}

#[tokio::test]
async fn replays_in_busy_batches_resolve_to_the_stored_run_without_retrying_the_batch() {
    let (app, stats) = spawn_app_hooked(|app| app.writer_stats()).await;

    // Stored before the burst: executions by request_id and task runs by key.
    let mut seeded = HashMap::new();
    for i in 0..40 {
        let rid = format!("seed-{i}");
        let r = app
            .executions
            .clone()
            .create_execution(create("seeded", &rid))
            .await
            .unwrap()
            .into_inner();
        assert!(r.created);
        seeded.insert(rid, r.execution.unwrap().id);
    }
    let parent = create_execution(&app).await;
    let mut keyed = HashMap::new();
    for i in 0..20 {
        let key = format!("k-{i}");
        let t = app
            .task_runs
            .clone()
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: parent.id.clone(),
                task_key: "step".into(),
                dynamic_key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(t.created);
        keyed.insert(key, t.task_run.unwrap().id);
    }
    let retried_before = stats.batches_retried();
    let commits_before = stats.commits();

    // The burst: every kind of create at once, so that replays share
    // batches with new runs.
    let mut calls = Vec::new();
    for _ in 0..3 {
        for i in 0..40 {
            calls.push(Call::Seeded {
                request_id: format!("seed-{i}"),
            });
        }
        // Each fresh request_id is sent once per round.
        for j in 0..60 {
            calls.push(Call::Fresh {
                request_id: format!("fresh-{j}"),
            });
        }
        for i in 0..5 {
            calls.push(Call::Mismatch {
                request_id: format!("seed-{i}"),
            });
        }
        for _ in 0..40 {
            calls.push(Call::Plain);
        }
        for i in 0..20 {
            calls.push(Call::TaskKey {
                key: format!("k-{i}"),
            });
        }
    }
    let total = calls.len();
    let start = Arc::new(Barrier::new(total));
    let mut handles = Vec::new();
    for call in calls {
        let (mut e, mut t, start) = (
            app.executions.clone(),
            app.task_runs.clone(),
            Arc::clone(&start),
        );
        let parent = parent.id.clone();
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let answer = match &call {
                Call::Seeded { request_id } => {
                    e.create_execution(create("seeded", request_id)).await
                }
                Call::Fresh { request_id } => e.create_execution(create("fresh", request_id)).await,
                Call::Mismatch { request_id } => {
                    e.create_execution(create("something else", request_id))
                        .await
                }
                Call::Plain => e.create_execution(goal("plain")).await,
                Call::TaskKey { key } => {
                    let r = t
                        .create_task_run(pb::CreateTaskRunRequest {
                            execution_id: parent,
                            task_key: "step".into(),
                            dynamic_key: key.clone(),
                            ..Default::default()
                        })
                        .await;
                    return (
                        call,
                        match r {
                            Ok(r) => {
                                let r = r.into_inner();
                                Answer::TaskRun(r.task_run.unwrap(), r.created)
                            }
                            Err(s) => Answer::Refused(s),
                        },
                    );
                }
            };
            let answer = match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    Answer::Execution(r.execution.unwrap(), r.created)
                }
                Err(s) => Answer::Refused(s),
            };
            (call, answer)
        }));
    }

    let mut fresh: HashMap<String, (HashSet<String>, usize)> = HashMap::new();
    for h in handles {
        match h.await.unwrap() {
            (Call::Seeded { request_id }, Answer::Execution(e, created)) => {
                assert!(!created, "a replay of {request_id} created a run");
                assert_eq!(e.id, seeded[&request_id], "{request_id}");
            }
            (Call::Fresh { request_id }, Answer::Execution(e, created)) => {
                let entry = fresh.entry(request_id).or_default();
                entry.0.insert(e.id);
                entry.1 += usize::from(created);
            }
            (Call::Mismatch { request_id }, Answer::Refused(s)) => {
                assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
                assert!(s.message().contains(&seeded[&request_id]), "{s:?}");
            }
            (Call::Plain, Answer::Execution(_, created)) => assert!(created),
            (Call::TaskKey { key }, Answer::TaskRun(t, created)) => {
                assert!(!created, "a replay of task key {key} created a run");
                assert_eq!(t.id, keyed[&key], "{key}");
            }
            (call, answer) => panic!("{call:?} answered {answer:?}"),
        }
    }
    assert_eq!(fresh.len(), 60);
    for (rid, (ids, created)) in &fresh {
        assert_eq!((ids.len(), *created), (1, 1), "{rid}");
    }

    // None of the burst's batches was retried one operation at a time,
    // and the burst did share transactions.
    assert_eq!(stats.batches_retried(), retried_before);
    let commits = stats.commits() - commits_before;
    assert!(
        commits < total as u64,
        "{commits} commits for {total} calls"
    );

    // The database agrees: one execution per request_id, nothing left of
    // the runs that were taken back, and a dense log whose stored events
    // carry their own sequence.
    let storage = app.stop().await;
    let mut db = storage.open().await;
    let per_request: Vec<(String, i64)> = db
        .fetch_all(
            "SELECT request_id, COUNT(*) FROM executions WHERE request_id IS NOT NULL \
             GROUP BY request_id",
            &[],
        )
        .await;
    assert_eq!(per_request.len(), 40 + 60);
    assert!(per_request.iter().all(|(_, n)| *n == 1), "{per_request:?}");
    let executions = db.count("SELECT COUNT(*) FROM executions", &[]).await;
    assert_eq!(executions, 40 + 1 + 60 + 3 * 40);
    let task_runs = db.count("SELECT COUNT(*) FROM task_runs", &[]).await;
    assert_eq!(task_runs, 20);
    let orphans = db
        .count(
            "SELECT (SELECT COUNT(*) FROM states WHERE run_id NOT IN \
                 (SELECT id FROM executions UNION ALL SELECT id FROM task_runs)) \
             + (SELECT COUNT(*) FROM events WHERE execution_id NOT IN (SELECT id FROM executions))",
            &[],
        )
        .await;
    assert_eq!(orphans, 0);
    let events: Vec<(i64, Vec<u8>)> = db
        .fetch_all("SELECT seq, payload FROM events ORDER BY seq", &[])
        .await;
    db.close().await;
    assert_eq!(events.len() as i64, executions + task_runs);
    let mut runs = HashSet::new();
    for (i, (seq, payload)) in events.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1, "the log has a hole");
        let record = runledger::domain::EventRecord::decode(payload).unwrap();
        let run = match record.run {
            runledger::domain::RecordedRun::Execution(e) => e.id.to_string(),
            runledger::domain::RecordedRun::TaskRun(t) => t.id.to_string(),
        };
        assert!(runs.insert(run), "one event per run created");
    }
}
