//! The orchestration rules of the contract, as pure functions: given a
//! run's current state, a proposal and the context, decide; then apply the
//! bookkeeping of an accepted transition. No I/O happens here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{ErrorInfo, RunCore, State, StateId, StateProposal, StateType, Timestamp};

/// How long a task run is told to wait while its execution is not yet
/// RUNNING.
pub const EXECUTION_NOT_RUNNING_RETRY_AFTER: Duration = Duration::from_secs(1);

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
}

/// What the rules need to know besides the run itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub now: Timestamp,
    /// For a task run: the state type of its execution.
    pub execution_state: Option<StateType>,
}

/// What happens to a proposal.
#[derive(Debug, Clone, PartialEq)]
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
}

impl Decision {
    pub fn status(&self) -> Status {
        match self {
            Decision::Accept => Status::Accept,
            Decision::Reject { .. } => Status::Reject,
            Decision::Wait { .. } => Status::Wait,
            Decision::Abort { .. } => Status::Abort,
        }
    }
}

/// Rules 2 to 7, in order. Rule 1 (a repeated transition_id returns the
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
                current.id, current.name
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
    Decision::Accept
}

/// What an accepted transition carries besides its state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Payload {
    pub output: Option<serde_json::Value>,
    pub error: Option<ErrorInfo>,
}

/// Rule 11: the bookkeeping of an accepted transition to `next`.
pub fn apply_accepted(run: &mut RunCore, next: State, payload: Payload, updated_by: &str) {
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
    if to == StateType::Completed
        && let Some(output) = payload.output
    {
        run.output = Some(output);
    }
    if matches!(to, StateType::Failed | StateType::Crashed)
        && let Some(error) = payload.error
    {
        run.error = Some(error);
    }
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
        }
    }

    fn ctx() -> Context {
        Context {
            now: T0,
            execution_state: None,
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

    fn any_type() -> impl Strategy<Value = StateType> {
        (0..StateType::ALL.len()).prop_map(|i| StateType::ALL[i])
    }

    proptest! {
        #[test]
        fn terminal_states_absorb_every_unforced_proposal(from in any_type(), to in any_type(), exec in proptest::option::of(any_type())) {
            prop_assume!(from.is_terminal());
            let c = Context { now: T0, execution_state: exec };
            prop_assert_eq!(decide(&state(from), &propose(to), &c).status(), Status::Abort);
        }

        #[test]
        fn every_accepted_transition_counts_once(types in proptest::collection::vec(any_type(), 1..20)) {
            let mut run = RunCore::new(state(StateType::Pending), "a");
            let mut accepted = 0;
            for (i, t) in types.into_iter().enumerate() {
                let now = T0.checked_add(Duration::from_secs(i as u64 + 1)).unwrap();
                let c = Context { now, execution_state: None };
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
