//! Requests -> validated domain values. Every problem is reported against
//! the field it concerns, all at once.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value};

use super::{convert, pb};
use crate::{
    domain::execution::{
        MAX_NAME_CHARS, MAX_TASK_ID_CHARS, NUL_REFUSED, check_chars, check_no_nul, check_string_map,
    },
    domain::page::{ExecutionFilter, HistoryPage, Page, TaskRunFilter},
    domain::task_run::{MAX_CACHE_KEY_CHARS, MAX_KEY_CHARS, MAX_TAG_CHARS, MAX_TAGS},
    domain::{
        ConfigOverrides, ConfigProfile, ErrorInfo, ExecutionId, NewExecution, NewTaskRun,
        RetryPolicy, StateDetails, StateId, StateProposal, StateType, TaskRunId, Violations, json,
    },
    orchestration::rules::{self, Payload, Proposal},
};

const MAX_MESSAGE_CHARS: usize = 10_000;
const MAX_TRANSITION_ID_CHARS: usize = 100;
const MAX_KEYSET_KEYS: usize = 100;
const MAX_FILTER_ITEMS: usize = 100;

pub(crate) fn execution_id(field: &str, s: &str, v: &mut Violations) -> Option<ExecutionId> {
    required_id(field, s, v, ExecutionId::parse)
}

pub(crate) fn task_run_id(field: &str, s: &str, v: &mut Violations) -> Option<TaskRunId> {
    required_id(field, s, v, TaskRunId::parse)
}

fn required_id<T>(
    field: &str,
    s: &str,
    v: &mut Violations,
    parse: fn(&str) -> Result<T, String>,
) -> Option<T> {
    if s.is_empty() {
        v.add(field, "is required");
        return None;
    }
    v.check(field, parse(s))
}

/// Checks a JSON value against the size and nesting limits.
fn json_value(field: &str, pbv: &prost_types::Value, v: &mut Violations) -> Option<Value> {
    if pbv.encoded_len() > json::MAX_ENCODED_BYTES {
        v.add(
            field,
            format!("at most {} bytes encoded", json::MAX_ENCODED_BYTES),
        );
        return None;
    }
    let value = v.check(field, convert::from_value(pbv))?;
    if json::depth(&value) > json::MAX_DEPTH {
        v.add(field, format!("nested at most {} deep", json::MAX_DEPTH));
        return None;
    }
    Some(value)
}

fn json_struct(
    field: &str,
    s: Option<&prost_types::Struct>,
    v: &mut Violations,
) -> Map<String, Value> {
    let Some(s) = s else { return Map::new() };
    let wrapped = prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(s.clone())),
    };
    match json_value(field, &wrapped, v) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn optional_chars(field: &str, s: String, max: usize, v: &mut Violations) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    v.check(field, check_chars(s, 0, max))
}

/// A filter's text, if given: any length, but no NUL.
fn optional_text(field: &str, s: String, v: &mut Violations) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    v.check(field, check_no_nul(&s).map(|()| s))
}

fn timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
    v: &mut Violations,
) -> Option<crate::domain::Timestamp> {
    t.and_then(|t| v.check(field, convert::from_timestamp(t)))
}

fn state_type(field: &str, t: i32, v: &mut Violations) -> Option<StateType> {
    let parsed = convert::from_state_type(t);
    if parsed.is_none() {
        v.add(
            field,
            "must be a state type other than STATE_TYPE_UNSPECIFIED",
        );
    }
    parsed
}

fn state_types(field: &str, types: &[i32], v: &mut Violations) -> Vec<StateType> {
    if types.len() > MAX_FILTER_ITEMS {
        v.add(field, format!("at most {MAX_FILTER_ITEMS} items"));
    }
    types
        .iter()
        .filter_map(|t| state_type(field, *t, v))
        .collect()
}

