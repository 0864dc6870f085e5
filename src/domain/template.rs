//! Templates in task run inputs: `{{task_key.output}}`,
//! `{{task_key.output.a.b}}`, with array indexes as path segments
//! (`{{fetch.output.items.0}}`). A string that is exactly one template takes
//! the referenced value with its JSON type; templates inside a longer string
//! are interpolated as text.

use std::collections::BTreeMap;

use serde_json::Value;

use super::TaskRunId;

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
            .ok_or_else(|| format!("unclosed template in {s:?}"))?;
        pieces.push(Piece::Ref(parse_reference(after[..end].trim())?));
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("unopened template in {s:?}"));
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

fn parse_reference(inner: &str) -> Result<Reference, String> {
    let bad = || {
        format!(
            "malformed template {{{{{inner}}}}}: expected {{{{task_key.output}}}} or {{{{task_key.output.path}}}}"
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
                format!("at {}: {e}", path.trim_start_matches('.'))
            }
        })?;
    }
    Ok(())
}

/// The task keys `input` references, each once, in order.
pub fn referenced_keys(input: &Value) -> Vec<String> {
    let mut all = Vec::new();
    strings(input, String::new(), &mut all);
    let mut keys: Vec<String> = Vec::new();
    for (_, s) in all {
        for piece in parse(s).unwrap_or_default() {
            if let Piece::Ref(r) = piece
                && !keys.contains(&r.task_key)
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

/// Resolves every template in `input` against `upstreams`.
pub fn resolve(input: &Value, upstreams: &BTreeMap<String, Upstream>) -> Resolution {
    let mut task_inputs = Vec::new();
    match resolve_value(input, upstreams, &mut task_inputs) {
        Ok(value) => Resolution::Resolved { value, task_inputs },
        Err(r) => r,
    }
}

fn resolve_value(
    v: &Value,
    upstreams: &BTreeMap<String, Upstream>,
    used: &mut Vec<TaskRunId>,
) -> Result<Value, Resolution> {
    Ok(match v {
        Value::String(s) => resolve_string(s, upstreams, used)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| resolve_value(i, upstreams, used))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_value(v, upstreams, used)?)))
                .collect::<Result<_, Resolution>>()?,
        ),
        other => other.clone(),
    })
}

fn resolve_string(
    s: &str,
    upstreams: &BTreeMap<String, Upstream>,
    used: &mut Vec<TaskRunId>,
) -> Result<Value, Resolution> {
    let pieces = parse(s).map_err(|message| Resolution::Failed { message })?;
    if let [Piece::Ref(r)] = pieces.as_slice() {
        return lookup(r, upstreams, used);
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Ref(_))) {
        return Ok(Value::String(s.to_owned()));
    }
    let mut text = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Ref(r) => match lookup(&r, upstreams, used)? {
                Value::String(v) => text.push_str(&v),
                other => text.push_str(&other.to_string()),
            },
        }
    }
    Ok(Value::String(text))
}

fn lookup(
    r: &Reference,
    upstreams: &BTreeMap<String, Upstream>,
    used: &mut Vec<TaskRunId>,
) -> Result<Value, Resolution> {
    let (id, output) = match upstreams.get(&r.task_key).unwrap_or(&Upstream::Missing) {
        Upstream::Completed { id, output } => (*id, output),
        Upstream::InProgress => {
            return Err(Resolution::Waiting {
                reference: r.to_string(),
            });
        }
        Upstream::EndedOtherwise => {
            return Err(Resolution::Failed {
                message: format!("{r}: task {:?} ended without completing", r.task_key),
            });
        }
        Upstream::Missing => {
            return Err(Resolution::Failed {
                message: format!(
                    "{r}: no task run with key {:?} in this execution",
                    r.task_key
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
            message: format!("{r}: the output has no {seg:?}"),
        })?;
    }
    if !used.contains(&id) {
        used.push(id);
    }
    Ok(at.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

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
        match resolve(&input, &ups) {
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
        assert!(matches!(resolve(&input, &wait), Resolution::Waiting { .. }));
        match resolve(&input, &BTreeMap::new()) {
            Resolution::Failed { message } => {
                assert!(message.contains("{{up.output}}"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let ended = BTreeMap::from([("up".to_owned(), Upstream::EndedOtherwise)]);
        assert!(matches!(resolve(&input, &ended), Resolution::Failed { .. }));
        let (_, up) = done(json!({"a": 1}));
        let ups = BTreeMap::from([("up".to_owned(), up)]);
        match resolve(&json!("{{up.output.b}}"), &ups) {
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
            assert!(err.starts_with("at k[0]"), "{bad}: {err}");
        }
        validate(&json!({"k": "{{up.output.items.0}} and {{b-2.output}}"})).unwrap();
        assert_eq!(
            referenced_keys(&json!(["{{a.output}}", {"x": "{{b.output.c}} {{a.output}}"}])),
            ["a", "b"]
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_validated_inputs_resolve_or_explain(s in ".{0,64}") {
            let v = Value::String(s);
            if validate(&v).is_ok() {
                // With no upstreams every reference is missing: Failed, or
                // Resolved when there is none.
                let r = resolve(&v, &BTreeMap::new());
                let waiting = matches!(r, Resolution::Waiting { .. });
                prop_assert!(!waiting);
            }
        }

        #[test]
        fn strings_without_braces_are_unchanged(s in "[^{}]{0,64}") {
            let v = Value::String(s);
            prop_assert!(validate(&v).is_ok());
            prop_assert_eq!(resolve(&v, &BTreeMap::new()), Resolution::Resolved { value: v.clone(), task_inputs: vec![] });
        }
    }
}
