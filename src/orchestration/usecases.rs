//! The use cases: each reads what it needs inside the writer's transaction,
//! asks the rules, and writes the run, its history row and its event
//! together. Checks come before writes, so a refusal writes nothing.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::rules::{self, CacheEntry, Context, Decision, Payload, Proposal, Status, TaskContext};
use crate::{
    Error, Result,
    domain::{
        Caller, EffectiveConfig, Event, EventKind, Execution, ExecutionId, NewExecution,
        NewTaskRun, Resource, RunCore, SYSTEM_ACTOR, State, TaskRun, TaskRunId, Timestamp,
        document, json,
        template::{self, Resolution, Upstream},
    },
    store::{Cursor, ExecutionFilter, HistoryPage, Page, Store, TaskRunFilter, WriteTx},
};

/// The result of a proposed transition.
#[derive(Debug, Clone)]
pub struct SetStateOutcome<R> {
    pub status: Status,
    /// The state the run is in now.
    pub state: State,
    pub reason: String,
    pub retry_after: Option<Duration>,
    pub run: R,
    /// Whether this call changed the run (a replayed transition did not).
    pub changed: bool,
}

/// What is kept of a transition's first result, for rule 1.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    status: Status,
    state: State,
    reason: String,
}

/// The ledger's operations, for the gRPC services.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
}

