//! The orchestration rules of the contract, as pure functions: given a
//! run's current state, a proposal and the context, decide; then apply the
//! bookkeeping of an accepted transition. No I/O happens here: the use cases
//! read what a rule looks at, ask the rule, and write what it decides; the
//! gRPC layer only translates wire types and names the fields a rule
//! refuses.
//!
//! The rule families:
//!
//! - transitions: [`decide`] (rules 2 to 10), [`retry_delay`],
//!   [`next_state`], and rule 11's bookkeeping ([`apply_accepted`],
//!   [`error_after`]);
//! - payloads: which state types a request may send an output or an error
//!   with ([`may_carry_output`], [`may_carry_error`]);
//! - creation and admission: the state a run starts in ([`may_start_in`],
//!   [`initial_state`]), a repeated request_id ([`repeated_request`]), and
//!   whether an execution takes a new task run and at which depth
//!   ([`check_takes_task_runs`], [`task_run_depth`]);
//! - cache and templates: what rules 8 and 10 look at
//!   ([`needs_task_lookups`], [`cache_key_to_read`]), when a completed
//!   result is written to the cache and until when ([`cache_write`]), and
//!   upstream outputs too large to load ([`upstreams_too_large`]);
//! - cancel: [`check_cancellable`], [`cancel_target`], [`cancel_state`];
//! - resume: [`check_resumable`], then [`resume_state`] ([`missing_keys`]);
//! - pause timeout: [`pause_timed_out`], [`pause_timeout_state`],
//!   [`pause_timeout_payload`];
//! - stale: [`check_may_mark_stale`];
//! - size: a run must fit in a response ([`check_fits`]), and a refusal
//!   names the field that adds the most ([`largest`], [`largest_in`]);
//!   the room left for a resolved input ([`resolution_room`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    Error, Result,
    domain::{
        ErrorInfo, Execution, ExecutionId, RetryPolicy, RunCore, State, StateId, StateProposal,
        StateType, TaskRun, TaskRunId, Timestamp, Violations, document, json, prefix, quote,
        template::{self, Resolution},
    },
};

/// How long a task run is told to wait while its execution is not yet
/// RUNNING.
pub const EXECUTION_NOT_RUNNING_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a task run is told to wait for an upstream it references.
pub const UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The names the server gives the states it chooses.
pub const AWAITING_RETRY: &str = "AwaitingRetry";
pub const RETRYING: &str = "Retrying";
pub const CACHED: &str = "Cached";
pub const PAUSE_TIMEOUT: &str = "PauseTimeout";
pub const TEMPLATE_ERROR: &str = "TemplateError";

/// The orchestration result's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Accept,
    Reject,
    Wait,
    Abort,
}

/// A proposed transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub state: StateProposal,
    pub force: bool,
    pub expected_state_id: Option<StateId>,
    pub payload: Payload,
}

/// What the rules need to know besides the run itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub now: Timestamp,
    /// For a task run: the state type of its execution.
    pub execution_state: Option<StateType>,
    /// For a task run: what rules 8 to 10 need.
    pub task: Option<TaskContext>,
}

/// What the task run rules look at, gathered by the caller beforehand.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskContext {
    pub retry_policy: RetryPolicy,
    pub run_count: i64,
    /// The tenant's cache entry for the run's cache key, when the proposal
    /// is RUNNING and does not ask to refresh the cache.
    pub cache: Option<CacheEntry>,
    /// The run's input with its templates resolved, when the proposal is
    /// RUNNING and the input has templates.
    pub templates: Option<Resolution>,
    /// A uniform sample in [0, 1) for the retry jitter.
    pub jitter: f64,
}

/// A cached COMPLETED result.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub output: Option<serde_json::Value>,
    pub expiration: Option<Timestamp>,
}

/// What happens to a proposal. Short-lived, one per call: the size of the
/// `Redirect` variant does not matter.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Decision {
    /// The proposed state becomes the run's state.
    Accept,
    /// Nothing changes; the reason says why.
    Reject { reason: String },
    /// Nothing changes yet; propose again after `retry_after`.
    Wait {
        reason: String,
        retry_after: Duration,
    },
    /// Nothing changes, and it never will for this proposal.
    Abort { reason: String },
    /// The proposal is refused and the server moves the run to a state of
    /// its own choosing instead (a cached result, a retry, a failure).
    Redirect {
        reason: String,
        state: StateProposal,
        payload: Payload,
    },
}

impl Decision {
    pub fn status(&self) -> Status {
        match self {
            Decision::Accept => Status::Accept,
            Decision::Reject { .. } | Decision::Redirect { .. } => Status::Reject,
            Decision::Wait { .. } => Status::Wait,
            Decision::Abort { .. } => Status::Abort,
        }
    }

    /// Why the proposal was not taken as it is; empty for an accept.
    pub fn reason(&self) -> &str {
        match self {
            Decision::Accept => "",
            Decision::Reject { reason }
            | Decision::Wait { reason, .. }
            | Decision::Abort { reason }
            | Decision::Redirect { reason, .. } => reason,
        }
    }

