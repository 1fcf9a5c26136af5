//! The workflow inside a server (`nexus serve --rules`): the `events:` source, which makes the
//! node an event broker, and the stream watcher, which turns every stream the server ends
//! into an event of the `streams` sensor.
//!
//! `events:SENSOR[?after=ID]` streams the sensor's events as JSON lines (`{"id", "sensor",
//! "time", "time_ms", "payload"}`), oldest first, then live as they are raised; it does not
//! end by itself. With `after=ID` it starts after that event, so a reader that kept the last
//! id it saw resumes without a gap or a repeat. Auth is the connection's, as for any stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexus_protocol::ErrorCode;
use nexus_server::{pipe, Opened, Source, SourceError, StreamEnded, StreamRequest, StreamWatcher};

use crate::event::StreamPayload;
use crate::Workflow;

/// Chunks queued ahead of the client per `events:` stream.
const DEPTH: usize = 16;

/// The `events:` source of a workflow.
pub struct EventsSource {
    workflow: Arc<Workflow>,
}

impl EventsSource {
    /// Serves `workflow`'s event log.
    pub fn new(workflow: Arc<Workflow>) -> EventsSource {
        EventsSource { workflow }
    }
}

impl Source for EventsSource {
    fn scheme(&self) -> &str {
        "events"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let paradata = request.paradata;
        let sensor = paradata.body.to_string();
        if !self.workflow.has_sensor(&sensor) {
            return Err(SourceError::new(
                ErrorCode::NOT_FOUND,
                format!("no sensor {sensor:?} in this node's rules"),
            ));
        }
        let mut after = None;
        for (key, value) in &paradata.params {
            match *key {
                "after" if after.is_none() => after = Some(value.to_string()),
                "after" => return Err(SourceError::bad("parameter \"after\" given twice")),
                other => {
                    return Err(SourceError::bad(format!(
                        "unknown parameter {other:?} for events:; allowed: after"
                    )))
                }
            }
        }
        let (sender, producer) = pipe(DEPTH);
        let workflow = Arc::clone(&self.workflow);
        std::thread::Builder::new()
            .name("nexus-events".into())
            .spawn(move || {
                let mut seq: Option<i64> = None;
                loop {
                    if sender.is_closed() {
                        return;
                    }
                    if workflow.is_stopped() {
                        let _ = sender.fail(SourceError::new(
                            ErrorCode::DRAINING,
                            "the workflow is stopping; resume with after=<the last id>",
                        ));
                        return;
                    }
                    let found = workflow.events_after(
                        &sensor,
                        after.as_deref(),
                        seq,
                        Duration::from_millis(500),
                    );
                    let events = match found {
                        Ok(Some(events)) => events,
                        // The id must exist: a typo fails at once, not a stream that waits
                        // forever. (Looked up here, not in `open`: the state's lock may be
                        // held through a disk sync, and `open` runs on the shard.)
                        Ok(None) => {
                            let id = after.as_deref().unwrap_or("");
                            let _ = sender.fail(SourceError::new(
                                ErrorCode::NOT_FOUND,
                                format!("sensor {sensor:?} has no event {id:?}"),
                            ));
                            return;
                        }
                        Err(e) => {
                            let _ = sender.fail(SourceError::new(ErrorCode::SOURCE_FAILED, e));
                            return;
                        }
                    };
                    if events.is_empty() {
                        continue;
                    }
                    let mut text = String::new();
                    for (s, event) in &events {
                        seq = Some(*s);
                        text.push_str(&event.to_json().to_string());
                        text.push('\n');
                    }
                    if sender.send(Bytes::from(text)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| SourceError::new(ErrorCode::INTERNAL, e.to_string()))?;
        Ok(Opened {
            producer: Box::new(producer),
            expected_bytes: None,
        })
    }
}

/// Most stream ends recorded in one transaction.
const MAX_BATCH: usize = 4096;

/// How long stream ends are gathered into one transaction after the first: an event is
/// recorded at most this late.
const GATHER: Duration = Duration::from_millis(20);

/// The `streams` payload of a stream the server ended, as JSON text (valid against the
/// schema: a test checks it).
fn payload_of(ended: StreamEnded) -> String {
    StreamPayload {
        direction: if ended.push { "push" } else { "pull" },
        side: "server",
        outcome: ended.outcome,
        error: ended.error,
        bytes: ended.bytes,
        digest: ended.digest.map(|d| format!("{d:016x}")),
        paradata: ended.paradata,
        peer: ended.peer.to_string(),
    }
    .to_text()
}

/// A watcher for [`Registry::watch_streams`](nexus_server::Registry::watch_streams): each
/// stream that ends becomes a `streams` event (`side = "server"`). It only queues the report;
/// a workflow thread writes the event.
pub fn stream_watcher(workflow: &Arc<Workflow>) -> StreamWatcher {
    let (tx, rx) = crossbeam_channel::unbounded::<StreamEnded>();
    let weak = Arc::downgrade(workflow);
    let spawned = std::thread::Builder::new()
        .name("nexus-sensor-streams".into())
        .spawn(move || {
            // Group commit: what ends within GATHER of the first stream end goes in one
            // transaction (one sync), at most MAX_BATCH: under a flood of short streams the
            // state is synced GATHER apart, not once per stream.
            while let Ok(first) = rx.recv() {
                let Some(workflow) = weak.upgrade() else {
                    return;
                };
                let deadline = Instant::now() + GATHER;
                let mut batch = vec![payload_of(first)];
                while batch.len() < MAX_BATCH {
                    match rx.recv_deadline(deadline) {
                        Ok(ended) => batch.push(payload_of(ended)),
                        Err(_) => break,
                    }
                }
                workflow.streams_ended(batch);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Cannot start the streams sensor; stream ends are not events.");
    }
    Arc::new(move |ended| {
        let _ = tx.send(ended);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{kind_schema, Schema};

    #[test]
    fn a_server_stream_end_fits_the_streams_schema() {
        let schema = Schema::compile(kind_schema("streams").unwrap()).unwrap();
        for (push, outcome, error, digest) in [
            (false, "complete", None, Some(7)),
            (true, "error", Some("sink_failed: full".to_string()), None),
            (false, "cancelled", None, None),
        ] {
            let text = payload_of(StreamEnded {
                push,
                paradata: "file:a".into(),
                peer: "127.0.0.1:9".parse().unwrap(),
                outcome,
                error,
                bytes: 3,
                digest,
            });
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            schema.validate(&value).unwrap();
        }
    }
}
