//! State history: ListStates in pages, and what retention keeps of it.

use std::{collections::HashSet, time::Duration};

use pb::StateType::*;
use runledger::grpc::pb;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

fn states_of_execution(id: &str, page_size: i32, page_token: &str) -> pb::ListStatesRequest {
    pb::ListStatesRequest {
        execution_id: id.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    }
}

async fn list_states(app: &TestApp, req: pb::ListStatesRequest) -> pb::ListStatesResponse {
    app.task_runs
        .clone()
        .list_states(req)
        .await
        .expect("states listed")
        .into_inner()
}

/// Moves the execution to `t`, forced, with an optional transition_id.
async fn force(app: &TestApp, id: &str, t: pb::StateType, transition_id: &str) {
    let r = app
        .executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: id.into(),
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
        .expect("set state answered")
        .into_inner();
    assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
}

fn state_ids(states: &[pb::State]) -> Vec<String> {
    states.iter().map(|s| s.id.clone()).collect()
}

#[tokio::test]
async fn list_states_pages_through_a_long_history_without_gaps_or_duplicates() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    for i in 0..60 {
        let t = if i % 2 == 0 { Running } else { Pending };
        force(&app, &exec.id, t, "").await;
    }

    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_states(&app, states_of_execution(&exec.id, 7, &token)).await;
        assert!(page.states.len() <= 7);
        paged.extend(page.states);
        pages += 1;
        if pages == 3 {
            // States appended while paging show up on later pages.
            for i in 0..5 {
                let t = if i % 2 == 0 { Running } else { Pending };
                force(&app, &exec.id, t, "").await;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged.len(), 1 + 60 + 5);
    assert_eq!(pages, (paged.len() as f64 / 7.0).ceil() as usize);
    let ids = state_ids(&paged);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());

    // The same history, oldest first, in one page.
    let whole = list_states(&app, states_of_execution(&exec.id, 1000, "")).await;
    assert!(whole.next_page_token.is_empty());
    assert_eq!(state_ids(&whole.states), ids);
    assert_eq!(whole.states[0].r#type, Pending as i32);
    // Without a page_size, the default page of 50.
    let first = list_states(&app, states_of_execution(&exec.id, 0, "")).await;
    assert_eq!(state_ids(&first.states), ids[..50]);
    assert!(!first.next_page_token.is_empty());

    // Bad page arguments name their field; a token of another list is
    // not a ListStates token.
    create_execution(&app).await;
    let listed = app
        .executions
        .clone()
        .list_executions(pb::ListExecutionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.next_page_token.is_empty());
    let cases = [
        (states_of_execution(&exec.id, 1001, ""), "page_size"),
        (states_of_execution(&exec.id, -1, ""), "page_size"),
        (states_of_execution(&exec.id, 10, "garbage"), "page_token"),
        (
            states_of_execution(&exec.id, 10, &listed.next_page_token),
            "page_token",
        ),
    ];
    for (req, field) in cases {
        let err = app.task_runs.clone().list_states(req).await.unwrap_err();
        assert_eq!(violated_fields(&err), [field], "{err:?}");
    }
}

async fn cache_task_run(
    app: &TestApp,
    execution_id: &str,
    key: &str,
    expiration: Option<prost_types::Timestamp>,
) -> pb::TaskRun {
    let t = app
        .task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: execution_id.into(),
            task_key: key.into(),
            cache_key: key.into(),
            cache_expiration: expiration,
            ..Default::default()
        })
        .await
        .expect("created")
        .into_inner()
        .task_run
        .unwrap();
    set_task_run_state(app, &t.id, Running).await;
    let done = set_task_run_state(app, &t.id, Completed).await;
    assert_eq!(done.status, pb::SetStateStatus::Accept as i32, "{done:?}");
    t
}

