//! Events: what a sensor raised, with a JSON payload checked against the sensor kind's JSON
//! Schema before anything is dispatched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

/// One event. `id` is the idempotency key: raising the same id twice on one sensor is one
/// event (the second is ignored), so a replayed sensor produces no duplicate runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Unique within the sensor; chosen by the sensor from what happened (a tick's time, a
    /// file's path, size and mtime, an HTTP caller's `Idempotency-Key`).
    pub id: String,
    /// The sensor's name.
    pub sensor: String,
    /// When it was raised, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// What happened; valid against the sensor's schema.
    pub payload: Value,
}

impl Event {
    /// An event raised now.
    pub fn now(sensor: &str, id: String, payload: Value) -> Event {
        Event {
            id,
            sensor: sensor.to_string(),
            time_ms: unix_ms(SystemTime::now()),
            payload,
        }
    }

    /// The event as templates and the `events:` source see it: `id`, `sensor`, `time`
    /// (RFC 3339), `time_ms`, `payload`.
    /// An event from [`to_json`](Self::to_json)'s form; `None` if a field is missing.
    pub fn from_json(value: &Value) -> Option<Event> {
        Some(Event {
            id: value.get("id")?.as_str()?.to_string(),
            sensor: value.get("sensor")?.as_str()?.to_string(),
            time_ms: value.get("time_ms")?.as_i64()?,
            payload: value.get("payload")?.clone(),
        })
    }

    /// The event as JSON: `{id, sensor, time, time_ms, payload}`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "sensor": self.sensor,
            "time": rfc3339(self.time_ms),
            "time_ms": self.time_ms,
            "payload": self.payload,
        })
    }
}

/// The payload of a `streams` event, the same from both sides (a step's stream, or one the
/// server ended): written as JSON text straight from it, valid against `kind_schema("streams")`.
#[derive(Debug, Clone, Serialize)]
pub struct StreamPayload {
    /// `pull` or `push`.
    pub direction: &'static str,
    /// `client` (a step moved it) or `server` (this server served it).
    pub side: &'static str,
    /// `complete`, `error`, `cancelled` or `timed_out`.
    pub outcome: &'static str,
    /// Why it failed (`code: message`).
    pub error: Option<String>,
    /// Data bytes moved.
    pub bytes: u64,
    /// The xxh3-64 of a complete stream, 16 hex digits.
    pub digest: Option<String>,
    /// Its paradata.
    pub paradata: String,
    /// The other end.
    pub peer: String,
}

impl StreamPayload {
    /// As JSON text.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time `ms` after the epoch.
pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// `ms` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The payload schema of each built-in sensor kind. An `http` sensor's schema is its own
/// (`schema` in the rules file), `{"type": "object"}` when it gives none.
pub fn kind_schema(kind: &str) -> Option<Value> {
    let tick = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["scheduled", "scheduled_ms", "missed"],
        "properties": {
            "scheduled": {"type": "string", "description": "the tick's time, RFC 3339"},
            "scheduled_ms": {"type": "integer"},
            "missed": {"type": "integer", "minimum": 0,
                       "description": "ticks skipped just before this one (the process was down)"}
        }
    });
    Some(match kind {
        "timer" | "cron" => tick,
        "file" => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["change", "path", "relative", "name", "size", "mtime_ms"],
            "properties": {
                "change": {"enum": ["created", "updated", "deleted"]},
                "path": {"type": "string", "description": "absolute path"},
                "relative": {"type": "string", "description": "path under the watched directory"},
                "name": {"type": "string", "description": "file name"},
                "size": {"type": "integer", "minimum": 0},
                "mtime_ms": {"type": "integer"}
            }
        }),
        "s3" => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["change", "bucket", "key", "relative", "etag", "size", "last_modified_ms"],
            "properties": {
                "change": {"enum": ["created", "modified", "deleted"]},
                "bucket": {"type": "string"},
                "key": {"type": "string", "description": "the object's key"},
                "relative": {"type": "string", "description": "the key under the sensor's prefix"},
                "etag": {"type": "string", "description": "the ETag, without quotes (the last known one for deleted)"},
                "size": {"type": "integer", "minimum": 0},
                "last_modified_ms": {"type": "integer"}
            }
        }),
        "mysql" => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["table", "inserts", "updates", "deletes", "rows", "binlog_file",
                         "binlog_position", "from_ms", "to_ms", "fired_ms"],
            "properties": {
                "table": {"type": "string", "description": "DATABASE.TABLE"},
                "inserts": {"type": "integer", "minimum": 0},
                "updates": {"type": "integer", "minimum": 0},
                "deletes": {"type": "integer", "minimum": 0},
                "rows": {"type": "integer", "minimum": 1, "description": "inserts + updates + deletes"},
                "binlog_file": {"type": "string"},
                "binlog_position": {"type": "integer", "minimum": 0,
                                    "description": "the end of the last transaction counted"},
                "from_ms": {"type": "integer", "description": "binlog time of the first change counted (second precision)"},
                "to_ms": {"type": "integer", "description": "binlog time of the last change counted"},
                "fired_ms": {"type": "integer"}
            }
        }),
        "streams" => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["direction", "side", "outcome", "bytes", "paradata", "peer"],
            "properties": {
                "direction": {"enum": ["pull", "push"]},
                "side": {"enum": ["server", "client"]},
                "outcome": {"enum": ["complete", "error", "cancelled", "timed_out"]},
                "error": {"type": ["string", "null"]},
                "bytes": {"type": "integer", "minimum": 0},
                "digest": {"type": ["string", "null"]},
                "paradata": {"type": "string"},
                "peer": {"type": "string"}
            }
        }),
        "runs" => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["rule", "run", "event", "sensor", "state"],
            "properties": {
                "rule": {"type": "string"},
                "run": {"type": "integer"},
                "event": {"type": "string", "description": "the id of the event that started the run"},
                "sensor": {"type": "string"},
                "state": {"enum": ["success", "failed"]},
                "error": {"type": ["string", "null"]},
                "steps": {"type": "object"}
            }
        }),
        "http" => json!({"type": "object"}),
        _ => return None,
    })
}

