//! `runledger bench`: drives a server, or several sharing one PostgreSQL
//! database (replicas), over many concurrent gRPC connections with the
//! generated clients and prints what it measured.

mod database;
mod delivery;
mod fanout;
mod load;
mod server;

use std::{
    fmt::Write as _,
    future::Future,
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

use crate::{database_url::Backend, grpc::pb, store::Durability};
pub use database::{BenchDatabase, PostgresInfo, Target, with_database};
use database::{SQLITE, Storage};
use load::LoadResult;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("database: {0}")]
    Database(String),
    #[error("server: {0}")]
    Server(String),
    #[error("client: {0}")]
    Client(String),
    #[error("interrupted; the servers are stopped and the benchmark's database removed")]
    Interrupted,
}

fn status(s: tonic::Status) -> BenchError {
    BenchError::Client(format!("{}: {}", s.code(), s.message()))
}

/// What to measure.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A running server to measure (e.g. http://127.0.0.1:50051); by default
    /// the benchmark starts its own on 127.0.0.1 with a fresh database.
    #[arg(long, conflicts_with_all = ["database", "replicas"])]
    pub addr: Option<String>,

    /// The database of the servers the benchmark starts: `sqlite`, a fresh
    /// SQLite file in a temporary folder; or a PostgreSQL server,
    /// postgres://USER@HOST:PORT/DATABASE, on which the benchmark creates
    /// a fresh database of its own and drops it at the end.
    #[arg(long, default_value = SQLITE)]
    pub database: String,

    /// How many servers to start on the database (more than one needs
    /// PostgreSQL); the load is spread over all of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub replicas: u32,

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

    /// State changes made one at a time on replica 0 for the delivery
    /// measurement: each server's subscribers, and so delivery from one
    /// replica to the others (0 to skip).
    #[arg(long, default_value_t = 200)]
    pub delivery_changes: usize,

    /// Subscribers on each server in the delivery measurement.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub delivery_subscribers: u32,

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
    /// "SQLite", "PostgreSQL", or "unknown" for a server the benchmark did
    /// not start.
    backend: String,
    /// How many servers share the database.
    replicas: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    sqlite: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sqlite_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<PostgresInfo>,
    durability: String,
    acknowledged_means: String,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    load: Vec<LoadResult>,
    fanout: Vec<fanout::FanoutResult>,
    catch_up: Option<CatchUp>,
    delivery: Option<delivery::DeliveryResult>,
    /// The servers the benchmark started, and their memory.
    servers: Vec<ServerMemory>,
}

#[derive(Debug, Serialize)]
struct ServerMemory {
    replica: usize,
    addr: String,
    /// Resident memory once listening.
    rss_at_start_bytes: Option<u64>,
    /// Resident memory after every measurement.
    rss_at_end_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CatchUp {
    events: u64,
    seconds: f64,
    per_second: f64,
}

/// Connections for `concurrency` requests in flight on `servers` servers:
/// HTTP/2 multiplexes, but one connection is one server task; as many on
/// each server.
fn connections_for(concurrency: usize, servers: usize) -> usize {
    spread(concurrency.div_ceil(8).clamp(1, 32), servers)
}

/// `n` rounded up to a multiple of `servers`, so that connections made
/// round-robin are as many on every server.
fn spread(n: usize, servers: usize) -> usize {
    n.div_ceil(servers.max(1)) * servers.max(1)
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

/// `n` connections, connection `i` to `urls[i % urls.len()]`.
async fn connect(urls: &[String], n: usize, key: &WithKey) -> Result<Vec<Conn>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let url = &urls[i % urls.len()];
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

/// What `--addr`, `--database` and `--replicas` ask for: the storage for
/// the benchmark's own servers, or none for a running server.
fn target(args: &BenchArgs) -> Result<Option<Target>, BenchError> {
    if args.addr.is_some() {
        if args.database != SQLITE || args.replicas != 1 {
            return Err(BenchError::Usage(
                "--addr measures a running server; --database and --replicas are for the \
                 servers the benchmark starts"
                    .into(),
            ));
        }
        return Ok(None);
    }
    let target = Target::parse(&args.database)?;
    if args.replicas > 1 && target.backend() != Backend::Postgres {
        return Err(BenchError::Usage(format!(
            "--replicas {} needs PostgreSQL (--database postgres://USER@HOST:PORT/DATABASE): \
             replicas share one database, and an SQLite file serves one server",
            args.replicas
        )));
    }
    Ok(Some(target))
}

/// Measures, prints the figures, and removes the benchmark's database.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    run_until(args, std::future::pending()).await
}

/// [`run`], stopping early when `stop` completes (a signal): the servers
/// are stopped and the database removed all the same.
pub async fn run_until(args: BenchArgs, stop: impl Future<Output = ()>) -> Result<(), BenchError> {
    let target = target(&args)?;
    let key = WithKey::new(args.api_key.as_deref())?;
    let mut stop = std::pin::pin!(stop);
    let storage = match &target {
        None => None,
        Some(t) => Some(tokio::select! {
            s = Storage::prepare(t) => s?,
            () = &mut stop => return Err(BenchError::Interrupted),
        }),
    };
    if let Some(Storage::Postgres(db)) = &storage {
        eprintln!(
            "runledger bench: database {} on {}, dropped at the end",
            db.name(),
            db.info().server
        );
    }
    // The servers belong to the measurement and stop with it, before
    // their database goes.
    let outcome = tokio::select! {
        r = measure_all(&args, &key, storage.as_ref()) => r,
        () = &mut stop => Err(BenchError::Interrupted),
    };
    let removed = match storage {
        Some(s) => s.remove().await,
        None => Ok(()),
    };
    let report = match (outcome, removed) {
        (Ok(report), removed) => {
            print_report(&args, &report);
            return removed;
        }
        (Err(e), Ok(())) => e,
        (Err(e), Err(removing)) => {
            eprintln!("{removing}");
            e
        }
    };
    Err(report)
}

fn print_report(args: &BenchArgs, report: &Report) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("serializable")
        );
    } else {
        print!("{}", table(report));
    }
}

