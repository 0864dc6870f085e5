//! Templates in task run inputs: `{{task_key.output}}`,
//! `{{task_key.output.a.b}}`, with array indexes as path segments
//! (`{{fetch.output.items.0}}`). A string that is exactly one template takes
//! the referenced value with its JSON type; templates inside a longer string
//! are interpolated as text.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{TaskRunId, json, quote};

/// The most task keys one input may reference.
pub const MAX_REFERENCED_KEYS: usize = 1_000;

/// The most bytes of upstream outputs (encoded as stored) one input's
/// templates may read, all referenced keys together.
pub const MAX_UPSTREAM_BYTES: usize = 16 * json::MAX_ENCODED_BYTES;

/// One `{{...}}` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub task_key: String,
    /// The path below `output`: object keys or array indexes.
    pub path: Vec<String>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{{{{}.output", self.task_key)?;
        for p in &self.path {
            write!(f, ".{p}")?;
        }
        f.write_str("}}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Ref(Reference),
}

/// Splits a string into text and references. Err describes the first
/// malformed template.
fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed template in {}", quote(s)))?;
        pieces.push(Piece::Ref(parse_reference(after[..end].trim())?));
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("unopened template in {}", quote(s)));
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

fn parse_reference(inner: &str) -> Result<Reference, String> {
    let bad = || {
        format!(
            "malformed template {}: expected {{{{task_key.output}}}} or {{{{task_key.output.path}}}}",
            quote(&format!("{{{{{inner}}}}}"))
        )
    };
    let mut parts = inner.split('.');
    let task_key = parts.next().filter(|k| valid_segment(k)).ok_or_else(bad)?;
    if parts.next() != Some("output") {
        return Err(bad());
    }
    let path: Vec<String> = parts.map(str::to_owned).collect();
    if path.iter().any(|p| !valid_segment(p)) {
        return Err(bad());
    }
    Ok(Reference {
        task_key: task_key.to_owned(),
        path,
    })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | ':' | '/'))
}

/// Every string in `value`, with its JSON path for error messages.
fn strings<'a>(value: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((path, s)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings(v, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                strings(v, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Checks every template in `input`; Err names the malformed one.
pub fn validate(input: &Value) -> Result<(), String> {
    let mut all = Vec::new();
    strings(input, String::new(), &mut all);
    for (path, s) in all {
        parse(s).map_err(|e| {
            if path.is_empty() {
                e
            } else {
                format!("at {}: {e}", quote(path.trim_start_matches('.')))
            }
        })?;
    }
    let keys = referenced_keys(input).len();
    if keys > MAX_REFERENCED_KEYS {
        return Err(format!(
            "references {keys} task keys; at most {MAX_REFERENCED_KEYS}"
        ));
    }
    Ok(())
}

/// The task keys `input` references, each once, in order.
pub fn referenced_keys(input: &Value) -> Vec<String> {
    let mut all = Vec::new();
    strings(input, String::new(), &mut all);
    let mut keys: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (_, s) in all {
        for piece in parse(s).unwrap_or_default() {
            if let Piece::Ref(r) = piece
                && seen.insert(r.task_key.clone())
            {
                keys.push(r.task_key);
            }
        }
    }
    keys
}

/// What the ledger knows of a referenced task key in the execution.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// The latest COMPLETED run with that key.
    Completed {
        id: TaskRunId,
        output: Value,
    },
    /// Runs exist, none COMPLETED, some still going.
    InProgress,
    /// Runs exist and all ended otherwise.
    EndedOtherwise,
    Missing,
}

/// The outcome of resolving an input's templates.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Resolved {
        value: Value,
        task_inputs: Vec<TaskRunId>,
    },
    /// An upstream has not completed yet.
    Waiting { reference: String },
    /// A reference cannot be resolved.
    Failed { message: String },
}

/// Resolves every template in `input` against `upstreams`, within the
/// limits on any stored value: at most `max_bytes` encoded and
/// [`json::MAX_DEPTH`] deep. The size is counted while resolving, so an
/// input that would grow too large fails before it is built.
pub fn resolve(
    input: &Value,
    upstreams: &BTreeMap<String, Upstream>,
    max_bytes: usize,
) -> Resolution {
    let mut r = Resolver {
        upstreams,
        used: Vec::new(),
        bytes: 0,
        max_bytes,
    };
    match r.value(input, 1) {
        Ok((value, _)) => Resolution::Resolved {
            value,
            task_inputs: r.used,
        },
        Err(e) => e,
    }
}