impl Ledger {
    pub fn new(store: Store) -> Self {
        Ledger { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the execution and whether it was created (false when the
    /// request_id matched an earlier identical request).
    pub async fn create_execution(
        &self,
        caller: &Caller,
        new: NewExecution,
    ) -> Result<(Execution, bool)> {
        let fingerprint: Option<Arc<str>> =
            new.request_id.as_ref().map(|_| new.fingerprint().into());
        let new = Arc::new(new);
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let (new, caller, fp) = (Arc::clone(&new), caller.clone(), fingerprint.clone());
                Box::pin(async move { create_execution(tx, &caller, &new, fp.as_deref()).await })
            })
            .await
    }

    pub async fn create_task_run(
        &self,
        caller: &Caller,
        new: NewTaskRun,
    ) -> Result<(TaskRun, bool)> {
        let new = Arc::new(new);
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let (new, caller) = (Arc::clone(&new), caller.clone());
                Box::pin(async move { create_task_run(tx, &caller, &new).await })
            })
            .await
    }

    pub async fn set_execution_state(
        &self,
        caller: &Caller,
        id: ExecutionId,
        proposal: Proposal,
    ) -> Result<SetStateOutcome<Execution>> {
        let job = Arc::new((caller.clone(), proposal));
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let job = Arc::clone(&job);
                Box::pin(async move {
                    let (caller, proposal) = &*job;
                    let mut exec = load_execution(tx, caller, id).await?;
                    let ctx = Context {
                        now: tx.now(),
                        execution_state: None,
                        task: None,
                    };
                    let task_id = exec.task_id.clone();
                    transition(tx, caller, &mut exec, proposal, &ctx, task_id.as_deref()).await
                })
            })
            .await
    }

    pub async fn set_task_run_state(
        &self,
        caller: &Caller,
        id: TaskRunId,
        proposal: Proposal,
    ) -> Result<SetStateOutcome<TaskRun>> {
        let job = Arc::new((caller.clone(), proposal));
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let job = Arc::clone(&job);
                Box::pin(async move {
                    let (caller, proposal) = &*job;
                    set_task_run_state(tx, caller, id, proposal).await
                })
            })
            .await
    }

    /// Cancels an execution and its task runs (see `rules::cancel_target`).
    pub async fn cancel_execution(
        &self,
        caller: &Caller,
        id: ExecutionId,
        reason: String,
    ) -> Result<Execution> {
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let (caller, reason) = (caller.clone(), reason.clone());
                Box::pin(async move { cancel_execution(tx, &caller, id, &reason).await })
            })
            .await
    }

    /// PAUSED -> RUNNING, with `run_input` on the new state's data.
    pub async fn resume_execution(
        &self,
        caller: &Caller,
        id: ExecutionId,
        run_input: Map<String, Value>,
    ) -> Result<Execution> {
        let job = Arc::new((caller.clone(), run_input));
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let job = Arc::clone(&job);
                Box::pin(async move { resume_execution(tx, &job.0, id, &job.1).await })
            })
            .await
    }

    /// Soft delete: hidden from lists, still readable. Deleting twice is
    /// not an error.
    pub async fn delete_execution(&self, caller: &Caller, id: ExecutionId) -> Result<Execution> {
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let caller = caller.clone();
                Box::pin(async move {
                    let mut exec = load_execution(tx, &caller, id).await?;
                    if exec.run.deleted_at.is_none() {
                        mark_deleted(&mut exec.run, &caller);
                        let task_id = exec.task_id.clone();
                        commit_update(tx, &exec, EventKind::Deleted, task_id.as_deref()).await?;
                    }
                    Ok(exec)
                })
            })
            .await
    }

    pub async fn delete_task_run(&self, caller: &Caller, id: TaskRunId) -> Result<TaskRun> {
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let caller = caller.clone();
                Box::pin(async move {
                    let (mut run, exec) = load_task_run(tx, &caller, id).await?;
                    if run.run.deleted_at.is_none() {
                        mark_deleted(&mut run.run, &caller);
                        commit_update(tx, &run, EventKind::Deleted, exec.task_id.as_deref())
                            .await?;
                    }
                    Ok(run)
                })
            })
            .await
    }

    /// Marks a COMPLETED or FAILED task run's data as outdated.
    pub async fn mark_task_run_stale(&self, caller: &Caller, id: TaskRunId) -> Result<TaskRun> {
        let caller = caller.clone();
        let tenant = caller.tenant_id.clone();
        self.store
            .write(&tenant, move |tx| {
                let caller = caller.clone();
                Box::pin(async move {
                    let (mut run, exec) = load_task_run(tx, &caller, id).await?;
                    rules::check_may_mark_stale(id, &run.run.state)?;
                    if !run.stale {
                        run.stale = true;
                        let now = tx.now();
                        run.run.updated_at = now;
                        run.run.updated_by = caller.name.clone();
                        commit_update(tx, &run, EventKind::Updated, exec.task_id.as_deref())
                            .await?;
                    }
                    Ok(run)
                })
            })
            .await
    }

    /// Fails PAUSED runs whose pause timed out; returns how many.
    ///
    /// The candidates are found first; then each tenant's are failed in a
    /// transaction of that tenant, which looks at each run again: on a
    /// database several servers share, another server's sweeper (or a
    /// client's resume) may have got there first, and a run is failed once.
    pub async fn expire_pauses(&self) -> Result<usize> {
        let now = Timestamp::now();
        let (executions, task_runs) = self
            .store
            .write_system(move |tx| Box::pin(tx.expired_pauses(now, SWEEP_LIMIT)))
            .await?;
        let mut by_tenant: BTreeMap<String, (Vec<ExecutionId>, Vec<TaskRunId>)> = BTreeMap::new();
        for (tenant, id) in executions {
            if let Ok(id) = ExecutionId::parse(&id) {
                by_tenant.entry(tenant).or_default().0.push(id);
            }
        }
        for (tenant, id) in task_runs {
            if let Ok(id) = TaskRunId::parse(&id) {
                by_tenant.entry(tenant).or_default().1.push(id);
            }
        }
        let mut n = 0;
        for (tenant, runs) in by_tenant {
            let runs = Arc::new(runs);
            let system = Caller {
                tenant_id: tenant.clone(),
                name: SYSTEM_ACTOR.into(),
            };
            n += self
                .store
                .write(&tenant, move |tx| {
                    let (runs, system) = (Arc::clone(&runs), system.clone());
                    Box::pin(async move { expire_pauses(tx, &system, &runs.0, &runs.1).await })
                })
                .await?;
        }
        Ok(n)
    }

    /// Takes one request from `key`'s daily quota, shared by every server
    /// on the database; false when none is left.
    pub async fn take_quota(
        &self,
        key: &crate::keys::ActiveKey,
        day: i64,
        quota: i64,
    ) -> Result<bool> {
        self.store
            .take_quota(&key.caller.tenant_id, &key.id, day, quota)
            .await
    }

    /// Takes one token from `key`'s rate bucket, shared by every server on
    /// the database; how long to wait when none is left.
    pub async fn take_token(
        &self,
        key: &crate::keys::ActiveKey,
        rate: f64,
    ) -> Result<Option<std::time::Duration>> {
        self.store
            .take_token(&key.caller.tenant_id, &key.id, rate)
            .await
    }

    /// The API key in force with this secret hash.
    pub async fn find_key(&self, hash: &str) -> Result<Option<crate::keys::ActiveKey>> {
        self.store.find_key(hash).await
    }

    pub async fn execution(&self, caller: &Caller, id: ExecutionId) -> Result<(Execution, i64)> {
        // Reads from the pool see committed data only.
        self.store
            .execution(&caller.tenant_id, id)
            .await?
            .ok_or_else(|| execution_not_found(id))
    }

    pub async fn task_run(&self, caller: &Caller, id: TaskRunId) -> Result<(TaskRun, i64)> {
        self.store
            .task_run(&caller.tenant_id, id)
            .await?
            .ok_or_else(|| task_run_not_found(id))
    }

    pub async fn list_executions(
        &self,
        caller: &Caller,
        filter: &ExecutionFilter,
        page: &Page,
    ) -> Result<(Vec<Execution>, Option<Cursor>)> {
        self.store
            .list_executions(&caller.tenant_id, filter, page)
            .await
    }

    pub async fn list_task_runs(
        &self,
        caller: &Caller,
        filter: &TaskRunFilter,
        page: &Page,
    ) -> Result<(Vec<TaskRun>, Option<Cursor>)> {
        self.store
            .list_task_runs(&caller.tenant_id, filter, page)
            .await
    }

    /// A page of the state history of an execution or a task run, oldest
    /// first, and the next page's token.
    pub async fn execution_states(
        &self,
        caller: &Caller,
        id: ExecutionId,
        page: &HistoryPage,
    ) -> Result<(Vec<State>, Option<String>)> {
        self.execution(caller, id).await?;
        self.store
            .states(&caller.tenant_id, &id.to_string(), page)
            .await
    }

    pub async fn task_run_states(
        &self,
        caller: &Caller,
        id: TaskRunId,
        page: &HistoryPage,
    ) -> Result<(Vec<State>, Option<String>)> {
        self.task_run(caller, id).await?;
        self.store
            .states(&caller.tenant_id, &id.to_string(), page)
            .await
    }
}

