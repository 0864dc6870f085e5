//! Limits on the free-form JSON values clients send (inputs, state data,
//! outputs).

use serde_json::Value;

/// The deepest nesting a value may have.
pub const MAX_DEPTH: usize = 32;
/// The largest a value may be, in its protobuf encoding.
pub const MAX_ENCODED_BYTES: usize = 1024 * 1024;

/// How deeply `value` nests: a scalar is 1, `[1]` is 2.
pub fn depth(value: &Value) -> usize {
    // Iterative so that hostile input cannot exhaust the stack.
    let mut deepest = 0;
    let mut pending = vec![(value, 1usize)];
    while let Some((v, d)) = pending.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => pending.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => pending.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(depth(&json!(1)), 1);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": 2}]})), 4);
    }
}