struct Resolver<'a> {
    upstreams: &'a BTreeMap<String, Upstream>,
    used: Vec<TaskRunId>,
    /// The encoded bytes of what has been produced so far: every part of
    /// the result is counted once, when it is made, so the total at the
    /// end is the result's exact encoded length.
    bytes: usize,
    max_bytes: usize,
}

impl<'a> Resolver<'a> {
    fn charge(&mut self, n: usize) -> Result<(), Resolution> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.max_bytes {
            return Err(self.too_large());
        }
        Ok(())
    }

    fn too_large(&self) -> Resolution {
        Resolution::Failed {
            message: format!(
                "the resolved input would be larger than {} bytes encoded",
                self.max_bytes
            ),
        }
    }

    /// `v` resolved, at nesting level `depth` (1 at the top), with its
    /// encoded length.
    fn value(&mut self, v: &Value, depth: usize) -> Result<(Value, usize), Resolution> {
        match v {
            Value::String(s) => self.string(s, depth),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut body = 0;
                for item in items {
                    let (value, n) = self.value(item, depth + 1)?;
                    let field = json::framed(n);
                    self.charge(field - n)?;
                    body += field;
                    out.push(value);
                }
                let len = json::framed(body);
                self.charge(len - body)?;
                Ok((Value::Array(out), len))
            }
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                let mut body = 0;
                for (k, item) in map {
                    let (value, n) = self.value(item, depth + 1)?;
                    let entry = json::framed(json::entry_len(k, n));
                    self.charge(entry - n)?;
                    body += entry;
                    out.insert(k.clone(), value);
                }
                let len = json::framed(body);
                self.charge(len - body)?;
                Ok((Value::Object(out), len))
            }
            other => {
                let n = json::encoded_len(other);
                self.charge(n)?;
                Ok((other.clone(), n))
            }
        }
    }

    fn string(&mut self, s: &str, depth: usize) -> Result<(Value, usize), Resolution> {
        let pieces = parse(s).map_err(|message| Resolution::Failed { message })?;
        if let [Piece::Ref(r)] = pieces.as_slice() {
            let at = self.lookup(r)?;
            if depth - 1 + json::depth(at) > json::MAX_DEPTH {
                return Err(Resolution::Failed {
                    message: format!(
                        "{} would nest the resolved input more than {} deep",
                        quote(&r.to_string()),
                        json::MAX_DEPTH
                    ),
                });
            }
            let n = json::encoded_len(at);
            self.charge(n)?;
            return Ok((at.clone(), n));
        }
        // Text, with any references interpolated.
        let mut text = Vec::new();
        for p in &pieces {
            match p {
                Piece::Text(t) => {
                    self.charge(t.len())?;
                    text.extend_from_slice(t.as_bytes());
                }
                Piece::Ref(r) => match self.lookup(r)? {
                    Value::String(v) => {
                        self.charge(v.len())?;
                        text.extend_from_slice(v.as_bytes());
                    }
                    other => {
                        let room = self.max_bytes.saturating_sub(self.bytes);
                        let mut w = Bounded {
                            out: &mut text,
                            room,
                        };
                        serde_json::to_writer(&mut w, other).map_err(|_| self.too_large())?;
                        let written = room - w.room;
                        self.charge(written)?;
                    }
                },
            }
        }
        let text = String::from_utf8(text).map_err(|_| Resolution::Failed {
            message: "the resolved text is not UTF-8".into(),
        })?;
        let len = json::framed(text.len());
        self.charge(len - text.len())?;
        Ok((Value::String(text), len))
    }

    fn lookup(&mut self, r: &Reference) -> Result<&'a Value, Resolution> {
        let upstreams = self.upstreams;
        let (id, output) = match upstreams.get(&r.task_key).unwrap_or(&Upstream::Missing) {
            Upstream::Completed { id, output } => (*id, output),
            Upstream::InProgress => {
                return Err(Resolution::Waiting {
                    reference: quote(&r.to_string()),
                });
            }
            Upstream::EndedOtherwise => {
                return Err(Resolution::Failed {
                    message: format!(
                        "{}: task {} ended without completing",
                        quote(&r.to_string()),
                        quote(&r.task_key)
                    ),
                });
            }
            Upstream::Missing => {
                return Err(Resolution::Failed {
                    message: format!(
                        "{}: no task run with key {} in this execution",
                        quote(&r.to_string()),
                        quote(&r.task_key)
                    ),
                });
            }
        };
        let mut at = output;
        for seg in &r.path {
            let next = match at {
                Value::Object(m) => m.get(seg),
                Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            at = next.ok_or_else(|| Resolution::Failed {
                message: format!(
                    "{}: the output has no {}",
                    quote(&r.to_string()),
                    quote(seg)
                ),
            })?;
        }
        if !self.used.contains(&id) {
            self.used.push(id);
        }
        Ok(at)
    }
}