pub(crate) fn execution_not_found(id: ExecutionId) -> Error {
    Error::NotFound(format!("execution {id} not found"))
}

pub(crate) fn task_run_not_found(id: TaskRunId) -> Error {
    Error::NotFound(format!("task run {id} not found"))
}

async fn create_execution(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    new: &NewExecution,
    fingerprint: Option<&str>,
) -> Result<(Execution, bool)> {
    if let Some(request_id) = &new.request_id
        && let Some((existing, hash)) = tx
            .execution_by_request_id(&caller.tenant_id, request_id)
            .await?
    {
        return rules::repeated_request(request_id, existing, &hash, fingerprint);
    }
    let now = tx.now();
    let initial = rules::initial_state(new.initial_state.as_ref(), now);
    let execution = Execution {
        id: ExecutionId::new(),
        tenant_id: caller.tenant_id.clone(),
        task_id: new.task_id.clone(),
        name: new.name.clone(),
        input: new.input.clone(),
        goal: new.goal.clone(),
        max_depth: new.max_depth,
        config_profile: new.config_profile,
        config_overrides: new.config_overrides.clone(),
        effective_config: EffectiveConfig::resolve(new.config_profile, &new.config_overrides),
        metadata: new.metadata.clone(),
        request_id: new.request_id.clone(),
        run: RunCore::new(initial, &caller.name),
    };
    let field = rules::largest(&[
        ("input", json::struct_len(&execution.input)),
        ("initial_state", document::state_bytes(&execution.run.state)),
    ]);
    ensure_fits(&execution, field)?;
    let seq = record_creation(tx, &execution).await?;
    tx.save_execution(&execution, fingerprint, seq).await?;
    Ok((execution, true))
}

