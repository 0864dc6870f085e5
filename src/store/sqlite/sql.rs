//! The hot queries, named, so that the plan test checks exactly what runs.

pub(crate) const EXECUTION_BY_ID: &str =
    "SELECT doc, last_seq FROM executions WHERE tenant_id = ? AND id = ?";
pub(crate) const TASK_RUN_BY_ID: &str =
    "SELECT doc, last_seq FROM task_runs WHERE tenant_id = ? AND id = ?";
pub(crate) const STATES_OF_RUN: &str = "SELECT rowid, doc FROM states \
     WHERE tenant_id = ? AND run_id = ? AND rowid > ? ORDER BY rowid LIMIT ?";
pub(crate) const TASK_RUNS_OF_EXECUTION: &str = "SELECT doc, last_seq FROM task_runs \
     WHERE tenant_id = ? AND execution_id = ? AND last_seq > ? AND last_seq <= ? ORDER BY last_seq LIMIT ?";
pub(crate) const EVENTS_OF_TENANT: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_EXECUTION: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = ? AND execution_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_EXECUTION_ONLY: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = ? AND execution_id = ? AND task_run_id IS NULL AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_TASK_RUN: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = ? AND task_run_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EXECUTION_BY_REQUEST_ID: &str =
    "SELECT id, doc, request_hash FROM executions WHERE tenant_id = ? AND request_id = ?";
pub(crate) const TASK_RUN_BY_KEY: &str =
    "SELECT id, doc FROM task_runs WHERE execution_id = ? AND task_key = ? AND dynamic_key = ?";
/// The latest COMPLETED run of a task key but one (?3), with its output
/// alone, as JSON text.
pub(crate) const LATEST_COMPLETED_OF_KEY: &str = "SELECT id, doc -> '$.run.output' FROM task_runs \
     WHERE execution_id = ?1 AND task_key = ?2 AND state_type = 4 AND id <> ?3 \
     ORDER BY created_at DESC, id DESC LIMIT 1";
/// Whether a task key has runs but one (?3), and whether one of them has
/// not ended (SCHEDULED, PENDING, RUNNING, PAUSED, CANCELLING).
pub(crate) const RUNS_OF_KEY_EXIST: &str = "SELECT \
     EXISTS (SELECT 1 FROM task_runs WHERE execution_id = ?1 AND task_key = ?2 AND id <> ?3), \
     EXISTS (SELECT 1 FROM task_runs WHERE execution_id = ?1 AND task_key = ?2 AND id <> ?3 \
         AND state_type IN (1, 2, 3, 8, 9))";
pub(crate) const EXPIRED_PAUSED_EXECUTIONS: &str =
    "SELECT tenant_id, id FROM executions WHERE pause_deadline <= ? LIMIT ?";
pub(crate) const EXPIRED_PAUSED_TASK_RUNS: &str =
    "SELECT tenant_id, id FROM task_runs WHERE pause_deadline <= ? LIMIT ?";
pub(crate) const CACHE_ENTRY: &str =
    "SELECT output, expiration FROM cache_entries WHERE tenant_id = ? AND cache_key = ?";
pub(crate) const FIRST_EVENT_KEPT: &str =
    "SELECT seq FROM events WHERE tenant_id = ? AND occurred_at >= ? ORDER BY seq LIMIT 1";
/// The latest sequence given out to a tenant.
pub(crate) const HEAD_OF_TENANT: &str =
    "SELECT COALESCE((SELECT head FROM tenant_heads WHERE tenant_id = ?), 0)";
pub(crate) const EXPIRED_CACHE_ENTRIES: &str = "DELETE FROM cache_entries WHERE expiration <= ?";
pub(crate) const CREATE_CLOSED_RUNS: &str =
    "CREATE TEMP TABLE IF NOT EXISTS closed_runs (id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID";
/// Finished runs whose last event is in the range of the log being
/// removed: ?1 < seq <= ?2. Finished means COMPLETED, CANCELLED or
/// deleted. Any terminal run can be forced back to RUNNING, but FAILED and
/// CRASHED runs are the ones clients retry that way, so they keep their
/// history and transition results and a repeated transition_id is
/// answered from them; for the others, transition_id is recognised for as
/// long as retention keeps their events.
pub(crate) const CLOSED_RUNS_IN_RANGE: &str = "INSERT OR IGNORE INTO temp.closed_runs (id) \
     SELECT id FROM executions WHERE id IN \
         (SELECT execution_id FROM events WHERE tenant_id = ?3 AND seq > ?1 AND seq <= ?2) \
       AND last_seq <= ?2 AND (state_type IN (4, 6) OR deleted_at IS NOT NULL) \
     UNION ALL \
     SELECT id FROM task_runs WHERE id IN \
         (SELECT task_run_id FROM events WHERE tenant_id = ?3 AND seq > ?1 AND seq <= ?2) \
       AND last_seq <= ?2 AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)";
/// The history rows of closed runs, but for each run's current state.
pub(crate) const PRUNE_CLOSED_STATES: &str = "DELETE FROM states \
     WHERE run_id IN (SELECT id FROM temp.closed_runs) \
       AND rowid < (SELECT MAX(kept.rowid) FROM states AS kept WHERE kept.run_id = states.run_id)";
pub(crate) const PRUNE_CLOSED_TRANSITIONS: &str =
    "DELETE FROM transitions WHERE run_id IN (SELECT id FROM temp.closed_runs)";

#[cfg(test)]
mod tests {
    use crate::domain::StateType;

    /// The upstream queries name COMPLETED and the unfinished types by code.
    #[test]
    fn upstream_queries_name_completed_and_the_unfinished_codes() {
        let unfinished: Vec<i64> = StateType::ALL
            .iter()
            .filter(|t| !t.is_terminal())
            .map(|t| t.code())
            .collect();
        assert_eq!(unfinished, [1, 2, 3, 8, 9]);
        assert!(super::RUNS_OF_KEY_EXIST.contains("state_type IN (1, 2, 3, 8, 9)"));
        assert_eq!(StateType::Completed.code(), 4);
        assert!(super::LATEST_COMPLETED_OF_KEY.contains("state_type = 4 "));
    }

    /// The retention queries name COMPLETED and CANCELLED by code.
    #[test]
    fn final_codes_are_those_retention_names() {
        let codes = [StateType::Completed.code(), StateType::Cancelled.code()];
        assert_eq!(codes, [4, 6]);
        assert!(super::CLOSED_RUNS_IN_RANGE.contains("state_type IN (4, 6)"));
    }
}
