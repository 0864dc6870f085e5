//! `runledger bench`: drives a server over many concurrent gRPC
//! connections with the generated clients and prints what it measured.

mod fanout;
mod load;
mod server;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{grpc::pb, store::Durability};
use load::LoadResult;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("server: {0}")]
    Server(String),
    #[error("client: {0}")]
    Client(String),
}

fn status(s: tonic::Status) -> BenchError {
    BenchError::Client(format!("{}: {}", s.code(), s.message()))
}

/// What to measure.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A running server to measure (e.g. http://127.0.0.1:50051); by default
    /// the benchmark starts its own on 127.0.0.1 with a fresh database.
    #[arg(long)]
    pub addr: Option<String>,

    /// The API key sent with every call and stream, for a server with keys.
    #[arg(long, env = "RUNLEDGER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Concurrent requests in flight, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub concurrency: Vec<usize>,

    /// How long each throughput measurement runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub duration: Duration,

    /// Subscriber counts for the fan-out measurement (0 to skip).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub subscribers: Vec<usize>,

    /// State changes delivered to the subscribers in each fan-out run.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,

    /// How far behind the catch-up subscriber starts, in events (0 to skip).
    #[arg(long, default_value_t = 100_000)]
    pub catch_up: u64,

    /// Durability of the server the benchmark starts.
    #[arg(long, value_enum, default_value = "process")]
    pub durability: Durability,

    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    memory_gib: f64,
    sqlite: String,
    durability: String,
    acknowledged_means: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    load: Vec<LoadResult>,
    fanout: Vec<fanout::FanoutResult>,
    catch_up: Option<CatchUp>,
}

#[derive(Debug, Serialize)]
struct CatchUp {
    events: u64,
    seconds: f64,
    per_second: f64,
}

/// Connections for `concurrency` requests in flight: HTTP/2 multiplexes,
/// but one connection is one server task.
fn connections_for(concurrency: usize) -> usize {
    concurrency.div_ceil(8).clamp(1, 32)
}

/// Sends the API key, if there is one, with every call.
#[derive(Debug, Clone)]
pub(crate) struct WithKey(Option<MetadataValue<Ascii>>);

impl WithKey {
    pub(crate) fn new(key: Option<&str>) -> Result<Self, BenchError> {
        key.map(|k| {
            format!("Bearer {}", k.trim()).parse().map_err(|_| {
                BenchError::Client("the API key holds characters a header cannot carry".into())
            })
        })
        .transpose()
        .map(WithKey)
    }
}