async fn create_task_run(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    new: &NewTaskRun,
) -> Result<(TaskRun, bool)> {
    let tenant = &caller.tenant_id;
    let exec = tx
        .execution(tenant, new.execution_id)
        .await?
        .ok_or_else(|| execution_not_found(new.execution_id))?;
    if let Some(key) = &new.dynamic_key
        && let Some(existing) = tx
            .task_run_by_key(&exec.tenant_id, exec.id, &new.task_key, key)
            .await?
    {
        return Ok((existing, false));
    }
    let depth = match may_add_task_run(tx, tenant, &exec, new).await {
        Ok(depth) => depth,
        Err(refusal) => {
            // A refusal must not hide an earlier identical create: look
            // for it in the database before refusing.
            if let Some(key) = &new.dynamic_key
                && let Some(existing) = tx
                    .task_run_by_key_checked(&exec.tenant_id, exec.id, &new.task_key, key)
                    .await?
            {
                return Ok((existing, false));
            }
            return Err(refusal);
        }
    };
    let dynamic_key = match &new.dynamic_key {
        Some(key) => key.clone(),
        None => next_dynamic_key(tx, &exec.tenant_id, exec.id, &new.task_key).await?,
    };
    let now = tx.now();
    let initial = rules::initial_state(new.initial_state.as_ref(), now);
    let id = TaskRunId::new();
    let run = TaskRun {
        id,
        tenant_id: tenant.clone(),
        execution_id: exec.id,
        parent_task_run_id: new.parent_task_run_id,
        depth,
        task_key: new.task_key.clone(),
        dynamic_key,
        name: if new.name.is_empty() {
            // The id's last digits are random: a readable, distinct name.
            let id = id.to_string();
            format!("{}-{}", new.task_key, &id[id.len() - 6..])
        } else {
            new.name.clone()
        },
        task_version: new.task_version.clone(),
        cache_key: new.cache_key.clone(),
        cache_expiration: new.cache_expiration,
        retry_policy: new.retry_policy.clone(),
        tags: new.tags.clone(),
        labels: new.labels.clone(),
        input: new.input.clone(),
        resolved_input: None,
        task_inputs: Vec::new(),
        stale: false,
        run: RunCore::new(initial, &caller.name),
    };
    let field = rules::largest(&[
        ("input", json::encoded_len(&run.input)),
        ("initial_state", document::state_bytes(&run.run.state)),
    ]);
    ensure_fits(&run, field)?;
    let seq = record_creation_with(tx, &run, exec.task_id.as_deref()).await?;
    tx.save_task_run(&run, seq).await?;
    Ok((run, true))
}

/// Whether `exec` takes this new task run, and at which depth (see
/// `rules::check_takes_task_runs` and `rules::task_run_depth`); the parent
/// is read only for an execution that takes task runs.
async fn may_add_task_run(
    tx: &mut WriteTx<'_>,
    tenant: &str,
    exec: &Execution,
    new: &NewTaskRun,
) -> Result<i32> {
    rules::check_takes_task_runs(exec)?;
    let parent = match new.parent_task_run_id {
        None => None,
        Some(parent_id) => {
            let found = tx.task_run(tenant, parent_id).await?;
            let missing = || Error::NotFound(format!("parent task run {parent_id} not found"));
            Some(found.ok_or_else(missing)?)
        }
    };
    rules::task_run_depth(exec, parent.as_ref())
}

