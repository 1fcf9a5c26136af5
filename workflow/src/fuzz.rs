//! Fuzz entry point for the HTTP sensor's door: everything `POST /sensors/NAME` and
//! `GET /runs` take from a caller, parsed and checked the way the admin routes do, without
//! a database. Driven by property tests and a seed corpus in CI (`tests/fuzz.rs`) and by
//! cargo-fuzz for long runs (`workflow/fuzz`).

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::admin::{idempotency_key_fits, parse_runs_query, MAX_LISTED};
use crate::event::Schema;
use crate::store::State;

/// The schema the fuzzed bodies are checked against: required fields, types, a pattern,
/// an enum, nesting, and no other properties.
fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::compile(json!({
            "type": "object",
            "required": ["file"],
            "additionalProperties": false,
            "properties": {
                "file": {"type": "string", "pattern": "^[a-z0-9./-]{1,64}$"},
                "size": {"type": "integer", "minimum": 0},
                "kind": {"enum": ["a", "b"]},
                "meta": {"type": "object", "properties": {"n": {"type": "number"}}}
            }
        }))
        .unwrap_or_else(|e| panic!("the fuzz schema: {e}"))
    })
}

/// Splits `data` at the first two NUL bytes into a `/runs` query, an `Idempotency-Key` and a
/// POST body, and runs each through what the routes do with it. It must not panic; a query
/// that parses gives a state a run can have and a limit in range; an accepted key fits
/// `events:?after=`; a body is accepted only when it is JSON valid against the schema, and a
/// refusal names at least one failing path.
pub fn http_door(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let query = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    if let Ok(query) = std::str::from_utf8(query) {
        if let Ok(wanted) = parse_runs_query(query) {
            assert!((1..=MAX_LISTED).contains(&wanted.limit), "{wanted:?}");
            assert_ne!(wanted.state, Some(State::Skipped), "{wanted:?}");
        }
    }
    if let Ok(key) = std::str::from_utf8(key) {
        if idempotency_key_fits(key) {
            assert!(!key.contains(['?', '&']) && !key.is_empty() && key.len() <= 200);
        }
    }
    let Ok(payload) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    match schema().validate(&payload) {
        Ok(()) => {
            assert!(
                payload.get("file").is_some_and(Value::is_string),
                "{payload}"
            );
        }
        Err(message) => {
            assert!(
                message.lines().all(|l| l.starts_with('/')),
                "each failure names its path: {message}"
            );
        }
    }
}
