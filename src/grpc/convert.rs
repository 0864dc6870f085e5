//! Domain -> protobuf, and the protobuf value types both directions.

use std::collections::BTreeMap;

use prost_types::{ListValue, Struct, value::Kind};
use serde_json::{Map, Number, Value};

use super::pb;
use crate::domain::{
    ErrorInfo, Event, EventKind, Execution, Resource, RunCore, State, StateDetails, StateType,
    TaskRun, Timestamp,
};

// ---- scalars -------------------------------------------------------------

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let micros = t.as_micros();
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// Years 1 to 9999, as protobuf's Timestamp allows.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

pub fn from_timestamp(t: &prost_types::Timestamp) -> Result<Timestamp, String> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err("must be a valid timestamp between years 1 and 9999".into());
    }
    Ok(Timestamp::from_micros(
        t.seconds * 1_000_000 + i64::from(t.nanos / 1_000),
    ))
}

pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn micros_duration(us: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

pub fn state_type(t: StateType) -> i32 {
    let v = match t {
        StateType::Scheduled => pb::StateType::Scheduled,
        StateType::Pending => pb::StateType::Pending,
        StateType::Running => pb::StateType::Running,
        StateType::Completed => pb::StateType::Completed,
        StateType::Failed => pb::StateType::Failed,
        StateType::Cancelled => pb::StateType::Cancelled,
        StateType::Crashed => pb::StateType::Crashed,
        StateType::Paused => pb::StateType::Paused,
        StateType::Cancelling => pb::StateType::Cancelling,
    };
    v as i32
}

/// None for UNSPECIFIED and unknown numbers.
pub fn from_state_type(v: i32) -> Option<StateType> {
    Some(match pb::StateType::try_from(v).ok()? {
        pb::StateType::Unspecified => return None,
        pb::StateType::Scheduled => StateType::Scheduled,
        pb::StateType::Pending => StateType::Pending,
        pb::StateType::Running => StateType::Running,
        pb::StateType::Completed => StateType::Completed,
        pb::StateType::Failed => StateType::Failed,
        pb::StateType::Cancelled => StateType::Cancelled,
        pb::StateType::Crashed => StateType::Crashed,
        pb::StateType::Paused => StateType::Paused,
        pb::StateType::Cancelling => StateType::Cancelling,
    })
}

pub fn is_terminal(v: i32) -> bool {
    from_state_type(v).is_some_and(StateType::is_terminal)
}

fn event_kind(k: EventKind) -> i32 {
    let v = match k {
        EventKind::Created => pb::EventKind::Created,
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::Updated => pb::EventKind::Updated,
        EventKind::Deleted => pb::EventKind::Deleted,
        EventKind::Snapshot => pb::EventKind::Snapshot,
    };
    v as i32
}

// ---- JSON values ---------------------------------------------------------

pub fn value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(structure(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn structure(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

/// JSON has no NaN or infinity, so neither is accepted. A value with no
/// kind is null.
pub fn from_value(v: &prost_types::Value) -> Result<Value, String> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => Value::Number(number(*n)?),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            Value::Array(l.values.iter().map(from_value).collect::<Result<_, _>>()?)
        }
        Some(Kind::StructValue(s)) => Value::Object(from_struct(s)?),
    })
}

/// Protobuf numbers are doubles; integral ones become JSON integers, so
/// that `1` stays `1` (in templates interpolated as text too).
fn number(n: f64) -> Result<Number, String> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return Ok(Number::from(n as i64));
    }
    Number::from_f64(n).ok_or_else(|| "numbers must be finite".to_owned())
}

pub fn from_struct(s: &Struct) -> Result<Map<String, Value>, String> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), from_value(v)?)))
        .collect()
}

// ---- resources -----------------------------------------------------------

pub fn state(s: &State) -> pb::State {
    pb::State {
        id: s.id.to_string(),
        r#type: state_type(s.state_type),
        name: s.name.clone(),
        message: s.message.clone(),
        data: s.data.as_ref().map(value),
        timestamp: Some(timestamp(s.timestamp)),
        details: Some(details(&s.details)),
    }
}

fn details(d: &StateDetails) -> pb::StateDetails {
    pb::StateDetails {
        scheduled_time: d.scheduled_time.map(timestamp),
        cache_key: d.cache_key.clone().unwrap_or_default(),
        cache_expiration: d.cache_expiration.map(timestamp),
        pause_timeout: d.pause_timeout.map(timestamp),
        pause_key: d.pause_key.clone().unwrap_or_default(),
        run_input_keyset: d.run_input_keyset.clone(),
        refresh_cache: d.refresh_cache,
        retriable: d.retriable,
        transition_id: d.transition_id.clone().unwrap_or_default(),
    }
}

