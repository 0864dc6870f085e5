//! The write transaction as the operations see it, whatever the backend.
//! Writes are kept in an overlay and written as a few multi-row statements
//! when the batch commits (or before a query the overlay cannot answer);
//! point reads are answered from the overlay, then (for a backend with one
//! writer) from the cache of runs the writer recently wrote or read, then
//! from the backend.
//!
//! Each tenant's events are numbered by the tenant's counter row, which a
//! transaction locks before it reads anything of the tenant and sets
//! once, when it commits: numbers are dense and in commit order however
//! many writers share the database, and while a transaction holds a
//! tenant no other writer changes the tenant's runs, so what it reads
//! stays current until it commits.
//!
//! With the database to itself, the writer locks the tenants of a batch's
//! operations first and numbers events as they are appended. Sharing it,
//! the writer takes a tenant's row only when an operation reads something
//! of the tenant, or else when the transaction ends: a batch that only
//! adds new runs (which no other writer can have read) numbers its events
//! 1, 2, ... as it goes and has the backend move them past the tenant's
//! head as it writes them (`TxBackend::seal`), so that the row is held
//! for one statement and the commit, not the whole transaction. Its new
//! runs are checked against the stored runs' idempotency keys before
//! (`settle`); one another writer stores meanwhile makes the seal fail as
//! a lost race, and the batch runs again.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use lru::LruCache;

use super::{
    EventBody, EventFormat, Pruned, StoredEvent,
    backend::{EventRow, RunRow, StateRow, TxBackend},
};
use crate::{
    Error, Result,
    domain::{Event, Execution, ExecutionId, State, TaskRun, TaskRunId, Timestamp},
};

/// A run as the writer last wrote or read it.
#[derive(Debug, Clone)]
pub(crate) enum CachedRun {
    Execution(Execution),
    TaskRun(TaskRun),
}

impl CachedRun {
    fn tenant_id(&self) -> &str {
        match self {
            CachedRun::Execution(e) => &e.tenant_id,
            CachedRun::TaskRun(t) => &t.tenant_id,
        }
    }
}

pub(crate) type RunCache = LruCache<String, CachedRun>;

#[derive(Debug)]
struct PendingRun {
    run: CachedRun,
    /// The sequence of its latest event.
    last_seq: i64,
    /// Set when the execution is created with a request_id.
    request_hash: Option<String>,
    /// Whether this batch created it.
    new: bool,
}

#[derive(Debug)]
struct PendingEvent {
    event: StoredEvent,
    occurred_at: i64,
    bytes: Vec<u8>,
}

impl PendingEvent {
    fn row(&self) -> EventRow<'_> {
        EventRow {
            event: &self.event,
            occurred_at: self.occurred_at,
            format: EventFormat::Record.code() as i16,
            bytes: &self.bytes,
        }
    }
}

/// The view an operation has of the open write transaction. Reads see the
/// writes of earlier operations in the same batch.
pub struct WriteTx<'c> {
    backend: &'c mut dyn TxBackend,
    /// Runs remembered between batches; None when the writer shares the
    /// database with others.
    cache: Option<&'c mut RunCache>,
    /// Per tenant numbering events: the head its numbers count from, and
    /// the latest sequence given out in this transaction. When numbers are
    /// given at commit (`late`), they count from 0 until then.
    heads: HashMap<String, (i64, i64)>,
    /// Tenants whose counter rows this transaction holds.
    locked: HashSet<String>,
    /// Whether events are numbered when the transaction ends.
    pub(super) late: bool,
    /// Runs written in this transaction, latest version, by id.
    overlay: HashMap<String, PendingRun>,
    /// Ids in `overlay` not yet flushed, in first-write order.
    dirty: Vec<String>,
    /// New runs of tenants not locked, checked against the stored runs'
    /// idempotency keys and left for `seal` to write (when events are
    /// numbered at commit), in first-write order.
    unsealed: Vec<String>,
    states: Vec<StateRow>,
    events: Vec<PendingEvent>,
    published: Vec<StoredEvent>,
    /// Runs read from the backend in this transaction: stored already.
    read_ids: HashSet<String>,
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

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("pending_runs", &self.overlay.len())
            .field("pending_events", &self.events.len())
            .finish()
    }
}