/// A compiled payload schema.
pub struct Schema {
    source: Value,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("source", &self.source)
            .finish()
    }
}

impl Schema {
    /// Compiles `source`; the error says what in it is wrong.
    pub fn compile(source: Value) -> Result<Schema, String> {
        let validator = jsonschema::validator_for(&source)
            .map_err(|e| format!("invalid JSON Schema: {e} (at {})", e.schema_path()))?;
        Ok(Schema { source, validator })
    }

    /// The schema as given.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Checks `payload`; the error names the failing path (`/size: "x" is not of type
    /// "integer"`), every failure on its own line.
    pub fn validate(&self, payload: &Value) -> Result<(), String> {
        let errors: Vec<String> = self
            .validator
            .iter_errors(payload)
            .map(|e| {
                let path = e.instance_path().as_str().to_string();
                let path = if path.is_empty() { "/".into() } else { path };
                format!("{path}: {e}")
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// What the schema says of the payload field at `path` (keys from the top), when the
    /// schema describes its fields: `Ok(None)` when it leaves that field open (no
    /// `properties`, or an object without `additionalProperties: false` and no such key),
    /// `Err` naming the field when the schema rules it out.
    pub fn field(&self, path: &[&str]) -> Result<Option<&Value>, String> {
        let mut node = &self.source;
        for (i, key) in path.iter().enumerate() {
            let Some(properties) = node.get("properties").and_then(Value::as_object) else {
                return Ok(None);
            };
            match properties.get(*key) {
                Some(next) => node = next,
                None if node.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    let mut known: Vec<&str> = properties.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    return Err(format!(
                        "payload field {:?} is not in the schema (it has: {})",
                        path[..=i].join("."),
                        known.join(", ")
                    ));
                }
                None => return Ok(None),
            }
        }
        Ok(Some(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_schema_compiles() {
        for kind in ["timer", "cron", "file", "streams", "runs", "http"] {
            Schema::compile(kind_schema(kind).unwrap()).unwrap();
        }
        assert!(kind_schema("nope").is_none());
    }

    #[test]
    fn an_invalid_payload_is_rejected_naming_the_failing_path() {
        let schema = Schema::compile(kind_schema("file").unwrap()).unwrap();
        let good = json!({"change": "created", "path": "/a/b", "relative": "b", "name": "b",
                          "size": 3, "mtime_ms": 1});
        schema.validate(&good).unwrap();
        let mut bad = good.clone();
        bad["size"] = json!("three");
        let e = schema.validate(&bad).unwrap_err();
        assert!(e.starts_with("/size: "), "{e}");
        assert!(e.contains("integer"), "{e}");
        bad["change"] = json!("renamed");
        let e = schema.validate(&bad).unwrap_err();
        assert!(e.contains("/change: ") && e.contains("/size: "), "{e}");
    }

    #[test]
    fn fields_are_looked_up_in_the_schema() {
        let schema = Schema::compile(kind_schema("file").unwrap()).unwrap();
        assert_eq!(
            schema.field(&["size"]).unwrap().unwrap()["type"],
            json!("integer")
        );
        let e = schema.field(&["sise"]).unwrap_err();
        assert!(e.contains("\"sise\"") && e.contains("size"), "{e}");
        let open = Schema::compile(json!({"type": "object"})).unwrap();
        assert_eq!(open.field(&["anything", "deep"]).unwrap(), None);
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(unix_ms(from_unix_ms(1_700_000_000_123)), 1_700_000_000_123);
    }
}
