//! Limits on the free-form JSON values clients send (inputs, state data,
//! outputs).

use prost::encoding::encoded_len_varint;
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

/// The length of `value` encoded as a `google.protobuf.Value`, computed
/// without building the encoding. Numbers are doubles there.
pub fn encoded_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 2,
        Value::Number(_) => 9,
        Value::String(s) => framed(s.len()),
        Value::Array(items) => framed(items.iter().map(|i| framed(encoded_len(i))).sum()),
        Value::Object(map) => framed(struct_len(map)),
    }
}

/// The length of `map` encoded as a `google.protobuf.Struct`.
pub fn struct_len(map: &serde_json::Map<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| framed(entry_len(k, encoded_len(v))))
        .sum()
}

/// A length-delimited field of `len` bytes with its one-byte tag.
pub fn framed(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// The body of a `Struct` map entry whose value encodes to `value_len`
/// bytes (an empty key is not written).
pub fn entry_len(key: &str, value_len: usize) -> usize {
    let key_len = if key.is_empty() { 0 } else { framed(key.len()) };
    key_len + framed(value_len)
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