fn details(prefix: &str, d: Option<pb::StateDetails>, v: &mut Violations) -> StateDetails {
    let Some(d) = d else {
        return StateDetails::default();
    };
    let f = |name: &str| format!("{prefix}.{name}");
    if d.run_input_keyset.len() > MAX_KEYSET_KEYS {
        v.add(
            f("run_input_keyset"),
            format!("at most {MAX_KEYSET_KEYS} keys"),
        );
    }
    if d.run_input_keyset.keys().any(|k| {
        let n = k.chars().count();
        n == 0 || n > MAX_KEY_CHARS
    }) {
        v.add(
            f("run_input_keyset"),
            format!("keys must be 1 to {MAX_KEY_CHARS} characters"),
        );
    }
    if d.run_input_keyset.keys().any(|k| k.contains('\0')) {
        v.add(f("run_input_keyset"), format!("keys {NUL_REFUSED}"));
    }
    StateDetails {
        scheduled_time: timestamp(&f("scheduled_time"), d.scheduled_time.as_ref(), v),
        cache_key: optional_chars(&f("cache_key"), d.cache_key, MAX_CACHE_KEY_CHARS, v),
        cache_expiration: timestamp(&f("cache_expiration"), d.cache_expiration.as_ref(), v),
        pause_timeout: timestamp(&f("pause_timeout"), d.pause_timeout.as_ref(), v),
        pause_key: optional_chars(&f("pause_key"), d.pause_key, MAX_KEY_CHARS, v),
        run_input_keyset: d.run_input_keyset,
        refresh_cache: d.refresh_cache,
        retriable: d.retriable,
        transition_id: optional_chars(
            &f("transition_id"),
            d.transition_id,
            MAX_TRANSITION_ID_CHARS,
            v,
        ),
    }
}

