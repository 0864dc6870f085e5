//! Starting the service as a process: errors on one line that name the
//! database and the cause, a port in use reported before the database is
//! touched, and a restart after kill -9 that keeps every acknowledged
//! write.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use pb::StateType::*;
use runledger::grpc::pb;
use tonic::transport::Channel;

use crate::helpers::*;

/// Runs the binary with `args` and `--database db` until it exits (at most
/// 30 s).
pub fn run_to_exit(
    args: &[&str],
    db: impl AsRef<OsStr>,
    adjust: impl FnOnce(&mut Command),
) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runledger"));
    command
        .args(args)
        .arg("--database")
        .arg(db)
        .env("RUST_LOG", "info")
        .env_remove("RUNLEDGER_DATABASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut command);
    let mut child = command.spawn().expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 30 s; its log:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

pub fn serve_to_exit(db: impl AsRef<OsStr>, adjust: impl FnOnce(&mut Command)) -> Output {
    run_to_exit(&["serve", "--listen", "127.0.0.1:0"], db, adjust)
}

/// The one error line a failed start prints, checked for what it must
/// name (the file, or the URL without its password) and the cause.
pub fn refused(out: &Output, names: &str, cause: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    let line = errors[0];
    assert!(line.contains(names), "names {names}: {line}");
    assert!(line.contains(cause), "says {cause:?}: {line}");
    assert!(!line.to_lowercase().contains("internal"), "{line}");
    assert!(!stderr.contains("Caused by"), "{stderr}");
    line.to_owned()
}

#[tokio::test]
async fn a_port_in_use_is_reported_before_the_database_is_touched() {
    let storage = Storage::fresh().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking({
        let (db, addr) = (storage.database(), addr.clone());
        move || run_to_exit(&["serve", "--listen", &addr], db, |_| {})
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("Caused by"), "{stderr}");
    assert!(storage.untouched().await, "the database was not set up");
}

/// Creates executions and moves each to RUNNING until the server stops
/// answering, counting acknowledged creates in `acked`. Hands back each
/// execution whose creation was acknowledged, and whether its RUNNING was.
async fn write_until_refused(
    channel: Channel,
    writer: usize,
    acked: Arc<AtomicUsize>,
) -> Vec<(String, bool)> {
    let mut execs = ExecutionServiceClient::new(channel);
    let mut written = Vec::new();
    for i in 0.. {
        let Ok(created) = execs
            .create_execution(goal(&format!("w{writer}-{i}")))
            .await
        else {
            break;
        };
        let id = created.into_inner().execution.unwrap().id;
        acked.fetch_add(1, Ordering::Relaxed);
        let moved = execs
            .set_execution_state(pb::SetExecutionStateRequest {
                id: id.clone(),
                state: state(Running),
                ..Default::default()
            })
            .await;
        match moved {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.status, pb::SetStateStatus::Accept as i32, "{r:?}");
                written.push((id, true));
            }
            Err(_) => {
                written.push((id, false));
                break;
            }
        }
    }
    written
}

fn execution_of(e: &pb::StatusEvent) -> Option<&pb::Execution> {
    match &e.resource {
        Some(pb::status_event::Resource::Execution(x)) => Some(x),
        _ => None,
    }
}

#[tokio::test]
async fn a_server_killed_mid_load_and_started_again_keeps_every_acknowledged_write() {
    const WRITERS: usize = 4;
    let storage = Storage::fresh().await;
    let server = Process::start(storage.database());
    let channel = connect(server.addr).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write_until_refused(channel.clone(), w, Arc::clone(&acked))))
        .collect();
    // Killed while every writer still writes.
    tokio::time::timeout(Duration::from_secs(30), async {
        while acked.load(Ordering::Relaxed) < 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("200 creates acknowledged within 30 s");
    server.kill();
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    assert!(written.len() >= 200, "{} acknowledged", written.len());

    let server = Process::start(storage.database());
    let channel = connect(server.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());

    // Each acknowledged creation is there, in at least the state
    // acknowledged.
    for (id, running) in &written {
        let e = execs
            .get_execution(pb::GetExecutionRequest { id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("{id} was acknowledged and is gone: {s:?}"))
            .into_inner()
            .execution
            .unwrap();
        let now = state_of(&e);
        if *running {
            assert_eq!(now, Running, "{id}");
        } else {
            assert!(matches!(now, Pending | Running), "{id}: {now:?}");
        }
    }
    let ids: HashSet<&String> = written.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), written.len(), "one execution per create");

    // The log is dense and holds the events of every acknowledged write.
    let mut db = storage.open().await;
    let logged: Vec<(i64, String)> = db
        .fetch_all("SELECT seq, execution_id FROM events ORDER BY seq", &[])
        .await;
    db.close().await;
    let head = logged.len() as i64;
    let seqs: Vec<i64> = logged.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "a gap or a duplicate");
    let mut per_execution: HashMap<&str, usize> = HashMap::new();
    for (_, id) in &logged {
        *per_execution.entry(id).or_default() += 1;
    }
    for (id, running) in &written {
        // Its creation, and its move to RUNNING when that was acknowledged.
        let acknowledged = 1 + usize::from(*running);
        let n = per_execution.get(id.as_str()).copied().unwrap_or(0);
        assert!(n >= acknowledged, "{id}: {n} events");
    }

    // Streamed from the log it is the same, and it goes on after what the
    // killed server wrote.
    let mut events = EventServiceClient::new(channel)
        .subscribe(pb::SubscribeRequest {
            after_sequence: 1,
            ..Default::default()
        })
        .await
        .expect("subscribes")
        .into_inner();
    let marker = execs
        .create_execution(goal("after the restart"))
        .await
        .expect("the restarted server writes")
        .into_inner()
        .execution
        .unwrap();
    let mut streamed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events
                .message()
                .await
                .expect("the stream goes on")
                .expect("an event")
                .event
                .expect("an event");
            let id = execution_of(&e).expect("an execution's event").id.clone();
            streamed.push(e.sequence);
            if id == marker.id {
                return;
            }
        }
    })
    .await
    .expect("the restarted server's event arrives");
    assert_eq!(streamed, (2..=head + 1).collect::<Vec<_>>());
    drop(events);
    server.kill();
}