impl<'c> WriteTx<'c> {
    pub(super) fn new(backend: &'c mut dyn TxBackend, cache: Option<&'c mut RunCache>) -> Self {
        let late = backend.numbers_at_commit();
        WriteTx {
            backend,
            cache,
            heads: HashMap::new(),
            locked: HashSet::new(),
            late,
            overlay: HashMap::new(),
            dirty: Vec::new(),
            unsealed: Vec::new(),
            read_ids: HashSet::new(),
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
    pub(super) fn into_parts(self) -> (Vec<StoredEvent>, Vec<(String, CachedRun)>) {
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
            None => self.cache.as_mut().and_then(|c| c.get(id)),
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
        self.lock_tenants(&[tenant]).await?;
        let Some(e) = self.backend.execution(tenant, id).await? else {
            return Ok(None);
        };
        self.read_ids.insert(key.clone());
        // Not in the overlay, so this is the committed, latest version.
        if let Some(cache) = self.cache.as_mut() {
            cache.put(key, CachedRun::Execution(e.clone()));
        }
        Ok(Some(e))
    }

    pub async fn task_run(&mut self, tenant: &str, id: TaskRunId) -> Result<Option<TaskRun>> {
        let key = id.to_string();
        if let Some(run) = self.known(&key) {
            return Ok(match run {
                CachedRun::TaskRun(t) if t.tenant_id == tenant => Some(t.clone()),
                _ => None,
            });
        }
        self.lock_tenants(&[tenant]).await?;
        let Some(t) = self.backend.task_run(tenant, id).await? else {
            return Ok(None);
        };
        self.read_ids.insert(key.clone());
        if let Some(cache) = self.cache.as_mut() {
            cache.put(key, CachedRun::TaskRun(t.clone()));
        }
        Ok(Some(t))
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
                None => {
                    self.lock_tenants(&[tenant]).await?;
                    self.backend.request_hash(tenant, e.id).await?
                }
            };
            return Ok(Some((e, hash)));
        }
        if !self.careful {
            return Ok(None);
        }
        self.lock_tenants(&[tenant]).await?;
        let Some((stored, hash)) = self
            .backend
            .execution_by_request_id(tenant, request_id)
            .await?
        else {
            return Ok(None);
        };
        self.read_ids.insert(stored.id.to_string());
        let e = match self.known(&stored.id.to_string()) {
            Some(CachedRun::Execution(e)) => e.clone(),
            _ => stored,
        };
        Ok(Some((e, hash)))
    }