/// The smallest free zero-based index at or above the count of the task
/// key's runs.
async fn next_dynamic_key(
    tx: &mut WriteTx<'_>,
    tenant: &str,
    execution: ExecutionId,
    task_key: &str,
) -> Result<String> {
    let mut n = tx
        .count_task_runs_for_key(tenant, execution, task_key)
        .await?;
    loop {
        let key = n.to_string();
        if tx
            .task_run_by_key(tenant, execution, task_key, &key)
            .await?
            .is_none()
        {
            return Ok(key);
        }
        n += 1;
    }
}

/// A run the use cases can move through states.
pub(crate) trait Tracked: Send + Sync {
    fn core(&self) -> &RunCore;
    fn core_mut(&mut self) -> &mut RunCore;
    fn run_id(&self) -> String;
    fn resource(&self) -> Resource<'_>;
    /// Records the input with its templates resolved (task runs only).
    fn set_resolved_input(&mut self, _value: Value, _task_inputs: Vec<TaskRunId>) {}
    /// An upper bound of the run's encoded size (see `domain::document`).
    fn document_bytes(&self) -> usize;
    /// "execution" or "task run", for messages.
    fn kind(&self) -> &'static str;
    fn save<'a>(
        &'a self,
        tx: &'a mut WriteTx<'_>,
        seq: i64,
    ) -> impl Future<Output = Result<()>> + Send + 'a;
}

impl Tracked for Execution {
    fn core(&self) -> &RunCore {
        &self.run
    }
    fn core_mut(&mut self) -> &mut RunCore {
        &mut self.run
    }
    fn run_id(&self) -> String {
        self.id.to_string()
    }
    fn resource(&self) -> Resource<'_> {
        Resource::Execution(self)
    }
    fn document_bytes(&self) -> usize {
        document::execution_bytes(self)
    }
    fn kind(&self) -> &'static str {
        "execution"
    }
    fn save<'a>(
        &'a self,
        tx: &'a mut WriteTx<'_>,
        seq: i64,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        tx.save_execution(self, None, seq)
    }
}

impl Tracked for TaskRun {
    fn core(&self) -> &RunCore {
        &self.run
    }
    fn core_mut(&mut self) -> &mut RunCore {
        &mut self.run
    }
    fn run_id(&self) -> String {
        self.id.to_string()
    }
    fn resource(&self) -> Resource<'_> {
        Resource::TaskRun(self)
    }
    fn document_bytes(&self) -> usize {
        document::task_run_bytes(self)
    }
    fn kind(&self) -> &'static str {
        "task run"
    }
    fn set_resolved_input(&mut self, value: Value, task_inputs: Vec<TaskRunId>) {
        self.resolved_input = Some(value);
        self.task_inputs = task_inputs;
    }
    fn save<'a>(
        &'a self,
        tx: &'a mut WriteTx<'_>,
        seq: i64,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        tx.save_task_run(self, seq)
    }
}

async fn record_creation(tx: &mut WriteTx<'_>, e: &Execution) -> Result<i64> {
    record_creation_with(tx, e, e.task_id.as_deref()).await
}

/// The initial state's history row and the CREATED event.
async fn record_creation_with<R: Tracked>(
    tx: &mut WriteTx<'_>,
    run: &R,
    task_id: Option<&str>,
) -> Result<i64> {
    let core = run.core();
    tx.append_state(run.resource().tenant_id(), &run.run_id(), &core.state)
        .await?;
    tx.append_event(&Event {
        kind: EventKind::Created,
        occurred_at: core.created_at,
        previous_state_type: None,
        resource: run.resource(),
        task_id,
    })
    .await
}

async fn load_execution(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    id: ExecutionId,
) -> Result<Execution> {
    tx.execution(&caller.tenant_id, id)
        .await?
        .ok_or_else(|| execution_not_found(id))
}

/// A task run and its execution.
async fn load_task_run(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    id: TaskRunId,
) -> Result<(TaskRun, Execution)> {
    let run = tx
        .task_run(&caller.tenant_id, id)
        .await?
        .ok_or_else(|| task_run_not_found(id))?;
    let exec = load_execution(tx, caller, run.execution_id).await?;
    Ok((run, exec))
}

