//! Streams whose client stops reading while its HTTP/2 windows stay open:
//! the server's memory stays bounded, and they lose nothing.

use std::net::SocketAddr;

use runledger::grpc::pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tonic::transport::{Channel, Endpoint};

use crate::{helpers::*, streams::*};

/// A TCP proxy whose server-to-client direction can be stopped: while
/// stopped it reads nothing from the server, as a client that never
/// drains its socket.
struct Proxy {
    addr: SocketAddr,
    flowing: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (flowing, _) = watch::channel(true);
        let gate = flowing.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut open = gate.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        if open.wait_for(|f| *f).await.is_err() {
                            return;
                        }
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Proxy { addr, flowing }
    }

    fn set_flowing(&self, on: bool) {
        self.flowing.send_replace(on);
    }
}

/// A client that opens the largest HTTP/2 windows there are, so flow
/// control never holds the server back.
async fn wide_open_client(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .connect()
        .await
        .expect("connects through the proxy")
}

/// A field of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

const CONNECTIONS: usize = 20;
const STREAMS_PER_CONNECTION: usize = 10;
const TASK_RUNS: usize = 128;
const OUTPUT_BYTES: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_cost_little_memory_and_lose_nothing() {
    let storage = Storage::fresh().await;
    // A small live buffer: the stalled streams fall behind it and catch
    // up from the log.
    let server = Process::start_with_env(storage.database(), &[("RUNLEDGER_LIVE_BUFFER", "64")]);
    let pid = server.child.id();
    let proxy = Proxy::start(server.addr).await;
    let direct = connect(server.addr).await;

    let mut stalled = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut events = EventServiceClient::new(wide_open_client(proxy.addr).await);
        for _ in 0..STREAMS_PER_CONNECTION {
            let s = events
                .subscribe(pb::SubscribeRequest {
                    include_task_runs: true,
                    ..Default::default()
                })
                .await
                .expect("subscribed through the proxy")
                .into_inner();
            stalled.push(s);
        }
    }
    let mut reader = EventServiceClient::new(direct.clone())
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let before = proc_kib(pid, "VmRSS:");
    proxy.set_flowing(false);

    // A few MB of events, every stalled stream wants every one.
    let mut execs = ExecutionServiceClient::new(direct.clone());
    let mut tasks = TaskRunServiceClient::new(direct.clone());
    let exec = running_execution_via(&mut execs, "big outputs").await;
    let output = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            "x".repeat(OUTPUT_BYTES),
        )),
    };
    for i in 0..TASK_RUNS {
        let t = tasks
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: format!("k{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        tasks
            .set_task_run_state(pb::SetTaskRunStateRequest {
                id: t.id.clone(),
                state: state(pb::StateType::Running),
                ..Default::default()
            })
            .await
            .unwrap();
        let done = tasks
            .set_task_run_state(pb::SetTaskRunStateRequest {
                id: t.id,
                state: state(pb::StateType::Completed),
                output: Some(output.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.status, pb::SetStateStatus::Accept as i32);
    }
    let total = 2 + 3 * TASK_RUNS;

    // A reader that keeps up gets everything while the others stall.
    let read = seqs(&take(&mut reader, total, ev_sub).await);
    assert!(read.windows(2).all(|w| w[1] == w[0] + 1));

    proxy.set_flowing(true);
    let mut tasks = Vec::new();
    for mut s in stalled {
        tasks.push(tokio::spawn(async move {
            seqs(&take(&mut s, total, ev_sub).await)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), read, "every event, in order, once");
    }
    // The most the server ever held, stalled or catching up: unbounded,
    // each stalled stream held a page of the log and the HTTP/2 layer's
    // 400 KiB (over 500 MB here); bounded, about 45 MB.
    let peak = proc_kib(pid, "VmHWM:");
    server.kill();
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 100 * 1024,
        "resident memory grew by {grew} KiB (from {before} KiB) for {} stalled streams",
        CONNECTIONS * STREAMS_PER_CONNECTION
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_many_task_runs_is_read_a_page_at_a_time() {
    const RUNS: usize = 200;
    const STREAMS: usize = 40;
    let storage = Storage::fresh().await;
    let server = Process::start(storage.database());
    let pid = server.child.id();
    let channel = connect(server.addr).await;
    let mut execs = ExecutionServiceClient::new(channel.clone());
    let mut tasks = TaskRunServiceClient::new(channel.clone());
    let exec = execs
        .create_execution(goal("many task runs"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let set_exec = |t: pb::StateType| pb::SetExecutionStateRequest {
        id: exec.id.clone(),
        state: state(t),
        ..Default::default()
    };
    execs
        .set_execution_state(set_exec(pb::StateType::Running))
        .await
        .unwrap();
    let output = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            "x".repeat(OUTPUT_BYTES),
        )),
    };
    for i in 0..RUNS {
        let t = tasks
            .create_task_run(pb::CreateTaskRunRequest {
                execution_id: exec.id.clone(),
                task_key: format!("k{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task_run
            .unwrap();
        for (s, output) in [
            (pb::StateType::Running, None),
            (pb::StateType::Completed, Some(output.clone())),
        ] {
            tasks
                .set_task_run_state(pb::SetTaskRunStateRequest {
                    id: t.id.clone(),
                    state: state(s),
                    output,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }

    // Clients that open their streams and do not read them: the default
    // HTTP/2 windows stop the server after the first few task runs.
    let mut readers = execs.clone();
    // On connections of their own: unread streams use up a connection's
    // window too.
    let before = proc_kib(pid, "VmRSS:");
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        if i % 10 == 0 {
            readers = ExecutionServiceClient::new(connect(server.addr).await);
        }
        let s = readers
            .stream_execution_status(pb::StreamExecutionStatusRequest {
                id: exec.id.clone(),
                include_task_runs: true,
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(s);
    }
    let peak = proc_kib(pid, "VmHWM:");

    // Changes while the snapshots are being read: a task run created
    // after they started shows once, by its creation after the snapshot;
    // then the execution completes and the streams end.
    let late = tasks
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap();
    execs
        .set_execution_state(set_exec(pb::StateType::Completed))
        .await
        .unwrap();
    // Read together: unread streams hold their connection's window.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut events = Vec::new();
                while let Some(m) = tokio::time::timeout(WAIT, s.message())
                    .await
                    .expect("the stream moves on")
                    .expect("no error")
                {
                    events.push(m.event.unwrap());
                }
                events
            })
        })
        .collect();
    for r in readers {
        let events = r.await.unwrap();
        let snapshots = events
            .iter()
            .take_while(|e| event_kind(e) == pb::EventKind::Snapshot)
            .count();
        assert_eq!(snapshots, 1 + RUNS, "the execution and every task run");
        let late_ones = events
            .iter()
            .filter(|e| {
                matches!(&e.resource, Some(pb::status_event::Resource::TaskRun(t)) if t.id == late.id)
            })
            .count();
        assert_eq!(late_ones, 1, "the late task run once");
        let rest: Vec<_> = events[snapshots..].iter().map(event_kind).collect();
        assert_eq!(
            rest,
            [pb::EventKind::Created, pb::EventKind::StateChanged],
            "then the late task run and the execution's end"
        );
    }
    server.kill();
    let grew = peak.saturating_sub(before);
    // Read whole, each snapshot held every task run's output (over 100 MB
    // here); a page at a time, a few MB.
    assert!(
        grew < 48 * 1024,
        "resident memory grew by {grew} KiB (from {before} KiB) for {STREAMS} unread snapshots"
    );
}

/// Sends SIGTERM and waits up to `limit` for the exit; a server still
/// running then is killed, so that a failing test leaves none behind.
fn terminate_within(mut server: Process, limit: std::time::Duration) -> std::process::ExitStatus {
    let pid = server.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            server.kill();
            panic!("still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_hold_shutdown_up() {
    use std::time::Duration;
    const GRACE: Duration = Duration::from_secs(1);
    let storage = Storage::fresh().await;
    let server = Process::start_with_env(storage.database(), &[("RUNLEDGER_SHUTDOWN_GRACE", "1s")]);
    let proxy = Proxy::start(server.addr).await;
    let direct = connect(server.addr).await;

    // A subscriber whose connection stays open and which stops reading
    // while its stream has megabytes to deliver: the stream's end cannot
    // reach it, so the call stays open past the grace.
    let stalled = EventServiceClient::new(wide_open_client(proxy.addr).await)
        .subscribe(pb::SubscribeRequest {
            include_task_runs: true,
            ..Default::default()
        })
        .await
        .expect("subscribed through the proxy")
        .into_inner();
    proxy.set_flowing(false);

    let mut execs = ExecutionServiceClient::new(direct.clone());
    let mut tasks = TaskRunServiceClient::new(direct.clone());
    let exec = execs
        .create_execution(goal("a stalled subscriber"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let input = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("x".repeat(64 * 1024))),
    };
    let mut acknowledged = Vec::new();
    for i in 0..64 {
        let t = tasks
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
        acknowledged.push(t.id);
    }

    let status = tokio::task::spawn_blocking(move || {
        terminate_within(server, GRACE + Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    drop(stalled);

    // Every acknowledged write is there after a restart.
    let server = Process::start(storage.database());
    let mut tasks = TaskRunServiceClient::new(connect(server.addr).await);
    for id in &acknowledged {
        let t = tasks
            .get_task_run(pb::GetTaskRunRequest { id: id.clone() })
            .await
            .expect("an acknowledged task run is kept")
            .into_inner()
            .task_run
            .unwrap();
        assert_eq!(&t.id, id);
    }
    server.kill();
}

/// Reads a stalled subscription to its end or its reset, then resumes
/// after the last sequence it read until it holds `upto`.
async fn read_resuming(
    addr: SocketAddr,
    mut s: tonic::Streaming<pb::SubscribeResponse>,
    upto: i64,
) -> (Vec<i64>, bool) {
    let mut seen = Vec::new();
    let mut reset = false;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(20), s.message()).await {
            Ok(Ok(Some(m))) => {
                seen.push(ev_sub(m).sequence);
                if seen.last() == Some(&upto) {
                    return (seen, reset);
                }
            }
            Ok(Ok(None)) => panic!("a subscription does not end by itself"),
            Ok(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                reset = true;
                let after = seen.last().copied().unwrap_or(0);
                s = EventServiceClient::new(connect(addr).await)
                    .subscribe(pb::SubscribeRequest {
                        include_task_runs: true,
                        after_sequence: after,
                        ..Default::default()
                    })
                    .await
                    .expect("resumed")
                    .into_inner();
            }
            Err(_) => panic!("no event for 20 s after {:?}", seen.last()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_of_large_events_are_reset_once_over_the_send_budget() {
    const CONNECTIONS: usize = 2;
    const STREAMS_PER_CONNECTION: usize = 60;
    let storage = Storage::fresh().await;
    let mut config =
        runledger::Config::new("127.0.0.1:0".parse().unwrap(), storage.database()).unwrap();
    config.stalled_stream_timeout = std::time::Duration::from_secs(1);
    let app = runledger::App::build(config).await.unwrap();
    let addr = app.local_addr();
    let budget = app.send_budget();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let proxy = Proxy::start(addr).await;
    let direct = connect(addr).await;

    let mut stalled = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut events = EventServiceClient::new(wide_open_client(proxy.addr).await);
        for _ in 0..STREAMS_PER_CONNECTION {
            let s = events
                .subscribe(pb::SubscribeRequest {
                    include_task_runs: true,
                    ..Default::default()
                })
                .await
                .expect("subscribed through the proxy")
                .into_inner();
            stalled.push(s);
        }
    }
    proxy.set_flowing(false);

    // One event of about a megabyte, which every stalled stream takes.
    let mut execs = ExecutionServiceClient::new(direct.clone());
    let mut tasks = TaskRunServiceClient::new(direct.clone());
    let exec = running_execution_via(&mut execs, "large outputs").await;
    let t = tasks
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: exec.id.clone(),
            task_key: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_run
        .unwrap()
        .id;
    let big = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("x".repeat(1_000_000))),
    };
    for (s, output) in [
        (pb::StateType::Running, None),
        (pb::StateType::Completed, Some(big)),
    ] {
        let done = tasks
            .set_task_run_state(pb::SetTaskRunStateRequest {
                id: t.clone(),
                state: state(s),
                output,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.status, pb::SetStateStatus::Accept as i32);
    }
    let last = 5;

    // Each stalled stream took the large event: far over the budget.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut peak = 0;
    while peak < 64 * 1024 * 1024 && std::time::Instant::now() < deadline {
        peak = peak.max(budget.held_bytes());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(peak > 64 * 1024 * 1024, "held at most {peak} bytes");
    // Then the stalled ones are reset and what HTTP/2 held is let go of.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while budget.held_bytes() > 32 * 1024 * 1024 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let held = budget.held_bytes();
    assert!(
        held <= 32 * 1024 * 1024,
        "{held} bytes still held for stalled streams"
    );
    // A client that reads meanwhile is served as usual.
    let fresh = TaskRunServiceClient::new(direct.clone())
        .get_task_run(pb::GetTaskRunRequest { id: t.clone() })
        .await;
    assert!(fresh.is_ok(), "{fresh:?}");

    // Once they read again, each stream resumes where it was: nothing lost.
    proxy.set_flowing(true);
    let mut readers = Vec::new();
    for s in stalled {
        readers.push(tokio::spawn(read_resuming(addr, s, last)));
    }
    let mut resets = 0;
    for r in readers {
        let (seen, reset) = r.await.unwrap();
        assert_eq!(seen, (1..=last).collect::<Vec<_>>(), "every event once");
        resets += reset as usize;
    }
    assert!(resets > 0, "some stalled streams were reset");
    shutdown.cancel();
    let _ = server.await;
}
