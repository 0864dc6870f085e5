//! Starting the service as a process on a PostgreSQL database it cannot
//! use: one error line that names the server (its password hidden) and
//! the cause, and no password anywhere in what the process prints.

use crate::{
    pg_ledger::with_user,
    postgres::{server_url, with_database},
    startup::{refused, serve_to_exit},
};

const PASSWORD: &str = "hunter2";

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Serves on `url` until the process exits; checks the one error line for
/// `names` and `cause`, and that the password is nowhere in its output.
async fn refused_start(url: String, names: &str, cause: &str) -> String {
    let out = tokio::task::spawn_blocking(move || serve_to_exit(url, |_| {}))
        .await
        .unwrap();
    let line = refused(&out, names, cause);
    let printed = [&out.stdout[..], &out.stderr[..]].concat();
    assert!(
        !String::from_utf8_lossy(&printed).contains(PASSWORD),
        "the password is shown:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    line
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_named_without_the_password() {
    let port = closed_port();
    refused_start(
        format!("postgres://ledger:{PASSWORD}@127.0.0.1:{port}/ledger"),
        &format!("postgres://ledger:***@127.0.0.1:{port}/ledger"),
        "the PostgreSQL server does not answer",
    )
    .await;
    // A password given as a parameter is hidden too.
    refused_start(
        format!("postgres://ledger@127.0.0.1:{port}/ledger?password={PASSWORD}"),
        &format!("postgres://ledger@127.0.0.1:{port}/ledger?password=***"),
        "the PostgreSQL server does not answer",
    )
    .await;
}

#[tokio::test]
async fn a_login_the_server_refuses_is_named_without_the_password() {
    let url = with_user(&server_url(), &format!("runledger_no_such_role:{PASSWORD}"));
    let shown = runledger::database_url::redacted(&url);
    assert!(!shown.contains(PASSWORD));
    refused_start(url, &shown, "the PostgreSQL server refused the login").await;
}

#[tokio::test]
async fn a_database_that_does_not_exist_is_named() {
    let url = with_database(&server_url(), "runledger_no_such_database");
    let shown = runledger::database_url::redacted(&url);
    let line = refused_start(
        url,
        &shown,
        "the database does not exist on the PostgreSQL server",
    )
    .await;
    assert!(line.contains("create it first"), "{line}");
}
