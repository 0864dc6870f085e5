use super::{Execution, ExecutionId, StateType, TaskRun, TaskRunId, Timestamp};

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
