use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{State, Timestamp};

/// What went wrong in a FAILED or CRASHED run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: String,
    pub traceback: String,
}

/// The lifecycle bookkeeping executions and task runs share: their state
/// and what the orchestration rules keep track of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCore {
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub transition_count: i64,
    pub run_count: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_start_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_start_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Timestamp>,
    /// Microseconds spent RUNNING, over every run.
    pub total_run_time_us: i64,
    pub updated_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<Timestamp>,
}

impl RunCore {
    /// Time spent RUNNING so far, including the current run.
    pub fn estimated_run_time_us(&self, now: Timestamp) -> i64 {
        let current = if self.state.state_type == super::StateType::Running {
            micros(now.saturating_since(self.state.timestamp))
        } else {
            0
        };
        self.total_run_time_us.saturating_add(current)
    }

    /// How late the run started against its expected start: fixed once it
    /// started, growing while it is overdue and not yet started.
    pub fn estimated_start_time_delta_us(&self, now: Timestamp) -> i64 {
        let Some(expected) = self.expected_start_time else {
            return 0;
        };
        match self.start_time {
            Some(started) => micros(started.saturating_since(expected)),
            None if !self.state.state_type.is_terminal() => micros(now.saturating_since(expected)),
            None => 0,
        }
    }

    /// A new run in its initial state. The initial state is not a
    /// transition: transition_count stays 0, but the times it implies are
    /// recorded.
    pub fn new(initial: State, created_by: &str) -> Self {
        let now = initial.timestamp;
        let state_type = initial.state_type;
        let scheduled = initial.details.scheduled_time;
        let mut run = RunCore {
            output: None,
            error: None,
            transition_count: 0,
            run_count: 0,
            created_at: now,
            updated_at: now,
            expected_start_time: Some(scheduled.unwrap_or(now)),
            next_scheduled_start_time: scheduled,
            start_time: None,
            end_time: None,
            total_run_time_us: 0,
            updated_by: created_by.to_owned(),
            deleted_at: None,
            state: initial,
        };
        if state_type == super::StateType::Running {
            run.run_count = 1;
            run.start_time = Some(now);
        }
        if state_type.is_terminal() {
            run.end_time = Some(now);
        }
        run
    }
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{StateProposal, StateType};
    use std::time::Duration;

    #[test]
    fn estimates_count_the_current_run_and_the_start_delay() {
        let t0 = Timestamp::from_micros(10_000_000);
        let at = |s: u64| t0.checked_add(Duration::from_secs(s)).unwrap();
        let mut run = RunCore::new(
            StateProposal::of_type(StateType::Pending).into_state(t0),
            "a",
        );
        assert_eq!(run.estimated_start_time_delta_us(at(3)), 3_000_000);
        run.start_time = Some(at(2));
        run.state = StateProposal::of_type(StateType::Running).into_state(at(2));
        run.total_run_time_us = 1_000_000;
        assert_eq!(run.estimated_run_time_us(at(5)), 4_000_000);
        assert_eq!(run.estimated_start_time_delta_us(at(9)), 2_000_000);
    }
}