/// A writer that refuses to grow past `room` bytes.
struct Bounded<'a> {
    out: &'a mut Vec<u8>,
    room: usize,
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.room {
            return Err(std::io::Error::other("over the limit"));
        }
        self.room -= buf.len();
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const MAX: usize = json::MAX_ENCODED_BYTES;

    fn done(output: Value) -> (TaskRunId, Upstream) {
        let id = TaskRunId::new();
        (id, Upstream::Completed { id, output })
    }

    #[test]
    fn whole_string_templates_keep_the_json_type() {
        let (id, up) = done(json!({"items": [{"n": 1}, {"n": 2}], "name": "x"}));
        let ups = BTreeMap::from([("fetch".to_owned(), up)]);
        let input = json!({
            "all": "{{fetch.output}}",
            "second": "{{ fetch.output.items.1.n }}",
            "text": "name={{fetch.output.name}}, n={{fetch.output.items.0.n}}",
            "plain": "no templates",
            "num": 3
        });
        match resolve(&input, &ups, MAX) {
            Resolution::Resolved { value, task_inputs } => {
                assert_eq!(value["all"]["name"], "x");
                assert_eq!(value["second"], json!(2));
                assert_eq!(value["text"], "name=x, n=1");
                assert_eq!(value["plain"], "no templates");
                assert_eq!(value["num"], 3);
                assert_eq!(task_inputs, [id]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unfinished_missing_and_failed_upstreams() {
        let input = json!({"a": "{{up.output}}"});
        let wait = BTreeMap::from([("up".to_owned(), Upstream::InProgress)]);
        assert!(matches!(
            resolve(&input, &wait, MAX),
            Resolution::Waiting { .. }
        ));
        match resolve(&input, &BTreeMap::new(), MAX) {
            Resolution::Failed { message } => {
                assert!(message.contains("{{up.output}}"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let ended = BTreeMap::from([("up".to_owned(), Upstream::EndedOtherwise)]);
        assert!(matches!(
            resolve(&input, &ended, MAX),
            Resolution::Failed { .. }
        ));
        let (_, up) = done(json!({"a": 1}));
        let ups = BTreeMap::from([("up".to_owned(), up)]);
        match resolve(&json!("{{up.output.b}}"), &ups, MAX) {
            Resolution::Failed { message } => assert!(message.contains("{{up.output.b}}")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_templates_are_named() {
        for bad in [
            "{{up}}",
            "{{up.result}}",
            "{{ .output }}",
            "{{up.output.}}",
            "{{up.output",
            "x}}",
            "{{}}",
        ] {
            let err = validate(&json!({"k": [bad]})).unwrap_err();
            assert!(err.starts_with("at \"k[0]\""), "{bad}: {err}");
        }
        validate(&json!({"k": "{{up.output.items.0}} and {{b-2.output}}"})).unwrap();
        assert_eq!(
            referenced_keys(&json!(["{{a.output}}", {"x": "{{b.output.c}} {{a.output}}"}])),
            ["a", "b"]
        );
    }

    #[test]
    fn resolution_stops_at_the_size_limit() {
        let (_, up) = done(json!({"blob": "x".repeat(200 * 1024)}));
        let ups = BTreeMap::from([("big".to_owned(), up)]);
        let refs: Vec<Value> = (0..60).map(|_| json!("{{big.output}}")).collect();
        match resolve(&Value::Array(refs), &ups, MAX) {
            Resolution::Failed { message } => {
                assert!(message.contains("larger than 1048576 bytes"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // Interpolated text is counted as it grows.
        let text: Vec<Value> = (0..60).map(|_| json!("a {{big.output}} b")).collect();
        assert!(matches!(
            resolve(&Value::Array(text), &ups, MAX),
            Resolution::Failed { .. }
        ));
        let few: Vec<Value> = (0..4).map(|_| json!("{{big.output.blob}}")).collect();
        assert!(matches!(
            resolve(&Value::Array(few), &ups, MAX),
            Resolution::Resolved { .. }
        ));
    }

    #[test]
    fn resolution_stops_at_the_depth_limit() {
        let mut deep = json!(1);
        for _ in 0..30 {
            deep = json!({ "d": deep });
        }
        let (_, up) = done(deep);
        let ups = BTreeMap::from([("deep".to_owned(), up)]);
        // 31 levels at the top fit; three levels further down do not.
        assert!(matches!(
            resolve(&json!("{{deep.output}}"), &ups, MAX),
            Resolution::Resolved { .. }
        ));
        assert!(matches!(
            resolve(&json!({"a": "{{deep.output}}"}), &ups, MAX),
            Resolution::Resolved { .. }
        ));
        match resolve(&json!({"a": {"b": ["{{deep.output}}"]}}), &ups, MAX) {
            Resolution::Failed { message } => {
                assert!(message.contains("more than 32 deep"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn messages_quote_only_a_prefix_of_long_input() {
        let long = format!("{{{{{}", "k".repeat(200_000));
        let err = validate(&json!({ "x": long })).unwrap_err();
        assert!(err.len() < 300, "{err}");
        let key = "k".repeat(100_000);
        let err = validate(&json!({ key.clone(): "{{a}}" })).unwrap_err();
        assert!(err.len() < 400, "{err}");
        let reference = Value::String(format!("{{{{{key}.output.{key}}}}}"));
        match resolve(&reference, &BTreeMap::new(), MAX) {
            Resolution::Failed { message } => assert!(message.len() < 300, "{message}"),
            other => panic!("{other:?}"),
        }
        let many: Vec<Value> = (0..=MAX_REFERENCED_KEYS)
            .map(|i| json!(format!("{{{{k{i}.output}}}}")))
            .collect();
        assert!(validate(&Value::Array(many)).is_err());
    }

    fn any_output() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z{}.é]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The size counted while resolving is the result's exact encoded
        /// length: a limit of exactly that passes, one byte less fails.
        #[test]
        fn the_counted_size_is_exact(output in any_output(), input in any_output()) {
            let (_, up) = done(output);
            let ups = BTreeMap::from([("u".to_owned(), up)]);
            let input = json!({"whole": "{{u.output}}", "text": "<{{u.output}}>", "rest": input});
            if let Resolution::Resolved { value, .. } = resolve(&input, &ups, MAX) {
                let n = json::encoded_len(&value);
                let exact = resolve(&input, &ups, n);
                let fits = matches!(exact, Resolution::Resolved { .. });
                prop_assert!(fits);
                let short = resolve(&input, &ups, n - 1);
                let fails = matches!(short, Resolution::Failed { .. });
                prop_assert!(fails);
            }
        }

        #[test]
        fn parsing_never_panics_and_validated_inputs_resolve_or_explain(s in ".{0,64}") {
            let v = Value::String(s);
            if validate(&v).is_ok() {
                // With no upstreams every reference is missing: Failed, or
                // Resolved when there is none.
                let r = resolve(&v, &BTreeMap::new(), MAX);
                let waiting = matches!(r, Resolution::Waiting { .. });
                prop_assert!(!waiting);
            }
        }

        #[test]
        fn strings_without_braces_are_unchanged(s in "[^{}]{0,64}") {
            let v = Value::String(s);
            prop_assert!(validate(&v).is_ok());
            prop_assert_eq!(resolve(&v, &BTreeMap::new(), MAX), Resolution::Resolved { value: v.clone(), task_inputs: vec![] });
        }
    }
}
