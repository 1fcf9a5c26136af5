//! The client's telemetry. Every [`Client`] keeps its counters as plain atomics, always on and
//! readable without a metrics recorder ([`Client::stream_stats`], [`Client::pool_stats`]);
//! [`publish`] copies them into the `metrics` facade, under the names in [`names`], just
//! before the application's exporter renders a scrape. The server does the same
//! (`nexus_server::telemetry`): one model for both sides.
//!
//! An application with a Prometheus exporter calls `publish(&client)` in its scrape handler;
//! one that never does pays one relaxed atomic add per stream event and per chunk, nothing else.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nexus_protocol::Outcome;

use crate::Client;

/// The Prometheus names of the client's metrics. Labels come from small fixed sets, never a
/// stream id or a peer address.
pub mod names {
    /// Streams open in this client (original: `nexus.client.gauge`).
    pub const STREAMS_ACTIVE: &str = "nexus_client_streams_active";
    /// Open connections of this client (original: `nexus.client.connection.gauge`).
    pub const CONNECTIONS: &str = "nexus_client_connections";
    /// Stream data bytes this client received (uncompressed).
    pub const BYTES_RECEIVED: &str = "nexus_client_bytes_received_total";
    /// Streams this client finished, by `outcome`: complete, cancelled, error, timeout.
    pub const STREAMS_FINISHED: &str = "nexus_client_streams_finished_total";
    /// Pooled connections the client closed, by `reason`: stale, capacity, dead, closed.
    pub const POOL_EVICTIONS: &str = "nexus_client_pool_evictions_total";
}

/// The client's metrics for the README and the exporter's descriptions: Prometheus name,
/// type, labels, name in the original system, meaning.
pub const METRICS: &[(&str, &str, &str, &str, &str)] = &[
    (
        names::STREAMS_ACTIVE,
        "gauge",
        "",
        "nexus.client.gauge",
        "Streams open in a client process.",
    ),
    (
        names::CONNECTIONS,
        "gauge",
        "",
        "nexus.client.connection.gauge",
        "Open connections of a client process.",
    ),
    (
        names::BYTES_RECEIVED,
        "counter",
        "",
        "",
        "Stream bytes a client process received.",
    ),
    (
        names::STREAMS_FINISHED,
        "counter",
        "outcome",
        "",
        "Streams a client process finished.",
    ),
    (
        names::POOL_EVICTIONS,
        "counter",
        "reason",
        "",
        "Pooled connections closed: stale, capacity, dead, closed.",
    ),
];

/// Stream counters of one client, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// Streams initiated and not yet ended.
    pub active: u64,
    /// Streams that ended complete.
    pub complete: u64,
    /// Streams cancelled.
    pub cancelled: u64,
    /// Streams that ended with an error.
    pub error: u64,
    /// Streams ended by the stream timeout.
    pub timeout: u64,
    /// Stream data bytes received (uncompressed).
    pub bytes_received: u64,
}

/// The counters a client's streams and connections share.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    started: AtomicU64,
    complete: AtomicU64,
    cancelled: AtomicU64,
    error: AtomicU64,
    timeout: AtomicU64,
    bytes_received: AtomicU64,
}

impl Counters {
    pub(crate) fn stream_started(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    pub(crate) fn stream_ended(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Complete(_) => &self.complete,
            Outcome::Error { .. } => &self.error,
            Outcome::Cancelled => &self.cancelled,
            Outcome::TimedOut => &self.timeout,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.bytes_received.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StreamStats {
        let complete = self.complete.load(Relaxed);
        let cancelled = self.cancelled.load(Relaxed);
        let error = self.error.load(Relaxed);
        let timeout = self.timeout.load(Relaxed);
        let ended = complete + cancelled + error + timeout;
        StreamStats {
            // An end is counted after its start, and both only grow.
            active: self.started.load(Relaxed).saturating_sub(ended),
            complete,
            cancelled,
            error,
            timeout,
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }
}

/// Copies `client`'s counters into the `metrics` facade (a no-op without a recorder). Call
/// it just before rendering a scrape. An application with several clients publishes the
/// one its scrapes are about (the names carry no client label).
pub fn publish(client: &Client) {
    use metrics::{counter, gauge};
    let streams = client.stream_stats();
    let pool = client.pool_stats();
    gauge!(names::STREAMS_ACTIVE).set(streams.active as f64);
    gauge!(names::CONNECTIONS).set(pool.open as f64);
    counter!(names::BYTES_RECEIVED).absolute(streams.bytes_received);
    for (outcome, value) in [
        ("complete", streams.complete),
        ("cancelled", streams.cancelled),
        ("error", streams.error),
        ("timeout", streams.timeout),
    ] {
        counter!(names::STREAMS_FINISHED, "outcome" => outcome).absolute(value);
    }
    for (reason, value) in [
        ("stale", pool.evicted_stale),
        ("capacity", pool.evicted_capacity),
        ("dead", pool.evicted_dead),
        ("closed", pool.closed),
    ] {
        counter!(names::POOL_EVICTIONS, "reason" => reason).absolute(value);
    }
}

/// Describes the client's metrics to the installed recorder (its `# HELP` lines).
pub fn describe() {
    for (name, kind, _, _, meaning) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *meaning),
            _ => metrics::describe_gauge!(*name, *meaning),
        }
    }
}