/// Starts the servers (unless measuring a running one) and measures.
async fn measure_all(
    args: &BenchArgs,
    key: &WithKey,
    storage: Option<&Storage>,
) -> Result<Report, BenchError> {
    let mut servers = Vec::new();
    if let Some(storage) = storage {
        let streams = args
            .subscribers
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(args.delivery_subscribers as usize);
        for replica in 0..args.replicas as usize {
            let (url, durability) = (storage.url(), args.durability);
            // One at a time: the first creates the schema.
            let started = tokio::task::spawn_blocking(move || {
                server::ChildServer::start(replica, &url, durability, streams)
            })
            .await
            .map_err(|e| BenchError::Server(e.to_string()))??;
            servers.push(started);
        }
    }
    let urls: Vec<String> = match &args.addr {
        Some(a) => vec![a.clone()],
        None => servers
            .iter()
            .map(|c| format!("http://{}", c.addr))
            .collect(),
    };
    let n = urls.len();
    let rss = || servers.iter().map(|c| c.rss_bytes()).collect::<Vec<_>>();

    let mut load = Vec::new();
    for &c in &args.concurrency {
        let channels = connect(&urls, connections_for(c, n), key).await?;
        let ceiling = measure(
            "grpc.health.v1.Health/Check",
            c,
            args,
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
            args,
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
            args,
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
        let pool = Arc::new(precreate(&tasks, &parents, per_worker, args).await?);
        let mut r = measure(
            "SetTaskRunState RUNNING+COMPLETED",
            c,
            args,
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
        let bar = spinner(args, format!("fan-out to {s} subscribers"));
        let channels = connect(&urls, spread(s.div_ceil(100).clamp(1, 128), n), key).await?;
        fanouts.push(fanout::run(&channels, n, s, args.rounds, &rss).await?);
        bar.finish_and_clear();
    }

    let catch_up = if args.catch_up > 0 {
        Some(catch_up(&urls, key, args.catch_up, args).await?)
    } else {
        None
    };

    let delivery = if args.delivery_changes > 0 {
        let per_replica = args.delivery_subscribers as usize;
        let bar = spinner(
            args,
            format!(
                "delivering {} changes to {per_replica} subscribers on each of {n} servers",
                args.delivery_changes
            ),
        );
        let channels = connect(&urls, delivery::connections(n, per_replica), key).await?;
        let r = delivery::run(&channels, n, per_replica, args.delivery_changes).await?;
        bar.finish_and_clear();
        Some(r)
    } else {
        None
    };

    let servers = servers
        .iter()
        .enumerate()
        .map(|(replica, c)| ServerMemory {
            replica,
            addr: c.addr.to_string(),
            rss_at_start_bytes: c.rss_at_start,
            rss_at_end_bytes: c.rss_bytes(),
        })
        .collect();
    Ok(Report {
        machine: machine(args.durability, storage, n),
        load,
        fanout: fanouts,
        catch_up,
        delivery,
        servers,
    })
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
    urls: &[String],
    key: &WithKey,
    behind: u64,
    args: &BenchArgs,
) -> Result<CatchUp, BenchError> {
    // Writers on every server; the subscriber on the first.
    let channels = connect(urls, spread(8, urls.len()), key).await?;
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

fn machine(durability: Durability, storage: Option<&Storage>, replicas: usize) -> Machine {
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0);
    let mut m = Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: memory_kib / 1024.0 / 1024.0,
        backend: "unknown".into(),
        replicas,
        sqlite: None,
        sqlite_version: None,
        postgres: None,
        durability: format!("{durability:?}").to_lowercase(),
        acknowledged_means: String::new(),
    };
    match storage {
        None => {
            m.durability = "unknown".into();
            m.acknowledged_means = "as the running server is configured".into();
        }
        Some(Storage::Sqlite(folder)) => {
            let (sync, means) = match durability {
                Durability::Process => ("NORMAL", "committed to the WAL; survives a process crash"),
                Durability::Power => ("FULL", "committed and synced to disk; survives power loss"),
            };
            m.backend = Backend::Sqlite.to_string();
            m.sqlite = Some(format!(
                "WAL, synchronous={sync}, one writer with group commit"
            ));
            m.sqlite_version = Some(folder.version.clone()).filter(|v| !v.is_empty());
            m.acknowledged_means = means.into();
        }
        Some(Storage::Postgres(db)) => {
            m.backend = Backend::Postgres.to_string();
            m.acknowledged_means = postgres_acknowledged(&db.info().synchronous_commit);
            m.postgres = Some(db.info().clone());
        }
    }
    m
}

/// What an acknowledged write has reached, by the PostgreSQL server's
/// default `synchronous_commit`.
fn postgres_acknowledged(synchronous_commit: &str) -> String {
    match synchronous_commit {
        "off" => "committed; the WAL is flushed shortly after (synchronous_commit=off), so a \
                  crash of the database server may lose the last commits"
            .into(),
        other => format!(
            "committed and flushed to PostgreSQL's WAL (synchronous_commit={other}); survives a \
             crash of the database server"
        ),
    }
}

/// The report as a table for people.
fn table(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let servers = match m.replicas {
        1 => "1 server".to_owned(),
        n => format!("{n} replicas"),
    };
    let storage = match (&m.sqlite, &m.postgres) {
        (Some(settings), _) => match &m.sqlite_version {
            Some(v) => format!("SQLite {v}, {settings}"),
            None => format!("SQLite {settings}"),
        },
        (None, Some(pg)) => format!(
            "{} at {} (database {}), synchronous_commit={}",
            pg.short_version(),
            pg.server,
            pg.database,
            pg.synchronous_commit
        ),
        (None, None) => format!("{} backend", m.backend),
    };
    let _ = writeln!(
        out,
        "runledger bench: {} cores, {:.1} GiB; {storage}; {servers}; durability {} \
         (acknowledged = {})",
        m.cores, m.memory_gib, m.durability, m.acknowledged_means
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<36} {:>5} {:>11} {:>9} {:>9} {:>9} {:>8} {:>7}",
        "operation", "conc", "requests/s", "p50 ms", "p99 ms", "max ms", "ceiling", "errors"
    );
    for l in &r.load {
        let ratio = l
            .vs_ceiling
            .map_or("-".to_owned(), |v| format!("{:.0}%", v * 100.0));
        let _ = writeln!(
            out,
            "{:<36} {:>5} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>7}",
            l.operation, l.concurrency, l.per_second, l.p50_ms, l.p99_ms, l.max_ms, ratio, l.errors
        );
    }
    let kib = |b: Option<f64>| b.map_or("-".to_owned(), |b| format!("{:.1}", b / 1024.0));
    if !r.fanout.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<36} {:>9} {:>9} {:>9} {:>16}",
            "fan-out (SetExecutionState -> each subscriber)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "KiB/idle stream"
        );
        for f in &r.fanout {
            let _ = writeln!(
                out,
                "{:<36} {:>9.2} {:>9.2} {:>9.2} {:>16}",
                format!("{} subscribers x {} events", f.subscribers, f.rounds),
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                kib(f.bytes_per_idle_stream)
            );
            if f.per_replica.len() > 1 {
                for p in &f.per_replica {
                    let _ = writeln!(
                        out,
                        "{:<36} {:>9} {:>9} {:>9} {:>16}",
                        format!("  replica {}: {} streams", p.replica, p.streams),
                        "",
                        "",
                        "",
                        kib(p.bytes_per_idle_stream)
                    );
                }
            }
        }
    }
    if let Some(c) = &r.catch_up {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "catch-up: {} events behind, delivered in {:.2} s = {:.0} events/s",
            c.events, c.seconds, c.per_second
        );
    }
    if let Some(d) = &r.delivery {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<50} {:>9} {:>9} {:>9}",
            format!(
                "delivery ({} changes on replica {}, one at a time)",
                d.changes, d.writer_replica
            ),
            "p50 ms",
            "p99 ms",
            "max ms"
        );
        let row = |out: &mut String, name: String, l: &delivery::Latency| {
            let _ = writeln!(
                out,
                "{:<50} {:>9.2} {:>9.2} {:>9.2}",
                format!("{name}, {} subscribers", l.subscribers),
                l.p50_ms,
                l.p99_ms,
                l.max_ms
            );
        };
        for p in &d.per_replica {
            let name = if p.local {
                format!("replica {} (the writer's: local)", p.replica)
            } else {
                format!("replica {}", p.replica)
            };
            row(&mut out, name, &p.latency);
        }
        if let Some(others) = &d.other_replicas {
            row(
                &mut out,
                "every other replica (across the database)".into(),
                others,
            );
        }
    }
    if !r.servers.is_empty() {
        let mib = |b: Option<u64>| {
            b.map_or("-".to_owned(), |b| {
                format!("{:.1}", b as f64 / 1024.0 / 1024.0)
            })
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:>18} {:>16}",
            "server", "address", "RSS at start MiB", "RSS at end MiB"
        );
        for s in &r.servers {
            let _ = writeln!(
                out,
                "{:<8} {:<22} {:>18} {:>16}",
                s.replica,
                s.addr,
                mib(s.rss_at_start_bytes),
                mib(s.rss_at_end_bytes)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn bench(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut argv = vec!["runledger", "bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.into_command() {
            Command::Bench(a) => Ok(a),
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn the_default_is_one_server_on_a_fresh_sqlite_file() {
        let args = bench(&[]).unwrap();
        assert_eq!(args.database, "sqlite");
        assert_eq!(args.replicas, 1);
        assert_eq!(target(&args).unwrap(), Some(Target::Sqlite));
        let args = bench(&["--database", "sqlite"]).unwrap();
        assert_eq!(target(&args).unwrap(), Some(Target::Sqlite));
    }

    #[test]
    fn replicas_need_postgres() {
        for argv in [
            &["--replicas", "2"][..],
            &["--replicas", "3", "--database", "sqlite"],
        ] {
            let args = bench(argv).unwrap();
            let e = target(&args).unwrap_err();
            assert!(matches!(e, BenchError::Usage(_)), "{e:?}");
            let message = e.to_string();
            assert!(message.contains("--replicas"), "{message}");
            assert!(message.contains("needs PostgreSQL"), "{message}");
            assert!(message.contains("postgres://"), "{message}");
        }
        let url = "postgres://bench:hunter2@127.0.0.1:5432/postgres";
        let args = bench(&["--replicas", "3", "--database", url]).unwrap();
        assert_eq!(target(&args).unwrap(), Some(Target::Postgres(url.into())));
        assert_eq!(args.replicas, 3);
        bench(&["--replicas", "0"]).unwrap_err();
    }

    #[test]
    fn a_database_that_is_neither_is_refused_without_its_password() {
        let args = bench(&["--database", "mysql://root:hunter2@db/x"]).unwrap();
        let message = target(&args).unwrap_err().to_string();
        assert!(message.contains("--database takes"), "{message}");
        assert!(message.contains("mysql://root:***@db/x"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn a_running_server_takes_no_database_or_replicas() {
        for extra in [
            &["--replicas", "2"][..],
            &["--database", "postgres://postgres@127.0.0.1/postgres"],
        ] {
            let mut argv = vec!["--addr", "http://127.0.0.1:50051"];
            argv.extend_from_slice(extra);
            let e = bench(&argv).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        }
        let mut args = bench(&["--addr", "http://127.0.0.1:50051"]).unwrap();
        assert_eq!(target(&args).unwrap(), None);
        // Set other than through the command line, the same is refused.
        args.replicas = 2;
        assert!(matches!(target(&args), Err(BenchError::Usage(_))));
    }

    #[test]
    fn connections_are_as_many_on_every_server() {
        assert_eq!(connections_for(1, 1), 1);
        assert_eq!(connections_for(64, 1), 8);
        assert_eq!(connections_for(1000, 1), 32);
        assert_eq!(connections_for(1, 3), 3);
        assert_eq!(connections_for(64, 3), 9);
        assert_eq!(connections_for(16, 2), 2);
        assert_eq!(connections_for(1000, 3), 33);
        assert_eq!(spread(8, 3), 9);
        assert_eq!(spread(8, 1), 8);
    }

    fn report(machine: Machine) -> Report {
        Report {
            machine,
            load: Vec::new(),
            fanout: Vec::new(),
            catch_up: None,
            delivery: Some(delivery::DeliveryResult {
                writer_replica: 0,
                changes: 200,
                per_replica: (0..3)
                    .map(|replica| delivery::ReplicaDelivery {
                        replica,
                        local: replica == 0,
                        latency: delivery::Latency {
                            subscribers: 10,
                            p50_ms: 1.0,
                            p99_ms: 2.0,
                            max_ms: 3.0,
                        },
                    })
                    .collect(),
                other_replicas: Some(delivery::Latency {
                    subscribers: 20,
                    p50_ms: 1.5,
                    p99_ms: 2.5,
                    max_ms: 3.5,
                }),
            }),
            servers: Vec::new(),
        }
    }

    fn machine(replicas: usize) -> Machine {
        Machine {
            cores: 2,
            memory_gib: 4.0,
            backend: String::new(),
            replicas,
            sqlite: None,
            sqlite_version: None,
            postgres: None,
            durability: "process".into(),
            acknowledged_means: String::new(),
        }
    }

    #[test]
    fn the_report_names_postgres_its_version_and_replicas_without_the_password() {
        let info = PostgresInfo::new(
            "postgres://bench:hunter2@db.internal:5432/postgres",
            "runledger_bench_1",
            "PostgreSQL 15.8 (Debian 15.8-0+deb12u1) on x86_64-pc-linux-gnu".into(),
            "on".into(),
        );
        let r = report(Machine {
            backend: "PostgreSQL".into(),
            acknowledged_means: postgres_acknowledged(&info.synchronous_commit),
            postgres: Some(info),
            ..machine(3)
        });
        let table = table(&r);
        let json = serde_json::to_string(&r).unwrap();
        for shown in [&table, &json] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                shown.contains("postgres://bench:***@db.internal:5432/postgres"),
                "{shown}"
            );
            assert!(shown.contains("runledger_bench_1"), "{shown}");
            assert!(shown.contains("synchronous_commit"), "{shown}");
        }
        assert!(
            table.contains("PostgreSQL 15.8 at postgres://bench:***@db.internal"),
            "{table}"
        );
        assert!(table.contains("; 3 replicas;"), "{table}");
        assert!(table.contains("replica 0 (the writer's: local), 10 subscribers"));
        assert!(table.contains("every other replica (across the database), 20 subscribers"));
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["machine"]["backend"], "PostgreSQL");
        assert_eq!(json["machine"]["replicas"], 3);
        assert!(
            json["machine"]["postgres"]["version"]
                .as_str()
                .unwrap()
                .starts_with("PostgreSQL 15.8")
        );
        assert!(json["machine"].get("sqlite").is_none());
        assert_eq!(json["delivery"]["per_replica"][1]["p99_ms"], 2.0);
        assert_eq!(json["delivery"]["other_replicas"]["subscribers"], 20);
    }

    #[test]
    fn the_report_of_sqlite_keeps_its_settings() {
        let r = report(Machine {
            backend: "SQLite".into(),
            sqlite: Some("WAL, synchronous=NORMAL, one writer with group commit".into()),
            sqlite_version: Some("3.46.0".into()),
            ..machine(1)
        });
        let table = table(&r);
        assert!(
            table.contains("SQLite 3.46.0, WAL, synchronous=NORMAL, one writer"),
            "{table}"
        );
        assert!(table.contains("; 1 server;"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["machine"]["sqlite"],
            "WAL, synchronous=NORMAL, one writer with group commit"
        );
        assert!(json["machine"].get("postgres").is_none());
    }

    #[test]
    fn what_an_acknowledged_postgres_write_means() {
        assert!(postgres_acknowledged("on").contains("survives a crash"));
        assert!(postgres_acknowledged("off").contains("may lose the last commits"));
    }
}
