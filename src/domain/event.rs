use serde::{Deserialize, Serialize, de::IgnoredAny};

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
/// API. Stored versioned (see [`EventRecord::encode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub kind: EventKind,
    pub occurred_at: Timestamp,
    pub previous_state_type: Option<StateType>,
    pub run: RecordedRun,
    pub task_id: Option<String>,
}

/// The version of the record encoding [`EventRecord::encode`] writes.
pub const EVENT_RECORD_VERSION: u32 = 2;

/// The first byte of a version 2 record; version 1 records are JSON
/// objects and start with `{`.
const V2: u8 = 0x02;

/// A record's fields as stored, for writing.
#[derive(Serialize)]
struct RecordOut<'a> {
    kind: EventKind,
    occurred_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_state_type: Option<StateType>,
    run: &'a RecordedRun,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
}

/// A record's fields as stored, for reading. Version 1 records hold their
/// version as a field `v` too.
#[derive(Deserialize)]
struct RecordIn {
    #[serde(default)]
    v: Option<u32>,
    kind: EventKind,
    occurred_at: Timestamp,
    #[serde(default)]
    previous_state_type: Option<StateType>,
    run: RecordedRun,
    #[serde(default)]
    task_id: Option<String>,
}

impl From<RecordIn> for EventRecord {
    fn from(r: RecordIn) -> Self {
        EventRecord {
            kind: r.kind,
            occurred_at: r.occurred_at,
            previous_state_type: r.previous_state_type,
            run: r.run,
            task_id: r.task_id,
        }
    }
}

