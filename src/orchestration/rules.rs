//! The orchestration rules of the contract, as pure functions: given a
//! run's current state, a proposal and the context, decide; then apply the
//! bookkeeping of an accepted transition. No I/O happens here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{
    ErrorInfo, RetryPolicy, RunCore, State, StateId, StateProposal, StateType, Timestamp, prefix,
    template::Resolution,
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
    // Requests carry these only with the states they belong to; the
    // server also keeps a failed attempt's error when it schedules a retry.
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
    }
}