fn error_info(e: &ErrorInfo) -> pb::ErrorInfo {
    pb::ErrorInfo {
        message: e.message.clone(),
        r#type: e.error_type.clone(),
        traceback: e.traceback.clone(),
    }
}

pub fn execution(e: &Execution) -> pb::Execution {
    let r = &e.run;
    pb::Execution {
        id: e.id.to_string(),
        tenant_id: e.tenant_id.clone(),
        task_id: e.task_id.clone().unwrap_or_default(),
        name: e.name.clone(),
        input: Some(structure(&e.input)),
        goal: e.goal.clone().unwrap_or_default(),
        max_depth: e.max_depth,
        config_profile: e.config_profile.name().to_owned(),
        config_overrides: Some(pb::ConfigOverrides {
            temperature: e.config_overrides.temperature,
            max_tokens: e.config_overrides.max_tokens,
            model: e.config_overrides.model.clone(),
        }),
        effective_config: Some(pb::EffectiveConfig {
            temperature: e.effective_config.temperature,
            max_tokens: e.effective_config.max_tokens,
            model: e.effective_config.model.clone(),
        }),
        metadata: e.metadata.clone(),
        state: Some(state(&r.state)),
        output: r.output.as_ref().map(value),
        error: r.error.as_ref().map(error_info),
        transition_count: r.transition_count,
        run_count: r.run_count,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        start_time: r.start_time.map(timestamp),
        end_time: r.end_time.map(timestamp),
        total_run_time: Some(micros_duration(r.total_run_time_us)),
        updated_by: r.updated_by.clone(),
        request_id: e.request_id.clone().unwrap_or_default(),
        deleted_at: r.deleted_at.map(timestamp),
    }
}

pub fn task_run(t: &TaskRun) -> pb::TaskRun {
    let r: &RunCore = &t.run;
    // The estimates are as of now.
    let now = Timestamp::now();
    pb::TaskRun {
        id: t.id.to_string(),
        tenant_id: t.tenant_id.clone(),
        execution_id: t.execution_id.to_string(),
        parent_task_run_id: t
            .parent_task_run_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        depth: t.depth,
        task_key: t.task_key.clone(),
        dynamic_key: t.dynamic_key.clone(),
        name: t.name.clone(),
        task_version: t.task_version.clone().unwrap_or_default(),
        cache_key: t.cache_key.clone().unwrap_or_default(),
        cache_expiration: t.cache_expiration.map(timestamp),
        retry_policy: Some(pb::RetryPolicy {
            retries: t.retry_policy.retries,
            retry_delay_seconds: t.retry_policy.retry_delay_seconds.clone(),
            retry_jitter_factor: t.retry_policy.retry_jitter_factor,
        }),
        tags: t.tags.clone(),
        labels: t.labels.clone(),
        input: Some(value(&t.input)),
        resolved_input: t.resolved_input.as_ref().map(value),
        task_inputs: t.task_inputs.iter().map(|id| id.to_string()).collect(),
        output: r.output.as_ref().map(value),
        error: r.error.as_ref().map(error_info),
        state: Some(state(&r.state)),
        run_count: r.run_count,
        transition_count: r.transition_count,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        expected_start_time: r.expected_start_time.map(timestamp),
        next_scheduled_start_time: r.next_scheduled_start_time.map(timestamp),
        start_time: r.start_time.map(timestamp),
        end_time: r.end_time.map(timestamp),
        total_run_time: Some(micros_duration(r.total_run_time_us)),
        estimated_run_time: Some(micros_duration(r.estimated_run_time_us(now))),
        estimated_start_time_delta: Some(micros_duration(r.estimated_start_time_delta_us(now))),
        updated_by: r.updated_by.clone(),
        stale: t.stale,
        deleted_at: r.deleted_at.map(timestamp),
    }
}

fn resource(r: Resource<'_>) -> pb::status_event::Resource {
    match r {
        Resource::Execution(e) => pb::status_event::Resource::Execution(execution(e)),
        Resource::TaskRun(t) => pb::status_event::Resource::TaskRun(task_run(t)),
    }
}

