//! The use cases: each reads what it needs inside the writer's transaction,
//! asks the rules, and writes the run, its history row and its event
//! together. Checks come before writes, so a refusal writes nothing.

use std::{future::Future, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::rules::{self, Context, Decision, Payload, Proposal, Status};
use crate::{
    Error, Result,
    domain::{
        Caller, EffectiveConfig, Event, EventKind, Execution, ExecutionId, NewExecution,
        NewTaskRun, Resource, RunCore, State, StateProposal, StateType, TaskRun, TaskRunId,
    },
    store::{Cursor, ExecutionFilter, Page, Store, TaskRunFilter, WriteTx},
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
        self.store
            .write(move |tx| {
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
        self.store
            .write(move |tx| {
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
        payload: Payload,
    ) -> Result<SetStateOutcome<Execution>> {
        let job = Arc::new((caller.clone(), proposal, payload));
        self.store
            .write(move |tx| {
                let job = Arc::clone(&job);
                Box::pin(async move {
                    let (caller, proposal, payload) = &*job;
                    let mut exec = tx
                        .execution(&caller.tenant_id, id)
                        .await?
                        .ok_or_else(|| execution_not_found(id))?;
                    let ctx = Context {
                        now: tx.now(),
                        execution_state: None,
                    };
                    let task_id = exec.task_id.clone();
                    transition(
                        tx,
                        caller,
                        &mut exec,
                        proposal,
                        payload,
                        &ctx,
                        task_id.as_deref(),
                    )
                    .await
                })
            })
            .await
    }

    pub async fn set_task_run_state(
        &self,
        caller: &Caller,
        id: TaskRunId,
        proposal: Proposal,
        payload: Payload,
    ) -> Result<SetStateOutcome<TaskRun>> {
        let job = Arc::new((caller.clone(), proposal, payload));
        self.store
            .write(move |tx| {
                let job = Arc::clone(&job);
                Box::pin(async move {
                    let (caller, proposal, payload) = &*job;
                    let mut run = tx
                        .task_run(&caller.tenant_id, id)
                        .await?
                        .ok_or_else(|| task_run_not_found(id))?;
                    let exec = tx
                        .execution(&caller.tenant_id, run.execution_id)
                        .await?
                        .ok_or_else(|| execution_not_found(run.execution_id))?;
                    let ctx = Context {
                        now: tx.now(),
                        execution_state: Some(exec.run.state.state_type),
                    };
                    transition(
                        tx,
                        caller,
                        &mut run,
                        proposal,
                        payload,
                        &ctx,
                        exec.task_id.as_deref(),
                    )
                    .await
                })
            })
            .await
    }

    pub async fn execution(&self, caller: &Caller, id: ExecutionId) -> Result<(Execution, i64)> {
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

    /// The state history of an execution or a task run, oldest first.
    pub async fn execution_states(&self, caller: &Caller, id: ExecutionId) -> Result<Vec<State>> {
        self.execution(caller, id).await?;
        self.store.states(&caller.tenant_id, &id.to_string()).await
    }

    pub async fn task_run_states(&self, caller: &Caller, id: TaskRunId) -> Result<Vec<State>> {
        self.task_run(caller, id).await?;
        self.store.states(&caller.tenant_id, &id.to_string()).await
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
        return if Some(hash.as_str()) == fingerprint {
            Ok((existing, false))
        } else {
            Err(Error::AlreadyExists(format!(
                "request_id {request_id:?} was already used for execution {} with a different request",
                existing.id
            )))
        };
    }
    let now = tx.now();
    let initial = new
        .initial_state
        .clone()
        .unwrap_or_else(|| StateProposal::of_type(StateType::Pending))
        .into_state(now);
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
        && let Some(existing) = tx.task_run_by_key(exec.id, &new.task_key, key).await?
    {
        return Ok((existing, false));
    }
    let exec_state = exec.run.state.state_type;
    if exec_state.is_terminal() || exec_state == StateType::Cancelling {
        return Err(Error::FailedPrecondition(format!(
            "execution {} is {}; it takes no new task runs",
            exec.id, exec.run.state.name
        )));
    }
    if exec.run.deleted_at.is_some() {
        return Err(Error::FailedPrecondition(format!(
            "execution {} is deleted",
            exec.id
        )));
    }
    let depth = match new.parent_task_run_id {
        None => 1,
        Some(parent_id) => {
            let parent = tx
                .task_run(tenant, parent_id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("parent task run {parent_id} not found")))?;
            if parent.execution_id != exec.id {
                return Err(Error::FailedPrecondition(format!(
                    "parent task run {parent_id} belongs to another execution"
                )));
            }
            parent.depth + 1
        }
    };
    if depth > exec.max_depth {
        return Err(Error::FailedPrecondition(format!(
            "a task run at depth {depth} exceeds the execution's max_depth of {}",
            exec.max_depth
        )));
    }
    let dynamic_key = match &new.dynamic_key {
        Some(key) => key.clone(),
        None => next_dynamic_key(tx, exec.id, &new.task_key).await?,
    };
    let now = tx.now();
    let initial = new
        .initial_state
        .clone()
        .unwrap_or_else(|| StateProposal::of_type(StateType::Pending))
        .into_state(now);
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
        estimated_run_time_us: 0,
        estimated_start_time_delta_us: 0,
        run: RunCore::new(initial, &caller.name),
    };
    let seq = record_creation_with(tx, &run, exec.task_id.as_deref()).await?;
    tx.save_task_run(&run, seq).await?;
    Ok((run, true))
}

/// The smallest free zero-based index at or above the count of the task
/// key's runs.
async fn next_dynamic_key(
    tx: &mut WriteTx<'_>,
    execution: ExecutionId,
    task_key: &str,
) -> Result<String> {
    let mut n = tx.count_task_runs_for_key(execution, task_key).await?;
    loop {
        let key = n.to_string();
        if tx
            .task_run_by_key(execution, task_key, &key)
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

/// Applies the rules to a proposal for `run` and, when accepted, records
/// the transition.
#[allow(clippy::too_many_arguments)]
async fn transition<R: Tracked + Clone>(
    tx: &mut WriteTx<'_>,
    caller: &Caller,
    run: &mut R,
    proposal: &Proposal,
    payload: &Payload,
    ctx: &Context,
    task_id: Option<&str>,
) -> Result<SetStateOutcome<R>> {
    let run_id = run.run_id();
    let transition_id = proposal.state.details.transition_id.as_deref();
    // Rule 1: a repeated transition_id gets the first result.
    if let Some(tid) = transition_id
        && let Some(json) = tx.transition(&run_id, tid).await?
    {
        let first: Recorded = serde_json::from_str(&json)
            .map_err(|e| Error::Internal(format!("decoding a recorded transition: {e}")))?;
        return Ok(SetStateOutcome {
            status: first.status,
            state: first.state,
            reason: first.reason,
            retry_after: None,
            run: run.clone(),
        });
    }
    let decision = rules::decide(&run.core().state, proposal, ctx);
    let (reason, retry_after) = match &decision {
        Decision::Accept => (String::new(), None),
        Decision::Reject { reason } | Decision::Abort { reason } => (reason.clone(), None),
        Decision::Wait {
            reason,
            retry_after,
        } => (reason.clone(), Some(*retry_after)),
    };
    if decision == Decision::Accept {
        let previous = run.core().state.state_type;
        let next = proposal.state.clone().into_state(ctx.now);
        rules::apply_accepted(run.core_mut(), next, payload.clone(), &caller.name);
        tx.append_state(&caller.tenant_id, &run_id, &run.core().state)
            .await?;
        let seq = tx
            .append_event(&Event {
                kind: EventKind::StateChanged,
                occurred_at: ctx.now,
                previous_state_type: Some(previous),
                resource: run.resource(),
                task_id,
            })
            .await?;
        run.save(tx, seq).await?;
        if let Some(tid) = transition_id {
            let recorded = Recorded {
                status: Status::Accept,
                state: run.core().state.clone(),
                reason: String::new(),
            };
            let json = serde_json::to_string(&recorded)
                .map_err(|e| Error::Internal(format!("encoding a transition: {e}")))?;
            tx.record_transition(&run_id, tid, &json).await?;
        }
    }
    Ok(SetStateOutcome {
        status: decision.status(),
        state: run.core().state.clone(),
        reason,
        retry_after,
        run: run.clone(),
    })
}