impl EventRecord {
    /// The record's stored form, version 2: the byte 0x02, then the record
    /// as MessagePack with named fields: the same data model the version 1
    /// JSON held, self-describing still (fields may be left out, JSON
    /// values keep their kinds), but binary, so smaller and cheaper to read.
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut bytes = Vec::with_capacity(1024);
        bytes.push(V2);
        rmp_serde::encode::write_named(&mut bytes, &self.fields())?;
        Ok(bytes)
    }

    fn fields(&self) -> RecordOut<'_> {
        RecordOut {
            kind: self.kind,
            occurred_at: self.occurred_at,
            previous_state_type: self.previous_state_type,
            run: &self.run,
            task_id: self.task_id.as_deref(),
        }
    }

    /// Reads a stored record of a version this server knows: version 2,
    /// or version 1, JSON with its version, `{"v":1,...}`, as logs written
    /// before version 2 hold.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.first() {
            Some(b'{') => Self::decode_v1(bytes),
            Some(&V2) => Self::decode_v2(&bytes[1..]),
            Some(b) => Err(format!(
                "an event record of unknown version (first byte {b:#04x})"
            )),
            None => Err("an empty event record".to_owned()),
        }
    }

    fn decode_v1(bytes: &[u8]) -> Result<Self, String> {
        let r: RecordIn = serde_json::from_slice(bytes)
            .map_err(|e| format!("an unreadable event record: {e}"))?;
        match r.v {
            Some(1) => Ok(r.into()),
            Some(v) => Err(format!("an event record of unknown version {v}")),
            None => Err("an event record without its version".to_owned()),
        }
    }

    fn decode_v2(bytes: &[u8]) -> Result<Self, String> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        let r = RecordIn::deserialize(&mut de)
            .map_err(|e| format!("an unreadable event record: {e}"))?;
        // The record must end the bytes: nothing, not even a marker, after it.
        match IgnoredAny::deserialize(&mut de) {
            Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Ok(r.into())
            }
            _ => Err("an unreadable event record: bytes after its end".to_owned()),
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{Value, json};

    use super::*;
    use crate::domain::{
        ConfigOverrides, ConfigProfile, EffectiveConfig, ErrorInfo, RetryPolicy, RunCore, State,
        StateDetails, StateId,
    };

    /// A version 1 record, as servers before version 2 wrote it.
    #[derive(Serialize)]
    struct V1<'a> {
        v: u32,
        #[serde(flatten)]
        fields: RecordOut<'a>,
    }

    fn encode_v1(r: &EventRecord) -> Vec<u8> {
        serde_json::to_vec(&V1 {
            v: 1,
            fields: r.fields(),
        })
        .unwrap()
    }

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_micros(micros)
    }

    /// JSON of every kind: nesting, integers at the ends of their range,
    /// negative numbers, floats that look like integers, unicode.
    fn values() -> Value {
        json!({
            "nested": {"deeper": {"list": [1, -2, [3, [4.5]], {"k": "v"}], "empty": {}}},
            "integers": [0, 1, -1, 127, 128, -33, 255, 65536, -65537,
                         i64::MIN, i64::MAX, u64::MAX],
            "floats": [0.0, 1.0, -1.0, 0.1, -2.5, 1e300, -1e-300, 4503599627370497.0],
            "text": ["", "plain", "ünïcødé ✓ 𝄞 🚀", "tab\tnew\nline \"quoted\" \\ \u{0}x"],
            "flags": [true, false, null],
            "": "empty key",
            "ключ": [],
        })
    }

    fn uuid_state(n: u8) -> StateId {
        StateId::parse(&format!("0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a{n:02x}")).unwrap()
    }

    fn bare_state() -> State {
        State {
            id: uuid_state(1),
            state_type: StateType::Pending,
            name: "Pending".into(),
            message: String::new(),
            data: None,
            timestamp: at(1_700_000_000_000_000),
            details: StateDetails::default(),
        }
    }

    fn full_state() -> State {
        State {
            id: uuid_state(2),
            state_type: StateType::Paused,
            name: "Suspended ⏸".into(),
            message: "waiting for a person".into(),
            data: Some(values()),
            timestamp: at(1_700_000_000_123_456),
            details: StateDetails {
                scheduled_time: Some(at(1_700_000_100_000_000)),
                cache_key: Some("cache-κ".into()),
                cache_expiration: Some(at(1_800_000_000_000_001)),
                pause_timeout: Some(at(1_700_003_600_000_000)),
                pause_key: Some("approval".into()),
                run_input_keyset: [("a".to_owned(), "b".to_owned()), ("ü".into(), "".into())]
                    .into(),
                refresh_cache: true,
                retriable: Some(false),
                transition_id: Some("t-1".into()),
            },
        }
    }

    fn bare_run() -> RunCore {
        RunCore {
            state: bare_state(),
            output: None,
            error: None,
            transition_count: 0,
            run_count: 0,
            created_at: at(1_700_000_000_000_000),
            updated_at: at(1_700_000_000_000_000),
            expected_start_time: None,
            next_scheduled_start_time: None,
            start_time: None,
            end_time: None,
            total_run_time_us: 0,
            updated_by: String::new(),
            deleted_at: None,
        }
    }

    fn full_run() -> RunCore {
        RunCore {
            state: full_state(),
            output: Some(values()),
            error: Some(ErrorInfo {
                message: "boom".into(),
                error_type: "ValueError".into(),
                traceback: "line 1\nline 2 ✗".into(),
            }),
            transition_count: 7,
            run_count: 3,
            created_at: at(-1),
            updated_at: at(i64::MAX),
            expected_start_time: Some(at(i64::MIN)),
            next_scheduled_start_time: Some(at(1)),
            start_time: Some(at(1_700_000_000_000_002)),
            end_time: Some(at(1_700_000_000_000_003)),
            total_run_time_us: 1_234_567,
            updated_by: "worker-7".into(),
            deleted_at: Some(at(1_700_000_000_000_004)),
        }
    }

    fn execution_id() -> ExecutionId {
        ExecutionId::parse("0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b").unwrap()
    }

    fn bare_execution() -> Execution {
        Execution {
            id: execution_id(),
            tenant_id: "acme".into(),
            task_id: None,
            name: String::new(),
            input: serde_json::Map::new(),
            goal: None,
            max_depth: 3,
            config_profile: ConfigProfile::General,
            config_overrides: ConfigOverrides::default(),
            effective_config: ConfigProfile::General.defaults(),
            metadata: BTreeMap::new(),
            request_id: None,
            run: bare_run(),
        }
    }

    fn full_execution() -> Execution {
        let Value::Object(input) = values() else {
            unreachable!()
        };
        Execution {
            id: execution_id(),
            tenant_id: "tenant-ß".into(),
            task_id: Some("task-1".into()),
            name: "an execution".into(),
            input,
            goal: Some("a goal 🎯".into()),
            max_depth: 10,
            config_profile: ConfigProfile::CryptoAgent,
            config_overrides: ConfigOverrides {
                temperature: Some(0.7),
                max_tokens: Some(-1),
                model: Some("m".into()),
            },
            effective_config: EffectiveConfig {
                temperature: 2.0,
                max_tokens: 1_000_000,
                model: "model-x".into(),
            },
            metadata: [("k".to_owned(), "v".to_owned()), ("é".into(), "ü".into())].into(),
            request_id: Some("req-1".into()),
            run: full_run(),
        }
    }

    fn task_run_id(n: u8) -> TaskRunId {
        TaskRunId::parse(&format!("0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1b{n:02x}")).unwrap()
    }

    fn bare_task_run() -> TaskRun {
        TaskRun {
            id: task_run_id(0),
            tenant_id: "acme".into(),
            execution_id: execution_id(),
            parent_task_run_id: None,
            depth: 0,
            task_key: "k".into(),
            dynamic_key: String::new(),
            name: String::new(),
            task_version: None,
            cache_key: None,
            cache_expiration: None,
            retry_policy: RetryPolicy::default(),
            tags: Vec::new(),
            labels: BTreeMap::new(),
            input: Value::Null,
            resolved_input: None,
            task_inputs: Vec::new(),
            stale: false,
            run: bare_run(),
        }
    }

    fn full_task_run() -> TaskRun {
        TaskRun {
            id: task_run_id(1),
            tenant_id: "tenant-ß".into(),
            execution_id: execution_id(),
            parent_task_run_id: Some(task_run_id(2)),
            depth: 4,
            task_key: "fetch".into(),
            dynamic_key: "fetch-3".into(),
            name: "a task run".into(),
            task_version: Some("1.2".into()),
            cache_key: Some("ck".into()),
            cache_expiration: Some(at(1_900_000_000_000_000)),
            retry_policy: RetryPolicy {
                retries: 3,
                retry_delay_seconds: vec![1.0, 2.5, 0.0],
                retry_jitter_factor: 0.25,
            },
            tags: vec!["a".into(), "β".into()],
            labels: [("team".to_owned(), "core".to_owned())].into(),
            input: values(),
            resolved_input: Some(json!([values(), -3, 3.25])),
            task_inputs: vec![task_run_id(3), task_run_id(4)],
            stale: true,
            run: full_run(),
        }
    }

    fn bare_record(run: RecordedRun) -> EventRecord {
        EventRecord {
            kind: EventKind::Created,
            occurred_at: at(1_700_000_000_000_000),
            previous_state_type: None,
            run,
            task_id: None,
        }
    }

    fn full_record(run: RecordedRun) -> EventRecord {
        EventRecord {
            kind: EventKind::StateChanged,
            occurred_at: at(1_700_000_000_000_005),
            previous_state_type: Some(StateType::Running),
            run,
            task_id: Some("task-1".into()),
        }
    }

    fn records() -> Vec<EventRecord> {
        let mut all = vec![
            bare_record(RecordedRun::Execution(bare_execution())),
            bare_record(RecordedRun::TaskRun(bare_task_run())),
            full_record(RecordedRun::Execution(full_execution())),
            full_record(RecordedRun::TaskRun(full_task_run())),
        ];
        for (kind, state_type) in [
            (EventKind::Updated, StateType::Completed),
            (EventKind::Deleted, StateType::Cancelling),
            (EventKind::Snapshot, StateType::Crashed),
        ] {
            let mut r = full_record(RecordedRun::Execution(full_execution()));
            r.kind = kind;
            r.previous_state_type = Some(state_type);
            all.push(r);
        }
        all
    }

    #[test]
    fn version_2_records_start_with_their_version_and_read_back_whole() {
        for r in records() {
            let bytes = r.encode().unwrap();
            assert_eq!(bytes[0], 0x02);
            assert_eq!(EventRecord::decode(&bytes), Ok(r.clone()));
            // The same record as version 1 JSON is larger.
            assert!(bytes.len() < encode_v1(&r).len());
        }
    }

    #[test]
    fn numbers_in_json_values_keep_their_kind() {
        let r = full_record(RecordedRun::TaskRun(full_task_run()));
        let RecordedRun::TaskRun(back) = EventRecord::decode(&r.encode().unwrap()).unwrap().run
        else {
            panic!("not a task run")
        };
        let ints = back.input["integers"].as_array().unwrap();
        assert!(ints.iter().all(|n| n.is_i64() || n.is_u64()), "{ints:?}");
        assert_eq!(ints[9].as_i64(), Some(i64::MIN));
        assert_eq!(ints[11].as_u64(), Some(u64::MAX));
        let floats = back.input["floats"].as_array().unwrap();
        assert!(floats.iter().all(Value::is_f64), "{floats:?}");
        assert_eq!(floats[1].as_f64(), Some(1.0));
        assert_eq!(floats[7].as_f64(), Some(4503599627370497.0));
        assert_eq!(back.input, values());
        assert_eq!(back.retry_policy.retry_delay_seconds, [1.0, 2.5, 0.0]);
    }

    #[test]
    fn version_1_records_still_read() {
        for r in records() {
            let v1 = encode_v1(&r);
            assert!(v1.starts_with(br#"{"v":1,"#));
            assert_eq!(EventRecord::decode(&v1), Ok(r));
        }
    }

    #[test]
    fn a_version_1_record_as_stored_reads() {
        let stored = br#"{"v":1,"kind":"created","occurred_at":1700000000000000,"run":{"execution":{"id":"0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b","tenant_id":"acme","task_id":null,"name":"","input":{},"goal":null,"max_depth":3,"config_profile":"general","config_overrides":{"temperature":null,"max_tokens":null,"model":null},"effective_config":{"temperature":0.7,"max_tokens":4000,"model":"general-default"},"metadata":{},"request_id":null,"run":{"state":{"id":"0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a01","type":"Pending","name":"Pending","message":"","timestamp":1700000000000000,"details":{}},"transition_count":0,"run_count":0,"created_at":1700000000000000,"updated_at":1700000000000000,"total_run_time_us":0,"updated_by":""}}}}"#;
        let r = bare_record(RecordedRun::Execution(bare_execution()));
        assert_eq!(EventRecord::decode(stored), Ok(r.clone()));
        assert_eq!(encode_v1(&r), stored);
    }

    /// The bytes of a version 2 record are fixed: a change in how the
    /// encoding library lays out the data model would leave stored records
    /// unreadable.
    #[test]
    fn a_version_2_record_is_laid_out_as_stored() {
        let stored: Vec<u8> = [
            "0283a46b696e64a763726561746564ab6f636375727265645f6174cf00060a24181e4000a372756e",
            "81a9657865637574696f6e8da26964c4100190a1b2c3d47e5f8a6b7c8d9e0f1a2ba974656e616e74",
            "5f6964a461636d65a77461736b5f6964c0a46e616d65a0a5696e70757480a4676f616cc0a96d6178",
            "5f646570746803ae636f6e6669675f70726f66696c65a767656e6572616cb0636f6e6669675f6f76",
            "6572726964657383ab74656d7065726174757265c0aa6d61785f746f6b656e73c0a56d6f64656cc0",
            "b06566666563746976655f636f6e66696783ab74656d7065726174757265cb3fe6666666666666aa",
            "6d61785f746f6b656e73cd0fa0a56d6f64656caf67656e6572616c2d64656661756c74a86d657461",
            "6461746180aa726571756573745f6964c0a372756e87a5737461746586a26964c4100190a1b2c3d4",
            "7e5f8a6b7c8d9e0f1a01a474797065a750656e64696e67a46e616d65a750656e64696e67a76d6573",
            "73616765a0a974696d657374616d70cf00060a24181e4000a764657461696c7380b07472616e7369",
            "74696f6e5f636f756e7400a972756e5f636f756e7400aa637265617465645f6174cf00060a24181e",
            "4000aa757064617465645f6174cf00060a24181e4000b1746f74616c5f72756e5f74696d655f7573",
            "00aa757064617465645f6279a0",
        ]
        .concat()
        .as_bytes()
        .chunks(2)
        .map(|h| u8::from_str_radix(std::str::from_utf8(h).unwrap(), 16).unwrap())
        .collect();
        let r = bare_record(RecordedRun::Execution(bare_execution()));
        assert_eq!(EventRecord::decode(&stored), Ok(r.clone()));
        assert_eq!(r.encode().unwrap(), stored);
    }

    #[test]
    fn records_that_cannot_be_read_are_errors() {
        let good = full_record(RecordedRun::TaskRun(full_task_run()))
            .encode()
            .unwrap();
        let mut unknown = good.clone();
        unknown[0] = 0x03;
        let mut trailing = good.clone();
        trailing.push(0xc0);
        let mut wrong_v1 = encode_v1(&bare_record(RecordedRun::Execution(bare_execution())));
        wrong_v1[5] = b'7';
        let broken: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0x02],
            vec![0xFF; 4],
            vec![0x00],
            unknown,
            trailing,
            wrong_v1,
            b"{".to_vec(),
            b"{}".to_vec(),
            b"not a record".to_vec(),
            [&[0x02][..], br#"{"v":1}"#].concat(),
            [&good[..], &[0xd9][..]].concat(),
            // A map claiming more entries than there are bytes.
            vec![0x02, 0xdf, 0xff, 0xff, 0xff, 0xff],
        ];
        for bytes in broken {
            assert!(EventRecord::decode(&bytes).is_err(), "{bytes:?}");
        }
        // Every truncation of a good record, and every byte changed.
        for n in 0..good.len() {
            assert!(EventRecord::decode(&good[..n]).is_err(), "cut at {n}");
            let mut changed = good.clone();
            changed[n] ^= 0xA5;
            let _ = EventRecord::decode(&changed);
        }
    }

    mod properties {
        use proptest::{collection, option, prelude::*};

        use super::*;

        fn any_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                (-1e6f64..1e6).prop_map(|f| Value::from(f.trunc())),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(5, 48, 4, |inner| {
                prop_oneof![
                    collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    collection::btree_map(".{0,8}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A value that is there; a record, like version 1, keeps a null
        /// one as none.
        fn any_present_value() -> impl Strategy<Value = Option<Value>> {
            option::of(any_value()).prop_map(|v| v.filter(|v| !v.is_null()))
        }

        fn any_time() -> impl Strategy<Value = Option<Timestamp>> {
            option::of(any::<i64>().prop_map(Timestamp::from_micros))
        }

        fn any_state_type() -> impl Strategy<Value = StateType> {
            proptest::sample::select(StateType::ALL.to_vec())
        }

        prop_compose! {
            fn any_run()(
                state_type in any_state_type(),
                message in ".{0,12}",
                data in any_present_value(),
                output in any_present_value(),
                error in option::of((".{0,8}", ".{0,8}", ".{0,8}")),
                times in (any_time(), any_time(), any_time(), any_time(), any_time()),
                counts in (any::<i64>(), any::<i64>(), any::<i64>()),
                cache_key in option::of(".{0,8}"),
                keyset in collection::btree_map(".{0,6}", ".{0,6}", 0..3),
                retriable in option::of(any::<bool>()),
                refresh_cache in any::<bool>(),
            ) -> RunCore {
                let mut run = if data.is_some() { full_run() } else { bare_run() };
                run.state.state_type = state_type;
                run.state.message = message;
                run.state.data = data;
                run.state.details.scheduled_time = times.0;
                run.state.details.cache_key = cache_key;
                run.state.details.run_input_keyset = keyset;
                run.state.details.retriable = retriable;
                run.state.details.refresh_cache = refresh_cache;
                run.output = output;
                run.error = error.map(|(message, error_type, traceback)| ErrorInfo {
                    message,
                    error_type,
                    traceback,
                });
                run.expected_start_time = times.1;
                run.start_time = times.2;
                run.end_time = times.3;
                run.deleted_at = times.4;
                (run.transition_count, run.run_count, run.total_run_time_us) = counts;
                run
            }
        }

        prop_compose! {
            fn any_task_run()(
                run in any_run(),
                input in any_value(),
                resolved_input in any_present_value(),
                parent in option::of(any::<u8>()),
                task_version in option::of(".{0,8}"),
                cache_expiration in any_time(),
                delays in collection::vec(any::<f64>(), 0..3),
                tags in collection::vec(".{0,6}", 0..3),
                labels in collection::btree_map(".{0,6}", ".{0,6}", 0..3),
                depth in any::<i32>(),
                stale in any::<bool>(),
            ) -> TaskRun {
                let mut t = if parent.is_some() { full_task_run() } else { bare_task_run() };
                t.run = run;
                t.input = input;
                t.resolved_input = resolved_input;
                t.parent_task_run_id = parent.map(task_run_id);
                t.task_version = task_version;
                t.cache_expiration = cache_expiration;
                t.retry_policy.retry_delay_seconds = delays;
                t.tags = tags;
                t.labels = labels;
                t.depth = depth;
                t.stale = stale;
                t
            }
        }

        prop_compose! {
            fn any_execution()(
                run in any_run(),
                input in collection::btree_map(".{0,8}", any_value(), 0..4),
                goal in option::of(".{0,12}"),
                temperature in option::of(any::<f64>()),
                max_tokens in option::of(any::<i32>()),
                metadata in collection::btree_map(".{0,6}", ".{0,6}", 0..3),
                request_id in option::of(".{0,8}"),
            ) -> Execution {
                let mut e = if goal.is_some() { full_execution() } else { bare_execution() };
                e.run = run;
                e.input = input.into_iter().collect();
                e.goal = goal;
                e.config_overrides.temperature = temperature;
                e.config_overrides.max_tokens = max_tokens;
                e.metadata = metadata;
                e.request_id = request_id;
                e
            }
        }

        fn any_record() -> impl Strategy<Value = EventRecord> {
            (
                prop_oneof![
                    any_execution().prop_map(RecordedRun::Execution),
                    any_task_run().prop_map(RecordedRun::TaskRun),
                ],
                proptest::sample::select(vec![
                    EventKind::Created,
                    EventKind::StateChanged,
                    EventKind::Updated,
                    EventKind::Deleted,
                    EventKind::Snapshot,
                ]),
                any::<i64>(),
                option::of(any_state_type()),
                option::of(".{0,8}"),
            )
                .prop_map(|(run, kind, at, previous_state_type, task_id)| {
                    EventRecord {
                        kind,
                        occurred_at: Timestamp::from_micros(at),
                        previous_state_type,
                        run,
                        task_id,
                    }
                })
        }

        /// Compares floats by their bits, so that a NaN in a record (only
        /// plain f64 fields can hold one) is equal to itself.
        fn same(a: &EventRecord, b: &EventRecord) -> bool {
            a == b || format!("{a:?}") == format!("{b:?}")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_record_reads_back_as_written(r in any_record()) {
                let back = EventRecord::decode(&r.encode().unwrap()).unwrap();
                prop_assert!(same(&back, &r), "{back:?}\n!=\n{r:?}");
            }

            #[test]
            fn any_bytes_read_as_a_record_or_an_error(
                bytes in collection::vec(any::<u8>(), 0..64),
                first in proptest::sample::select(vec![0x02u8, b'{', 0x00]),
            ) {
                let mut bytes = bytes;
                bytes.insert(0, first);
                let _ = EventRecord::decode(&bytes);
            }
        }
    }
}
