use serde::{Deserialize, Serialize};

use super::{Execution, ExecutionId, StateType, TaskRun, TaskRunId, Timestamp};

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    StateChanged,
    Updated,
    Deleted,
    Snapshot,
}

/// The run an event is about, as it is after the event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resource<'a> {
    Execution(&'a Execution),
    TaskRun(&'a TaskRun),
}

impl Resource<'_> {
    pub fn tenant_id(&self) -> &str {
        match self {
            Resource::Execution(e) => &e.tenant_id,
            Resource::TaskRun(t) => &t.tenant_id,
        }
    }

    pub fn execution_id(&self) -> ExecutionId {
        match self {
            Resource::Execution(e) => e.id,
            Resource::TaskRun(t) => t.execution_id,
        }
    }

    pub fn task_run_id(&self) -> Option<TaskRunId> {
        match self {
            Resource::Execution(_) => None,
            Resource::TaskRun(t) => Some(t.id),
        }
    }

    pub fn state_type(&self) -> StateType {
        match self {
            Resource::Execution(e) => e.run.state.state_type,
            Resource::TaskRun(t) => t.run.state.state_type,
        }
    }
}

/// An accepted change to a run, before the log gives it a sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event<'a> {
    pub kind: EventKind,
    pub occurred_at: Timestamp,
    pub previous_state_type: Option<StateType>,
    pub resource: Resource<'a>,
    /// The task_id of the execution the run belongs to, so that streams can
    /// select task run events by it too.
    pub task_id: Option<&'a str>,
}

impl Event<'_> {
    /// The event as the log keeps it: owned, with the run's document.
    pub fn record(&self) -> EventRecord {
        EventRecord {
            kind: self.kind,
            occurred_at: self.occurred_at,
            previous_state_type: self.previous_state_type,
            run: match self.resource {
                Resource::Execution(e) => RecordedRun::Execution(e.clone()),
                Resource::TaskRun(t) => RecordedRun::TaskRun(t.clone()),
            },
            task_id: self.task_id.map(str::to_owned),
        }
    }
}

/// The run an event record carries, as it is after the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedRun {
    Execution(Execution),
    TaskRun(TaskRun),
}

/// An event as the ledger records it in its log: the ledger's own record,
/// independent of any wire format, so that the log outlives changes to the
/// API. Stored as versioned JSON (see [`EventRecord::encode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub kind: EventKind,
    pub occurred_at: Timestamp,
    pub previous_state_type: Option<StateType>,
    pub run: RecordedRun,
    pub task_id: Option<String>,
}

/// The version of the record encoding [`EventRecord::encode`] writes.
pub const EVENT_RECORD_VERSION: u32 = 1;

/// A record as stored, version first.
#[derive(Serialize)]
struct StoredRecordOut<'a> {
    v: u32,
    kind: EventKind,
    occurred_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_state_type: Option<StateType>,
    run: &'a RecordedRun,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct StoredRecordIn {
    v: u32,
    kind: EventKind,
    occurred_at: Timestamp,
    #[serde(default)]
    previous_state_type: Option<StateType>,
    run: RecordedRun,
    #[serde(default)]
    task_id: Option<String>,
}

impl EventRecord {
    /// The record's stored form: JSON with its version, `{"v":1,...}`.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&StoredRecordOut {
            v: EVENT_RECORD_VERSION,
            kind: self.kind,
            occurred_at: self.occurred_at,
            previous_state_type: self.previous_state_type,
            run: &self.run,
            task_id: self.task_id.as_deref(),
        })
    }

    /// Reads a stored record of a version this server knows.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let r: StoredRecordIn = serde_json::from_slice(bytes)
            .map_err(|e| format!("an unreadable event record: {e}"))?;
        if r.v != EVENT_RECORD_VERSION {
            return Err(format!("an event record of unknown version {}", r.v));
        }
        Ok(EventRecord {
            kind: r.kind,
            occurred_at: r.occurred_at,
            previous_state_type: r.previous_state_type,
            run: r.run,
            task_id: r.task_id,
        })
    }

    /// The event this record holds, borrowed.
    pub fn event(&self) -> Event<'_> {
        Event {
            kind: self.kind,
            occurred_at: self.occurred_at,
            previous_state_type: self.previous_state_type,
            resource: match &self.run {
                RecordedRun::Execution(e) => Resource::Execution(e),
                RecordedRun::TaskRun(t) => Resource::TaskRun(t),
            },
            task_id: self.task_id.as_deref(),
        }
    }
}