fn mark_deleted(run: &mut RunCore, caller: &Caller) {
    let now = Timestamp::now();
    run.deleted_at = Some(now);
    run.updated_at = now;
    run.updated_by = caller.name.clone();
}

async fn set_task_run_state(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    id: TaskRunId,
    proposal: &Proposal,
) -> Result<SetStateOutcome<TaskRun>> {
    let (mut run, exec) = load_task_run(tx, caller, id).await?;
    let now = tx.now();
    let task = task_context(tx, caller, &run, proposal).await?;
    let ctx = Context {
        now,
        execution_state: Some(exec.run.state.state_type),
        task: Some(task),
    };
    let outcome = transition(
        tx,
        caller,
        &mut run,
        proposal,
        &ctx,
        exec.task_id.as_deref(),
    )
    .await?;
    // Rule 8's other half: a completed result with a cache key is cached.
    if let Some(write) = rules::cache_write(outcome.changed, &proposal.state, &run) {
        tx.put_cache_entry(
            &caller.tenant_id,
            write.key,
            run.id,
            run.run.output.as_ref(),
            write.expiration,
        )
        .await?;
    }
    Ok(outcome)
}

/// Gathers what rules 8 to 10 look at: only a RUNNING proposal needs the
/// cache and the upstream runs.
async fn task_context(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    run: &TaskRun,
    proposal: &Proposal,
) -> Result<TaskContext> {
    let mut task = TaskContext {
        retry_policy: run.retry_policy.clone(),
        run_count: run.run.run_count,
        jitter: rand::random::<f64>(),
        ..TaskContext::default()
    };
    if !rules::needs_task_lookups(proposal) {
        return Ok(task);
    }
    if let Some(key) = rules::cache_key_to_read(&proposal.state, run) {
        task.cache = tx
            .cache_entry(&caller.tenant_id, key)
            .await?
            .map(|(output, expiration)| CacheEntry { output, expiration });
    }
    let keys = template::referenced_keys(&run.input);
    let keys_len = keys.len();
    if !keys.is_empty() {
        task.templates = Some(match upstreams(tx, run, keys).await? {
            Some(upstreams) => {
                let room = rules::resolution_room(run, &proposal.state, keys_len);
                template::resolve(&run.input, &upstreams, json::MAX_ENCODED_BYTES.min(room))
            }
            None => rules::upstreams_too_large(),
        });
    }
    Ok(task)
}

/// What each of `keys` offers `run`'s templates, reading only the output
/// of each key's latest COMPLETED run; None when those outputs together
/// are larger than [`template::MAX_UPSTREAM_BYTES`].
async fn upstreams(
    tx: &mut WriteTx<'_>,
    run: &TaskRun,
    keys: Vec<String>,
) -> Result<Option<BTreeMap<String, Upstream>>> {
    let mut upstreams = BTreeMap::new();
    let mut loaded = 0usize;
    for key in keys {
        // A run is never its own upstream.
        let found = match tx
            .latest_completed_output(&run.tenant_id, run.execution_id, &key, run.id)
            .await?
        {
            Some((id, output)) => {
                loaded = loaded.saturating_add(output.as_ref().map_or(0, String::len));
                if loaded > template::MAX_UPSTREAM_BYTES {
                    return Ok(None);
                }
                let output = match output {
                    Some(text) => serde_json::from_str(&text)
                        .map_err(|e| Error::Internal(format!("decoding a stored output: {e}")))?,
                    None => Value::Null,
                };
                Upstream::Completed { id, output }
            }
            None => match tx
                .runs_of_key_exist(&run.tenant_id, run.execution_id, &key, run.id)
                .await?
            {
                (false, _) => Upstream::Missing,
                (true, true) => Upstream::InProgress,
                (true, false) => Upstream::EndedOtherwise,
            },
        };
        upstreams.insert(key, found);
    }
    Ok(Some(upstreams))
}