    /// When to propose again: only for a wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Decision::Wait { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Rules 2 to 10, in order. Rule 1 (a repeated transition_id returns the
/// first result) is answered before this from the recorded result; `force`
/// skips everything after rule 2.
pub fn decide(current: &State, proposal: &Proposal, ctx: &Context) -> Decision {
    let from = current.state_type;
    let to = proposal.state.state_type;

    // Rule 2: the client expected another state.
    if let Some(expected) = proposal.expected_state_id
        && expected != current.id
    {
        return Decision::Reject {
            reason: format!(
                "expected state {expected}, but the run is in state {} ({})",
                current.id,
                prefix(&current.name)
            ),
        };
    }
    if proposal.force {
        return Decision::Accept;
    }
    // Rule 3: terminal states absorb.
    if from.is_terminal() {
        return Decision::Abort {
            reason: format!("the run is already {}", type_word(from)),
        };
    }
    // Rule 4: a run being cancelled may only become cancelled.
    if from == StateType::Cancelling && to != StateType::Cancelled {
        return Decision::Reject {
            reason: "a CANCELLING run may only become CANCELLED".into(),
        };
    }
    // Rule 5: no transition to the same type.
    if from == to {
        return Decision::Reject {
            reason: format!("the run is already {}", type_word(from)),
        };
    }
    // Rule 6: scheduled runs wait for their time.
    if from == StateType::Scheduled
        && matches!(to, StateType::Pending | StateType::Running)
        && let Some(at) = current.details.scheduled_time
        && at > ctx.now
    {
        return Decision::Wait {
            reason: "the run is scheduled for later".into(),
            retry_after: at.saturating_since(ctx.now),
        };
    }
    // Rule 7: a task run runs only while its execution runs.
    if to == StateType::Running
        && let Some(exec) = ctx.execution_state
    {
        match exec {
            StateType::Running => {}
            StateType::Scheduled | StateType::Pending | StateType::Paused => {
                return Decision::Wait {
                    reason: format!("the execution is {}, not yet RUNNING", type_word(exec)),
                    retry_after: EXECUTION_NOT_RUNNING_RETRY_AFTER,
                };
            }
            StateType::Completed
            | StateType::Failed
            | StateType::Cancelled
            | StateType::Crashed
            | StateType::Cancelling => {
                return Decision::Abort {
                    reason: format!("the execution is {}", type_word(exec)),
                };
            }
        }
    }
    let Some(task) = &ctx.task else {
        return Decision::Accept;
    };
    // Rule 8: a live cached result completes the run without running it.
    if to == StateType::Running
        && let Some(hit) = &task.cache
        && hit.expiration.is_none_or(|e| e > ctx.now)
    {
        return Decision::Redirect {
            reason: "a cached result exists for the run's cache key".into(),
            state: StateProposal::of_type(StateType::Completed).named(CACHED),
            payload: Payload {
                output: hit.output.clone(),
                error: None,
            },
        };
    }
    // Rule 9: a failure with retries left schedules a retry.
    if from == StateType::Running
        && matches!(to, StateType::Failed | StateType::Crashed)
        && proposal.state.details.retriable != Some(false)
        && task.run_count <= i64::from(task.retry_policy.retries)
    {
        let delay = retry_delay(&task.retry_policy, task.run_count, task.jitter);
        let mut state = StateProposal::of_type(StateType::Scheduled).named(AWAITING_RETRY);
        state.message = proposal.state.message.clone();
        state.details.scheduled_time = ctx.now.checked_add(delay);
        return Decision::Redirect {
            reason: format!(
                "retry {} of {} in {:.3}s",
                task.run_count,
                task.retry_policy.retries,
                delay.as_secs_f64()
            ),
            state,
            payload: Payload {
                output: None,
                error: proposal.payload.error.clone(),
            },
        };
    }
    // Rule 10: templates resolve on entering RUNNING.
    if to == StateType::Running {
        match &task.templates {
            Some(Resolution::Waiting { reference }) => {
                return Decision::Wait {
                    reason: format!("waiting for {reference}: its task has not completed"),
                    retry_after: UPSTREAM_RETRY_AFTER,
                };
            }
            Some(Resolution::Failed { message }) => {
                let mut state = StateProposal::of_type(StateType::Failed);
                state.message = message.clone();
                return Decision::Redirect {
                    reason: message.clone(),
                    state,
                    payload: Payload {
                        output: None,
                        error: Some(ErrorInfo {
                            message: message.clone(),
                            error_type: TEMPLATE_ERROR.into(),
                            traceback: String::new(),
                        }),
                    },
                };
            }
            Some(Resolution::Resolved { .. }) | None => {}
        }
    }
    Decision::Accept
}

/// The delay before retry `attempt` (1-based): that entry of the delays,
/// the last one repeating, none meaning 0; scaled by a factor in
/// `[1 - jitter, 1 + jitter]` picked by `sample` in [0, 1).
pub fn retry_delay(policy: &RetryPolicy, attempt: i64, sample: f64) -> Duration {
    let delays = &policy.retry_delay_seconds;
    let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(0);
    let base = delays.get(index).or(delays.last()).copied().unwrap_or(0.0);
    let j = policy.retry_jitter_factor;
    let factor = 1.0 - j + 2.0 * j * sample.clamp(0.0, 1.0);
    Duration::try_from_secs_f64((base * factor).max(0.0)).unwrap_or(Duration::ZERO)
}

/// The state an accepted proposal becomes: as proposed, except that the
/// first RUNNING after a scheduled retry is named "Retrying".
pub fn next_state(current: &State, proposal: &StateProposal, now: Timestamp) -> State {
    let mut p = proposal.clone();
    if current.name == AWAITING_RETRY && p.state_type == StateType::Running && p.name.is_empty() {
        p.name = RETRYING.into();
    }
    p.into_state(now)
}

/// What cancelling does to a run of an execution in state `execution`: a
/// run not yet RUNNING is CANCELLED at once; a RUNNING run of a RUNNING
/// execution becomes CANCELLING (its executor then reports CANCELLED).
/// Terminal runs, and runs already CANCELLING, are left alone (None).
pub fn cancel_target(execution: StateType, run: StateType) -> Option<StateType> {
    if run.is_terminal() || run == StateType::Cancelling {
        return None;
    }
    Some(
        if execution == StateType::Running && run == StateType::Running {
            StateType::Cancelling
        } else {
            StateType::Cancelled
        },
    )
}

/// What an accepted transition carries besides its state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub output: Option<serde_json::Value>,
    pub error: Option<ErrorInfo>,
}

/// The run's error after a change to a state of type `to` that carries
/// `carried`: the carried error; else the one it had while it stays FAILED
/// or CRASHED; else none. An error belongs to the state it came with (a
/// failure, or the retry scheduled instead of one), and stays there in the
/// history when the run moves on.
pub fn error_after(
    previous: Option<ErrorInfo>,
    to: StateType,
    carried: Option<ErrorInfo>,
) -> Option<ErrorInfo> {
    carried.or(match to {
        StateType::Failed | StateType::Crashed => previous,
        _ => None,
    })
}

/// Rule 11: the bookkeeping of an accepted transition to `next`.
pub fn apply_accepted(run: &mut RunCore, mut next: State, payload: Payload, updated_by: &str) {
    let now = next.timestamp;
    let from = run.state.state_type;
    let to = next.state_type;

    run.transition_count += 1;
    if from == StateType::Running && to != StateType::Running {
        let spent = now.saturating_since(run.state.timestamp);
        run.total_run_time_us = run
            .total_run_time_us
            .saturating_add(i64::try_from(spent.as_micros()).unwrap_or(i64::MAX));
    }
    if to == StateType::Running {
        run.run_count += 1;
        run.start_time.get_or_insert(now);
    }
    if to.is_terminal() {
        run.end_time = Some(now);
    }
    run.next_scheduled_start_time = if to == StateType::Scheduled {
        next.details.scheduled_time
    } else {
        None
    };
    // Requests carry these only with the states they belong to (see
    // `may_carry_output`, `may_carry_error`); the server also keeps a failed
    // attempt's error when it schedules a retry.
    if let Some(output) = payload.output {
        run.output = Some(output);
    }
    // The history keeps the error's message on the state it came with.
    if let Some(error) = &payload.error
        && next.message.is_empty()
    {
        next.message = error.message.clone();
    }
    run.error = error_after(run.error.take(), to, payload.error);
    run.updated_by = updated_by.to_owned();
    run.updated_at = now;
    run.state = next;
}

// Payloads.

/// Payloads: a request may send an output only with a COMPLETED state.
pub fn may_carry_output(to: StateType) -> bool {
    to == StateType::Completed
}

/// Payloads: a request may send an error only with a FAILED or CRASHED
/// state. (The server itself keeps a failed attempt's error on the retry it
/// schedules instead, see rule 9.)
pub fn may_carry_error(to: StateType) -> bool {
    matches!(to, StateType::Failed | StateType::Crashed)
}

// Creation and admission.

/// Creation: a run may start in any state but CANCELLING.
pub fn may_start_in(t: StateType) -> bool {
    t != StateType::Cancelling
}

/// Creation: the state a new run starts in at `now`: the requested one,
/// else PENDING.
pub fn initial_state(requested: Option<&StateProposal>, now: Timestamp) -> State {
    requested
        .cloned()
        .unwrap_or_else(|| StateProposal::of_type(StateType::Pending))
        .into_state(now)
}

/// Idempotency: a request_id used again answers with the execution it
/// created (and `false`: not created now) when the request is the same,
/// recognised by its fingerprint; a different request is refused.
pub fn repeated_request(
    request_id: &str,
    existing: Execution,
    stored_fingerprint: &str,
    fingerprint: Option<&str>,
) -> Result<(Execution, bool)> {
    if Some(stored_fingerprint) == fingerprint {
        Ok((existing, false))
    } else {
        Err(Error::AlreadyExists(format!(
            "request_id {} was already used for execution {} with a different request",
            quote(request_id),
            existing.id
        )))
    }
}

