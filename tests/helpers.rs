//! One way to start the service for a test: in-process on 127.0.0.1:0
//! on a fresh database of the test binary's backend (`crate::BACKEND`: a
//! SQLite file, or a PostgreSQL database of its own), or as a real process
//! for crash tests.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use runledger::{App, Config, grpc::pb};
use sqlx::{
    Connection, FromRow, PgConnection, SqliteConnection,
    postgres::PgRow,
    sqlite::{SqliteConnectOptions, SqliteRow},
};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::test_database::TestDatabase;

pub use pb::{
    event_service_client::EventServiceClient, execution_service_client::ExecutionServiceClient,
    task_run_service_client::TaskRunServiceClient,
};

/// The storage backend a test binary runs its servers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's temporary folder.
    Sqlite,
    /// A fresh PostgreSQL database (`test_database::TestDatabase`).
    Postgres,
}

/// Where a test's server keeps its data: a temporary folder, holding the
/// SQLite file unless a PostgreSQL database is given. Handing it to
/// `spawn_in` again (a restart) reaches the same data.
#[derive(Debug)]
pub struct Storage {
    pub dir: TempDir,
    pub pg: Option<Arc<TestDatabase>>,
}

impl Storage {
    /// Fresh storage on the test binary's backend.
    pub async fn fresh() -> Storage {
        let dir = tempfile::tempdir().expect("a temp dir");
        match crate::BACKEND {
            Backend::Sqlite => Storage { dir, pg: None },
            Backend::Postgres => Storage {
                dir,
                pg: Some(Arc::new(TestDatabase::create().await)),
            },
        }
    }

    /// The temporary folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database's URL (`sqlite://` and the file, or the PostgreSQL
    /// URL), for opening it beside the server.
    pub fn url(&self) -> String {
        match &self.pg {
            Some(db) => db.url().to_owned(),
            None => format!("sqlite://{}", db_path(self.dir.path()).display()),
        }
    }

    /// What `--database` names: the PostgreSQL URL, or the SQLite file.
    pub fn database(&self) -> String {
        match &self.pg {
            Some(db) => db.url().to_owned(),
            None => db_path(self.dir.path()).display().to_string(),
        }
    }

    /// A connection beside the server, for reading what it stored (the
    /// SQLite file is opened read-only).
    pub async fn open(&self) -> StoredData {
        match &self.pg {
            Some(db) => StoredData::Postgres(db.connect().await),
            None => {
                let options = SqliteConnectOptions::new()
                    .filename(db_path(self.dir.path()))
                    .read_only(true);
                StoredData::Sqlite(
                    SqliteConnection::connect_with(&options)
                        .await
                        .expect("the SQLite file opens"),
                )
            }
        }
    }

    /// Whether no server has set the database up yet: no SQLite file, or
    /// no table in the PostgreSQL database.
    pub async fn untouched(&self) -> bool {
        match &self.pg {
            Some(db) => {
                let mut conn = db.connect().await;
                let tables: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
                conn.close().await.ok();
                tables == 0
            }
            None => !db_path(self.dir.path()).exists(),
        }
    }
}