pub fn status_event(seq: i64, e: &Event<'_>) -> pb::StatusEvent {
    pb::StatusEvent {
        sequence: seq,
        occurred_at: Some(timestamp(e.occurred_at)),
        kind: event_kind(e.kind),
        previous_state_type: e.previous_state_type.map_or(0, state_type),
        resource: Some(resource(e.resource)),
    }
}

/// The SNAPSHOT event of a run whose latest event is `seq`.
pub fn snapshot(r: Resource<'_>, seq: i64) -> pb::StatusEvent {
    let updated_at = match r {
        Resource::Execution(e) => e.run.updated_at,
        Resource::TaskRun(t) => t.run.updated_at,
    };
    pb::StatusEvent {
        sequence: seq,
        occurred_at: Some(timestamp(updated_at)),
        kind: event_kind(EventKind::Snapshot),
        previous_state_type: 0,
        resource: Some(resource(r)),
    }
}

/// Map fields as sorted pairs, for filters.
pub fn pairs(m: &BTreeMap<String, String>) -> Vec<(String, String)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_protobuf_values() {
        let v = json!({"a": [1.5, "x", null, true, {"b": {}}], "c": -3, "d": 1e300});
        assert_eq!(from_value(&value(&v)).unwrap(), v);
        let nan = prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert!(from_value(&nan).is_err());
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,200}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 200, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                prop::collection::btree_map(".{0,150}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_domain_knows_the_encoded_length_of_a_value(v in any_json()) {
            use prost::Message;
            proptest::prop_assert_eq!(crate::domain::json::encoded_len(&v), value(&v).encoded_len());
        }
    }

    /// A task run with every field set, its values `value`.
    fn full_task_run(value: &Value, text: &str) -> TaskRun {
        use crate::domain::{ExecutionId, RetryPolicy, StateProposal, TaskRunId};
        let mut state = StateProposal::of_type(StateType::Running);
        state.message = text.into();
        state.data = Some(value.clone());
        state.details.cache_key = Some(text.into());
        state.details.pause_key = Some(text.into());
        state.details.transition_id = Some(text.into());
        state.details.run_input_keyset = [(text.to_owned(), text.to_owned())].into();
        state.details.scheduled_time = Some(Timestamp::now());
        let mut run = RunCore::new(state.into_state(Timestamp::now()), text);
        run.output = Some(value.clone());
        run.error = Some(ErrorInfo {
            message: text.into(),
            error_type: text.into(),
            traceback: text.into(),
        });
        run.start_time = Some(Timestamp::now());
        run.end_time = Some(Timestamp::now());
        run.expected_start_time = Some(Timestamp::now());
        run.deleted_at = Some(Timestamp::now());
        TaskRun {
            id: TaskRunId::new(),
            tenant_id: text.into(),
            execution_id: ExecutionId::new(),
            parent_task_run_id: Some(TaskRunId::new()),
            depth: 3,
            task_key: text.into(),
            dynamic_key: text.into(),
            name: text.into(),
            task_version: Some(text.into()),
            cache_key: Some(text.into()),
            cache_expiration: Some(Timestamp::now()),
            retry_policy: RetryPolicy {
                retries: 3,
                retry_delay_seconds: vec![1.0; 50],
                retry_jitter_factor: 0.5,
            },
            tags: vec![text.to_owned(); 50],
            labels: (0..10)
                .map(|i| (format!("{i}{text}"), text.to_owned()))
                .collect(),
            input: value.clone(),
            resolved_input: Some(value.clone()),
            task_inputs: (0..1000).map(|_| TaskRunId::new()).collect(),
            stale: true,
            run,
        }
    }

    fn nested(depth: usize) -> Value {
        let mut v = serde_json::json!("leaf");
        for _ in 1..depth {
            v = serde_json::json!({ "k": v });
        }
        v
    }

    #[test]
    fn the_size_bound_of_a_run_covers_its_encoding() {
        use crate::domain::document;
        use prost::Message;
        for (value, text) in [
            (json!(null), ""),
            (json!({"a": [1, "x", {"b": null}]}), "short"),
            (json!({"blob": "x".repeat(100_000)}), &*"é".repeat(300)),
        ] {
            let t = full_task_run(&value, text);
            let bound = document::task_run_bytes(&t);
            let actual = task_run(&t).encoded_len();
            assert!(bound >= actual, "{bound} < {actual}");
            assert!(bound <= actual + 64 * 1024, "{bound} is far above {actual}");
            let event = Event {
                kind: EventKind::StateChanged,
                occurred_at: Timestamp::now(),
                previous_state_type: Some(StateType::Pending),
                resource: Resource::TaskRun(&t),
                task_id: Some(text),
            };
            let wire = crate::stream::LoggedEvent::new(1, &event)
                .message()
                .encode_to_vec();
            let response = pb::SetTaskRunStateResponse {
                status: 1,
                state: Some(state(&t.run.state)),
                reason: "r".repeat(1_000),
                retry_after: None,
                task_run: Some(task_run(&t)),
            };
            let with_state = document::with_state(bound, &t.run.state);
            let room =
                document::CLIENT_MESSAGE_LIMIT - document::SERVER_RESERVE - document::MAX_RUN_BYTES;
            assert!(wire.len() <= with_state + room);
            assert!(response.encoded_len() <= with_state + room);
        }
    }

    #[test]
    fn the_size_bound_of_an_execution_covers_its_encoding() {
        use crate::domain::{
            ConfigOverrides, ConfigProfile, EffectiveConfig, ExecutionId, document,
        };
        use prost::Message;
        let t = full_task_run(&json!({"blob": "y".repeat(50_000), "n": [1, 2]}), "text");
        let overrides = ConfigOverrides {
            temperature: Some(0.5),
            max_tokens: Some(10),
            model: Some("m".repeat(200)),
        };
        let e = Execution {
            id: ExecutionId::new(),
            tenant_id: "tenant".into(),
            task_id: Some("task".repeat(50)),
            name: "n".repeat(200),
            input: match t.input.clone() {
                Value::Object(m) => m,
                _ => unreachable!(),
            },
            goal: Some("g".repeat(10_000)),
            max_depth: 3,
            config_profile: ConfigProfile::Fast,
            effective_config: EffectiveConfig::resolve(ConfigProfile::Fast, &overrides),
            config_overrides: overrides,
            metadata: (0..10)
                .map(|i| (format!("k{i}"), "v".repeat(500)))
                .collect(),
            request_id: Some("r".repeat(100)),
            run: t.run.clone(),
        };
        let bound = document::execution_bytes(&e);
        let actual = execution(&e).encoded_len();
        assert!(bound >= actual, "{bound} < {actual}");
        assert!(bound <= actual + 64 * 1024, "{bound} is far above {actual}");
    }

    #[test]
    fn values_at_the_depth_limit_decode_in_a_default_client() {
        use crate::domain::json::MAX_DEPTH;
        use prost::Message;
        let deep = nested(MAX_DEPTH);
        assert_eq!(crate::domain::json::depth(&deep), MAX_DEPTH);
        let t = full_task_run(&deep, "x");
        let event = Event {
            kind: EventKind::StateChanged,
            occurred_at: Timestamp::now(),
            previous_state_type: None,
            resource: Resource::TaskRun(&t),
            task_id: None,
        };
        let wire = crate::stream::LoggedEvent::new(1, &event)
            .message()
            .encode_to_vec();
        pb::StreamExecutionStatusResponse::decode(&wire[..]).expect("a stream message decodes");
        let response = pb::SetTaskRunStateResponse {
            state: Some(state(&t.run.state)),
            task_run: Some(task_run(&t)),
            ..Default::default()
        };
        pb::SetTaskRunStateResponse::decode(response.encode_to_vec().as_slice())
            .expect("a response decodes");
        // Well past the limit, prost's own recursion limit refuses it.
        let too_deep = full_task_run(&nested(40), "x");
        let bytes = task_run(&too_deep).encode_to_vec();
        assert!(pb::TaskRun::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn timestamps_round_trip_and_reject_out_of_range() {
        let t = Timestamp::from_micros(1_700_000_000_123_456);
        assert_eq!(from_timestamp(&timestamp(t)).unwrap(), t);
        let before_epoch = Timestamp::from_micros(-1_500_000);
        assert_eq!(
            from_timestamp(&timestamp(before_epoch)).unwrap(),
            before_epoch
        );
        assert!(
            from_timestamp(&prost_types::Timestamp {
                seconds: MAX_SECONDS + 1,
                nanos: 0
            })
            .is_err()
        );
        assert!(
            from_timestamp(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_err()
        );
    }

    #[test]
    fn every_state_type_round_trips() {
        for t in StateType::ALL {
            assert_eq!(from_state_type(state_type(t)), Some(t));
        }
        assert_eq!(from_state_type(0), None);
        assert_eq!(from_state_type(99), None);
    }
}