#[tokio::test]
async fn retention_keeps_only_the_current_state_of_finished_runs_and_drops_expired_cache_entries() {
    let app = spawn_app_with(|c| {
        c.event_retention = Duration::ZERO;
        c.prune_interval = Duration::from_millis(20);
    })
    .await;
    // Finished: PENDING, RUNNING, COMPLETED.
    let finished = create_execution(&app).await;
    force(&app, &finished.id, Running, "start-finished").await;
    force(&app, &finished.id, Completed, "").await;
    // Still running: PENDING, RUNNING.
    let running = create_execution(&app).await;
    force(&app, &running.id, Running, "start-running").await;
    // Cache entries: one expired, one without expiry.
    let past = prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    let expired = cache_task_run(&app, &running.id, "expired", Some(past)).await;
    let lasting = cache_task_run(&app, &running.id, "lasting", None).await;

    // Wait until retention has passed the finished runs' last events.
    let states = |id: String| {
        let app = &app;
        async move {
            list_states(
                app,
                pb::ListStatesRequest {
                    task_run_id: id,
                    ..Default::default()
                },
            )
            .await
            .states
        }
    };
    tokio::time::timeout(WAIT, async {
        loop {
            let exec = list_states(&app, states_of_execution(&finished.id, 0, "")).await;
            if exec.states.len() == 1 && states(lasting.id.clone()).await.len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("retention reduces finished runs to their current state");

    // Through the API: a finished run shows its current state, a running
    // one its whole history.
    let exec = list_states(&app, states_of_execution(&finished.id, 0, "")).await;
    assert_eq!(exec.states[0].r#type, Completed as i32);
    let got = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: finished.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(got.state.unwrap().id, exec.states[0].id);
    let types = |states: Vec<pb::State>| states.iter().map(|s| s.r#type).collect::<Vec<_>>();
    assert_eq!(
        types(
            list_states(&app, states_of_execution(&running.id, 0, ""))
                .await
                .states
        ),
        [Pending as i32, Running as i32]
    );
    assert_eq!(types(states(expired.id.clone()).await), [Completed as i32]);

    // In the database: history rows, transition results and cache
    // entries.
    let mut db = app.storage.open().await;
    let history = "SELECT COUNT(*) FROM states WHERE run_id = $1";
    let transitions = "SELECT COUNT(*) FROM transitions WHERE run_id = $1";
    assert_eq!(db.count(history, &[&finished.id]).await, 1);
    assert_eq!(db.count(history, &[&running.id]).await, 2);
    assert_eq!(db.count(history, &[&expired.id]).await, 1);
    assert_eq!(db.count(history, &[&lasting.id]).await, 1);
    assert_eq!(db.count(transitions, &[&finished.id]).await, 0);
    assert_eq!(db.count(transitions, &[&running.id]).await, 1);
    let keys: Vec<(String,)> = db
        .fetch_all(
            "SELECT cache_key FROM cache_entries ORDER BY cache_key",
            &[],
        )
        .await;
    assert_eq!(keys, [("lasting".to_owned(),)]);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM events", &[]).await,
        0,
        "every event is past a retention of zero"
    );
    db.close().await;
    app.stop().await;
}

#[tokio::test]
async fn retention_keeps_the_history_and_transition_results_of_runs_that_may_be_retried() {
    let app = spawn_app_with(|c| {
        c.event_retention = Duration::ZERO;
        c.prune_interval = Duration::from_millis(20);
    })
    .await;
    let failed = create_execution(&app).await;
    force(&app, &failed.id, Running, "start-failed").await;
    force(&app, &failed.id, Failed, "fail-failed").await;
    // Finished after it: once retention has reduced this one, it has
    // passed every event of the failed run too.
    let finished = create_execution(&app).await;
    force(&app, &finished.id, Running, "").await;
    force(&app, &finished.id, Completed, "").await;
    tokio::time::timeout(WAIT, async {
        loop {
            let exec = list_states(&app, states_of_execution(&finished.id, 0, "")).await;
            if exec.states.len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("retention reduces the finished run to its current state");

    let types: Vec<i32> = list_states(&app, states_of_execution(&failed.id, 0, ""))
        .await
        .states
        .iter()
        .map(|s| s.r#type)
        .collect();
    assert_eq!(types, [Pending as i32, Running as i32, Failed as i32]);
    // A repeated transition_id is answered from the record: the FAILED
    // run does not start again.
    force(&app, &failed.id, Running, "start-failed").await;
    let got = app
        .executions
        .clone()
        .get_execution(pb::GetExecutionRequest {
            id: failed.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(state_of(&got), Failed);
    app.stop().await;
}
