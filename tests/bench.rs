//! `runledger bench` on the storage it makes for itself: a fresh SQLite
//! file, or a fresh database on a PostgreSQL server that is dropped
//! however the run ends; and its servers, stopped with it.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use runledger::bench::BenchDatabase;
use sqlx::{Connection, PgConnection};

use crate::postgres::{server_url, unreachable_message};

/// The server of the tests with a password in its URL, when it has none
/// (the tests' server trusts local users, so any will do), and that
/// password: the benchmark must never show it.
fn server_with_password() -> (String, Option<String>) {
    let server = server_url();
    if let Some(password) = password_of(&server) {
        return (server, Some(password));
    }
    let Some(p) = server.find("://") else {
        return (server, None);
    };
    let authority = &server[p + 3..];
    let Some(at) = authority.find('@') else {
        return (server, None);
    };
    let secret = format!("bench-secret-{}", uuid::Uuid::now_v7().simple());
    let url = format!(
        "{}{}:{secret}{}",
        &server[..p + 3],
        &authority[..at],
        &authority[at..]
    );
    (url, Some(secret))
}

fn password_of(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

async fn connect(server: &str) -> PgConnection {
    PgConnection::connect(server)
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_message(server, e)))
}

async fn database_exists(server: &str, name: &str) -> bool {
    let mut conn = connect(server).await;
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

async fn create_on(server: &str) -> BenchDatabase {
    BenchDatabase::create(server)
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable_message(server, e)))
}

#[tokio::test]
async fn the_bench_database_is_created_fresh_and_dropped() {
    let (server, secret) = server_with_password();
    let db = create_on(&server).await;
    let name = db.name().to_owned();
    assert!(name.starts_with("runledger_bench_"), "{name}");
    assert!(database_exists(&server, &name).await);

    let mut conn = connect(db.url()).await;
    let current: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(current, name);
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(db.info().version, version);
    assert!(db.info().short_version().starts_with("PostgreSQL "));
    assert_eq!(db.info().database, name);
    if let Some(secret) = &secret {
        assert!(!db.info().server.contains(secret.as_str()));
        assert!(db.info().server.contains(":***@"), "{}", db.info().server);
    }

    // A second one has a name of its own.
    let other = create_on(&server).await;
    assert_ne!(other.name(), name);
    other.drop_database().await.unwrap();

    // Dropped with a connection still open to it.
    db.drop_database().await.unwrap();
    assert!(!database_exists(&server, &name).await);
    assert!(
        sqlx::query("SELECT 1").execute(&mut conn).await.is_err(),
        "the open connection was ended"
    );
}

#[tokio::test]
async fn a_bench_database_never_dropped_by_hand_goes_with_its_value() {
    let server = server_url();
    let db = create_on(&server).await;
    let name = db.name().to_owned();
    let _open = connect(db.url()).await;
    drop(db);
    assert!(!database_exists(&server, &name).await);
}