/// Admission: an execution takes new task runs while it has not ended, is
/// not being cancelled and is not deleted.
pub fn check_takes_task_runs(exec: &Execution) -> Result<()> {
    let st = exec.run.state.state_type;
    if st.is_terminal() || st == StateType::Cancelling {
        return Err(Error::FailedPrecondition(format!(
            "execution {} is {}; it takes no new task runs",
            exec.id,
            prefix(&exec.run.state.name)
        )));
    }
    if exec.run.deleted_at.is_some() {
        return Err(Error::FailedPrecondition(format!(
            "execution {} is deleted",
            exec.id
        )));
    }
    Ok(())
}

/// Admission: the depth of a new task run of `exec`: 1 without a parent,
/// one below its `parent` otherwise. The parent must belong to `exec`, and
/// the depth must stay within the execution's max_depth.
pub fn task_run_depth(exec: &Execution, parent: Option<&TaskRun>) -> Result<i32> {
    let depth = match parent {
        None => 1,
        Some(parent) => {
            if parent.execution_id != exec.id {
                return Err(Error::FailedPrecondition(format!(
                    "parent task run {} belongs to another execution",
                    parent.id
                )));
            }
            parent.depth.saturating_add(1)
        }
    };
    if depth > exec.max_depth {
        return Err(Error::FailedPrecondition(format!(
            "a task run at depth {depth} exceeds the execution's max_depth of {}",
            exec.max_depth
        )));
    }
    Ok(depth)
}

// The cache (rule 8) and templates (rule 10).

/// Rules 8 and 10 look at the cache and at upstream runs only for an
/// unforced RUNNING proposal; for any other, nothing needs to be gathered.
pub fn needs_task_lookups(proposal: &Proposal) -> bool {
    proposal.state.state_type == StateType::Running && !proposal.force
}

/// Rule 8, the read: the key whose cache entry a RUNNING proposal for `run`
/// looks up: the state's cache_key, else the run's; none when the proposal
/// asks to refresh the cache.
pub fn cache_key_to_read<'a>(proposal: &'a StateProposal, run: &'a TaskRun) -> Option<&'a str> {
    if proposal.details.refresh_cache {
        return None;
    }
    cache_key(proposal, run)
}

fn cache_key<'a>(proposal: &'a StateProposal, run: &'a TaskRun) -> Option<&'a str> {
    proposal
        .details
        .cache_key
        .as_deref()
        .or(run.cache_key.as_deref())
}

/// Where a completed result goes in the tenant's cache, and until when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheWrite<'a> {
    pub key: &'a str,
    pub expiration: Option<Timestamp>,
}

/// Rule 8's other half, the write: a call that changed `run` (after
/// `proposal`) and left it COMPLETED caches its output under the state's
/// cache_key, else the run's, until the state's cache_expiration, else the
/// run's. A result that came from the cache (named "Cached") is already
/// there.
pub fn cache_write<'a>(
    changed: bool,
    proposal: &'a StateProposal,
    run: &'a TaskRun,
) -> Option<CacheWrite<'a>> {
    let state = &run.run.state;
    if !changed || state.state_type != StateType::Completed || state.name == CACHED {
        return None;
    }
    Some(CacheWrite {
        key: cache_key(proposal, run)?,
        expiration: proposal.details.cache_expiration.or(run.cache_expiration),
    })
}

/// Rule 10, when the outputs of the runs an input references are larger
/// than [`template::MAX_UPSTREAM_BYTES`] together: the run fails.
pub fn upstreams_too_large() -> Resolution {
    Resolution::Failed {
        message: format!(
            "the outputs of the task runs this input references are larger than {} bytes \
             together",
            template::MAX_UPSTREAM_BYTES
        ),
    }
}

// Cancel, resume, pause timeout, stale.

/// Cancel: only an execution that has not ended can be cancelled (see
/// [`cancel_target`] for what happens to it and its task runs).
pub fn check_cancellable(id: ExecutionId, state: &State) -> Result<()> {
    if state.state_type.is_terminal() {
        return Err(Error::FailedPrecondition(format!(
            "execution {id} is already {}; only a run that has not ended can be cancelled",
            prefix(&state.name)
        )));
    }
    Ok(())
}

/// Cancel: the state a cancelled run moves to (a [`cancel_target`] type),
/// with the cancellation's reason as its message.
pub fn cancel_state(target: StateType, reason: &str, now: Timestamp) -> State {
    let mut p = StateProposal::of_type(target);
    p.message = reason.to_owned();
    p.into_state(now)
}

/// Resume, first: only a PAUSED execution can be resumed.
pub fn check_resumable(id: ExecutionId, state: &State) -> Result<()> {
    if state.state_type != StateType::Paused {
        return Err(Error::FailedPrecondition(format!(
            "execution {id} is {}, not PAUSED; only a PAUSED run can be resumed",
            prefix(&state.name)
        )));
    }
    Ok(())
}

/// Resume, then at `now`: the pause of the PAUSED `state` must not have
/// timed out, and `run_input` must hold every key of its run_input_keyset.
/// Returns the state to move to: RUNNING, with `run_input` as its data.
pub fn resume_state(
    id: ExecutionId,
    state: &State,
    run_input: &Map<String, Value>,
    now: Timestamp,
) -> Result<StateProposal> {
    if pause_timed_out(state, now) {
        return Err(Error::FailedPrecondition(format!(
            "execution {id}'s pause has timed out"
        )));
    }
    let missing = missing_keys(state, run_input);
    if !missing.is_empty() {
        return Err(Error::InvalidArgument(Violations::single(
            "run_input",
            format!("missing keys: {}", key_list(&missing)),
        )));
    }
    let mut next = StateProposal::of_type(StateType::Running);
    next.data = Some(Value::Object(run_input.clone()));
    Ok(next)
}

/// The keys of `state`'s run_input_keyset that `run_input` lacks, in order.
pub fn missing_keys<'a>(state: &'a State, run_input: &Map<String, Value>) -> Vec<&'a str> {
    state
        .details
        .run_input_keyset
        .keys()
        .filter(|k| !run_input.contains_key(*k))
        .map(String::as_str)
        .collect()
}

/// How many characters of quoted keys a message lists before it only
/// counts the rest.
const MAX_LISTED_KEY_CHARS: usize = 500;

/// `keys` quoted, comma-separated, as many as fit in
/// [`MAX_LISTED_KEY_CHARS`], then how many more there are.
fn key_list(keys: &[&str]) -> String {
    let mut out = String::new();
    for (i, key) in keys.iter().enumerate() {
        let quoted = quote(key);
        if i > 0 && out.len() + quoted.len() + 2 > MAX_LISTED_KEY_CHARS {
            out.push_str(&format!(" and {} more", keys.len() - i));
            break;
        }
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&quoted);
    }
    out
}

/// Pause timeout: whether `state`'s pause has timed out at `now`.
pub fn pause_timed_out(state: &State, now: Timestamp) -> bool {
    state.details.pause_timeout.is_some_and(|t| t <= now)
}

/// Pause timeout: whether the sweeper fails a run in `state` now: it is
/// PAUSED and its pause has timed out.
pub fn pause_expired(state: &State, now: Timestamp) -> bool {
    state.state_type == StateType::Paused && pause_timed_out(state, now)
}