impl Interceptor for WithKey {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to the server under test that carries the API key.
pub(crate) type Conn = InterceptedService<Channel, WithKey>;

async fn connect(url: &str, n: usize, key: &WithKey) -> Result<Vec<Conn>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ch = Endpoint::from_shared(url.to_owned())
            .map_err(|e| BenchError::Client(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| BenchError::Client(format!("connecting to {url}: {e}")))?;
        out.push(InterceptedService::new(ch, key.clone()));
    }
    Ok(out)
}

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let key = WithKey::new(args.api_key.as_deref())?;
    let dir = tempfile_dir()?;
    let child = match &args.addr {
        Some(_) => None,
        None => Some(server::ChildServer::start(
            &dir.join("bench.db"),
            args.durability,
            args.subscribers.iter().copied().max().unwrap_or(0),
        )?),
    };
    let url = match (&args.addr, &child) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => format!("http://{}", c.addr),
        (None, None) => unreachable!("a server was started"),
    };
    let rss = || child.as_ref().and_then(|c| c.rss_bytes());

    let mut load = Vec::new();
    for &c in &args.concurrency {
        let channels = connect(&url, connections_for(c), &key).await?;
        let ceiling = measure(
            "grpc.health.v1.Health/Check",
            c,
            &args,
            {
                let clients: Vec<_> = channels
                    .iter()
                    .cloned()
                    .map(tonic_health::pb::health_client::HealthClient::new)
                    .collect();
                move |w, _| {
                    let mut h = clients[w % clients.len()].clone();
                    async move {
                        h.check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .map(drop)
                    }
                }
            },
            1,
        )
        .await?;
        let ceiling_rate = ceiling.per_second;
        load.push(ceiling);

        let execs: Vec<_> = channels
            .iter()
            .cloned()
            .map(pb::execution_service_client::ExecutionServiceClient::new)
            .collect();
        let tasks: Vec<_> = channels
            .iter()
            .cloned()
            .map(pb::task_run_service_client::TaskRunServiceClient::new)
            .collect();

        let mut r = measure(
            "CreateExecution",
            c,
            &args,
            {
                let execs = execs.clone();
                move |w, _| {
                    let mut e = execs[w % execs.len()].clone();
                    async move {
                        e.create_execution(pb::CreateExecutionRequest {
                            task_id: "bench".into(),
                            goal: "measure the write path".into(),
                            metadata: [("worker".to_owned(), w.to_string())].into(),
                            ..Default::default()
                        })
                        .await
                        .map(drop)
                    }
                }
            },
            1,
        )
        .await?;
        r.vs_ceiling = Some(r.per_second / ceiling_rate);
        load.push(r);

        // One running execution per worker for its task runs.
        let mut parents = Vec::with_capacity(c);
        for w in 0..c {
            parents.push(running_execution(&execs[w % execs.len()]).await?);
        }
        let parents = Arc::new(parents);
        let mut r = measure(
            "CreateTaskRun",
            c,
            &args,
            {
                let (tasks, parents) = (tasks.clone(), Arc::clone(&parents));
                move |w, n| {
                    let mut t = tasks[w % tasks.len()].clone();
                    let execution_id = parents[w].clone();
                    async move {
                        t.create_task_run(pb::CreateTaskRunRequest {
                            execution_id,
                            task_key: "create".into(),
                            dynamic_key: n.to_string(),
                            ..Default::default()
                        })
                        .await
                        .map(drop)
                    }
                }
            },
            1,
        )
        .await?;
        r.vs_ceiling = Some(r.per_second / ceiling_rate);
        let create_rate = r.per_second;
        load.push(r);

        // Enough fresh task runs for each worker to move through
        // RUNNING -> COMPLETED for the whole measurement.
        let per_worker =
            ((create_rate * args.duration.as_secs_f64() * 1.5) / c as f64).ceil() as usize + 16;
        let pool = Arc::new(precreate(&tasks, &parents, per_worker, &args).await?);
        let mut r = measure(
            "SetTaskRunState RUNNING+COMPLETED",
            c,
            &args,
            {
                let (tasks, pool) = (tasks.clone(), Arc::clone(&pool));
                move |w, n| {
                    let mut t = tasks[w % tasks.len()].clone();
                    let id = pool[w].get(n as usize).cloned();
                    async move {
                        let id = id.ok_or_else(|| {
                            tonic::Status::resource_exhausted("the pool of task runs ran out")
                        })?;
                        for to in [pb::StateType::Running, pb::StateType::Completed] {
                            let answer = t
                                .set_task_run_state(pb::SetTaskRunStateRequest {
                                    id: id.clone(),
                                    state: Some(pb::StateCreate {
                                        r#type: to as i32,
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                })
                                .await?
                                .into_inner();
                            if answer.status != pb::SetStateStatus::Accept as i32 {
                                return Err(tonic::Status::internal(format!(
                                    "not accepted: {}",
                                    answer.reason
                                )));
                            }
                        }
                        Ok(())
                    }
                }
            },
            2,
        )
        .await?;
        r.vs_ceiling = Some(r.per_second / ceiling_rate);
        load.push(r);
    }

    let mut fanouts = Vec::new();
    for &s in args.subscribers.iter().filter(|s| **s > 0) {
        let bar = spinner(&args, format!("fan-out to {s} subscribers"));
        let channels = connect(&url, s.div_ceil(100).clamp(1, 128), &key).await?;
        fanouts.push(fanout::run(&channels, s, args.rounds, &rss).await?);
        bar.finish_and_clear();
    }

    let catch_up = if args.catch_up > 0 {
        Some(catch_up(&url, &key, args.catch_up, &args).await?)
    } else {
        None
    };

    let report = Report {
        machine: machine(args.durability),
        load,
        fanout: fanouts,
        catch_up,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        print_table(&report);
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn measure<F, Fut>(
    name: &str,
    c: usize,
    args: &BenchArgs,
    op: F,
    requests_per_op: u64,
) -> Result<LoadResult, BenchError>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let bar = spinner(args, format!("{name} at concurrency {c}"));
    let r = load::run(name, c, args.duration, requests_per_op, op).await;
    bar.finish_and_clear();
    r
}

fn spinner(args: &BenchArgs, msg: String) -> ProgressBar {
    if args.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn running_execution(
    client: &pb::execution_service_client::ExecutionServiceClient<Conn>,
) -> Result<String, BenchError> {
    let mut c = client.clone();
    let e = c
        .create_execution(pb::CreateExecutionRequest {
            task_id: "bench".into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner()
        .execution
        .ok_or_else(|| BenchError::Client("no execution".into()))?;
    c.set_execution_state(pb::SetExecutionStateRequest {
        id: e.id.clone(),
        state: Some(pb::StateCreate {
            r#type: pb::StateType::Running as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .map_err(status)?;
    Ok(e.id)
}

/// `per_worker` PENDING task runs for each worker, created 64 at a time.
async fn precreate(
    tasks: &[pb::task_run_service_client::TaskRunServiceClient<Conn>],
    parents: &Arc<Vec<String>>,
    per_worker: usize,
    args: &BenchArgs,
) -> Result<Vec<Vec<String>>, BenchError> {
    let bar = spinner(
        args,
        format!("creating {} task runs to move", per_worker * parents.len()),
    );
    let mut pool = Vec::with_capacity(parents.len());
    for (w, parent) in parents.iter().enumerate() {
        let mut ids = Vec::with_capacity(per_worker);
        for chunk in (0..per_worker).collect::<Vec<_>>().chunks(64) {
            let calls = chunk.iter().map(|i| {
                let mut t = tasks[(w + i) % tasks.len()].clone();
                let req = pb::CreateTaskRunRequest {
                    execution_id: parent.clone(),
                    task_key: "move".into(),
                    dynamic_key: i.to_string(),
                    ..Default::default()
                };
                async move { t.create_task_run(req).await }
            });
            for r in futures::future::join_all(calls).await {
                let run = r.map_err(status)?.into_inner().task_run;
                ids.push(run.map(|t| t.id).unwrap_or_default());
            }
        }
        pool.push(ids);
    }
    bar.finish_and_clear();
    Ok(pool)
}

/// Fills the log to `behind` events past a cursor, then times a subscriber
/// reading all of them.
async fn catch_up(
    url: &str,
    key: &WithKey,
    behind: u64,
    args: &BenchArgs,
) -> Result<CatchUp, BenchError> {
    let channels = connect(url, 8, key).await?;
    let mut events = pb::event_service_client::EventServiceClient::new(channels[0].clone());
    let head = |ch: Conn| async move {
        let mut e = pb::execution_service_client::ExecutionServiceClient::new(ch);
        let created = e
            .create_execution(pb::CreateExecutionRequest::default())
            .await
            .map_err(status)?
            .into_inner()
            .execution
            .ok_or_else(|| BenchError::Client("no execution".into()))?;
        let mut s = e
            .stream_execution_status(pb::StreamExecutionStatusRequest {
                id: created.id,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        let snap = s.message().await.map_err(status)?.and_then(|m| m.event);
        Ok::<i64, BenchError>(snap.map_or(0, |e| e.sequence))
    };
    let start = head(channels[0].clone()).await?;
    let bar = spinner(args, format!("writing {behind} events to catch up on"));
    let per = behind.div_ceil(64);
    let writers: Vec<_> = (0..64)
        .map(|i| {
            let mut e = pb::execution_service_client::ExecutionServiceClient::new(
                channels[i % channels.len()].clone(),
            );
            tokio::spawn(async move {
                for _ in 0..per {
                    e.create_execution(pb::CreateExecutionRequest {
                        task_id: "catch-up".into(),
                        ..Default::default()
                    })
                    .await?;
                }
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    for w in writers {
        w.await
            .map_err(|e| BenchError::Client(e.to_string()))?
            .map_err(status)?;
    }
    bar.finish_and_clear();

    let bar = spinner(args, format!("catching up on {behind} events"));
    let t = Instant::now();
    let mut s = events
        .subscribe(pb::SubscribeRequest {
            after_sequence: start,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut n = 0u64;
    while n < behind {
        if s.message().await.map_err(status)?.is_none() {
            break;
        }
        n += 1;
    }
    let seconds = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(CatchUp {
        events: n,
        seconds,
        per_second: n as f64 / seconds,
    })
}

fn machine(durability: Durability) -> Machine {
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0);
    let (sync, means) = match durability {
        Durability::Process => ("NORMAL", "committed to the WAL; survives a process crash"),
        Durability::Power => ("FULL", "committed and synced to disk; survives power loss"),
    };
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kib / 1024.0 / 1024.0,
        sqlite: format!("WAL, synchronous={sync}, one writer with group commit"),
        durability: format!("{durability:?}").to_lowercase(),
        acknowledged_means: means,
    }
}

fn print_table(r: &Report) {
    let m = &r.machine;
    println!(
        "runledger bench: {} cores, {:.1} GiB; SQLite {}; durability {} (acknowledged = {})",
        m.cores, m.memory_gib, m.sqlite, m.durability, m.acknowledged_means
    );
    println!();
    println!(
        "{:<36} {:>5} {:>11} {:>9} {:>9} {:>9} {:>8} {:>7}",
        "operation", "conc", "requests/s", "p50 ms", "p99 ms", "max ms", "ceiling", "errors"
    );
    for l in &r.load {
        let ratio = l
            .vs_ceiling
            .map_or("-".to_owned(), |v| format!("{:.0}%", v * 100.0));
        println!(
            "{:<36} {:>5} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>7}",
            l.operation, l.concurrency, l.per_second, l.p50_ms, l.p99_ms, l.max_ms, ratio, l.errors
        );
    }
    if !r.fanout.is_empty() {
        println!();
        println!(
            "{:<36} {:>9} {:>9} {:>9} {:>16}",
            "fan-out (SetExecutionState -> each subscriber)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "KiB/idle stream"
        );
        for f in &r.fanout {
            let mem = f
                .bytes_per_idle_stream
                .map_or("-".to_owned(), |b| format!("{:.1}", b / 1024.0));
            println!(
                "{:<36} {:>9.2} {:>9.2} {:>9.2} {:>16}",
                format!("{} subscribers x {} events", f.subscribers, f.rounds),
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                mem
            );
        }
    }
    if let Some(c) = &r.catch_up {
        println!();
        println!(
            "catch-up: {} events behind, delivered in {:.2} s = {:.0} events/s",
            c.events, c.seconds, c.per_second
        );
    }
}

/// A fresh folder for the benchmark's database.
fn tempfile_dir() -> Result<std::path::PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("runledger-bench-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Server(e.to_string()))?;
    Ok(dir)
}