/// Runs the benchmark binary with these arguments, in `tmp` as its
/// temporary folder.
fn bench_command(args: &[&str], tmp: &Path, mark: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runledger"));
    command
        .arg("bench")
        .args(args)
        .env("TMPDIR", tmp)
        .env("RUNLEDGER_BENCH_TEST_MARK", mark)
        .env_remove("RUNLEDGER_DATABASE")
        .env_remove("RUNLEDGER_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A small run: every measurement, briefly.
const SMALL: &[&str] = &[
    "--concurrency",
    "2",
    "--duration",
    "200ms",
    "--subscribers",
    "4",
    "--rounds",
    "2",
    "--catch-up",
    "50",
    "--delivery-changes",
    "5",
    "--delivery-subscribers",
    "2",
    "--json",
];

/// The processes (other than exited ones) that carry `mark` in their
/// environment: the benchmark and the servers it started.
fn processes_marked(mark: &str) -> Vec<(u32, String)> {
    let needle = format!("RUNLEDGER_BENCH_TEST_MARK={mark}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // A zombie has exited; it only waits to be reaped.
        if stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            continue;
        }
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The name of the database the benchmark said it made.
fn database_named(stderr: &str) -> Option<String> {
    let rest = stderr.split("database runledger_bench_").nth(1)?;
    let suffix: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    Some(format!("runledger_bench_{suffix}"))
}

/// What a server of a build without the PostgreSQL backend says.
const NO_POSTGRES: &str = "PostgreSQL is not available in this build yet";

#[tokio::test]
async fn the_benchmark_on_sqlite_reports_one_server_its_memory_and_local_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = uuid::Uuid::now_v7().to_string();
    let out = bench_command(SMALL, tmp.path(), &mark)
        .output()
        .expect("the binary runs");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let machine = &report["machine"];
    assert_eq!(machine["backend"], "SQLite");
    assert_eq!(machine["replicas"], 1);
    assert!(
        machine["sqlite"]
            .as_str()
            .unwrap()
            .starts_with("WAL, synchronous=NORMAL")
    );
    assert!(machine["sqlite_version"].as_str().unwrap().starts_with('3'));
    assert!(machine.get("postgres").is_none());
    let load = report["load"].as_array().unwrap();
    let operations: Vec<&str> = load
        .iter()
        .map(|l| l["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        operations,
        [
            "grpc.health.v1.Health/Check",
            "CreateExecution",
            "CreateTaskRun",
            "SetTaskRunState RUNNING+COMPLETED"
        ]
    );
    for l in load {
        assert!(l["requests"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["errors"], 0, "{l}");
    }
    let fanout = &report["fanout"][0];
    assert_eq!(fanout["subscribers"], 4);
    assert_eq!(fanout["per_replica"][0]["streams"], 4);
    assert_eq!(report["catch_up"]["events"], 50);
    let delivery = &report["delivery"];
    assert_eq!(delivery["changes"], 5);
    assert_eq!(delivery["writer_replica"], 0);
    let per_replica = delivery["per_replica"].as_array().unwrap();
    assert_eq!(per_replica.len(), 1);
    assert_eq!(per_replica[0]["local"], true);
    assert_eq!(per_replica[0]["subscribers"], 2);
    assert!(
        per_replica[0]["max_ms"].as_f64().unwrap() >= per_replica[0]["p50_ms"].as_f64().unwrap()
    );
    assert!(delivery["other_replicas"].is_null());
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1);
    assert!(servers[0]["rss_at_start_bytes"].as_u64().unwrap() > 0);
    assert!(servers[0]["rss_at_end_bytes"].as_u64().unwrap() > 0);

    // Its SQLite folder is gone and its server stopped.
    assert!(is_empty(tmp.path()), "left behind in {:?}", tmp.path());
    assert_eq!(processes_marked(&mark), []);
}

#[test]
fn replicas_without_postgres_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = uuid::Uuid::now_v7().to_string();
    let out = bench_command(&["--replicas", "2"], tmp.path(), &mark)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--replicas 2 needs PostgreSQL (--database postgres://"),
        "{stderr}"
    );
    assert!(is_empty(tmp.path()));
}

#[tokio::test]
async fn the_benchmark_on_postgres_reports_its_replicas_and_drops_its_database() {
    let (server, secret) = server_with_password();
    // Fails here, with what to do, when no server answers.
    drop(connect(&server).await);
    let tmp = tempfile::tempdir().unwrap();
    let mark = uuid::Uuid::now_v7().to_string();
    let mut args = vec!["--database", &server, "--replicas", "2"];
    args.extend_from_slice(SMALL);
    let out = bench_command(&args, tmp.path(), &mark).output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if let Some(secret) = &secret {
        assert!(!stdout.contains(secret.as_str()), "{stdout}");
        assert!(!stderr.contains(secret.as_str()), "{stderr}");
    }
    let name = database_named(&stderr).unwrap_or_else(|| panic!("no database named: {stderr}"));
    assert!(
        !database_exists(&server, &name).await,
        "{name} is left behind"
    );
    assert_eq!(processes_marked(&mark), []);
    assert!(is_empty(tmp.path()));

    if stderr.contains(NO_POSTGRES) {
        // A build without the backend: the first server says so, and the
        // database is dropped all the same.
        assert!(!out.status.success());
        assert!(
            stderr.contains("server 0 exited before listening"),
            "{stderr}"
        );
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let machine = &report["machine"];
    assert_eq!(machine["backend"], "PostgreSQL");
    assert_eq!(machine["replicas"], 2);
    assert!(machine.get("sqlite").is_none());
    let postgres = &machine["postgres"];
    assert!(
        postgres["version"]
            .as_str()
            .unwrap()
            .starts_with("PostgreSQL ")
    );
    assert_eq!(postgres["database"], name.as_str());
    assert!(!postgres["synchronous_commit"].as_str().unwrap().is_empty());
    for l in report["load"].as_array().unwrap() {
        assert!(l["requests"].as_u64().unwrap() > 0, "{l}");
    }
    let fanout = &report["fanout"][0]["per_replica"];
    assert_eq!(fanout.as_array().unwrap().len(), 2);
    let delivery = &report["delivery"];
    let per_replica = delivery["per_replica"].as_array().unwrap();
    assert_eq!(per_replica.len(), 2);
    assert_eq!(per_replica[0]["local"], true);
    assert_eq!(per_replica[1]["local"], false);
    assert_eq!(delivery["other_replicas"]["subscribers"], 2);
    assert_eq!(report["servers"].as_array().unwrap().len(), 2);
}

/// Starts the benchmark, waits for `servers` of its servers to run,
/// interrupts it as Ctrl-C would (the benchmark alone), and returns how it
/// ended; `None` when it ended by itself first.
fn interrupt_when_serving(args: &[&str], servers: usize, tmp: &Path, mark: &str) -> (Output, bool) {
    let child = bench_command(args, tmp, mark).spawn().unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut interrupted = false;
    while Instant::now() < deadline {
        let serving = processes_marked(mark)
            .iter()
            .filter(|(p, cmd)| *p != pid && cmd.contains(" serve "))
            .count();
        let alive = processes_marked(mark).iter().any(|(p, _)| *p == pid);
        if !alive {
            break;
        }
        if serving >= servers {
            // Let the measurement begin.
            std::thread::sleep(Duration::from_millis(500));
            let sent = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            interrupted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), interrupted)
}

const LONG: &[&str] = &[
    "--concurrency",
    "4",
    "--duration",
    "60s",
    "--subscribers",
    "0",
    "--catch-up",
    "0",
    "--delivery-changes",
    "0",
];

#[test]
fn an_interrupted_benchmark_stops_its_server_and_removes_its_sqlite_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mark = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    let (out, interrupted) = interrupt_when_serving(LONG, 1, tmp.path(), &mark);
    let stderr = text(&out.stderr);
    assert!(interrupted, "the benchmark ended by itself: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it stopped early"
    );
    assert_eq!(processes_marked(&mark), []);
    assert!(is_empty(tmp.path()), "left behind in {:?}", tmp.path());
}

#[tokio::test]
async fn an_interrupted_benchmark_on_postgres_drops_its_database() {
    let server = server_url();
    drop(connect(&server).await);
    let tmp = tempfile::tempdir().unwrap();
    let mark = uuid::Uuid::now_v7().to_string();
    let mut args = vec!["--database", &server, "--replicas", "2"];
    args.extend_from_slice(LONG);
    let (out, interrupted) = interrupt_when_serving(&args, 2, tmp.path(), &mark);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    let name = database_named(&stderr).unwrap_or_else(|| panic!("no database named: {stderr}"));
    assert!(
        !database_exists(&server, &name).await,
        "{name} is left behind"
    );
    assert_eq!(processes_marked(&mark), []);
    if !interrupted {
        // A build without the backend ends by itself, at the first server.
        assert!(stderr.contains(NO_POSTGRES), "{stderr}");
        return;
    }
    assert!(stderr.contains("interrupted"), "{stderr}");
}
