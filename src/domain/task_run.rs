use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ExecutionId, RunCore, StateProposal, TaskRunId, Timestamp};

pub const MAX_KEY_CHARS: usize = 200;
pub const MAX_CACHE_KEY_CHARS: usize = 1_000;
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_CHARS: usize = 100;
pub const MAX_RETRIES: i32 = 100;
pub const MAX_RETRY_DELAYS: usize = 50;

/// How a failed task run is retried.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub retries: i32,
    pub retry_delay_seconds: Vec<f64>,
    pub retry_jitter_factor: f64,
}

impl RetryPolicy {
    pub fn check(self) -> Result<Self, String> {
        if !(0..=MAX_RETRIES).contains(&self.retries) {
            return Err(format!("retries must be between 0 and {MAX_RETRIES}"));
        }
        if self.retry_delay_seconds.len() > MAX_RETRY_DELAYS {
            return Err(format!("at most {MAX_RETRY_DELAYS} retry delays"));
        }
        if self
            .retry_delay_seconds
            .iter()
            .any(|d| !d.is_finite() || *d < 0.0 || *d > 31_536_000.0)
        {
            return Err("retry delays must be between 0 and 31536000 seconds".into());
        }
        if !self.retry_jitter_factor.is_finite() || !(0.0..=1.0).contains(&self.retry_jitter_factor)
        {
            return Err("retry_jitter_factor must be between 0 and 1".into());
        }
        Ok(self)
    }
}

/// A validated request to create a task run.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTaskRun {
    pub execution_id: ExecutionId,
    pub task_key: String,
    /// None: the server assigns the next index for the task_key.
    pub dynamic_key: Option<String>,
    pub name: String,
    pub parent_task_run_id: Option<TaskRunId>,
    pub task_version: Option<String>,
    pub cache_key: Option<String>,
    pub cache_expiration: Option<Timestamp>,
    pub retry_policy: RetryPolicy,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub input: Value,
    pub initial_state: Option<StateProposal>,
}

/// One unit of work inside an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    pub id: TaskRunId,
    pub tenant_id: String,
    pub execution_id: ExecutionId,
    pub parent_task_run_id: Option<TaskRunId>,
    pub depth: i32,
    pub task_key: String,
    pub dynamic_key: String,
    pub name: String,
    pub task_version: Option<String>,
    pub cache_key: Option<String>,
    pub cache_expiration: Option<Timestamp>,
    pub retry_policy: RetryPolicy,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub input: Value,
    pub resolved_input: Option<Value>,
    pub task_inputs: Vec<TaskRunId>,
    pub stale: bool,
    pub run: RunCore,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_limits() {
        let ok = RetryPolicy {
            retries: 3,
            retry_delay_seconds: vec![1.0, 10.0],
            retry_jitter_factor: 0.5,
        };
        assert!(ok.clone().check().is_ok());
        assert!(
            RetryPolicy {
                retries: -1,
                ..ok.clone()
            }
            .check()
            .is_err()
        );
        assert!(
            RetryPolicy {
                retry_delay_seconds: vec![f64::NAN],
                ..ok.clone()
            }
            .check()
            .is_err()
        );
        assert!(
            RetryPolicy {
                retry_jitter_factor: 2.0,
                ..ok
            }
            .check()
            .is_err()
        );
    }
}
