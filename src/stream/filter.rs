use super::LoggedEvent;
use crate::grpc::pb::status_event::Resource;

/// Which events a subscription delivers. Empty lists and maps match
/// everything; task run events come only with `include_task_runs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub task_ids: Vec<String>,
    pub execution_ids: Vec<String>,
    pub state_types: Vec<i32>,
    pub kinds: Vec<i32>,
    pub metadata: Vec<(String, String)>,
    pub labels: Vec<(String, String)>,
    pub include_task_runs: bool,
}

impl EventFilter {
    pub fn matches(&self, e: &LoggedEvent) -> bool {
        if e.task_run_id.is_some() && !self.include_task_runs {
            return false;
        }
        if !self.execution_ids.is_empty() && !self.execution_ids.contains(&e.execution_id) {
            return false;
        }
        if !self.task_ids.is_empty() {
            // A task run's event carries its execution's task_id.
            if !e
                .task_id
                .as_deref()
                .is_some_and(|t| self.task_ids.iter().any(|x| x == t))
            {
                return false;
            }
        }
        // What a stand-in lost cannot be matched: deliver it rather than
        // lose the event without a trace.
        if e.is_stand_in() {
            return true;
        }
        if !self.state_types.is_empty() && !self.state_types.contains(&e.state_type()) {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&e.event().kind) {
            return false;
        }
        if self.metadata.is_empty() && self.labels.is_empty() {
            return true;
        }
        match &e.event().resource {
            Some(Resource::Execution(x)) => all_pairs_in(&self.metadata, &x.metadata),
            Some(Resource::TaskRun(t)) => all_pairs_in(&self.labels, &t.labels),
            None => false,
        }
    }
}

fn all_pairs_in(
    wanted: &[(String, String)],
    have: &std::collections::BTreeMap<String, String>,
) -> bool {
    wanted.iter().all(|(k, v)| have.get(k) == Some(v))
}
