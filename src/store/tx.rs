//! The write transaction as the operations see it. Writes are kept in an
//! overlay and flushed as a few multi-row statements when the batch
//! commits (or before a query the overlay cannot answer); point reads are
//! answered from the overlay, then from the cache of runs the writer
//! recently wrote or read, then from the database. The writer is the only
//! one writing runs, so a cached run is always its latest version.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use lru::LruCache;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

mod retention;

pub use retention::Pruned;

use super::{rows, sql};
use crate::{
    Error, Result,
    domain::{Event, Execution, ExecutionId, State, TaskRun, TaskRunId, Timestamp},
    stream::LoggedEvent,
};

/// How many statements' worth of rows one multi-row insert carries, kept
/// well under SQLite's limit on bound variables.
const ROWS_PER_STATEMENT: usize = 256;

/// A run as the writer last wrote or read it.
#[derive(Debug, Clone)]
pub(crate) enum CachedRun {
    Execution(Execution),
    TaskRun(TaskRun),
}

pub(crate) type RunCache = LruCache<String, CachedRun>;

#[derive(Debug)]
struct PendingRun {
    run: CachedRun,
    last_seq: i64,
    /// Set when the execution is created with a request_id.
    request_hash: Option<String>,
}

#[derive(Debug)]
struct PendingEvent {
    logged: Arc<LoggedEvent>,
    occurred_at: i64,
    payload: bytes::Bytes,
}

/// The view an operation has of the open write transaction. Reads see the
/// writes of earlier operations in the same batch.
#[derive(Debug)]
pub struct WriteTx<'c> {
    conn: &'c mut SqliteConnection,
    cache: &'c mut RunCache,
    next_seq: i64,
    /// Runs written in this transaction, latest version, by id.
    overlay: HashMap<String, PendingRun>,
    /// Ids in `overlay` not yet flushed, in first-write order.
    dirty: Vec<String>,
    states: Vec<(String, String, State)>,
    events: Vec<PendingEvent>,
    published: Vec<Arc<LoggedEvent>>,
    /// Changes made since the current operation began.
    pub(super) writes_in_op: usize,
    /// Whether lookups by idempotency key also ask the database. A batch of
    /// several operations skips that round trip per operation: a new run
    /// whose key turns out to be stored already is withdrawn at flush (see
    /// `flush`), and the operations that made or found it run again,
    /// carefully, in the same transaction.
    pub(super) careful: bool,
    /// The operation running now, by its place in the batch.
    pub(super) op: usize,
    /// Runs each operation wrote or found by idempotency key: (id, op).
    touched: Vec<(String, usize)>,
    /// Operations to run again because a run they made or found was
    /// withdrawn.
    rerun: BTreeSet<usize>,
}

impl<'c> WriteTx<'c> {
    pub(super) fn new(
        conn: &'c mut SqliteConnection,
        cache: &'c mut RunCache,
        next_seq: i64,
    ) -> Self {
        WriteTx {
            conn,
            cache,
            next_seq,
            overlay: HashMap::new(),
            dirty: Vec::new(),
            states: Vec::new(),
            events: Vec::new(),
            published: Vec::new(),
            writes_in_op: 0,
            careful: true,
            op: 0,
            touched: Vec::new(),
            rerun: BTreeSet::new(),
        }
    }

