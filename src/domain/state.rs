use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{StateId, Timestamp};

/// The fixed kinds of state that drive the orchestration rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateType {
    Scheduled,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Crashed,
    Paused,
    Cancelling,
}

impl StateType {
    pub const ALL: [StateType; 9] = [
        StateType::Scheduled,
        StateType::Pending,
        StateType::Running,
        StateType::Completed,
        StateType::Failed,
        StateType::Cancelled,
        StateType::Crashed,
        StateType::Paused,
        StateType::Cancelling,
    ];

    /// Terminal states end a run; only a forced transition leaves them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StateType::Completed | StateType::Failed | StateType::Cancelled | StateType::Crashed
        )
    }

    /// The name a state of this type gets when the client gives none.
    pub fn default_name(self) -> &'static str {
        match self {
            StateType::Scheduled => "Scheduled",
            StateType::Pending => "Pending",
            StateType::Running => "Running",
            StateType::Completed => "Completed",
            StateType::Failed => "Failed",
            StateType::Cancelled => "Cancelled",
            StateType::Crashed => "Crashed",
            StateType::Paused => "Paused",
            StateType::Cancelling => "Cancelling",
        }
    }

    /// A stable small number for indexed storage columns.
    pub fn code(self) -> i64 {
        match self {
            StateType::Scheduled => 1,
            StateType::Pending => 2,
            StateType::Running => 3,
            StateType::Completed => 4,
            StateType::Failed => 5,
            StateType::Cancelled => 6,
            StateType::Crashed => 7,
            StateType::Paused => 8,
            StateType::Cancelling => 9,
        }
    }
}

/// Details that shape how a state is orchestrated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_expiration: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_timeout: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_key: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub run_input_keyset: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition_id: Option<String>,
}

/// A state a run is or was in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub id: StateId,
    #[serde(rename = "type")]
    pub state_type: StateType,
    pub name: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub timestamp: Timestamp,
    #[serde(default)]
    pub details: StateDetails,
}

/// A state proposed by a client, already validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateProposal {
    pub state_type: StateType,
    /// Empty: the type's default name.
    pub name: String,
    pub message: String,
    pub data: Option<Value>,
    pub details: StateDetails,
}

impl StateProposal {
    pub fn of_type(state_type: StateType) -> Self {
        Self {
            state_type,
            name: String::new(),
            message: String::new(),
            data: None,
            details: StateDetails::default(),
        }
    }

    /// Same proposal under another name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The state this proposal becomes when accepted at `now`. A SCHEDULED
    /// state without a time is scheduled for now.
    pub fn into_state(self, now: Timestamp) -> State {
        let mut details = self.details;
        if self.state_type == StateType::Scheduled && details.scheduled_time.is_none() {
            details.scheduled_time = Some(now);
        }
        State {
            id: StateId::new(),
            state_type: self.state_type,
            name: if self.name.is_empty() {
                self.state_type.default_name().to_owned()
            } else {
                self.name
            },
            message: self.message,
            data: self.data,
            timestamp: now,
            details,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_four_terminal_types() {
        let terminal: Vec<_> = StateType::ALL
            .into_iter()
            .filter(|t| t.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                StateType::Completed,
                StateType::Failed,
                StateType::Cancelled,
                StateType::Crashed
            ]
        );
    }

    #[test]
    fn proposals_get_default_names_and_schedule_times() {
        let now = Timestamp::from_micros(42);
        let s = StateProposal::of_type(StateType::Scheduled).into_state(now);
        assert_eq!(s.name, "Scheduled");
        assert_eq!(s.details.scheduled_time, Some(now));
        let s = StateProposal::of_type(StateType::Paused)
            .named("PendingReview")
            .into_state(now);
        assert_eq!(s.name, "PendingReview");
        assert_eq!(s.details.scheduled_time, None);
    }
}