const PAUSE_TIMEOUT_MESSAGE: &str = "the pause timed out before the run was resumed";

/// Pause timeout: the state a run whose pause timed out is failed with.
pub fn pause_timeout_state(now: Timestamp) -> State {
    let mut p = StateProposal::of_type(StateType::Failed).named(PAUSE_TIMEOUT);
    p.message = PAUSE_TIMEOUT_MESSAGE.into();
    p.into_state(now)
}

/// Pause timeout: the error that failure carries.
pub fn pause_timeout_payload() -> Payload {
    Payload {
        output: None,
        error: Some(ErrorInfo {
            message: PAUSE_TIMEOUT_MESSAGE.into(),
            error_type: PAUSE_TIMEOUT.into(),
            traceback: String::new(),
        }),
    }
}

/// Stale: only a COMPLETED or FAILED task run can be marked stale.
pub fn check_may_mark_stale(id: TaskRunId, state: &State) -> Result<()> {
    if !matches!(state.state_type, StateType::Completed | StateType::Failed) {
        return Err(Error::FailedPrecondition(format!(
            "task run {id} is {}; only a COMPLETED or FAILED task run can be marked stale",
            prefix(&state.name)
        )));
    }
    Ok(())
}

// Size.

/// Size: a run of `kind` ("execution", "task run") whose document takes
/// `document_bytes`, sent with its `state` once more beside it, must fit in
/// a message a client accepts; a refusal names the request's `field` that
/// brought the most.
pub fn check_fits(kind: &str, document_bytes: usize, state: &State, field: &str) -> Result<()> {
    let bytes = document::with_state(document_bytes, state);
    if bytes > document::MAX_RUN_BYTES {
        return Err(Error::InvalidArgument(Violations::single(
            field,
            format!(
                "the {kind} would take about {bytes} bytes with this, more than the {} a response may carry; send less",
                document::MAX_RUN_BYTES
            ),
        )));
    }
    Ok(())
}

/// Size: the name of the largest part, to name in a refusal ("state" when
/// there are none).
pub fn largest<'a>(parts: &[(&'a str, usize)]) -> &'a str {
    parts
        .iter()
        .max_by_key(|(_, n)| *n)
        .map_or("state", |(name, _)| name)
}

/// Size: the field of a state change request that adds the most to a run.
pub fn largest_in(proposal: &Proposal) -> &'static str {
    let s = &proposal.state;
    let error = proposal.payload.error.as_ref();
    largest(&[
        (
            "state",
            document::state_parts_bytes(&s.name, &s.message, &s.data, &s.details),
        ),
        (
            "output",
            proposal
                .payload
                .output
                .as_ref()
                .map_or(0, json::encoded_len),
        ),
        ("error", error.map_or(0, document::error_bytes)),
    ])
}

/// Size: how many encoded bytes `run`'s resolved input may take so that the
/// run, RUNNING in `next` with it and the ids of its `keys` upstreams, still
/// fits in a response.
pub fn resolution_room(run: &TaskRun, next: &StateProposal, keys: usize) -> usize {
    let earlier = run
        .resolved_input
        .as_ref()
        .map_or(0, |v| json::encoded_len(v) + 7)
        + run.task_inputs.len() * 40;
    let next_state =
        document::state_parts_bytes(&next.name, &next.message, &next.data, &next.details);
    let others = document::task_run_bytes(run) - earlier - document::state_bytes(&run.run.state)
        + 2 * next_state
        + keys * 40
        + 7;
    document::MAX_RUN_BYTES.saturating_sub(others)
}

