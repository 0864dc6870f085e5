//! The hot queries, named, so that the plan test checks exactly what runs.

pub(crate) const EXECUTION_BY_ID: &str =
    "SELECT doc, last_seq FROM executions WHERE tenant_id = ? AND id = ?";
pub(crate) const TASK_RUN_BY_ID: &str =
    "SELECT doc, last_seq FROM task_runs WHERE tenant_id = ? AND id = ?";
pub(crate) const STATES_OF_RUN: &str =
    "SELECT doc FROM states WHERE tenant_id = ? AND run_id = ? ORDER BY rowid";
pub(crate) const TASK_RUNS_OF_EXECUTION: &str = "SELECT doc, last_seq, created_at, id FROM task_runs \
     WHERE execution_id = ? AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?";
pub(crate) const EVENTS_OF_TENANT: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, payload \
     FROM events WHERE tenant_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_EXECUTION: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, payload \
     FROM events WHERE tenant_id = ? AND execution_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_EXECUTION_ONLY: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, payload \
     FROM events WHERE tenant_id = ? AND execution_id = ? AND task_run_id IS NULL AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EVENTS_OF_TASK_RUN: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, payload \
     FROM events WHERE tenant_id = ? AND task_run_id = ? AND seq > ? ORDER BY seq LIMIT ?";
pub(crate) const EXECUTION_BY_REQUEST_ID: &str =
    "SELECT id, doc, request_hash FROM executions WHERE tenant_id = ? AND request_id = ?";
pub(crate) const TASK_RUN_BY_KEY: &str =
    "SELECT id, doc FROM task_runs WHERE execution_id = ? AND task_key = ? AND dynamic_key = ?";
pub(crate) const TASK_RUNS_BY_KEY: &str = "SELECT doc FROM task_runs WHERE execution_id = ? AND task_key = ? \
     ORDER BY created_at DESC, id DESC";
pub(crate) const EXPIRED_PAUSED_EXECUTIONS: &str =
    "SELECT tenant_id, id FROM executions WHERE pause_deadline <= ? LIMIT ?";
pub(crate) const EXPIRED_PAUSED_TASK_RUNS: &str =
    "SELECT tenant_id, id FROM task_runs WHERE pause_deadline <= ? LIMIT ?";
pub(crate) const CACHE_ENTRY: &str =
    "SELECT output, expiration FROM cache_entries WHERE tenant_id = ? AND cache_key = ?";
pub(crate) const FIRST_EVENT_KEPT: &str =
    "SELECT seq FROM events WHERE occurred_at >= ? ORDER BY seq LIMIT 1";