/// A connection to a test's database on either backend. Queries name
/// their parameters `$1`, `$2`, ..., which both backends read.
#[derive(Debug)]
pub enum StoredData {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl StoredData {
    /// The rows `sql` selects, with `binds` as its parameters in turn.
    pub async fn fetch_all<T>(&mut self, sql: &'static str, binds: &[&str]) -> Vec<T>
    where
        T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let rows = match self {
            StoredData::Sqlite(conn) => {
                let mut query = sqlx::query_as::<_, T>(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_all(conn).await
            }
            StoredData::Postgres(conn) => {
                let mut query = sqlx::query_as::<_, T>(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_all(conn).await
            }
        };
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The one row `sql` selects.
    pub async fn fetch_one<T>(&mut self, sql: &'static str, binds: &[&str]) -> T
    where
        T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut rows = self.fetch_all(sql, binds).await;
        assert_eq!(rows.len(), 1, "{sql}: one row");
        rows.pop().unwrap()
    }

    /// The number `sql` (a `SELECT COUNT(*) ...`) selects.
    pub async fn count(&mut self, sql: &'static str, binds: &[&str]) -> i64 {
        self.fetch_one::<(i64,)>(sql, binds).await.0
    }

    pub async fn close(self) {
        match self {
            StoredData::Sqlite(conn) => conn.close().await.unwrap(),
            StoredData::Postgres(conn) => conn.close().await.unwrap(),
        }
    }
}

/// A SQLite file in this folder.
impl From<TempDir> for Storage {
    fn from(dir: TempDir) -> Self {
        Storage { dir, pg: None }
    }
}

#[derive(Debug)]
pub struct TestApp {
    pub addr: SocketAddr,
    pub executions: ExecutionServiceClient<Channel>,
    pub task_runs: TaskRunServiceClient<Channel>,
    pub events: EventServiceClient<Channel>,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<Result<(), runledger::StartError>>,
    pub storage: Storage,
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("runledger.db")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_in(Storage::fresh().await, adjust).await
}

/// Starts a server on `storage` (a restart when it holds data); a bare
/// `TempDir` is a SQLite file in it.
pub async fn spawn_in(storage: impl Into<Storage>, adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_in_hooked(storage, adjust, |_| ()).await.0
}

/// Starts a server on fresh storage, handing back beside it what `hook`
/// takes from the built app (its store, its writer's counts).
pub async fn spawn_app_hooked<T>(hook: impl FnOnce(&App) -> T) -> (TestApp, T) {
    spawn_in_hooked(Storage::fresh().await, |_| {}, hook).await
}

/// `spawn_in`, handing back what `hook` takes from the built app.
pub async fn spawn_in_hooked<T>(
    storage: impl Into<Storage>,
    adjust: impl FnOnce(&mut Config),
    hook: impl FnOnce(&App) -> T,
) -> (TestApp, T) {
    let storage = storage.into();
    let mut config =
        Config::new("127.0.0.1:0".parse().unwrap(), storage.database()).expect("default config");
    adjust(&mut config);
    let app = App::build(config).await.expect("the app builds");
    let hooked = hook(&app);
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let channel = connect(addr).await;
    let app = TestApp {
        addr,
        executions: ExecutionServiceClient::new(channel.clone()),
        task_runs: TaskRunServiceClient::new(channel.clone()),
        events: EventServiceClient::new(channel),
        shutdown,
        server,
        storage,
    };
    (app, hooked)
}

/// A server on a PostgreSQL database of its own (see
/// `postgres::TestDatabase`), dropped once the last server on it is.
#[derive(Debug)]
pub struct PgTestApp {
    pub app: TestApp,
    pub db: Arc<TestDatabase>,
}

impl std::ops::Deref for PgTestApp {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

impl PgTestApp {
    /// Shuts down gracefully; hands back the database.
    pub async fn stop(self) -> Arc<TestDatabase> {
        self.app.stop().await;
        self.db
    }
}

/// Starts a server on a fresh PostgreSQL database.
pub async fn spawn_app_on_postgres(adjust: impl FnOnce(&mut Config)) -> PgTestApp {
    spawn_on_database(Arc::new(TestDatabase::create().await), adjust).await
}

/// Starts a server on `db` (another replica, or a restart).
pub async fn spawn_on_database(
    db: Arc<TestDatabase>,
    adjust: impl FnOnce(&mut Config),
) -> PgTestApp {
    let storage = Storage {
        dir: tempfile::tempdir().expect("a temp dir"),
        pg: Some(db.clone()),
    };
    let app = spawn_in(storage, adjust).await;
    PgTestApp { app, db }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects to the server")
}

impl TestApp {
    /// Shuts down gracefully and hands back its storage, for a restart.
    pub async fn stop(self) -> Storage {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the server stops within 10 s")
            .expect("the server task ends")
            .expect("the server ends cleanly");
        self.storage
    }
}

/// The service as a separate process, for kill -9.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Starts on `db`: a SQLite file or a PostgreSQL URL.
    pub fn start(db: impl AsRef<OsStr>) -> Process {
        Self::start_with_env(db, &[])
    }

    /// Starts with these environment variables (its settings) added.
    pub fn start_with_env(db: impl AsRef<OsStr>, env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database"])
            .arg(db)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server logs its address")
                .expect("readable log");
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the log so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Process { child, addr }
    }

    pub fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit, for at most `limit`.
    pub fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server a test leaves running (it failed, or it is done with it) is
/// killed with it, never left behind.
impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- request builders ------------------------------------------------------

pub fn goal(goal: &str) -> pb::CreateExecutionRequest {
    pb::CreateExecutionRequest {
        goal: goal.into(),
        ..Default::default()
    }
}

pub fn state(t: pb::StateType) -> Option<pb::StateCreate> {
    Some(pb::StateCreate {
        r#type: t as i32,
        ..Default::default()
    })
}

pub async fn create_execution(app: &TestApp) -> pb::Execution {
    app.executions
        .clone()
        .create_execution(goal("test"))
        .await
        .expect("created")
        .into_inner()
        .execution
        .unwrap()
}

pub async fn set_execution_state(
    app: &TestApp,
    id: &str,
    t: pb::StateType,
) -> pb::SetExecutionStateResponse {
    app.executions
        .clone()
        .set_execution_state(pb::SetExecutionStateRequest {
            id: id.into(),
            state: state(t),
            ..Default::default()
        })
        .await
        .expect("set state answered")
        .into_inner()
}

/// Creates an execution and moves it to RUNNING, so task runs may start.
pub async fn running_execution_via(
    execs: &mut ExecutionServiceClient<Channel>,
    goal_text: &str,
) -> pb::Execution {
    let exec = execs
        .create_execution(goal(goal_text))
        .await
        .expect("created")
        .into_inner()
        .execution
        .unwrap();
    let running = execs
        .set_execution_state(pb::SetExecutionStateRequest {
            id: exec.id.clone(),
            state: state(pb::StateType::Running),
            ..Default::default()
        })
        .await
        .expect("set state answered")
        .into_inner();
    assert_eq!(running.status, pb::SetStateStatus::Accept as i32);
    running.execution.unwrap_or(exec)
}

pub async fn create_task_run(app: &TestApp, execution_id: &str, task_key: &str) -> pb::TaskRun {
    app.task_runs
        .clone()
        .create_task_run(pb::CreateTaskRunRequest {
            execution_id: execution_id.into(),
            task_key: task_key.into(),
            ..Default::default()
        })
        .await
        .expect("created")
        .into_inner()
        .task_run
        .unwrap()
}

pub async fn set_task_run_state(
    app: &TestApp,
    id: &str,
    t: pb::StateType,
) -> pb::SetTaskRunStateResponse {
    app.task_runs
        .clone()
        .set_task_run_state(pb::SetTaskRunStateRequest {
            id: id.into(),
            state: state(t),
            ..Default::default()
        })
        .await
        .expect("set state answered")
        .into_inner()
}

/// The field names of an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("a BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

pub fn state_of(e: &pb::Execution) -> pb::StateType {
    pb::StateType::try_from(e.state.as_ref().unwrap().r#type).unwrap()
}

pub fn event_seq(e: &pb::StatusEvent) -> i64 {
    e.sequence
}

pub fn event_kind(e: &pb::StatusEvent) -> pb::EventKind {
    pb::EventKind::try_from(e.kind).unwrap()
}
