//! Every hot query is answered through an index, never a full scan: shown
//! by SQLite's own query plans on a migrated database.

use sqlx::{Connection, Row, SqliteConnection, sqlite::SqliteConnectOptions};

use super::{
    ExecutionFilter, Page, TaskRunFilter, list_executions_query, list_task_runs_query, sql,
};
use crate::domain::{ExecutionId, StateType};

async fn plan(conn: &mut SqliteConnection, query: &str) -> Vec<String> {
    // The queries are the store's own constant SQL.
    sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")))
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect()
}

#[tokio::test]
async fn hot_queries_use_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("plans.db"))
        .create_if_missing(true);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::migrate!("./migrations/sqlite")
        .run(&mut conn)
        .await
        .unwrap();

    let page = Page::new(50, "").unwrap();
    let next = Page {
        size: 50,
        after: Some(super::Cursor {
            created_at: 1,
            id: ExecutionId::new().to_string(),
        }),
    };
    let filtered = ExecutionFilter {
        state_types: vec![StateType::Running],
        metadata: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    let by_execution = TaskRunFilter {
        execution_id: Some(ExecutionId::new()),
        ..Default::default()
    };
    let lists = [
        (
            "list executions",
            list_executions_query("t", &ExecutionFilter::default(), &page)
                .sql()
                .as_str()
                .to_owned(),
        ),
        (
            "list executions, next page",
            list_executions_query("t", &ExecutionFilter::default(), &next)
                .sql()
                .as_str()
                .to_owned(),
        ),
        (
            "list executions, filtered",
            list_executions_query("t", &filtered, &page)
                .sql()
                .as_str()
                .to_owned(),
        ),
        (
            "list task runs",
            list_task_runs_query("t", &TaskRunFilter::default(), &page)
                .sql()
                .as_str()
                .to_owned(),
        ),
        (
            "list task runs of an execution",
            list_task_runs_query("t", &by_execution, &next)
                .sql()
                .as_str()
                .to_owned(),
        ),
    ];
    let named = [
        ("execution by id", sql::EXECUTION_BY_ID),
        ("task run by id", sql::TASK_RUN_BY_ID),
        ("state history", sql::STATES_OF_RUN),
        ("task runs of an execution", sql::TASK_RUNS_OF_EXECUTION),
        ("events of a tenant", sql::EVENTS_OF_TENANT),
        ("events of an execution", sql::EVENTS_OF_EXECUTION),
        (
            "events of an execution alone",
            sql::EVENTS_OF_EXECUTION_ONLY,
        ),
        ("events of a task run", sql::EVENTS_OF_TASK_RUN),
        ("execution by request_id", sql::EXECUTION_BY_REQUEST_ID),
        ("task run by key", sql::TASK_RUN_BY_KEY),
        (
            "latest completed run of a key",
            sql::LATEST_COMPLETED_OF_KEY,
        ),
        ("runs of a key exist", sql::RUNS_OF_KEY_EXIST),
        (
            "timed-out paused executions",
            sql::EXPIRED_PAUSED_EXECUTIONS,
        ),
        ("timed-out paused task runs", sql::EXPIRED_PAUSED_TASK_RUNS),
        ("cache entry", sql::CACHE_ENTRY),
        ("retention cutoff", sql::FIRST_EVENT_KEPT),
        ("expired cache entries", sql::EXPIRED_CACHE_ENTRIES),
        (
            "finished runs whose last event goes",
            sql::CLOSED_RUNS_IN_RANGE,
        ),
        ("history of finished runs", sql::PRUNE_CLOSED_STATES),
        (
            "transitions of finished runs",
            sql::PRUNE_CLOSED_TRANSITIONS,
        ),
    ];
    sqlx::query(sql::CREATE_CLOSED_RUNS)
        .execute(&mut conn)
        .await
        .unwrap();
    let all = named.iter().map(|(n, q)| (*n, q.to_string())).chain(lists);
    for (name, query) in all {
        let steps = plan(&mut conn, &query).await;
        println!("{name}:\n    {}", steps.join("\n    "));
        for step in &steps {
            // json_each walks one row's metadata, not a table; a SELECT
            // of subqueries alone has one constant row.
            let full_scan = step.starts_with("SCAN ")
                && !step.contains(" USING ")
                && !step.contains("json_each")
                && step != "SCAN CONSTANT ROW";
            // The retention cutoff walks the log from its oldest event on
            // purpose: it stops at the first one to keep.
            let allowed = name == "retention cutoff" && step == "SCAN events";
            assert!(!full_scan || allowed, "{name} scans a table: {step}");
        }
    }
}
