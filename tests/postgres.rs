//! The checks of the PostgreSQL schema and of the test databases
//! (`test_database`) the PostgreSQL tests run on.

use sqlx::PgConnection;

pub use crate::test_database::*;

/// Whether a database of this name is on `server`.
async fn database_exists(server: &str, name: &str) -> bool {
    let mut conn = connect(server).await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The tables of the public schema (the migrations' own bookkeeping
/// aside) whose primary key does not start with tenant_id, or that have
/// none.
async fn tables_not_keyed_by_tenant(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'p' \
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.conkey[1] \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') \
           AND c.relname <> '_sqlx_migrations' \
           AND a.attname IS DISTINCT FROM 'tenant_id' \
         ORDER BY c.relname",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// The tables, columns, constraints and indexes of the public schema, and
/// the migrations recorded as applied.
async fn schema_fingerprint(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable \
             FROM information_schema.columns WHERE table_schema = 'public' \
         UNION ALL SELECT conrelid::regclass::text || ' ' || pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
         UNION ALL SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' \
         UNION ALL SELECT version || ' ' || installed_on::text || ' ' || encode(checksum, 'hex') \
             FROM _sqlx_migrations \
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_migrations_apply_to_a_fresh_database_and_a_second_run_changes_nothing() {
    let db = TestDatabase::create().await;
    let mut conn = db.connect().await;
    MIGRATOR.run(&mut conn).await.expect("the migrations apply");

    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let expected: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    assert!(!expected.is_empty());
    assert_eq!(applied, expected);
    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
         AND tablename <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    tables.sort();
    assert_eq!(
        tables,
        [
            "api_keys",
            "cache_entries",
            "events",
            "executions",
            "key_buckets",
            "key_usage",
            "states",
            "task_runs",
            "tenant_heads",
            "transitions"
        ]
    );

    let before = schema_fingerprint(&mut conn).await;
    MIGRATOR
        .run(&mut conn)
        .await
        .expect("a second run succeeds");
    assert_eq!(schema_fingerprint(&mut conn).await, before);
}

#[tokio::test]
async fn every_primary_key_starts_with_tenant_id() {
    let db = TestDatabase::migrated().await;
    let mut conn = db.connect().await;
    assert_eq!(
        tables_not_keyed_by_tenant(&mut conn).await,
        Vec::<String>::new()
    );

    // The check sees tables keyed otherwise, or not at all.
    sqlx::raw_sql(
        "CREATE TABLE keyed_by_id (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL); \
         CREATE TABLE keyed_by_id_then_tenant (id TEXT, tenant_id TEXT, PRIMARY KEY (id, tenant_id)); \
         CREATE TABLE unkeyed (tenant_id TEXT NOT NULL)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        tables_not_keyed_by_tenant(&mut conn).await,
        ["keyed_by_id", "keyed_by_id_then_tenant", "unkeyed"]
    );
}

/// Drops `db` while a connection to it is still open, and checks that
/// the database is gone.
async fn dropping_removes_the_database() {
    let db = TestDatabase::create().await;
    let (server, name) = (db.server().to_owned(), db.name().to_owned());
    assert!(database_exists(&server, &name).await);
    let mut open = db.connect().await;
    sqlx::query("CREATE TABLE t (tenant_id TEXT PRIMARY KEY)")
        .execute(&mut open)
        .await
        .unwrap();
    drop(db);
    assert!(!database_exists(&server, &name).await);
    assert!(
        sqlx::query("SELECT 1").execute(&mut open).await.is_err(),
        "the open connection was ended"
    );
}

#[tokio::test]
async fn a_test_database_is_gone_once_dropped_on_a_current_thread_runtime() {
    dropping_removes_the_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_database_is_gone_once_dropped_on_a_multi_thread_runtime() {
    dropping_removes_the_database().await;
}

#[tokio::test]
async fn a_test_database_has_a_url_of_its_own() {
    let first = TestDatabase::create().await;
    let second = TestDatabase::create().await;
    assert_ne!(first.name(), second.name());
    let mut conn = first.connect().await;
    let current: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(current, first.name());
    assert!(first.url().ends_with(&format!("/{}", first.name())));
}

#[test]
fn a_server_url_with_another_database() {
    for (server, url) in [
        (
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgres://postgres@127.0.0.1:5432/t1",
        ),
        ("postgres://postgres@db", "postgres://postgres@db/t1"),
        (
            "postgresql://u:p@db:5433/x?sslmode=disable",
            "postgresql://u:p@db:5433/t1?sslmode=disable",
        ),
        (
            "postgres://db?sslmode=disable",
            "postgres://db/t1?sslmode=disable",
        ),
    ] {
        assert_eq!(with_database(server, "t1"), url);
    }
}

#[test]
fn the_unreachable_server_message_says_what_to_do() {
    let message = unreachable_message(
        "postgres://ledger:hunter2@db.internal:5432/postgres",
        "Connection refused (os error 111)",
    );
    assert!(
        message.contains("postgres://ledger:***@db.internal:5432/postgres"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
    assert!(
        message.contains("Connection refused (os error 111)"),
        "{message}"
    );
    assert!(message.contains("start PostgreSQL"), "{message}");
    assert!(message.contains("set RUNLEDGER_TEST_POSTGRES"), "{message}");
}

/// The URL of a PostgreSQL server on a local port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("postgres://postgres:hunter2@127.0.0.1:{port}/postgres")
}

#[tokio::test]
async fn a_server_that_does_not_answer_fails_with_that_message() {
    let url = closed_port_url();
    let message = TestDatabase::try_on(&url).await.unwrap_err();
    let expected_start = unreachable_message(&url, "");
    let expected_start = &expected_start[..expected_start.find(" (").unwrap()];
    assert!(message.starts_with(expected_start), "{message}");
    assert!(message.contains("set RUNLEDGER_TEST_POSTGRES"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
#[should_panic(expected = "start PostgreSQL there, or set RUNLEDGER_TEST_POSTGRES")]
async fn a_test_without_a_server_fails() {
    TestDatabase::on(&closed_port_url()).await;
}

#[tokio::test]
async fn documents_are_kept_as_the_json_text_they_were_written_as() {
    let db = TestDatabase::migrated().await;
    let mut conn = db.connect().await;
    // JSON text with a NUL escape, which JSONB refuses.
    let doc = r#"{"metadata":{"team":"ledger","note":"a\u0000b"},"run":{"output":{"n":1}}}"#;
    sqlx::query(
        "INSERT INTO executions (tenant_id, id, created_at, state_type, last_seq, doc) \
         VALUES ('acme', $1, 1, 4, 1, $2)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(doc)
    .execute(&mut conn)
    .await
    .unwrap();
    let stored: String = sqlx::query_scalar("SELECT doc FROM executions WHERE tenant_id = 'acme'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, doc);

    let other = r#"{"metadata":{"team":"ledger"},"run":{"output":{"n":2}}}"#;
    sqlx::query(
        "INSERT INTO executions (tenant_id, id, created_at, state_type, last_seq, doc) \
         VALUES ('acme', $1, 2, 4, 2, $2)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(other)
    .execute(&mut conn)
    .await
    .unwrap();
    let output: String = sqlx::query_scalar(
        "SELECT (doc::json -> 'run' -> 'output')::text FROM executions \
         WHERE tenant_id = 'acme' AND last_seq = 2 AND doc::json -> 'metadata' ->> 'team' = $1",
    )
    .bind("ledger")
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(output, r#"{"n":2}"#);
}

#[tokio::test]
async fn each_tenant_numbers_its_own_events() {
    let db = TestDatabase::migrated().await;
    let mut conn = db.connect().await;
    for tenant in ["acme", "globex"] {
        let head: i64 = sqlx::query_scalar(
            "INSERT INTO tenant_heads (tenant_id) VALUES ($1) \
             ON CONFLICT (tenant_id) DO NOTHING RETURNING head",
        )
        .bind(tenant)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(head, 0);
        let seq: i64 = sqlx::query_scalar(
            "UPDATE tenant_heads SET head = head + 1 WHERE tenant_id = $1 RETURNING head",
        )
        .bind(tenant)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(seq, 1);
        sqlx::query(
            "INSERT INTO events (tenant_id, seq, execution_id, occurred_at, format, payload) \
             VALUES ($1, $2, 'e', 0, 1, $3)",
        )
        .bind(tenant)
        .bind(seq)
        .bind(b"\x08\x01".as_slice())
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let repeated = sqlx::query(
        "INSERT INTO events (tenant_id, seq, execution_id, occurred_at, format, payload) \
         VALUES ('acme', 1, 'e', 0, 1, '\\x00')",
    )
    .execute(&mut conn)
    .await
    .unwrap_err();
    assert!(
        repeated
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation()),
        "{repeated}"
    );
    let compacted_past_head =
        sqlx::query("UPDATE tenant_heads SET compacted = 2 WHERE tenant_id = 'acme'")
            .execute(&mut conn)
            .await;
    assert!(compacted_past_head.is_err());
}

#[tokio::test]
async fn a_runs_history_reads_back_in_the_order_written() {
    let db = TestDatabase::migrated().await;
    let mut conn = db.connect().await;
    for (run, state) in [("r1", "a"), ("r2", "x"), ("r1", "b"), ("r1", "c")] {
        sqlx::query(
            "INSERT INTO states (tenant_id, run_id, id, doc) VALUES ('acme', $1, $2, '{}')",
        )
        .bind(run)
        .bind(state)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM states WHERE tenant_id = 'acme' AND run_id = 'r1' ORDER BY pos",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(history, ["a", "b", "c"]);
}
