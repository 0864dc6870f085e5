//! Starting the service as a process: one server per database file, and
//! errors that name the file and the cause on one line.

use std::{
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::*;

/// Runs the binary with `args` until it exits (at most 30 s).
fn run_to_exit(args: &[&str], db: &Path, adjust: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runledger"));
    command
        .args(args)
        .arg("--database")
        .arg(db)
        .env("RUST_LOG", "info")
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

fn serve_to_exit(db: &Path, adjust: impl FnOnce(&mut Command)) -> Output {
    run_to_exit(&["serve", "--listen", "127.0.0.1:0"], db, adjust)
}

/// The one error line a failed start prints, checked for the file and the
/// cause.
fn refused(out: &Output, db: &Path, cause: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    let line = errors[0];
    assert!(
        line.contains(&db.display().to_string()),
        "names the file: {line}"
    );
    assert!(line.contains(cause), "says {cause:?}: {line}");
    assert!(!line.to_lowercase().contains("internal"), "{line}");
    assert!(!stderr.contains("Caused by"), "{stderr}");
    line.to_owned()
}

#[tokio::test]
async fn a_second_server_on_a_database_in_use_through_a_link_exits_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let first = Process::start(&db);
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();

    let second = tokio::task::spawn_blocking({
        let link = link.clone();
        move || serve_to_exit(&link, |_| {})
    })
    .await
    .unwrap();
    refused(&second, &link, "another runledger server is using it");
    first.kill();
}

#[tokio::test]
async fn a_second_server_on_a_database_in_use_exits_naming_it_and_keys_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let first = Process::start(&db);

    let second = tokio::task::spawn_blocking({
        let db = db.clone();
        move || serve_to_exit(&db, |_| {})
    })
    .await
    .unwrap();
    refused(&second, &db, "another runledger server is using it");

    // The first serves on, unharmed.
    let mut execs = ExecutionServiceClient::new(connect(first.addr).await);
    execs
        .create_execution(goal("after the second tried"))
        .await
        .expect("the first server still writes");

    // Key commands share the database with the running server.
    let keys = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            run_to_exit(
                &["keys", "create", "--tenant", "t", "--name", "n"],
                &db,
                |_| {},
            )
        }
    })
    .await
    .unwrap();
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );

    let status = tokio::task::spawn_blocking(move || first.terminate(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Once the first has stopped, the file is free again.
    let again = Process::start(&db);
    again.kill();
}

#[test]
fn a_missing_folder_is_named_as_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("no-such-folder").join("runledger.db");
    let out = serve_to_exit(&db, |_| {});
    let folder = dir.path().join("no-such-folder");
    refused(
        &out,
        &db,
        &format!("the folder {} does not exist", folder.display()),
    );
}

#[test]
fn a_file_that_is_not_a_database_is_named_as_such_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let text = "these are notes, not a database\n".repeat(200);
    std::fs::write(&db, &text).unwrap();
    let out = serve_to_exit(&db, |_| {});
    refused(&out, &db, "not a SQLite database");
    assert_eq!(std::fs::read_to_string(&db).unwrap(), text, "unchanged");
}

#[test]
fn a_database_the_user_may_not_open_is_refused_with_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("owner");
    std::fs::write(&probe, "").unwrap();
    // Root may open anything: as root the server runs as `nobody`, and the
    // temporary folder is private to its owner; otherwise the folder is
    // made read-only.
    let (db, out) = if std::fs::metadata(&probe).unwrap().uid() == 0 {
        let db = db_path(dir.path());
        let out = serve_to_exit(&db, |c| {
            c.uid(65534).gid(65534);
        });
        (db, out)
    } else {
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let db = locked.join("runledger.db");
        let out = serve_to_exit(&db, |_| {});
        (db, out)
    };
    refused(&out, &db, "permission denied");
}

#[test]
fn a_port_in_use_is_reported_before_the_database_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_to_exit(&["serve", "--listen", &addr], &db, |_| {});
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("Caused by"), "{stderr}");
    assert!(!db.exists(), "the database was not created");
}
