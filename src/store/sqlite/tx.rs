//! The write transaction's primitives on SQLite: the writer's own
//! connection, BEGIN IMMEDIATE, multi-row statements.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::sql;
use crate::{
    Error, Result,
    domain::{Execution, ExecutionId, RunCore, StateType, TaskRun, TaskRunId, Timestamp},
    store::{
        Pruned,
        backend::{EventRow, RunRow, StateRow, TxBackend},
        rows,
    },
};

/// How many rows one multi-row statement carries, kept well under
/// SQLite's limit on bound variables.
const ROWS_PER_STATEMENT: usize = 256;

/// The writer's connection.
#[derive(Debug)]
pub(super) struct SqliteTx {
    pub(super) conn: SqliteConnection,
}

impl SqliteTx {
    pub(super) fn new(conn: SqliteConnection) -> Self {
        SqliteTx { conn }
    }
}

#[async_trait]
impl TxBackend for SqliteTx {
    async fn begin(&mut self) -> Result<()> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn rollback(&mut self) {
        if let Err(e) = sqlx::query("ROLLBACK").execute(&mut self.conn).await {
            // Nothing was open (the failure ended the transaction already).
            tracing::warn!(error = %e, "rollback");
        }
    }

    async fn close(self: Box<Self>) {
        use sqlx::Connection;
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the write connection");
        }
    }

    fn sole_writer(&self) -> bool {
        true
    }

    fn is_retryable(&self, _e: &Error) -> bool {
        // The only writer never races another.
        false
    }

    async fn execution(&mut self, tenant: &str, id: ExecutionId) -> Result<Option<Execution>> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT doc FROM executions WHERE id = ? AND tenant_id = ?")
                .bind(id.to_string())
                .bind(tenant)
                .fetch_optional(&mut self.conn)
                .await?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT doc FROM task_runs WHERE id = ? AND tenant_id = ?")
                .bind(id.to_string())
                .bind(tenant)
                .fetch_optional(&mut self.conn)
                .await?;
        doc.map(|d| rows::decode_doc(&d)).transpose()
    }

    async fn execution_by_request_id(
        &mut self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<(Execution, String)>> {
        let row: Option<(String, String, Option<String>)> =
            sqlx::query_as(sql::EXECUTION_BY_REQUEST_ID)
                .bind(tenant)
                .bind(request_id)
                .fetch_optional(&mut self.conn)
                .await?;
        row.map(|(_, doc, hash)| Ok((rows::decode_doc(&doc)?, hash.unwrap_or_default())))
            .transpose()
    }

    async fn request_hash(&mut self, _tenant: &str, id: ExecutionId) -> Result<String> {
        let hash: Option<Option<String>> =
            sqlx::query_scalar("SELECT request_hash FROM executions WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&mut self.conn)
                .await?;
        Ok(hash.flatten().unwrap_or_default())
    }

    async fn task_run_by_key(
        &mut self,
        _tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        let row: Option<(String, String)> = sqlx::query_as(sql::TASK_RUN_BY_KEY)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(dynamic_key)
            .fetch_optional(&mut self.conn)
            .await?;
        row.map(|(_, doc)| rows::decode_doc(&doc)).transpose()
    }

    async fn count_task_runs_for_key(
        &mut self,
        _tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM task_runs WHERE execution_id = ? AND task_key = ?",
        )
        .bind(execution_id.to_string())
        .bind(task_key)
        .fetch_one(&mut self.conn)
        .await?)
    }

    async fn task_runs_of(
        &mut self,
        _tenant: &str,
        execution_id: ExecutionId,
    ) -> Result<Vec<TaskRun>> {
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM task_runs WHERE execution_id = ? ORDER BY created_at, id",
        )
        .bind(execution_id.to_string())
        .fetch_all(&mut self.conn)
        .await?;
        docs.iter().map(|d| rows::decode_doc(d)).collect()
    }

    async fn latest_completed_output(
        &mut self,
        _tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<Option<(TaskRunId, Option<String>)>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(sql::LATEST_COMPLETED_OF_KEY)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(except.to_string())
            .fetch_optional(&mut self.conn)
            .await?;
        row.map(|(id, output)| {
            let id = TaskRunId::parse(&id)
                .map_err(|e| Error::Internal(format!("a stored task run id: {e}")))?;
            Ok((id, output))
        })
        .transpose()
    }

    async fn runs_of_key_exist(
        &mut self,
        _tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<(bool, bool)> {
        Ok(sqlx::query_as(sql::RUNS_OF_KEY_EXIST)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(except.to_string())
            .fetch_one(&mut self.conn)
            .await?)
    }

    async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>> {
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(sql::CACHE_ENTRY)
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut self.conn)
            .await?;
        row.map(|(output, exp)| {
            let output = output.map(|o| rows::decode_doc(&o)).transpose()?;
            Ok((output, exp.map(Timestamp::from_micros)))
        })
        .transpose()
    }

    async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO cache_entries (tenant_id, cache_key, task_run_id, output, expiration, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, cache_key) DO UPDATE SET \
             task_run_id = excluded.task_run_id, output = excluded.output, \
             expiration = excluded.expiration, created_at = excluded.created_at",
        )
        .bind(tenant)
        .bind(key)
        .bind(run.to_string())
        .bind(output.map(rows::encode_doc).transpose()?)
        .bind(expiration.map(Timestamp::as_micros))
        .bind(Timestamp::now().as_micros())
        .execute(&mut self.conn)
        .await?;
        Ok(())
    }

    async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        let executions = sqlx::query_as(sql::EXPIRED_PAUSED_EXECUTIONS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(&mut self.conn)
            .await?;
        let task_runs = sqlx::query_as(sql::EXPIRED_PAUSED_TASK_RUNS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(&mut self.conn)
            .await?;
        Ok((executions, task_runs))
    }

    async fn record_key_usage(&mut self, counts: &[(String, String, i64, i64)]) -> Result<()> {
        for (_tenant, key_id, day, requests) in counts {
            sqlx::query(
                "INSERT INTO key_usage (key_id, day, requests) VALUES (?, ?, ?) \
                 ON CONFLICT (key_id, day) DO UPDATE SET requests = requests + excluded.requests",
            )
            .bind(key_id)
            .bind(day)
            .bind(requests)
            .execute(&mut self.conn)
            .await?;
        }
        Ok(())
    }

    async fn touch_keys(&mut self, hashes: &[String], at: Timestamp) -> Result<()> {
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE api_keys SET last_used_at = ");
        q.push_bind(at.as_micros()).push(" WHERE secret_hash IN (");
        let mut list = q.separated(", ");
        for h in hashes {
            list.push_bind(h.clone());
        }
        list.push_unseparated(")");
        q.build().persistent(false).execute(&mut self.conn).await?;
        Ok(())
    }

    async fn transition(
        &mut self,
        _tenant: &str,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT result FROM transitions WHERE run_id = ? AND transition_id = ?",
        )
        .bind(run_id)
        .bind(transition_id)
        .fetch_optional(&mut self.conn)
        .await?)
    }

    async fn record_transition(
        &mut self,
        _tenant: &str,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()> {
        sqlx::query("INSERT INTO transitions (run_id, transition_id, result) VALUES (?, ?, ?)")
            .bind(run_id)
            .bind(transition_id)
            .bind(result_json)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn write_runs(
        &mut self,
        executions: &[RunRow<'_, Execution>],
        task_runs: &[RunRow<'_, TaskRun>],
    ) -> Result<Vec<String>> {
        let mut withdrawn = Vec::new();
        for chunk in executions.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO executions (id, tenant_id, created_at, task_id, state_type, request_id, \
                 request_hash, deleted_at, last_seq, doc, pause_deadline) ",
            );
            let mut failed = None;
            q.push_values(chunk, |mut b, p| {
                let e = p.run;
                let doc = rows::encode_doc(e).unwrap_or_else(|err| {
                    failed = Some(err);
                    String::new()
                });
                b.push_bind(e.id.to_string())
                    .push_bind(e.tenant_id.clone())
                    .push_bind(e.run.created_at.as_micros())
                    .push_bind(e.task_id.clone())
                    .push_bind(e.run.state.state_type.code())
                    .push_bind(e.request_id.clone())
                    .push_bind(p.request_hash.map(str::to_owned))
                    .push_bind(e.run.deleted_at.map(Timestamp::as_micros))
                    .push_bind(p.last_seq)
                    .push_bind(doc)
                    .push_bind(pause_deadline(&e.run));
            });
            if let Some(err) = failed {
                return Err(err);
            }
            q.push(
                " ON CONFLICT (id) DO UPDATE SET state_type = excluded.state_type, \
                 deleted_at = excluded.deleted_at, last_seq = excluded.last_seq, doc = excluded.doc, \
                 pause_deadline = excluded.pause_deadline ON CONFLICT DO NOTHING",
            );
            let written = q.build().persistent(false).execute(&mut self.conn).await?;
            if written.rows_affected() < chunk.len() as u64 {
                // Only a new run can meet one stored under its key.
                let ids = chunk
                    .iter()
                    .filter(|p| p.new)
                    .map(|p| p.run.id.to_string())
                    .collect();
                withdrawn.extend(not_stored(&mut self.conn, "executions", ids).await?);
            }
        }
        for chunk in task_runs.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO task_runs (id, tenant_id, execution_id, task_key, dynamic_key, created_at, \
                 state_type, stale, deleted_at, last_seq, doc, pause_deadline) ",
            );
            let mut failed = None;
            q.push_values(chunk, |mut b, p| {
                let t = p.run;
                let doc = rows::encode_doc(t).unwrap_or_else(|err| {
                    failed = Some(err);
                    String::new()
                });
                b.push_bind(t.id.to_string())
                    .push_bind(t.tenant_id.clone())
                    .push_bind(t.execution_id.to_string())
                    .push_bind(t.task_key.clone())
                    .push_bind(t.dynamic_key.clone())
                    .push_bind(t.run.created_at.as_micros())
                    .push_bind(t.run.state.state_type.code())
                    .push_bind(t.stale)
                    .push_bind(t.run.deleted_at.map(Timestamp::as_micros))
                    .push_bind(p.last_seq)
                    .push_bind(doc)
                    .push_bind(pause_deadline(&t.run));
            });
            if let Some(err) = failed {
                return Err(err);
            }
            q.push(
                " ON CONFLICT (id) DO UPDATE SET state_type = excluded.state_type, \
                 stale = excluded.stale, deleted_at = excluded.deleted_at, \
                 last_seq = excluded.last_seq, doc = excluded.doc, \
                 pause_deadline = excluded.pause_deadline ON CONFLICT DO NOTHING",
            );
            let written = q.build().persistent(false).execute(&mut self.conn).await?;
            if written.rows_affected() < chunk.len() as u64 {
                let ids = chunk
                    .iter()
                    .filter(|p| p.new)
                    .map(|p| p.run.id.to_string())
                    .collect();
                withdrawn.extend(not_stored(&mut self.conn, "task_runs", ids).await?);
            }
        }
        Ok(withdrawn)
    }

    async fn insert_states(&mut self, states: &[StateRow]) -> Result<()> {
        for chunk in states.chunks(ROWS_PER_STATEMENT) {
            let mut q =
                QueryBuilder::<Sqlite>::new("INSERT INTO states (id, tenant_id, run_id, doc) ");
            let mut failed = None;
            q.push_values(chunk, |mut b, (tenant, run_id, state)| {
                let doc = rows::encode_doc(state).unwrap_or_else(|err| {
                    failed = Some(err);
                    String::new()
                });
                b.push_bind(state.id.to_string())
                    .push_bind(tenant.clone())
                    .push_bind(run_id.clone())
                    .push_bind(doc);
            });
            if let Some(err) = failed {
                return Err(err);
            }
            q.build().persistent(false).execute(&mut self.conn).await?;
        }
        Ok(())
    }

    async fn insert_events(&mut self, events: &[EventRow<'_>]) -> Result<()> {
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (tenant_id, seq, execution_id, task_run_id, task_id, \
                 occurred_at, format, payload) ",
            );
            q.push_values(chunk, |mut b, e| {
                let s = e.event;
                b.push_bind(s.tenant_id.clone())
                    .push_bind(s.seq)
                    .push_bind(s.execution_id.clone())
                    .push_bind(s.task_run_id.clone())
                    .push_bind(s.task_id.clone())
                    .push_bind(e.occurred_at)
                    .push_bind(e.format)
                    .push_bind(e.bytes.to_vec());
            });
            q.build().persistent(false).execute(&mut self.conn).await?;
        }
        Ok(())
    }

    async fn lock_heads(&mut self, tenants: &[&str]) -> Result<HashMap<String, i64>> {
        // The transaction already holds the database's write lock.
        let mut heads = HashMap::with_capacity(tenants.len());
        for t in tenants {
            let head: i64 = sqlx::query_scalar(sql::HEAD_OF_TENANT)
                .bind(*t)
                .fetch_one(&mut self.conn)
                .await?;
            heads.insert((*t).to_owned(), head);
        }
        Ok(heads)
    }

    async fn set_heads(&mut self, heads: &[(&str, i64)]) -> Result<()> {
        for (tenant, head) in heads {
            sqlx::query(
                "INSERT INTO tenant_heads (tenant_id, head) VALUES (?, ?) \
                 ON CONFLICT (tenant_id) DO UPDATE SET head = excluded.head",
            )
            .bind(*tenant)
            .bind(*head)
            .execute(&mut self.conn)
            .await?;
        }
        Ok(())
    }

    async fn prune(&mut self, tenant: &str, cutoff: Timestamp, limit: i64) -> Result<Pruned> {
        super::retention::prune(&mut self.conn, tenant, cutoff, limit).await
    }

    async fn expire_cache_entries(&mut self, now: Timestamp) -> Result<u64> {
        Ok(sqlx::query(sql::EXPIRED_CACHE_ENTRIES)
            .bind(now.as_micros())
            .execute(&mut self.conn)
            .await?
            .rows_affected())
    }

    async fn tenants_with_events_before(&mut self, cutoff: Timestamp) -> Result<Vec<String>> {
        // Each tenant's oldest event is the first of its log.
        Ok(sqlx::query_scalar(
            "SELECT tenant_id FROM tenant_heads AS h WHERE (SELECT e.occurred_at FROM events AS e \
             WHERE e.tenant_id = h.tenant_id ORDER BY e.seq LIMIT 1) < ?",
        )
        .bind(cutoff.as_micros())
        .fetch_all(&mut self.conn)
        .await?)
    }
}

/// Which of `ids` `table` does not hold.
async fn not_stored(
    conn: &mut SqliteConnection,
    table: &'static str,
    ids: Vec<String>,
) -> Result<Vec<String>> {
    let mut q = QueryBuilder::<Sqlite>::new("SELECT id FROM ");
    q.push(table).push(" WHERE id IN (");
    let mut list = q.separated(", ");
    for id in &ids {
        list.push_bind(id.clone());
    }
    list.push_unseparated(")");
    let stored: HashSet<String> = q
        .build_query_scalar()
        .persistent(false)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    Ok(ids.into_iter().filter(|id| !stored.contains(id)).collect())
}

/// The pause deadline the sweeper watches, while the run is PAUSED.
fn pause_deadline(run: &RunCore) -> Option<i64> {
    (run.state.state_type == StateType::Paused)
        .then_some(run.state.details.pause_timeout)
        .flatten()
        .map(Timestamp::as_micros)
}
