//! The layers depend one way: grpc -> stream -> orchestration -> store ->
//! domain. The store names no wire type and no stream, orchestration
//! writes no SQL and names no wire type, and the gRPC edge never reaches
//! the store. Checked on the source (test modules aside), so that a change
//! that crosses a layer fails here rather than in review.

use std::path::Path;

/// The non-test source of every `.rs` file under `dir`.
fn sources(dir: &str) -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(i) => text[..i].to_owned(),
                    None => text,
                };
                out.push((path.display().to_string(), code));
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(dir), &mut out);
    assert!(!out.is_empty(), "no sources under {dir}");
    out
}

/// Whether `line` holds `word` as a word of its own (`Upstream::` does not
/// name `stream::`).
fn names(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(i, _)| {
        !line[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn forbid(dir: &str, words: &[&str]) {
    let mut found = Vec::new();
    for (path, code) in sources(dir) {
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for w in words {
                if names(line, w) {
                    found.push(format!("{path}:{}: {w}", n + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "layer crossed:\n{}", found.join("\n"));
}

#[test]
fn the_store_names_no_wire_type_and_no_stream() {
    forbid(
        "src/store",
        &["grpc::", "pb::", "prost", "stream::", "tonic"],
    );
}

#[test]
fn orchestration_writes_no_sql_and_names_no_wire_type() {
    forbid(
        "src/orchestration",
        &[
            "sqlx", "SELECT ", "INSERT ", "UPDATE ", "grpc::", "pb::", "tonic",
        ],
    );
}

#[test]
fn the_grpc_edge_never_reaches_the_store() {
    forbid("src/grpc", &["store::", "Store", "sqlx"]);
}

#[test]
fn the_domain_does_no_io() {
    forbid(
        "src/domain",
        &["store::", "stream::", "grpc::", "sqlx", "tokio", "tonic"],
    );
}

#[test]
fn a_word_is_found_only_whole() {
    assert!(names("use crate::stream::Feed;", "stream::"));
    assert!(names("    stream::{Feed},", "stream::"));
    assert!(!names("Upstream::Missing", "stream::"));
}