async fn cancel_execution(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    id: ExecutionId,
    reason: &str,
) -> Result<Execution> {
    let mut exec = load_execution(tx, caller, id).await?;
    rules::check_cancellable(id, &exec.run.state)?;
    let st = exec.run.state.state_type;
    let now = tx.now();
    let task_id = exec.task_id.clone();
    // Task runs first, so that the execution's own (possibly terminal)
    // event is the last a stream of it delivers.
    for mut run in tx.task_runs_of(&caller.tenant_id, id).await? {
        if let Some(target) = rules::cancel_target(st, run.run.state.state_type) {
            let next = rules::cancel_state(target, reason, now);
            commit_transition(
                tx,
                &mut run,
                next,
                Payload::default(),
                &caller.name,
                task_id.as_deref(),
                None,
            )
            .await?;
        }
    }
    if let Some(target) = rules::cancel_target(st, st) {
        let next = rules::cancel_state(target, reason, now);
        commit_transition(
            tx,
            &mut exec,
            next,
            Payload::default(),
            &caller.name,
            task_id.as_deref(),
            None,
        )
        .await?;
    }
    Ok(exec)
}

async fn resume_execution(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    id: ExecutionId,
    run_input: &Map<String, Value>,
) -> Result<Execution> {
    let mut exec = load_execution(tx, caller, id).await?;
    rules::check_resumable(id, &exec.run.state)?;
    let now = tx.now();
    let next = rules::resume_state(id, &exec.run.state, run_input, now)?;
    let task_id = exec.task_id.clone();
    commit_transition(
        tx,
        &mut exec,
        next.into_state(now),
        Payload::default(),
        &caller.name,
        task_id.as_deref(),
        Some("run_input"),
    )
    .await?;
    Ok(exec)
}

/// How many timed-out pauses one sweep handles; the next sweep does more.
const SWEEP_LIMIT: i64 = 256;

/// Fails the runs among these whose pause has timed out by now, as they
/// are in this transaction; returns how many.
async fn expire_pauses(
    tx: &mut WriteTx<'_>,
    system: &Caller,
    executions: &[ExecutionId],
    task_runs: &[TaskRunId],
) -> Result<usize> {
    let now = tx.now();
    let mut n = 0;
    for id in executions {
        let Some(mut exec) = tx.execution(&system.tenant_id, *id).await? else {
            continue;
        };
        if !rules::pause_expired(&exec.run.state, now) {
            continue;
        }
        let task_id = exec.task_id.clone();
        commit_transition(
            tx,
            &mut exec,
            rules::pause_timeout_state(now),
            rules::pause_timeout_payload(),
            SYSTEM_ACTOR,
            task_id.as_deref(),
            None,
        )
        .await?;
        n += 1;
    }
    for id in task_runs {
        let Some(mut run) = tx.task_run(&system.tenant_id, *id).await? else {
            continue;
        };
        if !rules::pause_expired(&run.run.state, now) {
            continue;
        }
        let (_, exec) = load_task_run(tx, system, *id).await?;
        commit_transition(
            tx,
            &mut run,
            rules::pause_timeout_state(now),
            rules::pause_timeout_payload(),
            SYSTEM_ACTOR,
            exec.task_id.as_deref(),
            None,
        )
        .await?;
        n += 1;
    }
    Ok(n)
}

/// Rule 11 for a change the rules allowed or the server made: bookkeeping,
/// a history row, a STATE_CHANGED event and the run itself, together.
/// A change a client asked for is refused, before anything is written, if
/// it would make the run too large to send, naming the request's `field`
/// that brought it; the server's own changes fit in the room kept for them.
async fn commit_transition<R: Tracked>(
    tx: &mut WriteTx<'_>,
    run: &mut R,
    next: State,
    payload: Payload,
    actor: &str,
    task_id: Option<&str>,
    field: Option<&str>,
) -> Result<i64> {
    let previous = run.core().state.state_type;
    let occurred_at = next.timestamp;
    rules::apply_accepted(run.core_mut(), next, payload, actor);
    if let Some(field) = field {
        ensure_fits(run, field)?;
    }
    let tenant = run.resource().tenant_id().to_owned();
    tx.append_state(&tenant, &run.run_id(), &run.core().state)
        .await?;
    let seq = tx
        .append_event(&Event {
            kind: EventKind::StateChanged,
            occurred_at,
            previous_state_type: Some(previous),
            resource: run.resource(),
            task_id,
        })
        .await?;
    run.save(tx, seq).await?;
    Ok(seq)
}