/// A proposed state; `field` names it in violations ("state",
/// "initial_state").
fn state_create(
    field: &str,
    s: Option<pb::StateCreate>,
    v: &mut Violations,
) -> Option<StateProposal> {
    let Some(s) = s else {
        v.add(field, "is required");
        return None;
    };
    let state_type = state_type(&format!("{field}.type"), s.r#type, v);
    let name = v
        .check(
            &format!("{field}.name"),
            check_chars(s.name, 0, MAX_NAME_CHARS),
        )
        .unwrap_or_default();
    let message = v
        .check(
            &format!("{field}.message"),
            check_chars(s.message, 0, MAX_MESSAGE_CHARS),
        )
        .unwrap_or_default();
    let data = s
        .data
        .as_ref()
        .and_then(|d| json_value(&format!("{field}.data"), d, v));
    let details = details(&format!("{field}.details"), s.details, v);
    Some(StateProposal {
        state_type: state_type?,
        name,
        message,
        data,
        details,
    })
}

fn initial_state(s: Option<pb::StateCreate>, v: &mut Violations) -> Option<StateProposal> {
    s.as_ref()?;
    let p = state_create("initial_state", s, v)?;
    if !rules::may_start_in(p.state_type) {
        v.add("initial_state.type", "a run cannot start CANCELLING");
    }
    Some(p)
}

pub(crate) fn new_execution(r: pb::CreateExecutionRequest) -> Result<NewExecution, Violations> {
    let mut v = Violations::new();
    let task_id = optional_chars("task_id", r.task_id, MAX_TASK_ID_CHARS, &mut v);
    let name = v
        .check("name", check_chars(r.name, 0, MAX_NAME_CHARS))
        .unwrap_or_default();
    let input = json_struct("input", r.input.as_ref(), &mut v);
    let goal = if r.goal.is_empty() {
        None
    } else {
        v.check("goal", NewExecution::check_goal(r.goal))
    };
    let max_depth = v.check("max_depth", NewExecution::check_max_depth(r.max_depth));
    let config_profile = v.check("config_profile", ConfigProfile::parse(&r.config_profile));
    let o = r.config_overrides.unwrap_or_default();
    let config_overrides = ConfigOverrides {
        temperature: o.temperature.and_then(|t| {
            v.check(
                "config_overrides.temperature",
                ConfigOverrides::check_temperature(t),
            )
        }),
        max_tokens: o.max_tokens.and_then(|n| {
            v.check(
                "config_overrides.max_tokens",
                ConfigOverrides::check_max_tokens(n),
            )
        }),
        model: o
            .model
            .and_then(|m| v.check("config_overrides.model", ConfigOverrides::check_model(m))),
    };
    check_string_map("metadata", &r.metadata, &mut v);
    let request_id = if r.request_id.is_empty() {
        None
    } else {
        v.check("request_id", NewExecution::check_request_id(r.request_id))
    };
    let initial_state = initial_state(r.initial_state, &mut v);
    v.finish(|| NewExecution {
        task_id,
        name,
        input,
        goal,
        max_depth: max_depth.unwrap_or_default(),
        config_profile: config_profile.unwrap_or(ConfigProfile::General),
        config_overrides,
        metadata: r.metadata,
        request_id,
        initial_state,
    })
}

pub(crate) fn new_task_run(r: pb::CreateTaskRunRequest) -> Result<NewTaskRun, Violations> {
    let mut v = Violations::new();
    let execution_id = execution_id("execution_id", &r.execution_id, &mut v);
    let task_key = if r.task_key.is_empty() {
        v.add("task_key", "is required");
        None
    } else {
        v.check("task_key", check_chars(r.task_key, 1, MAX_KEY_CHARS))
    };
    let dynamic_key = optional_chars("dynamic_key", r.dynamic_key, MAX_KEY_CHARS, &mut v);
    let name = v
        .check("name", check_chars(r.name, 0, MAX_NAME_CHARS))
        .unwrap_or_default();
    let parent_task_run_id = if r.parent_task_run_id.is_empty() {
        None
    } else {
        task_run_id("parent_task_run_id", &r.parent_task_run_id, &mut v)
    };
    let task_version = optional_chars("task_version", r.task_version, MAX_KEY_CHARS, &mut v);
    let cache_key = optional_chars("cache_key", r.cache_key, MAX_CACHE_KEY_CHARS, &mut v);
    let cache_expiration = timestamp("cache_expiration", r.cache_expiration.as_ref(), &mut v);
    let retry_policy = r.retry_policy.map_or_else(
        || Some(RetryPolicy::default()),
        |p| {
            let policy = RetryPolicy {
                retries: p.retries,
                retry_delay_seconds: p.retry_delay_seconds,
                retry_jitter_factor: p.retry_jitter_factor,
            };
            v.check("retry_policy", policy.check())
        },
    );
    if r.tags.len() > MAX_TAGS {
        v.add("tags", format!("at most {MAX_TAGS} tags"));
    }
    if r.tags
        .iter()
        .any(|t| t.is_empty() || t.chars().count() > MAX_TAG_CHARS)
    {
        v.add(
            "tags",
            format!("each tag must be 1 to {MAX_TAG_CHARS} characters"),
        );
    }
    if r.tags.iter().any(|t| t.contains('\0')) {
        v.add("tags", format!("tags {NUL_REFUSED}"));
    }
    check_string_map("labels", &r.labels, &mut v);
    let input = match &r.input {
        Some(i) => json_value("input", i, &mut v),
        None => Some(Value::Object(Map::new())),
    };
    if let Some(input) = &input
        && let Err(e) = crate::domain::template::validate(input)
    {
        v.add("input", e);
    }
    let initial_state = initial_state(r.initial_state, &mut v);
    v.finish(|| NewTaskRun {
        execution_id: execution_id.unwrap_or_default(),
        task_key: task_key.unwrap_or_default(),
        dynamic_key,
        name,
        parent_task_run_id,
        task_version,
        cache_key,
        cache_expiration,
        retry_policy: retry_policy.unwrap_or_default(),
        tags: r.tags,
        labels: r.labels,
        input: input.unwrap_or(Value::Null),
        initial_state,
    })
}

/// The fields SetExecutionState and SetTaskRunState share.
pub(crate) struct SetState {
    pub(crate) state: Option<pb::StateCreate>,
    pub(crate) output: Option<prost_types::Value>,
    pub(crate) error: Option<pb::ErrorInfo>,
    pub(crate) force: bool,
    pub(crate) expected_state_id: String,
}

pub(crate) fn proposal(r: SetState, v: &mut Violations) -> Option<Proposal> {
    let state = state_create("state", r.state, v);
    let expected_state_id = if r.expected_state_id.is_empty() {
        None
    } else {
        v.check("expected_state_id", StateId::parse(&r.expected_state_id))
    };
    let to = state.as_ref().map(|s| s.state_type);
    let output = r.output.as_ref().and_then(|o| json_value("output", o, v));
    if output.is_some() && to.is_some_and(|t| !rules::may_carry_output(t)) {
        v.add("output", "only allowed when state.type is COMPLETED");
    }
    let error = r.error.map(|e| ErrorInfo {
        message: v
            .check(
                "error.message",
                check_chars(e.message, 0, MAX_MESSAGE_CHARS),
            )
            .unwrap_or_default(),
        error_type: v
            .check("error.type", check_chars(e.r#type, 0, MAX_NAME_CHARS))
            .unwrap_or_default(),
        traceback: v
            .check("error.traceback", check_chars(e.traceback, 0, 100_000))
            .unwrap_or_default(),
    });
    if error.is_some() && to.is_some_and(|t| !rules::may_carry_error(t)) {
        v.add("error", "only allowed when state.type is FAILED or CRASHED");
    }
    Some(Proposal {
        state: state?,
        force: r.force,
        expected_state_id,
        payload: Payload { output, error },
    })
}

/// ResumeExecution's input.
pub(crate) fn run_input(s: Option<&prost_types::Struct>, v: &mut Violations) -> Map<String, Value> {
    json_struct("run_input", s, v)
}

pub(crate) fn page(size: i32, token: &str, v: &mut Violations) -> Option<Page> {
    match Page::new(size, token) {
        Ok(p) => Some(p),
        Err((field, e)) => {
            v.add(field, e);
            None
        }
    }
}

/// ListStates' page.
pub(crate) fn history_page(size: i32, token: &str, v: &mut Violations) -> Option<HistoryPage> {
    match HistoryPage::new(size, token) {
        Ok(p) => Some(p),
        Err((field, e)) => {
            v.add(field, e);
            None
        }
    }
}

fn filter_pairs(
    field: &str,
    m: &BTreeMap<String, String>,
    v: &mut Violations,
) -> Vec<(String, String)> {
    if m.len() > MAX_FILTER_ITEMS {
        v.add(field, format!("at most {MAX_FILTER_ITEMS} pairs"));
    }
    if m.iter()
        .any(|(k, val)| k.contains('\0') || val.contains('\0'))
    {
        v.add(field, format!("keys and values {NUL_REFUSED}"));
    }
    convert::pairs(m)
}

pub(crate) fn execution_list(
    r: pb::ListExecutionsRequest,
) -> Result<(ExecutionFilter, Page), Violations> {
    let mut v = Violations::new();
    let page = page(r.page_size, &r.page_token, &mut v);
    let filter = ExecutionFilter {
        task_id: optional_text("task_id", r.task_id, &mut v),
        state_types: state_types("state_types", &r.state_types, &mut v),
        metadata: filter_pairs("metadata", &r.metadata, &mut v),
        created_after: timestamp("created_after", r.created_after.as_ref(), &mut v),
        created_before: timestamp("created_before", r.created_before.as_ref(), &mut v),
        show_deleted: r.show_deleted,
    };
    v.finish(|| (filter, page.expect("checked")))
}

pub(crate) fn task_run_list(
    r: pb::ListTaskRunsRequest,
) -> Result<(TaskRunFilter, Page), Violations> {
    let mut v = Violations::new();
    let page = page(r.page_size, &r.page_token, &mut v);
    let execution_id = if r.execution_id.is_empty() {
        None
    } else {
        execution_id("execution_id", &r.execution_id, &mut v)
    };
    let filter = TaskRunFilter {
        execution_id,
        task_key: optional_text("task_key", r.task_key, &mut v),
        state_types: state_types("state_types", &r.state_types, &mut v),
        labels: filter_pairs("labels", &r.labels, &mut v),
        created_after: timestamp("created_after", r.created_after.as_ref(), &mut v),
        created_before: timestamp("created_before", r.created_before.as_ref(), &mut v),
        show_deleted: r.show_deleted,
        stale: r.stale,
    };
    v.finish(|| (filter, page.expect("checked")))
}

pub(crate) fn after_sequence(after: i64, v: &mut Violations) -> i64 {
    if after < 0 {
        v.add("after_sequence", "must not be negative");
    }
    after.max(0)
}

pub(crate) fn event_filter(
    r: &pb::SubscribeRequest,
    v: &mut Violations,
) -> crate::stream::EventFilter {
    for (field, n) in [
        ("task_ids", r.task_ids.len()),
        ("execution_ids", r.execution_ids.len()),
        ("kinds", r.kinds.len()),
    ] {
        if n > MAX_FILTER_ITEMS {
            v.add(field, format!("at most {MAX_FILTER_ITEMS} items"));
        }
    }
    for id in &r.execution_ids {
        v.check("execution_ids", ExecutionId::parse(id));
    }
    for k in &r.kinds {
        if !matches!(pb::EventKind::try_from(*k), Ok(k) if k != pb::EventKind::Unspecified && k != pb::EventKind::Snapshot)
        {
            v.add(
                "kinds",
                "must be CREATED, STATE_CHANGED, UPDATED or DELETED",
            );
        }
    }
    let state_types = state_types("state_types", &r.state_types, v);
    crate::stream::EventFilter {
        task_ids: r.task_ids.clone(),
        // Ids are matched in their canonical form.
        execution_ids: r
            .execution_ids
            .iter()
            .filter_map(|id| ExecutionId::parse(id).ok().map(|id| id.to_string()))
            .collect(),
        state_types: state_types.into_iter().map(convert::state_type).collect(),
        kinds: r.kinds.clone(),
        metadata: filter_pairs("metadata", &r.metadata, v),
        labels: filter_pairs("labels", &r.labels, v),
        include_task_runs: r.include_task_runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: &Violations) -> Vec<String> {
        v.iter().map(|f| f.field.clone()).collect()
    }

    #[test]
    fn a_valid_execution_request_gets_its_defaults() {
        let e = new_execution(pb::CreateExecutionRequest {
            goal: "g".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(e.max_depth, 3);
        assert_eq!(e.config_profile, ConfigProfile::General);
        assert!(e.input.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let r = pb::CreateExecutionRequest {
            goal: " ".into(),
            max_depth: 11,
            config_profile: "turbo".into(),
            config_overrides: Some(pb::ConfigOverrides {
                temperature: Some(2.5),
                max_tokens: Some(0),
                model: Some(String::new()),
            }),
            task_id: "t".repeat(201),
            request_id: "r".repeat(101),
            initial_state: Some(pb::StateCreate {
                r#type: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = new_execution(r).unwrap_err();
        let f = fields(&v);
        for want in [
            "goal",
            "max_depth",
            "config_profile",
            "config_overrides.temperature",
            "config_overrides.max_tokens",
            "config_overrides.model",
            "task_id",
            "request_id",
            "initial_state.type",
        ] {
            assert!(f.contains(&want.to_owned()), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn output_and_error_must_fit_the_state() {
        let mut v = Violations::new();
        proposal(
            SetState {
                state: Some(pb::StateCreate {
                    r#type: pb::StateType::Running as i32,
                    ..Default::default()
                }),
                output: Some(convert::value(&serde_json::json!(1))),
                error: Some(pb::ErrorInfo::default()),
                force: false,
                expected_state_id: "nope".into(),
            },
            &mut v,
        );
        assert_eq!(fields(&v), ["expected_state_id", "output", "error"]);
    }

    #[test]
    fn deep_values_are_refused() {
        let mut deep = serde_json::json!(1);
        for _ in 0..40 {
            deep = serde_json::json!([deep]);
        }
        let mut v = Violations::new();
        assert!(json_value("input", &convert::value(&deep), &mut v).is_none());
        assert_eq!(fields(&v), ["input"]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn any_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever arrives, validation answers without panicking, and a
        /// refusal names every field it refuses.
        #[test]
        fn create_requests_are_accepted_or_refused_by_field(
            goal in ".{0,40}",
            task_id in ".{0,210}",
            max_depth in -3i32..14,
            profile in prop_oneof![Just(String::new()), Just("fast".to_owned()), ".{0,12}"],
            temperature in proptest::option::of(-1.0f64..3.0),
            max_tokens in proptest::option::of(-5i32..2_000_000),
            metadata in prop::collection::btree_map(".{0,55}", ".{0,8}", 0..13),
            request_id in ".{0,105}",
            state in -1i32..12,
            input in any_value(),
            template in "[{}a-z.0-9]{0,20}",
        ) {
            let r = pb::CreateExecutionRequest {
                goal,
                task_id,
                max_depth,
                config_profile: profile,
                config_overrides: Some(pb::ConfigOverrides { temperature, max_tokens, model: None }),
                metadata,
                request_id,
                initial_state: (state >= 0).then_some(pb::StateCreate { r#type: state, ..Default::default() }),
                input: match convert::value(&input).kind {
                    Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                    _ => None,
                },
                ..Default::default()
            };
            if let Err(v) = new_execution(r) {
                prop_assert!(!v.is_empty());
                prop_assert!(v.iter().all(|f| !f.field.is_empty() && !f.description.is_empty()));
            }
            let t = pb::CreateTaskRunRequest {
                execution_id: uuid::Uuid::now_v7().to_string(),
                task_key: "k".into(),
                input: Some(convert::value(&serde_json::json!({ "x": template, "y": input }))),
                ..Default::default()
            };
            if let Err(v) = new_task_run(t) {
                prop_assert!(v.iter().all(|f| f.field == "input"), "{v}");
            }
        }
    }
}