    /// The operations to run again, in batch order; see `careful`.
    pub(super) fn take_rerun(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.rerun).into_iter().collect()
    }

    /// The events written and the runs to remember once committed.
    pub(super) fn into_parts(self) -> (Vec<Arc<LoggedEvent>>, Vec<(String, CachedRun)>) {
        let runs = self
            .overlay
            .into_iter()
            .map(|(id, p)| (id, p.run))
            .collect();
        (self.published, runs)
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn known(&mut self, id: &str) -> Option<&CachedRun> {
        match self.overlay.get(id) {
            Some(p) => Some(&p.run),
            None => self.cache.get(id),
        }
    }

    pub async fn execution(&mut self, tenant: &str, id: ExecutionId) -> Result<Option<Execution>> {
        let key = id.to_string();
        if let Some(run) = self.known(&key) {
            return Ok(match run {
                CachedRun::Execution(e) if e.tenant_id == tenant => Some(e.clone()),
                _ => None,
            });
        }
        let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM executions WHERE id = ?")
            .bind(&key)
            .fetch_optional(&mut *self.conn)
            .await?;
        let Some(e) = doc.map(|d| rows::decode_doc::<Execution>(&d)).transpose()? else {
            return Ok(None);
        };
        // Not in the overlay, so this is the committed, latest version.
        self.cache.put(key, CachedRun::Execution(e.clone()));
        Ok((e.tenant_id == tenant).then_some(e))
    }

    pub async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>> {
        let key = id.to_string();
        if let Some(run) = self.known(&key) {
            return Ok(match run {
                CachedRun::TaskRun(t) if t.tenant_id == tenant => Some(t.clone()),
                _ => None,
            });
        }
        let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM task_runs WHERE id = ?")
            .bind(&key)
            .fetch_optional(&mut *self.conn)
            .await?;
        let Some(t) = doc.map(|d| rows::decode_doc::<TaskRun>(&d)).transpose()? else {
            return Ok(None);
        };
        self.cache.put(key, CachedRun::TaskRun(t.clone()));
        Ok((t.tenant_id == tenant).then_some(t))
    }

    /// The execution created with `request_id`, and its request fingerprint.
    pub async fn execution_by_request_id(
        &mut self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<(Execution, String)>> {
        let in_batch = self.overlay.values().find_map(|p| match &p.run {
            CachedRun::Execution(e)
                if e.tenant_id == tenant && e.request_id.as_deref() == Some(request_id) =>
            {
                Some((e.clone(), p.request_hash.clone()))
            }
            _ => None,
        });
        if let Some((e, hash)) = in_batch {
            self.touched.push((e.id.to_string(), self.op));
            let hash = match hash {
                Some(h) => h,
                None => self.request_hash(&e.id.to_string()).await?,
            };
            return Ok(Some((e, hash)));
        }
        if !self.careful {
            return Ok(None);
        }
        let row: Option<(String, String, Option<String>)> =
            sqlx::query_as(sql::EXECUTION_BY_REQUEST_ID)
                .bind(tenant)
                .bind(request_id)
                .fetch_optional(&mut *self.conn)
                .await?;
        let Some((id, doc, hash)) = row else {
            return Ok(None);
        };
        let e = match self.known(&id) {
            Some(CachedRun::Execution(e)) => e.clone(),
            _ => rows::decode_doc(&doc)?,
        };
        Ok(Some((e, hash.unwrap_or_default())))
    }

    async fn request_hash(&mut self, id: &str) -> Result<String> {
        let hash: Option<Option<String>> =
            sqlx::query_scalar("SELECT request_hash FROM executions WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *self.conn)
                .await?;
        Ok(hash.flatten().unwrap_or_default())
    }

    pub async fn save_execution(
        &mut self,
        e: &Execution,
        request_hash: Option<&str>,
        last_seq: i64,
    ) -> Result<()> {
        let id = e.id.to_string();
        self.remember(id, CachedRun::Execution(e.clone()), last_seq, request_hash);
        Ok(())
    }

    pub async fn save_task_run(&mut self, t: &TaskRun, last_seq: i64) -> Result<()> {
        let id = t.id.to_string();
        self.remember(id, CachedRun::TaskRun(t.clone()), last_seq, None);
        Ok(())
    }

    fn remember(&mut self, id: String, run: CachedRun, last_seq: i64, request_hash: Option<&str>) {
        self.writes_in_op += 1;
        self.touched.push((id.clone(), self.op));
        match self.overlay.get_mut(&id) {
            Some(p) => {
                if !self.dirty.contains(&id) {
                    self.dirty.push(id);
                }
                p.run = run;
                p.last_seq = last_seq;
                if let Some(h) = request_hash {
                    p.request_hash = Some(h.to_owned());
                }
            }
            None => {
                self.dirty.push(id.clone());
                self.overlay.insert(
                    id,
                    PendingRun {
                        run,
                        last_seq,
                        request_hash: request_hash.map(str::to_owned),
                    },
                );
            }
        }
    }

    /// The task run with this key, if any; see `careful`.
    pub async fn task_run_by_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        let careful = self.careful;
        self.find_task_run_by_key(execution_id, task_key, dynamic_key, careful)
            .await
    }

    /// The task run with this key, if any, asking the database too.
    pub async fn task_run_by_key_checked(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        self.find_task_run_by_key(execution_id, task_key, dynamic_key, true)
            .await
    }

    async fn find_task_run_by_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
        ask_database: bool,
    ) -> Result<Option<TaskRun>> {
        let in_batch = self.overlay.values().find_map(|p| match &p.run {
            CachedRun::TaskRun(t)
                if t.execution_id == execution_id
                    && t.task_key == task_key
                    && t.dynamic_key == dynamic_key =>
            {
                Some(t.clone())
            }
            _ => None,
        });
        if let Some(t) = &in_batch {
            self.touched.push((t.id.to_string(), self.op));
        }
        if in_batch.is_some() || !ask_database {
            return Ok(in_batch);
        }
        let row: Option<(String, String)> = sqlx::query_as(sql::TASK_RUN_BY_KEY)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(dynamic_key)
            .fetch_optional(&mut *self.conn)
            .await?;
        let Some((id, doc)) = row else {
            return Ok(None);
        };
        Ok(Some(match self.known(&id) {
            Some(CachedRun::TaskRun(t)) => t.clone(),
            _ => rows::decode_doc(&doc)?,
        }))
    }

    /// How many task runs the execution has for `task_key`.
    pub async fn count_task_runs_for_key(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64> {
        self.flush().await?;
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM task_runs WHERE execution_id = ? AND task_key = ?",
        )
        .bind(execution_id.to_string())
        .bind(task_key)
        .fetch_one(&mut *self.conn)
        .await?)
    }

    /// Every task run of an execution, oldest first.
    pub async fn task_runs_of(&mut self, execution_id: ExecutionId) -> Result<Vec<TaskRun>> {
        self.flush().await?;
        let docs: Vec<String> = sqlx::query_scalar(
            "SELECT doc FROM task_runs WHERE execution_id = ? ORDER BY created_at, id",
        )
        .bind(execution_id.to_string())
        .fetch_all(&mut *self.conn)
        .await?;
        docs.iter().map(|d| rows::decode_doc(d)).collect()
    }

    /// The latest COMPLETED run of `task_key` in the execution other than
    /// `except`: its id and its output as JSON text (None when it has
    /// none). Only that output is read, whatever the key's other runs hold.
    pub async fn latest_completed_output(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<Option<(TaskRunId, Option<String>)>> {
        self.flush().await?;
        let row: Option<(String, Option<String>)> = sqlx::query_as(sql::LATEST_COMPLETED_OF_KEY)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(except.to_string())
            .fetch_optional(&mut *self.conn)
            .await?;
        row.map(|(id, output)| {
            let id = TaskRunId::parse(&id)
                .map_err(|e| Error::Internal(format!("a stored task run id: {e}")))?;
            Ok((id, output))
        })
        .transpose()
    }

    /// Whether `task_key` has runs in the execution other than `except`,
    /// and whether one of those has not ended.
    pub async fn runs_of_key_exist(
        &mut self,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<(bool, bool)> {
        self.flush().await?;
        Ok(sqlx::query_as(sql::RUNS_OF_KEY_EXIST)
            .bind(execution_id.to_string())
            .bind(task_key)
            .bind(except.to_string())
            .fetch_one(&mut *self.conn)
            .await?)
    }

    /// The tenant's cached result for `key`: output and expiration.
    pub async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>> {
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(sql::CACHE_ENTRY)
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut *self.conn)
            .await?;
        row.map(|(output, exp)| {
            let output = output.map(|o| rows::decode_doc(&o)).transpose()?;
            Ok((output, exp.map(Timestamp::from_micros)))
        })
        .transpose()
    }

    pub async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()> {
        self.writes_in_op += 1;
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
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    /// PAUSED runs whose pause timed out by `now`: (tenant, id) of up to
    /// `limit` executions and task runs each.
    pub async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        self.flush().await?;
        let executions = sqlx::query_as(sql::EXPIRED_PAUSED_EXECUTIONS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(&mut *self.conn)
            .await?;
        let task_runs = sqlx::query_as(sql::EXPIRED_PAUSED_TASK_RUNS)
            .bind(now.as_micros())
            .bind(limit)
            .fetch_all(&mut *self.conn)
            .await?;
        Ok((executions, task_runs))
    }

    /// Records request counts per key and day (a count only grows).
    pub(crate) async fn record_key_usage(&mut self, counts: &[(String, i64, i64)]) -> Result<()> {
        for (key_id, day, requests) in counts {
            self.writes_in_op += 1;
            sqlx::query(
                "INSERT INTO key_usage (key_id, day, requests) VALUES (?, ?, ?) \
                 ON CONFLICT (key_id, day) DO UPDATE SET requests = MAX(requests, excluded.requests)",
            )
            .bind(key_id)
            .bind(day)
            .bind(requests)
            .execute(&mut *self.conn)
            .await?;
        }
        Ok(())
    }

    /// Records when these API keys (by secret hash) were last used.
    pub(crate) async fn touch_keys(&mut self, hashes: &[String], at: Timestamp) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.writes_in_op += 1;
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE api_keys SET last_used_at = ");
        q.push_bind(at.as_micros()).push(" WHERE secret_hash IN (");
        let mut list = q.separated(", ");
        for h in hashes {
            list.push_bind(h.clone());
        }
        list.push_unseparated(")");
        q.build().persistent(false).execute(&mut *self.conn).await?;
        Ok(())
    }

    /// Appends a state to a run's history.
    pub async fn append_state(&mut self, tenant: &str, run_id: &str, state: &State) -> Result<()> {
        self.writes_in_op += 1;
        self.states
            .push((tenant.to_owned(), run_id.to_owned(), state.clone()));
        Ok(())
    }

    /// The recorded first result of a transition_id, as JSON.
    pub async fn transition(
        &mut self,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT result FROM transitions WHERE run_id = ? AND transition_id = ?",
        )
        .bind(run_id)
        .bind(transition_id)
        .fetch_optional(&mut *self.conn)
        .await?)
    }

    pub async fn record_transition(
        &mut self,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()> {
        self.writes_in_op += 1;
        sqlx::query("INSERT INTO transitions (run_id, transition_id, result) VALUES (?, ?, ?)")
            .bind(run_id)
            .bind(transition_id)
            .bind(result_json)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    /// Appends an event to the log and returns its sequence. Subscribers
    /// receive it once the transaction commits.
    pub async fn append_event(&mut self, event: &Event<'_>) -> Result<i64> {
        self.writes_in_op += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        let logged = Arc::new(LoggedEvent::new(seq, event));
        self.events.push(PendingEvent {
            payload: logged.payload(),
            occurred_at: event.occurred_at.as_micros(),
            logged: Arc::clone(&logged),
        });
        self.published.push(logged);
        Ok(seq)
    }

    /// Takes back new runs that could not be inserted (see `flush`): their
    /// overlay entries, history rows and events. Later events are numbered
    /// down so that the log has no hole.
    fn withdraw(&mut self, ids: &HashSet<String>) -> Result<()> {
        if self.careful {
            // Careful lookups ask the database: nothing should conflict.
            return Err(Error::Internal(
                "a new run conflicts with a stored one".into(),
            ));
        }
        for id in ids {
            self.overlay.remove(id);
        }
        self.dirty.retain(|id| !ids.contains(id));
        self.states.retain(|(_, run_id, _)| !ids.contains(run_id));
        let mut gone = Vec::new();
        self.events.retain(|e| {
            let l = &e.logged;
            let run = l.task_run_id.as_ref().unwrap_or(&l.execution_id);
            let keep = !ids.contains(run);
            if !keep {
                gone.push(l.seq);
            }
            keep
        });
        for (id, op) in &self.touched {
            if ids.contains(id) {
                self.rerun.insert(*op);
            }
        }
        let Some(&first) = gone.first() else {
            return Ok(());
        };
        // The withdrawn events are pending, so every later event is too.
        let renumber = |seq: i64| seq - gone.partition_point(|g| *g < seq) as i64;
        let mut renumbered = HashMap::new();
        for e in &mut self.events {
            let seq = e.logged.seq;
            if seq > first {
                let logged = Arc::new(e.logged.with_seq(renumber(seq)));
                e.payload = logged.payload();
                e.logged = Arc::clone(&logged);
                renumbered.insert(seq, logged);
            }
        }
        self.published
            .retain(|l| gone.binary_search(&l.seq).is_err());
        for l in &mut self.published {
            if let Some(new) = renumbered.remove(&l.seq) {
                *l = new;
            }
        }
        for p in self.overlay.values_mut() {
            if p.last_seq > first {
                p.last_seq = renumber(p.last_seq);
            }
        }
        self.next_seq -= gone.len() as i64;
        Ok(())
    }

    /// Writes everything pending: executions before the task runs that
    /// reference them, then history rows and events.
    ///
    /// A new run whose idempotency key (request_id, or task key and
    /// dynamic key) is already stored is not inserted: it is withdrawn with
    /// its history rows and events, the events after it take the numbers
    /// freed (the log stays dense), and the operations that made or found it
    /// are marked to run again; run carefully, they find the stored run.
    /// An operation that creates a run writes nothing else, so running it
    /// again repeats nothing.
    pub(super) async fn flush(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let (mut executions, mut task_runs) = (Vec::new(), Vec::new());
        for id in &dirty {
            match self.overlay.get(id) {
                Some(
                    p @ PendingRun {
                        run: CachedRun::Execution(_),
                        ..
                    },
                ) => executions.push(p),
                Some(
                    p @ PendingRun {
                        run: CachedRun::TaskRun(_),
                        ..
                    },
                ) => task_runs.push(p),
                None => {}
            }
        }
        let mut withdrawn = HashSet::new();
        for chunk in executions.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO executions (id, tenant_id, created_at, task_id, state_type, request_id, \
                 request_hash, deleted_at, last_seq, doc, pause_deadline) ",
            );
            let mut failed = None;
            q.push_values(chunk, |mut b, p| {
                let CachedRun::Execution(e) = &p.run else {
                    unreachable!("sorted above")
                };
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
                    .push_bind(p.request_hash.clone())
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
            let written = q.build().persistent(false).execute(&mut *self.conn).await?;
            if written.rows_affected() < chunk.len() as u64 {
                let ids = chunk.iter().map(|p| run_id(&p.run)).collect();
                withdrawn.extend(not_stored(&mut *self.conn, "executions", ids).await?);
            }
        }
        for chunk in task_runs.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO task_runs (id, tenant_id, execution_id, task_key, dynamic_key, created_at, \
                 state_type, stale, deleted_at, last_seq, doc, pause_deadline) ",
            );
            let mut failed = None;
            q.push_values(chunk, |mut b, p| {
                let CachedRun::TaskRun(t) = &p.run else {
                    unreachable!("sorted above")
                };
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
            let written = q.build().persistent(false).execute(&mut *self.conn).await?;
            if written.rows_affected() < chunk.len() as u64 {
                let ids = chunk.iter().map(|p| run_id(&p.run)).collect();
                withdrawn.extend(not_stored(&mut *self.conn, "task_runs", ids).await?);
            }
        }
        if !withdrawn.is_empty() {
            self.withdraw(&withdrawn)?;
        }
        let states = std::mem::take(&mut self.states);
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
            q.build().persistent(false).execute(&mut *self.conn).await?;
        }
        let events = std::mem::take(&mut self.events);
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (seq, tenant_id, execution_id, task_run_id, task_id, occurred_at, payload) ",
            );
            q.push_values(chunk, |mut b, e| {
                let l = &e.logged;
                b.push_bind(l.seq)
                    .push_bind(l.tenant_id.clone())
                    .push_bind(l.execution_id.clone())
                    .push_bind(l.task_run_id.clone())
                    .push_bind(l.task_id.clone())
                    .push_bind(e.occurred_at)
                    .push_bind(e.payload.to_vec());
            });
            q.build().persistent(false).execute(&mut *self.conn).await?;
        }
        Ok(())
    }
}

/// A run's id.
fn run_id(run: &CachedRun) -> String {
    match run {
        CachedRun::Execution(e) => e.id.to_string(),
        CachedRun::TaskRun(t) => t.id.to_string(),
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
fn pause_deadline(run: &crate::domain::RunCore) -> Option<i64> {
    (run.state.state_type == crate::domain::StateType::Paused)
        .then_some(run.state.details.pause_timeout)
        .flatten()
        .map(Timestamp::as_micros)
}