    /// Writes an execution whose latest event has sequence `last_seq` (as
    /// `append_event` gave it); `new` when this creates it.
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
        // A run neither in the overlay nor read through this transaction
        // (nor remembered from earlier ones) is new.
        let new = !self.overlay.contains_key(&id)
            && !self.read_ids.contains(&id)
            && !self.cache.as_mut().is_some_and(|c| c.contains(&id));
        self.writes_in_op += 1;
        self.touched.push((id.clone(), self.op));
        match self.overlay.get_mut(&id) {
            Some(p) => {
                if !self.dirty.contains(&id) && !self.unsealed.contains(&id) {
                    self.dirty.push(id);
                }
                p.run = run;
                p.last_seq = last_seq;
                let _ = new;
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
                        new,
                    },
                );
            }
        }
    }

    /// The task run with this key, if any; see `careful`.
    pub async fn task_run_by_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        let careful = self.careful;
        self.find_task_run_by_key(tenant, execution_id, task_key, dynamic_key, careful)
            .await
    }

    /// The task run with this key, if any, asking the database too.
    pub async fn task_run_by_key_checked(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        dynamic_key: &str,
    ) -> Result<Option<TaskRun>> {
        self.find_task_run_by_key(tenant, execution_id, task_key, dynamic_key, true)
            .await
    }

    async fn find_task_run_by_key(
        &mut self,
        tenant: &str,
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
        self.lock_tenants(&[tenant]).await?;
        let Some(stored) = self
            .backend
            .task_run_by_key(tenant, execution_id, task_key, dynamic_key)
            .await?
        else {
            return Ok(None);
        };
        let id = stored.id.to_string();
        self.read_ids.insert(id.clone());
        Ok(Some(match self.known(&id) {
            Some(CachedRun::TaskRun(t)) => t.clone(),
            _ => stored,
        }))
    }

    /// How many task runs the execution has for `task_key`.
    pub async fn count_task_runs_for_key(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
    ) -> Result<i64> {
        self.flush().await?;
        self.lock_tenants(&[tenant]).await?;
        self.backend
            .count_task_runs_for_key(tenant, execution_id, task_key)
            .await
    }

    /// Every task run of an execution, oldest first.
    pub async fn task_runs_of(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
    ) -> Result<Vec<TaskRun>> {
        self.flush().await?;
        self.lock_tenants(&[tenant]).await?;
        let runs = self.backend.task_runs_of(tenant, execution_id).await?;
        self.read_ids.extend(runs.iter().map(|t| t.id.to_string()));
        Ok(runs)
    }

    /// The latest COMPLETED run of `task_key` in the execution other than
    /// `except`: its id and its output as JSON text (None when it has
    /// none). Only that output is read, whatever the key's other runs hold.
    pub async fn latest_completed_output(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<Option<(TaskRunId, Option<String>)>> {
        self.flush().await?;
        self.lock_tenants(&[tenant]).await?;
        self.backend
            .latest_completed_output(tenant, execution_id, task_key, except)
            .await
    }

    /// Whether `task_key` has runs in the execution other than `except`,
    /// and whether one of those has not ended.
    pub async fn runs_of_key_exist(
        &mut self,
        tenant: &str,
        execution_id: ExecutionId,
        task_key: &str,
        except: TaskRunId,
    ) -> Result<(bool, bool)> {
        self.flush().await?;
        self.lock_tenants(&[tenant]).await?;
        self.backend
            .runs_of_key_exist(tenant, execution_id, task_key, except)
            .await
    }

    /// The tenant's cached result for `key`: output and expiration.
    pub async fn cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<(Option<serde_json::Value>, Option<Timestamp>)>> {
        self.lock_tenants(&[tenant]).await?;
        self.backend.cache_entry(tenant, key).await
    }

    pub async fn put_cache_entry(
        &mut self,
        tenant: &str,
        key: &str,
        run: TaskRunId,
        output: Option<&serde_json::Value>,
        expiration: Option<Timestamp>,
    ) -> Result<()> {
        self.lock_tenants(&[tenant]).await?;
        self.writes_in_op += 1;
        self.backend
            .put_cache_entry(tenant, key, run, output, expiration)
            .await
    }

    /// PAUSED runs whose pause timed out by `now`: (tenant, id) of up to
    /// `limit` executions and task runs each, their tenants locked. On a
    /// database other writers share, the runs are asked for again once
    /// their tenants are locked, so that none another writer has resumed
    /// or timed out meanwhile is returned.
    pub async fn expired_pauses(
        &mut self,
        now: Timestamp,
        limit: i64,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>)> {
        self.flush().await?;
        let candidates = self.backend.expired_pauses(now, limit).await?;
        let tenants: BTreeSet<&str> = candidates
            .0
            .iter()
            .chain(&candidates.1)
            .map(|(tenant, _)| tenant.as_str())
            .collect();
        if tenants.is_empty() || self.backend.sole_writer() {
            let tenants: Vec<&str> = tenants.into_iter().collect();
            self.lock_tenants(&tenants).await?;
            return Ok(candidates);
        }
        let tenants: Vec<String> = tenants.into_iter().map(str::to_owned).collect();
        let names: Vec<&str> = tenants.iter().map(String::as_str).collect();
        self.lock_tenants(&names).await?;
        // Current now: keep those of the tenants locked (another tenant's
        // runs wait for the next sweep).
        let (executions, task_runs) = self.backend.expired_pauses(now, limit).await?;
        let locked = |(tenant, _): &(String, String)| self.locked.contains(tenant);
        Ok((
            executions.into_iter().filter(locked).collect(),
            task_runs.into_iter().filter(locked).collect(),
        ))
    }

    /// Adds request counts per key and day.
    pub(crate) async fn record_key_usage(
        &mut self,
        counts: &[(String, String, i64, i64)],
    ) -> Result<()> {
        self.writes_in_op += counts.len();
        self.backend.record_key_usage(counts).await
    }

    /// Records when these API keys (by secret hash) were last used.
    pub(crate) async fn touch_keys(&mut self, hashes: &[String], at: Timestamp) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.writes_in_op += 1;
        self.backend.touch_keys(hashes, at).await
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
        tenant: &str,
        run_id: &str,
        transition_id: &str,
    ) -> Result<Option<String>> {
        self.lock_tenants(&[tenant]).await?;
        self.backend.transition(tenant, run_id, transition_id).await
    }

    pub async fn record_transition(
        &mut self,
        tenant: &str,
        run_id: &str,
        transition_id: &str,
        result_json: &str,
    ) -> Result<()> {
        self.lock_tenants(&[tenant]).await?;
        self.writes_in_op += 1;
        self.backend
            .record_transition(tenant, run_id, transition_id, result_json)
            .await
    }

    /// Retention for one tenant: see `Store::prune`.
    pub(crate) async fn prune(
        &mut self,
        tenant: &str,
        cutoff: Timestamp,
        limit: i64,
    ) -> Result<Pruned> {
        self.flush().await?;
        // What it removes depends on what the tenant's runs are now.
        self.lock_tenants(&[tenant]).await?;
        self.writes_in_op += 1;
        self.backend.prune(tenant, cutoff, limit).await
    }

    /// Removes cache entries expired by `now`; returns how many.
    pub(crate) async fn expire_cache_entries(&mut self, now: Timestamp) -> Result<u64> {
        self.writes_in_op += 1;
        self.backend.expire_cache_entries(now).await
    }

    /// Tenants whose logs hold events that occurred before `cutoff`.
    pub(crate) async fn tenants_with_events_before(
        &mut self,
        cutoff: Timestamp,
    ) -> Result<Vec<String>> {
        self.backend.tenants_with_events_before(cutoff).await
    }

    /// Locks the tenants' log counters for the rest of the transaction
    /// (those not locked yet), in a fixed order.
    pub(super) async fn lock_tenants(&mut self, tenants: &[&str]) -> Result<()> {
        let mut wanted: Vec<&str> = tenants
            .iter()
            .copied()
            .filter(|t| !self.locked.contains(*t))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        let heads = self.backend.lock_heads(&wanted).await?;
        for t in wanted {
            self.locked.insert(t.to_owned());
            let head = heads.get(t).copied().unwrap_or(0);
            match self.heads.get_mut(t) {
                // Numbers given before the lock count from 0: they follow
                // the head now that it is known (and held).
                Some((start, given)) => {
                    *start = head;
                    *given += head;
                    self.renumber(t, head);
                }
                None => {
                    self.heads.insert(t.to_owned(), (head, head));
                }
            }
        }
        Ok(())
    }

    /// Moves the numbers given to `tenant`'s events and runs in this
    /// transaction by `by`.
    fn renumber(&mut self, tenant: &str, by: i64) {
        for e in &mut self.events {
            if e.event.tenant_id == tenant {
                e.event.seq += by;
            }
        }
        for p in self.overlay.values_mut() {
            if p.run.tenant_id() == tenant {
                p.last_seq += by;
            }
        }
    }

    /// Locks the tenants of a batch's operations before they run, when
    /// events are numbered as they are appended.
    pub(super) async fn lock_up_front(&mut self, tenants: &[&str]) -> Result<()> {
        if self.late {
            return Ok(());
        }
        self.lock_tenants(tenants).await
    }

    /// Appends an event to its tenant's log and returns its sequence, for
    /// the run it is of to be saved with (when events are numbered at
    /// commit, a number in the transaction, which the commit moves along
    /// with the event's). Subscribers receive the event once the
    /// transaction commits.
    pub async fn append_event(&mut self, event: &Event<'_>) -> Result<i64> {
        let tenant = event.resource.tenant_id();
        if !self.late {
            self.lock_tenants(&[tenant]).await?;
        }
        self.writes_in_op += 1;
        let head = match self.heads.get_mut(tenant) {
            Some(head) => head,
            None if self.late => self.heads.entry(tenant.to_owned()).or_insert((0, 0)),
            None => return Err(Error::Internal("a tenant's log was not locked".into())),
        };
        head.1 += 1;
        let seq = head.1;
        let record = event.record();
        let bytes = record
            .encode()
            .map_err(|e| Error::Internal(format!("encoding an event: {e}")))?;
        self.events.push(PendingEvent {
            event: StoredEvent {
                seq,
                tenant_id: tenant.to_owned(),
                execution_id: event.resource.execution_id().to_string(),
                task_run_id: event.resource.task_run_id().map(|id| id.to_string()),
                task_id: event.task_id.map(str::to_owned),
                body: EventBody::Record(Arc::new(record)),
            },
            occurred_at: event.occurred_at.as_micros(),
            bytes,
        });
        Ok(seq)
    }

    /// Takes back new runs that could not be inserted (see `flush`): their
    /// overlay entries, history rows and events. The tenants' later events
    /// take the numbers freed, so that each log stays dense.
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
        self.unsealed.retain(|id| !ids.contains(id));
        self.states.retain(|(_, run_id, _)| !ids.contains(run_id));
        self.events.retain(|e| {
            let run = e
                .event
                .task_run_id
                .as_ref()
                .unwrap_or(&e.event.execution_id);
            !ids.contains(run)
        });
        for (id, op) in &self.touched {
            if ids.contains(id) {
                self.rerun.insert(*op);
            }
        }
        // Events are written only when the transaction ends: number the
        // remaining ones again from each tenant's locked head.
        let mut renumbered: HashMap<(String, i64), i64> = HashMap::new();
        for head in self.heads.values_mut() {
            head.1 = head.0;
        }
        for e in &mut self.events {
            let head = self
                .heads
                .get_mut(&e.event.tenant_id)
                .ok_or_else(|| Error::Internal("a tenant's log was not locked".into()))?;
            head.1 += 1;
            if head.1 != e.event.seq {
                renumbered.insert((e.event.tenant_id.clone(), e.event.seq), head.1);
                e.event.seq = head.1;
            }
        }
        if renumbered.is_empty() {
            return Ok(());
        }
        for (id, p) in &mut self.overlay {
            let tenant = match &p.run {
                CachedRun::Execution(e) => &e.tenant_id,
                CachedRun::TaskRun(t) => &t.tenant_id,
            };
            if let Some(seq) = renumbered.get(&(tenant.clone(), p.last_seq)) {
                p.last_seq = *seq;
                if !self.dirty.contains(id) && !self.unsealed.contains(id) {
                    self.dirty.push(id.clone());
                }
            }
        }
        Ok(())
    }

    /// Writes the pending runs and history rows: executions before the
    /// task runs that reference them.
    ///
    /// A new run whose idempotency key (request_id, or task key and
    /// dynamic key) is already stored is not inserted: it is withdrawn with
    /// its history rows and events, and the operations that made or found
    /// it are marked to run again; run carefully, they find the stored run.
    /// An operation that creates a run writes nothing else, so running it
    /// again repeats nothing.
    pub(super) async fn flush(&mut self) -> Result<()> {
        if self.late {
            // What is written now keeps its numbers: the tenants are
            // locked first, and the runs left for `seal` are written too.
            let mut ids = std::mem::take(&mut self.unsealed);
            ids.append(&mut self.dirty);
            let tenants: Vec<String> = ids
                .iter()
                .filter_map(|id| self.overlay.get(id))
                .map(|p| p.run.tenant_id().to_owned())
                .filter(|t| !self.locked.contains(t))
                .collect();
            self.dirty = ids;
            let tenants: Vec<&str> = tenants.iter().map(String::as_str).collect();
            self.lock_tenants(&tenants).await?;
        }
        self.write_dirty().await?;
        self.write_states().await
    }

    /// Before the operations' end is sealed: writes the runs of locked
    /// tenants; checks the new runs of the other
    /// tenants against the stored runs' idempotency keys (withdrawing
    /// those that meet one, as `flush` does) and leaves them for `seal`.
    pub(super) async fn settle(&mut self) -> Result<()> {
        if !self.late {
            return self.flush().await;
        }
        // History rows are left for the seal too.
        let (mut now, mut later) = (Vec::new(), Vec::new());
        let mut lock = Vec::new();
        for id in std::mem::take(&mut self.dirty) {
            let Some(p) = self.overlay.get(&id) else {
                continue;
            };
            let tenant = p.run.tenant_id();
            if !self.locked.contains(tenant) {
                if p.new {
                    later.push(id);
                    continue;
                }
                lock.push(tenant.to_owned());
            }
            now.push(id);
        }
        let lock: Vec<&str> = lock.iter().map(String::as_str).collect();
        self.lock_tenants(&lock).await?;
        self.dirty = now;
        if !later.is_empty() {
            let conflicts = {
                let (mut executions, mut task_runs) = (Vec::new(), Vec::new());
                for id in &later {
                    match self.overlay.get(id).map(|p| &p.run) {
                        Some(CachedRun::Execution(e)) => executions.push(RunRow {
                            run: e,
                            last_seq: 0,
                            request_hash: None,
                            new: true,
                        }),
                        Some(CachedRun::TaskRun(t)) => task_runs.push(RunRow {
                            run: t,
                            last_seq: 0,
                            request_hash: None,
                            new: true,
                        }),
                        None => {}
                    }
                }
                self.backend
                    .stored_conflicts(&executions, &task_runs)
                    .await?
            };
            self.unsealed.extend(later);
            if !conflicts.is_empty() {
                self.withdraw(&conflicts.into_iter().collect())?;
            }
        }
        self.write_dirty().await
    }

    /// Writes the pending history rows.
    async fn write_states(&mut self) -> Result<()> {
        let states = std::mem::take(&mut self.states);
        if !states.is_empty() {
            self.backend.insert_states(&states).await?;
        }
        Ok(())
    }

    /// Writes the runs in `dirty`.
    async fn write_dirty(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let (mut executions, mut task_runs) = (Vec::new(), Vec::new());
        for id in &dirty {
            match self.overlay.get(id) {
                Some(PendingRun {
                    run: CachedRun::Execution(e),
                    last_seq,
                    request_hash,
                    new,
                }) => executions.push(RunRow {
                    run: e,
                    last_seq: *last_seq,
                    request_hash: request_hash.as_deref(),
                    new: *new,
                }),
                Some(PendingRun {
                    run: CachedRun::TaskRun(t),
                    last_seq,
                    new,
                    ..
                }) => task_runs.push(RunRow {
                    run: t,
                    last_seq: *last_seq,
                    request_hash: None,
                    new: *new,
                }),
                None => {}
            }
        }
        let withdrawn: HashSet<String> = if executions.is_empty() && task_runs.is_empty() {
            HashSet::new()
        } else {
            self.backend
                .write_runs(&executions, &task_runs)
                .await?
                .into_iter()
                .collect()
        };
        // What was written is stored now: later writes of it change it.
        for id in &dirty {
            if let Some(p) = self.overlay.get_mut(id) {
                p.new = false;
            }
        }
        if !withdrawn.is_empty() {
            self.withdraw(&withdrawn)?;
        }
        Ok(())
    }

    /// Ends the transaction's writes: the pending runs and history rows,
    /// then the events, and each tenant's new head.
    pub(super) async fn finish(&mut self) -> Result<()> {
        if self.late {
            return self.seal().await;
        }
        self.flush().await?;
        if self.events.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.events);
        let rows: Vec<EventRow<'_>> = events.iter().map(PendingEvent::row).collect();
        self.backend.insert_events(&rows).await?;
        drop(rows);
        let heads: Vec<(&str, i64)> = self
            .heads
            .iter()
            .filter(|(_, (locked, head))| head > locked)
            .map(|(t, (_, head))| (t.as_str(), *head))
            .collect();
        self.backend.set_heads(&heads).await?;
        self.published.extend(events.into_iter().map(|e| e.event));
        Ok(())
    }

    /// `finish` when events are numbered at commit: the runs of locked
    /// tenants and the history rows are written, the new runs of the
    /// others checked; then one statement takes the tenants' counter
    /// rows, numbers the events after the heads and writes them with the
    /// new runs.
    async fn seal(&mut self) -> Result<()> {
        self.settle().await?;
        if self.events.is_empty() && self.unsealed.is_empty() {
            return self.write_states().await;
        }
        let mut events = std::mem::take(&mut self.events);
        let unsealed = std::mem::take(&mut self.unsealed);
        let start = |heads: &HashMap<String, (i64, i64)>, tenant: &str| {
            heads
                .get(tenant)
                .map(|(start, _)| *start)
                .ok_or_else(|| Error::Internal("a tenant's log was not numbered".into()))
        };
        // Numbers in the transaction, from 1 per tenant.
        for e in &mut events {
            e.event.seq -= start(&self.heads, &e.event.tenant_id)?;
        }
        let counts: Vec<(&str, i64)> = self
            .heads
            .iter()
            .filter(|(_, (start, given))| given > start)
            .map(|(t, (start, given))| (t.as_str(), given - start))
            .collect();
        let (mut executions, mut task_runs) = (Vec::new(), Vec::new());
        for id in &unsealed {
            match self.overlay.get(id) {
                Some(PendingRun {
                    run: CachedRun::Execution(e),
                    last_seq,
                    request_hash,
                    ..
                }) => executions.push(RunRow {
                    run: e,
                    last_seq: last_seq - start(&self.heads, &e.tenant_id)?,
                    request_hash: request_hash.as_deref(),
                    new: true,
                }),
                Some(PendingRun {
                    run: CachedRun::TaskRun(t),
                    last_seq,
                    ..
                }) => task_runs.push(RunRow {
                    run: t,
                    last_seq: last_seq - start(&self.heads, &t.tenant_id)?,
                    request_hash: None,
                    new: true,
                }),
                None => {}
            }
        }
        let rows: Vec<EventRow<'_>> = events.iter().map(PendingEvent::row).collect();
        let states = std::mem::take(&mut self.states);
        let bases = self
            .backend
            .seal(&counts, &rows, &executions, &task_runs, &states)
            .await?;
        drop((rows, executions, task_runs));
        // The seal may have committed already: a defect found now is
        // answered as an unknown outcome, never run again.
        let defect = |what: &str| {
            tracing::error!(error = what, "sealing a batch");
            Error::Unavailable
        };
        for (tenant, (start, _)) in &self.heads {
            if self.locked.contains(tenant) && bases.get(tenant).is_some_and(|b| b != start) {
                return Err(defect("a tenant's head moved while it was locked"));
            }
        }
        for e in &mut events {
            let base = bases
                .get(&e.event.tenant_id)
                .ok_or_else(|| defect("an event's tenant was not numbered"))?;
            e.event.seq += base;
        }
        for id in &unsealed {
            if let Some(p) = self.overlay.get_mut(id) {
                p.new = false;
            }
        }
        self.published.extend(events.into_iter().map(|e| e.event));
        Ok(())
    }
}