fn type_word(t: StateType) -> &'static str {
    match t {
        StateType::Scheduled => "SCHEDULED",
        StateType::Pending => "PENDING",
        StateType::Running => "RUNNING",
        StateType::Completed => "COMPLETED",
        StateType::Failed => "FAILED",
        StateType::Cancelled => "CANCELLED",
        StateType::Crashed => "CRASHED",
        StateType::Paused => "PAUSED",
        StateType::Cancelling => "CANCELLING",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp::from_micros(1_000_000_000);

    fn state(t: StateType) -> State {
        StateProposal::of_type(t).into_state(T0)
    }

    fn propose(t: StateType) -> Proposal {
        Proposal {
            state: StateProposal::of_type(t),
            force: false,
            expected_state_id: None,
            payload: Payload::default(),
        }
    }

    fn ctx() -> Context {
        Context {
            now: T0,
            execution_state: None,
            task: None,
        }
    }

    #[test]
    fn plain_lifecycle_is_accepted() {
        use StateType::*;
        for (from, to) in [
            (Pending, Running),
            (Running, Completed),
            (Running, Failed),
            (Scheduled, Pending),
            (Running, Paused),
            (Paused, Running),
            (Cancelling, Cancelled),
        ] {
            assert_eq!(
                decide(&state(from), &propose(to), &ctx()),
                Decision::Accept,
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn expected_state_mismatch_rejects_even_when_forced() {
        let current = state(StateType::Pending);
        let mut p = propose(StateType::Running);
        p.expected_state_id = Some(StateId::new());
        p.force = true;
        assert_eq!(decide(&current, &p, &ctx()).status(), Status::Reject);
        p.expected_state_id = Some(current.id);
        assert_eq!(decide(&current, &p, &ctx()), Decision::Accept);
    }

    #[test]
    fn terminal_states_abort_unless_forced() {
        for t in StateType::ALL.into_iter().filter(|t| t.is_terminal()) {
            let d = decide(&state(t), &propose(StateType::Running), &ctx());
            assert_eq!(d.status(), Status::Abort, "{t:?}");
            let mut p = propose(StateType::Running);
            p.force = true;
            assert_eq!(decide(&state(t), &p, &ctx()), Decision::Accept);
        }
    }

    #[test]
    fn cancelling_only_goes_to_cancelled() {
        let from = state(StateType::Cancelling);
        for to in StateType::ALL {
            let d = decide(&from, &propose(to), &ctx());
            if to == StateType::Cancelled {
                assert_eq!(d, Decision::Accept);
            } else {
                assert_eq!(d.status(), Status::Reject, "{to:?}");
            }
        }
    }

    #[test]
    fn same_type_is_rejected() {
        for t in StateType::ALL.into_iter().filter(|t| !t.is_terminal()) {
            assert_eq!(
                decide(&state(t), &propose(t), &ctx()).status(),
                Status::Reject,
                "{t:?}"
            );
        }
    }

    #[test]
    fn scheduled_runs_wait_for_their_time() {
        let mut s = state(StateType::Scheduled);
        s.details.scheduled_time = T0.checked_add(Duration::from_secs(30));
        for to in [StateType::Pending, StateType::Running] {
            match decide(&s, &propose(to), &ctx()) {
                Decision::Wait { retry_after, .. } => {
                    assert_eq!(retry_after, Duration::from_secs(30))
                }
                d => panic!("expected WAIT, got {d:?}"),
            }
        }
        // Other moves are not held back, and the time passing releases it.
        assert_eq!(
            decide(&s, &propose(StateType::Cancelled), &ctx()),
            Decision::Accept
        );
        let later = Context {
            now: T0.checked_add(Duration::from_secs(31)).unwrap(),
            ..ctx()
        };
        assert_eq!(
            decide(&s, &propose(StateType::Running), &later),
            Decision::Accept
        );
    }

    #[test]
    fn task_runs_run_only_while_the_execution_runs() {
        use StateType::*;
        let from = state(Pending);
        for exec in StateType::ALL {
            let c = Context {
                execution_state: Some(exec),
                ..ctx()
            };
            let status = decide(&from, &propose(Running), &c).status();
            let expected = match exec {
                Running => Status::Accept,
                Scheduled | Pending | Paused => Status::Wait,
                _ => Status::Abort,
            };
            assert_eq!(status, expected, "execution {exec:?}");
            // Only RUNNING is held back.
            assert_eq!(decide(&from, &propose(Failed), &c), Decision::Accept);
        }
    }

    #[test]
    fn bookkeeping_counts_runs_and_time() {
        let mut run = RunCore::new(state(StateType::Pending), "alice");
        assert_eq!(run.transition_count, 0);
        let t1 = T0.checked_add(Duration::from_secs(1)).unwrap();
        let t2 = T0.checked_add(Duration::from_secs(4)).unwrap();
        let t3 = T0.checked_add(Duration::from_secs(6)).unwrap();
        let t4 = T0.checked_add(Duration::from_secs(7)).unwrap();
        apply_accepted(
            &mut run,
            StateProposal::of_type(StateType::Running).into_state(t1),
            Payload::default(),
            "bob",
        );
        assert_eq!(
            (run.run_count, run.transition_count, run.start_time),
            (1, 1, Some(t1))
        );
        apply_accepted(
            &mut run,
            StateProposal::of_type(StateType::Scheduled).into_state(t2),
            Payload::default(),
            "bob",
        );
        assert_eq!(run.total_run_time_us, 3_000_000);
        assert_eq!(run.next_scheduled_start_time, Some(t2));
        apply_accepted(
            &mut run,
            StateProposal::of_type(StateType::Running).into_state(t3),
            Payload::default(),
            "bob",
        );
        assert_eq!(
            (run.run_count, run.start_time, run.next_scheduled_start_time),
            (2, Some(t1), None)
        );
        let out = Payload {
            output: Some(serde_json::json!({"ok": true})),
            error: None,
        };
        apply_accepted(
            &mut run,
            StateProposal::of_type(StateType::Completed).into_state(t4),
            out,
            "carol",
        );
        assert_eq!(run.total_run_time_us, 4_000_000);
        assert_eq!(run.end_time, Some(t4));
        assert_eq!(run.transition_count, 4);
        assert_eq!(run.updated_by, "carol");
        assert_eq!(run.output, Some(serde_json::json!({"ok": true})));
    }

    #[test]
    fn a_run_keeps_its_error_only_while_it_stays_failed() {
        use StateType::*;
        let boom = || ErrorInfo {
            message: "boom".into(),
            ..Default::default()
        };
        let failure = || Payload {
            output: None,
            error: Some(boom()),
        };
        let mut run = RunCore::new(state(Running), "a");
        // A failed attempt scheduled for a retry shows its error, and the
        // state it came with says so in the history.
        apply_accepted(
            &mut run,
            StateProposal::of_type(Scheduled)
                .named(AWAITING_RETRY)
                .into_state(T0),
            failure(),
            "system",
        );
        assert_eq!(run.error, Some(boom()));
        assert_eq!(run.state.message, "boom");
        // The retry runs: the error was the attempt's, not the run's.
        apply_accepted(
            &mut run,
            StateProposal::of_type(Running).into_state(T0),
            Payload::default(),
            "a",
        );
        assert_eq!(run.error, None);
        apply_accepted(
            &mut run,
            StateProposal::of_type(Completed).into_state(T0),
            Payload::default(),
            "a",
        );
        assert_eq!(run.error, None);
        // A failed run keeps its error across a forced move between failed
        // states, and loses it when forced out of them.
        assert_eq!(error_after(Some(boom()), Crashed, None), Some(boom()));
        assert_eq!(error_after(Some(boom()), Failed, None), Some(boom()));
        for t in StateType::ALL
            .into_iter()
            .filter(|t| !matches!(t, Failed | Crashed))
        {
            assert_eq!(error_after(Some(boom()), t, None), None, "{t:?}");
        }
        // A state given its own message keeps it.
        let mut failed = StateProposal::of_type(Failed);
        failed.message = "disk full".into();
        apply_accepted(&mut run, failed.into_state(T0), failure(), "a");
        assert_eq!(
            (run.state.message.as_str(), run.error),
            ("disk full", Some(boom()))
        );
    }

    fn task_ctx(task: TaskContext) -> Context {
        Context {
            now: T0,
            execution_state: Some(StateType::Running),
            task: Some(task),
        }
    }

    #[test]
    fn a_live_cache_entry_completes_the_run_as_cached() {
        let hit = CacheEntry {
            output: Some(serde_json::json!(7)),
            expiration: None,
        };
        let c = task_ctx(TaskContext {
            cache: Some(hit.clone()),
            ..Default::default()
        });
        match decide(&state(StateType::Pending), &propose(StateType::Running), &c) {
            Decision::Redirect { state, payload, .. } => {
                assert_eq!(
                    (state.state_type, state.name.as_str()),
                    (StateType::Completed, CACHED)
                );
                assert_eq!(payload.output, Some(serde_json::json!(7)));
            }
            d => panic!("{d:?}"),
        }
        let expired = CacheEntry {
            expiration: Some(T0),
            ..hit
        };
        let c = task_ctx(TaskContext {
            cache: Some(expired),
            ..Default::default()
        });
        assert_eq!(
            decide(&state(StateType::Pending), &propose(StateType::Running), &c),
            Decision::Accept
        );
    }

    #[test]
    fn failures_with_retries_left_are_rescheduled() {
        let policy = RetryPolicy {
            retries: 2,
            retry_delay_seconds: vec![10.0, 60.0],
            retry_jitter_factor: 0.0,
        };
        let mut failed = propose(StateType::Failed);
        failed.payload.error = Some(ErrorInfo {
            message: "boom".into(),
            ..Default::default()
        });
        for (run_count, delay) in [(1, 10), (2, 60)] {
            let c = task_ctx(TaskContext {
                retry_policy: policy.clone(),
                run_count,
                ..Default::default()
            });
            match decide(&state(StateType::Running), &failed, &c) {
                Decision::Redirect { state, payload, .. } => {
                    assert_eq!(
                        (state.state_type, state.name.as_str()),
                        (StateType::Scheduled, AWAITING_RETRY)
                    );
                    assert_eq!(
                        state.details.scheduled_time,
                        T0.checked_add(Duration::from_secs(delay))
                    );
                    assert_eq!(payload.error.unwrap().message, "boom");
                }
                d => panic!("{d:?}"),
            }
        }
        // Out of retries, or not retriable: the failure stands.
        let c = task_ctx(TaskContext {
            retry_policy: policy.clone(),
            run_count: 3,
            ..Default::default()
        });
        assert_eq!(
            decide(&state(StateType::Running), &failed, &c),
            Decision::Accept
        );
        let mut final_failure = failed.clone();
        final_failure.state.details.retriable = Some(false);
        let c = task_ctx(TaskContext {
            retry_policy: policy,
            run_count: 1,
            ..Default::default()
        });
        assert_eq!(
            decide(&state(StateType::Running), &final_failure, &c),
            Decision::Accept
        );
        // Only from RUNNING.
        assert_eq!(
            decide(&state(StateType::Pending), &failed, &c),
            Decision::Accept
        );
    }

    #[test]
    fn retry_delays_repeat_the_last_and_jitter_within_the_factor() {
        let p = RetryPolicy {
            retries: 5,
            retry_delay_seconds: vec![1.0, 4.0],
            retry_jitter_factor: 0.5,
        };
        assert_eq!(retry_delay(&p, 3, 0.5), Duration::from_secs(4));
        assert_eq!(retry_delay(&p, 1, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(&p, 1, 1.0), Duration::from_millis(1500));
        assert_eq!(retry_delay(&RetryPolicy::default(), 1, 0.3), Duration::ZERO);
    }

    #[test]
    fn the_run_after_a_scheduled_retry_is_named_retrying() {
        let waiting = StateProposal::of_type(StateType::Scheduled)
            .named(AWAITING_RETRY)
            .into_state(T0);
        let next = next_state(&waiting, &StateProposal::of_type(StateType::Running), T0);
        assert_eq!(next.name, RETRYING);
        let next = next_state(
            &state(StateType::Scheduled),
            &StateProposal::of_type(StateType::Running),
            T0,
        );
        assert_eq!(next.name, "Running");
    }

    #[test]
    fn templates_wait_for_upstreams_and_fail_when_unresolvable() {
        let waiting = Resolution::Waiting {
            reference: "{{a.output}}".into(),
        };
        let c = task_ctx(TaskContext {
            templates: Some(waiting),
            ..Default::default()
        });
        assert_eq!(
            decide(&state(StateType::Pending), &propose(StateType::Running), &c).status(),
            Status::Wait
        );
        let failed = Resolution::Failed {
            message: "{{a.output}}: no task run".into(),
        };
        let c = task_ctx(TaskContext {
            templates: Some(failed),
            ..Default::default()
        });
        match decide(&state(StateType::Pending), &propose(StateType::Running), &c) {
            Decision::Redirect { state, payload, .. } => {
                assert_eq!(state.state_type, StateType::Failed);
                assert_eq!(payload.error.unwrap().error_type, TEMPLATE_ERROR);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn cancelling_plans_the_cascade() {
        use StateType::*;
        assert_eq!(cancel_target(Pending, Pending), Some(Cancelled));
        assert_eq!(cancel_target(Paused, Running), Some(Cancelled));
        assert_eq!(cancel_target(Running, Running), Some(Cancelling));
        assert_eq!(cancel_target(Running, Scheduled), Some(Cancelled));
        assert_eq!(cancel_target(Running, Completed), None);
        assert_eq!(cancel_target(Running, Cancelling), None);
    }

    // Payloads, creation and admission.

    #[test]
    fn outputs_come_with_completed_and_errors_with_failures() {
        use StateType::*;
        for t in StateType::ALL {
            assert_eq!(may_carry_output(t), t == Completed, "{t:?}");
            assert_eq!(may_carry_error(t), matches!(t, Failed | Crashed), "{t:?}");
            // No state takes both, and only an ended run has either.
            assert!(!(may_carry_output(t) && may_carry_error(t)), "{t:?}");
            if may_carry_output(t) || may_carry_error(t) {
                assert!(t.is_terminal(), "{t:?}");
            }
        }
    }

    #[test]
    fn runs_start_pending_or_as_asked_but_never_cancelling() {
        for t in StateType::ALL {
            assert_eq!(may_start_in(t), t != StateType::Cancelling, "{t:?}");
        }
        let s = initial_state(None, T0);
        assert_eq!(
            (s.state_type, s.name.as_str(), s.timestamp),
            (StateType::Pending, "Pending", T0)
        );
        let asked = StateProposal::of_type(StateType::Scheduled).named("Later");
        let s = initial_state(Some(&asked), T0);
        assert_eq!(
            (s.state_type, s.name.as_str()),
            (StateType::Scheduled, "Later")
        );
    }

    fn execution(t: StateType) -> Execution {
        use crate::domain::{ConfigOverrides, ConfigProfile, EffectiveConfig};
        Execution {
            id: ExecutionId::new(),
            tenant_id: "t".into(),
            task_id: None,
            name: String::new(),
            input: Map::new(),
            goal: None,
            max_depth: 3,
            config_profile: ConfigProfile::General,
            config_overrides: ConfigOverrides::default(),
            effective_config: EffectiveConfig::resolve(
                ConfigProfile::General,
                &ConfigOverrides::default(),
            ),
            metadata: Default::default(),
            request_id: None,
            run: RunCore::new(state(t), "a"),
        }
    }

    fn task_run(exec: &Execution, depth: i32) -> TaskRun {
        TaskRun {
            id: TaskRunId::new(),
            tenant_id: exec.tenant_id.clone(),
            execution_id: exec.id,
            parent_task_run_id: None,
            depth,
            task_key: "k".into(),
            dynamic_key: "0".into(),
            name: "k-0".into(),
            task_version: None,
            cache_key: None,
            cache_expiration: None,
            retry_policy: RetryPolicy::default(),
            tags: Vec::new(),
            labels: Default::default(),
            input: Value::Object(Map::new()),
            resolved_input: None,
            task_inputs: Vec::new(),
            stale: false,
            run: RunCore::new(state(StateType::Running), "a"),
        }
    }

    fn failed_precondition(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::FailedPrecondition(m)) => m,
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        }
    }

    fn violation(r: Result<impl std::fmt::Debug>) -> (String, String) {
        match r {
            Err(Error::InvalidArgument(v)) => {
                let f: Vec<_> = v.iter().collect();
                assert_eq!(f.len(), 1, "{v}");
                (f[0].field.clone(), f[0].description.clone())
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_repeated_request_id_replays_the_same_request_only() {
        let existing = execution(StateType::Running);
        let id = existing.id;
        let (again, created) =
            repeated_request("r1", existing.clone(), "abc", Some("abc")).unwrap();
        assert_eq!((again.id, created), (id, false));
        for other in [Some("abd"), None] {
            match repeated_request("r1", existing.clone(), "abc", other) {
                Err(Error::AlreadyExists(m)) => assert_eq!(
                    m,
                    format!(
                        "request_id \"r1\" was already used for execution {id} with a different request"
                    )
                ),
                r => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn only_a_live_execution_takes_task_runs() {
        for t in StateType::ALL {
            let exec = execution(t);
            let r = check_takes_task_runs(&exec);
            if t.is_terminal() || t == StateType::Cancelling {
                assert_eq!(
                    failed_precondition(r),
                    format!(
                        "execution {} is {}; it takes no new task runs",
                        exec.id,
                        t.default_name()
                    )
                );
            } else {
                assert!(r.is_ok(), "{t:?}");
            }
        }
        let mut deleted = execution(StateType::Running);
        deleted.run.deleted_at = Some(T0);
        assert_eq!(
            failed_precondition(check_takes_task_runs(&deleted)),
            format!("execution {} is deleted", deleted.id)
        );
    }

    #[test]
    fn task_runs_nest_within_their_execution_and_its_max_depth() {
        let exec = execution(StateType::Running);
        assert_eq!(task_run_depth(&exec, None).unwrap(), 1);
        assert_eq!(task_run_depth(&exec, Some(&task_run(&exec, 2))).unwrap(), 3);
        assert_eq!(
            failed_precondition(task_run_depth(&exec, Some(&task_run(&exec, 3)))),
            "a task run at depth 4 exceeds the execution's max_depth of 3"
        );
        let elsewhere = task_run(&execution(StateType::Running), 1);
        assert_eq!(
            failed_precondition(task_run_depth(&exec, Some(&elsewhere))),
            format!(
                "parent task run {} belongs to another execution",
                elsewhere.id
            )
        );
    }

    // The cache.

    #[test]
    fn only_an_unforced_running_proposal_looks_at_cache_and_upstreams() {
        for t in StateType::ALL {
            let mut p = propose(t);
            assert_eq!(needs_task_lookups(&p), t == StateType::Running, "{t:?}");
            p.force = true;
            assert!(!needs_task_lookups(&p), "{t:?}");
        }
    }

    #[test]
    fn the_cache_is_read_under_the_states_key_first_unless_refreshed() {
        let exec = execution(StateType::Running);
        let mut run = task_run(&exec, 1);
        let mut p = StateProposal::of_type(StateType::Running);
        assert_eq!(cache_key_to_read(&p, &run), None);
        run.cache_key = Some("run-key".into());
        assert_eq!(cache_key_to_read(&p, &run), Some("run-key"));
        p.details.cache_key = Some("state-key".into());
        assert_eq!(cache_key_to_read(&p, &run), Some("state-key"));
        p.details.refresh_cache = true;
        assert_eq!(cache_key_to_read(&p, &run), None);
    }

    #[test]
    fn a_changed_completed_result_is_written_back_unless_it_came_from_the_cache() {
        let exec = execution(StateType::Running);
        let t1 = T0.checked_add(Duration::from_secs(60)).unwrap();
        let t2 = T0.checked_add(Duration::from_secs(120)).unwrap();
        let mut run = task_run(&exec, 1);
        run.cache_key = Some("run-key".into());
        run.cache_expiration = Some(t1);
        let plain = StateProposal::of_type(StateType::Completed);
        for t in StateType::ALL {
            run.run.state = state(t);
            for changed in [false, true] {
                let w = cache_write(changed, &plain, &run);
                if changed && t == StateType::Completed {
                    assert_eq!(
                        w,
                        Some(CacheWrite {
                            key: "run-key",
                            expiration: Some(t1)
                        })
                    );
                } else {
                    assert_eq!(w, None, "{t:?} changed {changed}");
                }
            }
        }
        // The state's key and expiration come first.
        run.run.state = state(StateType::Completed);
        let mut own = plain.clone();
        own.details.cache_key = Some("state-key".into());
        own.details.cache_expiration = Some(t2);
        assert_eq!(
            cache_write(true, &own, &run),
            Some(CacheWrite {
                key: "state-key",
                expiration: Some(t2)
            })
        );
        // A cached result is already there; without a key there is nowhere.
        run.run.state = StateProposal::of_type(StateType::Completed)
            .named(CACHED)
            .into_state(T0);
        assert_eq!(cache_write(true, &own, &run), None);
        run.run.state = state(StateType::Completed);
        run.cache_key = None;
        assert_eq!(cache_write(true, &plain, &run), None);
    }

    #[test]
    fn upstreams_too_large_to_load_fail_the_run() {
        match upstreams_too_large() {
            Resolution::Failed { message } => assert_eq!(
                message,
                format!(
                    "the outputs of the task runs this input references are larger than {} bytes together",
                    template::MAX_UPSTREAM_BYTES
                )
            ),
            r => panic!("{r:?}"),
        }
    }

    // Cancel, resume, pause timeout, stale.

    #[test]
    fn only_a_run_that_has_not_ended_can_be_cancelled() {
        let id = ExecutionId::new();
        for t in StateType::ALL {
            let r = check_cancellable(id, &state(t));
            if t.is_terminal() {
                assert_eq!(
                    failed_precondition(r),
                    format!(
                        "execution {id} is already {}; only a run that has not ended can be cancelled",
                        t.default_name()
                    )
                );
            } else {
                assert!(r.is_ok(), "{t:?}");
                // A cancellable execution moves, unless it is already on
                // its way (its task runs still are cancelled).
                assert_eq!(
                    cancel_target(t, t).is_some(),
                    t != StateType::Cancelling,
                    "{t:?}"
                );
            }
        }
        let s = cancel_state(StateType::Cancelling, "stop", T0);
        assert_eq!(
            (
                s.state_type,
                s.name.as_str(),
                s.message.as_str(),
                s.timestamp
            ),
            (StateType::Cancelling, "Cancelling", "stop", T0)
        );
    }

    fn paused(keys: &[&str], timeout: Option<Timestamp>) -> State {
        let mut p = StateProposal::of_type(StateType::Paused);
        p.details.run_input_keyset = keys
            .iter()
            .map(|k| (k.to_string(), String::new()))
            .collect();
        p.details.pause_timeout = timeout;
        p.into_state(T0)
    }

    fn input(keys: &[&str]) -> Map<String, Value> {
        keys.iter()
            .map(|k| (k.to_string(), Value::Bool(true)))
            .collect()
    }

    #[test]
    fn only_a_paused_run_can_be_resumed() {
        let id = ExecutionId::new();
        for t in StateType::ALL {
            let r = check_resumable(id, &state(t));
            if t == StateType::Paused {
                assert!(r.is_ok());
            } else {
                assert_eq!(
                    failed_precondition(r),
                    format!(
                        "execution {id} is {}, not PAUSED; only a PAUSED run can be resumed",
                        t.default_name()
                    )
                );
            }
        }
    }

    #[test]
    fn the_sweeper_fails_only_a_paused_run_whose_pause_has_timed_out() {
        let later = T0.checked_add(Duration::from_secs(10)).unwrap();
        let s = paused(&[], Some(later));
        assert!(!pause_expired(&s, T0));
        assert!(pause_expired(&s, later));
        // Resumed (or failed) since it was found: left alone.
        for t in StateType::ALL {
            let mut other = s.clone();
            other.state_type = t;
            assert_eq!(pause_expired(&other, later), t == StateType::Paused);
        }
        assert!(!pause_expired(&paused(&[], None), later));
    }

    #[test]
    fn resuming_needs_a_live_pause_and_every_asked_key() {
        let id = ExecutionId::new();
        let later = T0.checked_add(Duration::from_secs(10)).unwrap();
        let s = paused(&["a", "b"], Some(later));
        let next = resume_state(id, &s, &input(&["a", "b", "c"]), T0).unwrap();
        assert_eq!(next.state_type, StateType::Running);
        assert_eq!(next.data, Some(Value::Object(input(&["a", "b", "c"]))));
        // The timeout is reached at its instant.
        assert!(!pause_timed_out(&s, T0));
        assert!(pause_timed_out(&s, later));
        assert_eq!(
            failed_precondition(resume_state(id, &s, &input(&["a", "b"]), later)),
            format!("execution {id}'s pause has timed out")
        );
        assert!(!pause_timed_out(&paused(&[], None), later));
        assert_eq!(
            violation(resume_state(id, &s, &input(&["b", "x"]), T0)),
            ("run_input".to_owned(), "missing keys: \"a\"".to_owned())
        );
        assert_eq!(
            violation(resume_state(id, &s, &Map::new(), T0)).1,
            "missing keys: \"a\", \"b\""
        );
    }

    #[test]
    fn a_long_list_of_missing_keys_is_cut_and_counted() {
        let keys: Vec<String> = (0..200).map(|i| format!("key{i:03}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let list = key_list(&refs);
        assert!(list.len() <= MAX_LISTED_KEY_CHARS + 20, "{list}");
        assert!(list.starts_with("\"key000\", \"key001\""), "{list}");
        let listed = list.matches("\"key").count();
        assert!(
            list.ends_with(&format!(" and {} more", 200 - listed)),
            "{list}"
        );
    }

    #[test]
    fn a_timed_out_pause_fails_the_run_with_its_error() {
        let s = pause_timeout_state(T0);
        assert_eq!(
            (
                s.state_type,
                s.name.as_str(),
                s.message.as_str(),
                s.timestamp
            ),
            (
                StateType::Failed,
                PAUSE_TIMEOUT,
                "the pause timed out before the run was resumed",
                T0
            )
        );
        let p = pause_timeout_payload();
        assert_eq!(p.output, None);
        let e = p.error.unwrap();
        assert_eq!(
            (e.message.as_str(), e.error_type.as_str()),
            (s.message.as_str(), PAUSE_TIMEOUT)
        );
        assert!(may_carry_error(s.state_type));
    }

    #[test]
    fn only_completed_or_failed_task_runs_can_be_marked_stale() {
        let id = TaskRunId::new();
        for t in StateType::ALL {
            let r = check_may_mark_stale(id, &state(t));
            if matches!(t, StateType::Completed | StateType::Failed) {
                assert!(r.is_ok(), "{t:?}");
            } else {
                assert_eq!(
                    failed_precondition(r),
                    format!(
                        "task run {id} is {}; only a COMPLETED or FAILED task run can be marked stale",
                        t.default_name()
                    )
                );
            }
        }
    }

    // Size.

    #[test]
    fn a_run_fits_up_to_the_limit_and_a_refusal_names_the_field() {
        let s = state(StateType::Running);
        let room = document::MAX_RUN_BYTES - document::state_bytes(&s);
        assert!(check_fits("task run", room, &s, "output").is_ok());
        let (field, description) = violation(check_fits("task run", room + 1, &s, "output"));
        assert_eq!(field, "output");
        assert_eq!(
            description,
            format!(
                "the task run would take about {} bytes with this, more than the {} a response may carry; send less",
                document::MAX_RUN_BYTES + 1,
                document::MAX_RUN_BYTES
            )
        );
    }

    #[test]
    fn a_refusal_names_the_largest_part_of_the_request() {
        assert_eq!(largest(&[]), "state");
        assert_eq!(
            largest(&[("input", 5), ("initial_state", 9)]),
            "initial_state"
        );
        let mut p = propose(StateType::Completed);
        assert_eq!(largest_in(&p), "state");
        p.payload.output = Some(Value::String("x".repeat(5_000)));
        assert_eq!(largest_in(&p), "output");
        p.payload.error = Some(ErrorInfo {
            message: "y".repeat(10_000),
            ..Default::default()
        });
        assert_eq!(largest_in(&p), "error");
    }

    fn any_type() -> impl Strategy<Value = StateType> {
        (0..StateType::ALL.len()).prop_map(|i| StateType::ALL[i])
    }

    proptest! {
        #[test]
        fn terminal_states_absorb_every_unforced_proposal(from in any_type(), to in any_type(), exec in proptest::option::of(any_type())) {
            prop_assume!(from.is_terminal());
            let c = Context { now: T0, execution_state: exec, task: Some(TaskContext::default()) };
            prop_assert_eq!(decide(&state(from), &propose(to), &c).status(), Status::Abort);
        }

        #[test]
        fn every_accepted_transition_counts_once(types in proptest::collection::vec(any_type(), 1..20)) {
            let mut run = RunCore::new(state(StateType::Pending), "a");
            let mut accepted = 0;
            for (i, t) in types.into_iter().enumerate() {
                let now = T0.checked_add(Duration::from_secs(i as u64 + 1)).unwrap();
                let c = Context { now, execution_state: None, task: None };
                if decide(&run.state, &propose(t), &c) == Decision::Accept {
                    apply_accepted(&mut run, StateProposal::of_type(t).into_state(now), Payload::default(), "a");
                    accepted += 1;
                }
                prop_assert_eq!(run.transition_count, accepted);
                prop_assert!(run.run_count <= accepted);
            }
        }

        #[test]
        fn the_largest_part_is_named(parts in proptest::collection::vec(0usize..1000, 1..6)) {
            const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
            let named: Vec<(&str, usize)> = parts.iter().enumerate().map(|(i, n)| (NAMES[i], *n)).collect();
            let name = largest(&named);
            let size = named.iter().find(|(n, _)| *n == name).unwrap().1;
            prop_assert_eq!(size, *parts.iter().max().unwrap());
        }

        #[test]
        fn depth_is_one_below_the_parent_within_max_depth(parent_depth in 1i32..12, max_depth in 1i32..11) {
            let mut exec = execution(StateType::Running);
            exec.max_depth = max_depth;
            let parent = task_run(&exec, parent_depth);
            let r = task_run_depth(&exec, Some(&parent));
            if parent_depth < max_depth {
                prop_assert_eq!(r.unwrap(), parent_depth + 1);
            } else {
                prop_assert!(r.is_err());
            }
        }

        #[test]
        fn resuming_lacks_exactly_the_keys_not_given(
            asked in proptest::collection::btree_set("[a-c]{1,2}", 0..8),
            given in proptest::collection::btree_set("[a-c]{1,2}", 0..8),
        ) {
            let asked: Vec<&str> = asked.iter().map(String::as_str).collect();
            let given: Vec<&str> = given.iter().map(String::as_str).collect();
            let s = paused(&asked, None);
            let run_input = input(&given);
            let missing = missing_keys(&s, &run_input);
            let expected: Vec<&str> = asked.iter().copied().filter(|k| !given.contains(k)).collect();
            prop_assert_eq!(&missing, &expected);
            prop_assert_eq!(
                resume_state(ExecutionId::new(), &s, &run_input, T0).is_ok(),
                expected.is_empty()
            );
        }

        #[test]
        fn a_missing_key_list_accounts_for_every_key(keys in proptest::collection::vec("[a-z]{1,60}", 1..60)) {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let list = key_list(&refs);
            // Keys hold no commas: each separator is one more key listed.
            let listed = list.matches(", ").count() + 1;
            let more = list
                .rsplit_once(" and ")
                .and_then(|(_, rest)| rest.strip_suffix(" more"))
                .map_or(0, |n| n.parse::<usize>().unwrap());
            prop_assert_eq!(listed + more, keys.len(), "{}", list);
            // At least one key is always shown, whatever its length.
            prop_assert!(listed == 1 || list.len() <= MAX_LISTED_KEY_CHARS + 20, "{}", list);
        }

        #[test]
        fn a_resolved_input_within_its_room_fits(input_len in 0usize..3_900_000, keys in 0usize..40, delta in -3i64..4) {
            let exec = execution(StateType::Running);
            let mut run = task_run(&exec, 1);
            run.input = Value::String("i".repeat(input_len));
            run.run.state = state(StateType::Pending);
            let next = StateProposal::of_type(StateType::Running).named("Running");
            let room = resolution_room(&run, &next, keys);
            prop_assume!(room > 100);
            // A value whose encoding is `room + delta` bytes, give or take
            // the length prefix.
            let target = (room as i64 + delta) as usize;
            let mut n = target.saturating_sub(8);
            while json::encoded_len(&Value::String("v".repeat(n))) < target {
                n += 1;
            }
            let value = Value::String("v".repeat(n));
            let bytes = json::encoded_len(&value);
            run.resolved_input = Some(value);
            run.task_inputs = (0..keys).map(|_| TaskRunId::new()).collect();
            run.run.state = next.into_state(T0);
            let fits = check_fits("task run", document::task_run_bytes(&run), &run.run.state, "state");
            prop_assert_eq!(fits.is_ok(), bytes <= room, "room {}, value {}", room, bytes);
        }
    }
}