/// A change that is not a transition (deleted, marked stale): an event and
/// the run.
async fn commit_update<R: Tracked>(
    tx: &mut WriteTx<'_>,
    run: &R,
    kind: EventKind,
    task_id: Option<&str>,
) -> Result<i64> {
    let seq = tx
        .append_event(&Event {
            kind,
            occurred_at: run.core().updated_at,
            previous_state_type: None,
            resource: run.resource(),
            task_id,
        })
        .await?;
    run.save(tx, seq).await?;
    Ok(seq)
}

/// Refuses a run that, with its state sent once more beside it, would not
/// fit in a message a client accepts (see `rules::check_fits`).
fn ensure_fits<R: Tracked>(run: &R, field: &str) -> Result<()> {
    rules::check_fits(run.kind(), run.document_bytes(), &run.core().state, field)
}

/// Applies the rules to a proposal for `run` and records what they decide.
async fn transition<R: Tracked + Clone>(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    run: &mut R,
    proposal: &Proposal,
    ctx: &Context,
    task_id: Option<&str>,
) -> Result<SetStateOutcome<R>> {
    let run_id = run.run_id();
    let transition_id = proposal.state.details.transition_id.as_deref();
    // Rule 1: a repeated transition_id gets the first result.
    if let Some(tid) = transition_id
        && let Some(json) = tx.transition(&caller.tenant_id, &run_id, tid).await?
    {
        let first: Recorded = serde_json::from_str(&json)
            .map_err(|e| Error::Internal(format!("decoding a recorded transition: {e}")))?;
        return Ok(SetStateOutcome {
            status: first.status,
            state: first.state,
            reason: first.reason,
            retry_after: None,
            run: run.clone(),
            changed: false,
        });
    }
    let decision = rules::decide(&run.core().state, proposal, ctx);
    let status = decision.status();
    let (reason, retry_after) = (decision.reason().to_owned(), decision.retry_after());
    let field = rules::largest_in(proposal);
    let changed = match decision {
        Decision::Accept => {
            let next = rules::next_state(&run.core().state, &proposal.state, ctx.now);
            if let Some(Resolution::Resolved { value, task_inputs }) =
                ctx.task.as_ref().and_then(|t| t.templates.as_ref())
            {
                run.set_resolved_input(value.clone(), task_inputs.clone());
            }
            commit_transition(
                tx,
                run,
                next,
                proposal.payload.clone(),
                &caller.name,
                task_id,
                Some(field),
            )
            .await?;
            true
        }
        Decision::Redirect { state, payload, .. } => {
            commit_transition(
                tx,
                run,
                state.into_state(ctx.now),
                payload,
                SYSTEM_ACTOR,
                task_id,
                Some(field),
            )
            .await?;
            true
        }
        Decision::Reject { .. } | Decision::Wait { .. } | Decision::Abort { .. } => false,
    };
    if changed && let Some(tid) = transition_id {
        let recorded = Recorded {
            status,
            state: run.core().state.clone(),
            reason: reason.clone(),
        };
        let json = serde_json::to_string(&recorded)
            .map_err(|e| Error::Internal(format!("encoding a transition: {e}")))?;
        tx.record_transition(&caller.tenant_id, &run_id, tid, &json)
            .await?;
    }
    Ok(SetStateOutcome {
        status,
        state: run.core().state.clone(),
        reason,
        retry_after,
        run: run.clone(),
        changed,
    })
}
