//! Lists of large documents: every page fits in one response a client
//! accepts, the pages chain without gaps or duplicates, and the server
//! reads no more of a page than it sends.

use std::collections::HashSet;

use prost::Message;
use runledger::grpc::pb;

use crate::helpers::*;

/// What a tonic client accepts in one message by default.
const CLIENT_LIMIT: usize = 4 * 1024 * 1024;

fn json(v: serde_json::Value) -> prost_types::Value {
    runledger::grpc::convert::value(&v)
}

async fn list_states(app: &TestApp, execution_id: &str, page_size: i32) -> (Vec<pb::State>, usize) {
    let mut states = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .task_runs
            .clone()
            .list_states(pb::ListStatesRequest {
                execution_id: execution_id.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("every page decodes")
            .into_inner();
        assert!(page.encoded_len() < CLIENT_LIMIT);
        assert!(!page.states.is_empty(), "no empty page");
        pages += 1;
        states.extend(page.states);
        token = page.next_page_token;
        if token.is_empty() {
            return (states, pages);
        }
    }
}

#[tokio::test]
async fn a_history_of_large_states_comes_in_pages_a_client_accepts() {
    let app = spawn_app().await;
    let exec = create_execution(&app).await;
    for i in 0..60 {
        let t = if i % 2 == 0 {
            pb::StateType::Running
        } else {
            pb::StateType::Pending
        };
        let r = app
            .executions
            .clone()
            .set_execution_state(pb::SetExecutionStateRequest {
                id: exec.id.clone(),
                state: Some(pb::StateCreate {
                    r#type: t as i32,
                    data: Some(json(serde_json::json!({
                        "blob": format!("{i:03}").repeat(34_000)
                    }))),
                    ..Default::default()
                }),
                force: true,
                ..Default::default()
            })
            .await
            .expect("state set")
            .into_inner();
        assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
    }

    let (all, pages) = list_states(&app, &exec.id, 1000).await;
    assert!(pages > 1, "6 MB of states take more than one response");
    let (small, _) = list_states(&app, &exec.id, 7).await;
    let ids: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 61, "the first state and the 60 set");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    assert_eq!(
        ids,
        small.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        "the same history, oldest first, whatever the page size"
    );
}

fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Pages through a list with the largest page size, returning the ids
/// listed and by how much the server's peak memory grew meanwhile.
async fn list_all<F, Fut>(pid: u32, mut page: F) -> (Vec<String>, u64)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<String>, String)>,
{
    // The peak starts again from what the server holds now.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("peak reset");
    let before = peak_kib(pid);
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let (ids, next) = page(token).await;
        assert!(!ids.is_empty(), "no empty page");
        listed.extend(ids);
        token = next;
        if token.is_empty() {
            break;
        }
    }
    (listed, peak_kib(pid).saturating_sub(before) / 1024)
}

#[tokio::test]
async fn listing_large_runs_holds_about_one_response_in_memory() {
    const RUNS: usize = 100;
    let blob = || serde_json::json!({ "blob": "x".repeat(1_000_000) });
    let storage = Storage::fresh().await;
    let server = Process::start(storage.database());
    let channel = connect(server.addr).await;
    let executions = ExecutionServiceClient::new(channel.clone());
    let task_runs = TaskRunServiceClient::new(channel);
    let exec = executions
        .clone()
        .create_execution(goal("large runs"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: Some(pb::StateCreate {
                r#type: pb::StateType::Running as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut runs = Vec::new();
    let mut execs = Vec::new();
    for i in 0..RUNS {
        let run = task_runs
            .clone()
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: format!("t{i}"),
                input: Some(json(blob())),
                ..Default::default()
            })
            .await
            .expect("created")
            .into_inner()
            .task_run
            .unwrap();
        runs.push(run.id);
        let input = match json(blob()).kind {
            Some(prost_types::value::Kind::StructValue(s)) => s,
            _ => unreachable!("an object"),
        };
        let e = executions
            .clone()
            .create_execution(pb::CreateExecutionRequest {
                task_id: "large".into(),
                input: Some(input),
                ..Default::default()
            })
            .await
            .expect("created")
            .into_inner()
            .execution
            .unwrap();
        execs.push(e.id);
    }
    runs.reverse();
    execs.reverse();
    server.kill();

    // Each list in a server of its own, whose memory nothing else used.
    let server = Process::start(storage.database());
    let task_runs = TaskRunServiceClient::new(connect(server.addr).await);
    let (listed, runs_growth) = list_all(server.child.id(), |token| {
        let mut task_runs = task_runs.clone();
        let execution_id = exec.id.clone();
        async move {
            let page = task_runs
                .list_task_runs(pb::ListTaskRunsRequest {
                    execution_id,
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("every page decodes")
                .into_inner();
            let ids = page.task_runs.into_iter().map(|t| t.id).collect();
            (ids, page.next_page_token)
        }
    })
    .await;
    assert_eq!(listed, runs, "every task run once, newest first");
    server.kill();

    let server = Process::start(storage.database());
    let executions = ExecutionServiceClient::new(connect(server.addr).await);
    let (listed, execs_growth) = list_all(server.child.id(), |token| {
        let mut executions = executions.clone();
        async move {
            let page = executions
                .list_executions(pb::ListExecutionsRequest {
                    task_id: "large".into(),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .expect("every page decodes")
                .into_inner();
            let ids = page.executions.into_iter().map(|e| e.id).collect();
            (ids, page.next_page_token)
        }
    })
    .await;
    assert_eq!(listed, execs, "every execution once, newest first");
    server.kill();

    // Each list takes 100 MB stored; a response holds three of its runs.
    // Holding a whole page of 1000 would take hundreds of MiB.
    assert!(
        runs_growth < 120,
        "the server's peak memory grew by {runs_growth} MiB listing task runs"
    );
    assert!(
        execs_growth < 120,
        "the server's peak memory grew by {execs_growth} MiB listing executions"
    );
}
