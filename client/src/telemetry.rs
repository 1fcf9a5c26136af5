//! What the client reports through the `metrics` facade: a no-op until the embedding
//! application installs a recorder (Prometheus, say). Names are in
//! [`nexus_config::metric_names`]. Counted per stream and per connection, and bytes per chunk
//! through a handle each connection takes once.

use nexus_config::metric_names as names;
use nexus_protocol::Outcome;

pub(crate) fn stream_started() {
    metrics::gauge!(names::CLIENT_STREAMS_ACTIVE).increment(1.0);
}

pub(crate) fn stream_ended(outcome: &Outcome) {
    metrics::gauge!(names::CLIENT_STREAMS_ACTIVE).decrement(1.0);
    let outcome = match outcome {
        Outcome::Complete(_) => "complete",
        Outcome::Error { .. } => "error",
        Outcome::Cancelled => "cancelled",
        Outcome::TimedOut => "timeout",
    };
    metrics::counter!(names::CLIENT_STREAMS_FINISHED, "outcome" => outcome).increment(1);
}

pub(crate) fn connection_opened() {
    metrics::gauge!(names::CLIENT_CONNECTIONS).increment(1.0);
}

pub(crate) fn connection_closed() {
    metrics::gauge!(names::CLIENT_CONNECTIONS).decrement(1.0);
}

/// A pooled connection closed: stale, capacity, dead or closed.
pub(crate) fn evicted(reason: &'static str) {
    metrics::counter!(names::CLIENT_POOL_EVICTIONS, "reason" => reason).increment(1);
}

/// The bytes-received counter, for a connection to keep.
pub(crate) fn bytes_received() -> metrics::Counter {
    metrics::counter!(names::CLIENT_BYTES_RECEIVED)
}
