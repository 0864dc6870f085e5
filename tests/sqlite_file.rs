//! A SQLite database is a file: one server per file, and a file that
//! cannot be opened is named, with the cause, on one error line.

use std::os::unix::{fs::MetadataExt, process::CommandExt};
use std::time::Duration;

use crate::{
    helpers::*,
    startup::{refused, run_to_exit, serve_to_exit},
};

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
    refused(
        &second,
        &link.display().to_string(),
        "another runledger server is using it",
    );
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
    refused(
        &second,
        &db.display().to_string(),
        "another runledger server is using it",
    );

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
        &db.display().to_string(),
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
    refused(&out, &db.display().to_string(), "not a SQLite database");
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
    refused(&out, &db.display().to_string(), "permission denied");
}
