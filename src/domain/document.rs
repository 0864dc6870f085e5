//! How large a run is when it is sent, and how large it may grow.
//!
//! Every response and every event that carries a run must stay within what
//! a default gRPC client accepts (4 MiB). Each value field is limited on its
//! own (1 MiB), but together they are not: input, resolved input, output
//! and state data alone could reach 4 MiB, and an answer to a state change
//! carries the run's state twice (as `state` and inside the run). So a
//! change is also checked against the whole: the run after it, plus its
//! state once more, must fit.
//!
//! The sizes here are upper bounds of the protobuf encoding, computed
//! without building it: exact for JSON values, generous for the rest.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ErrorInfo, Execution, RunCore, State, StateDetails, TaskRun, json};

/// The largest message a gRPC client accepts by default.
pub const CLIENT_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// Room for what wraps a run: an event's own fields, a response's others
/// (the reason of an orchestration result), the stream message.
const ENVELOPE: usize = 16 * 1024;

/// Room left for what the server adds to a run by itself after a change
/// the client made (a cancellation's reason, a pause timeout's error).
pub const SERVER_RESERVE: usize = 64 * 1024;

/// The largest a run and its state may be together, after a change a
/// client asks for.
pub const MAX_RUN_BYTES: usize = CLIENT_MESSAGE_LIMIT - ENVELOPE - SERVER_RESERVE;

/// The most a page of runs may take in one list response.
pub const MAX_PAGE_BYTES: usize = CLIENT_MESSAGE_LIMIT - ENVELOPE;

/// Generous room for the fixed-size fields of a message (ids, numbers,
/// timestamps, enums, flags, tags and length prefixes of its fields).
const FIXED: usize = 1024;

fn text(s: &str) -> usize {
    // A tag (at most 2 bytes) and a length (at most 5).
    s.len() + 7
}

fn opt_text(s: &Option<String>) -> usize {
    s.as_deref().map_or(0, text)
}

fn value(v: &Value) -> usize {
    json::encoded_len(v) + 7
}

fn opt_value(v: &Option<Value>) -> usize {
    v.as_ref().map_or(0, value)
}

fn map(m: &BTreeMap<String, String>) -> usize {
    m.iter().map(|(k, v)| text(k) + text(v) + 7).sum()
}

/// A state with these parts.
pub fn state_parts_bytes(
    name: &str,
    message: &str,
    data: &Option<Value>,
    details: &StateDetails,
) -> usize {
    FIXED
        + text(name)
        + text(message)
        + opt_value(data)
        + opt_text(&details.cache_key)
        + opt_text(&details.pause_key)
        + opt_text(&details.transition_id)
        + map(&details.run_input_keyset)
}

pub fn state_bytes(s: &State) -> usize {
    state_parts_bytes(&s.name, &s.message, &s.data, &s.details)
}

pub fn error_bytes(e: &ErrorInfo) -> usize {
    FIXED + text(&e.message) + text(&e.error_type) + text(&e.traceback)
}

fn core_bytes(r: &RunCore) -> usize {
    FIXED
        + state_bytes(&r.state)
        + opt_value(&r.output)
        + r.error.as_ref().map_or(0, error_bytes)
        + text(&r.updated_by)
}

pub fn task_run_bytes(t: &TaskRun) -> usize {
    FIXED
        + core_bytes(&t.run)
        + text(&t.tenant_id)
        + text(&t.task_key)
        + text(&t.dynamic_key)
        + text(&t.name)
        + opt_text(&t.task_version)
        + opt_text(&t.cache_key)
        + t.retry_policy.retry_delay_seconds.len() * 9
        + t.tags.iter().map(|s| text(s)).sum::<usize>()
        + map(&t.labels)
        + value(&t.input)
        + opt_value(&t.resolved_input)
        // A hyphenated id and its field.
        + t.task_inputs.len() * 40
}

pub fn execution_bytes(e: &Execution) -> usize {
    FIXED
        + core_bytes(&e.run)
        + text(&e.tenant_id)
        + opt_text(&e.task_id)
        + text(&e.name)
        + json::framed(json::struct_len(&e.input))
        + opt_text(&e.goal)
        + opt_text(&e.config_overrides.model)
        + text(&e.effective_config.model)
        + map(&e.metadata)
        + opt_text(&e.request_id)
}

/// What a run and its state take together, against [`MAX_RUN_BYTES`].
pub fn with_state(run_bytes: usize, state: &State) -> usize {
    run_bytes + state_bytes(state)
}
