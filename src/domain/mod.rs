//! The ledger's vocabulary: ids, states, executions, task runs and events.
//! Plain data and validated constructors; no I/O.

pub mod document;
mod event;
pub mod execution;
mod ids;
pub mod json;
pub mod page;
mod run;
mod state;
pub mod task_run;
pub mod template;
mod time;
mod violation;

pub use event::{EVENT_RECORD_VERSION, Event, EventKind, EventRecord, RecordedRun, Resource};
pub use execution::{ConfigOverrides, ConfigProfile, EffectiveConfig, Execution, NewExecution};
pub use ids::{ExecutionId, StateId, TaskRunId};
pub use run::{ErrorInfo, RunCore};
pub use state::{State, StateDetails, StateProposal, StateType};
pub use task_run::{NewTaskRun, RetryPolicy, TaskRun};
pub use time::Timestamp;
pub use violation::{FieldViolation, QUOTE_CHARS, Violations, prefix, quote};

/// Who makes a call: the tenant whose rows it may touch, and the name its
/// changes are recorded under (`updated_by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: String,
    pub name: String,
}

/// The name the server records for transitions it makes by itself.
pub const SYSTEM_ACTOR: &str = "system";
