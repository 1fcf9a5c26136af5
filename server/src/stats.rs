//! Server-wide counters, updated per connection and per stream (never per chunk), read by
//! tests, `nexus serve`'s logs and (with the operations issue) the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) streams_open: AtomicU64,
    pub(crate) streams_total: AtomicU64,
    pub(crate) streams_complete: AtomicU64,
    pub(crate) streams_error: AtomicU64,
    pub(crate) streams_cancelled: AtomicU64,
    pub(crate) streams_timeout: AtomicU64,
    pub(crate) streams_rejected: AtomicU64,
    pub(crate) producers_dropped: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused at the connection limit.
    pub connections_refused: u64,
    /// Streams with a running producer now.
    pub streams_open: u64,
    /// Streams accepted since start.
    pub streams_total: u64,
    /// Streams that ended with COMPLETE.
    pub streams_complete: u64,
    /// Streams that ended with an ERROR (source failure, drain, connection loss).
    pub streams_error: u64,
    /// Streams cancelled by their client.
    pub streams_cancelled: u64,
    /// Streams ended by the stream timeout.
    pub streams_timeout: u64,
    /// Stream requests refused before they started (bad paradata, unknown source, ...).
    pub streams_rejected: u64,
    /// Producers dropped (each source's cleanup); equals the streams started once all ended.
    pub producers_dropped: u64,
    /// Connections closed because the peer broke the protocol.
    pub protocol_errors: u64,
    /// Stream data bytes handed to the protocol (before compression).
    pub bytes_sent: u64,
}

impl ServerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections_open: self.connections_open.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            streams_open: self.streams_open.load(Relaxed),
            streams_total: self.streams_total.load(Relaxed),
            streams_complete: self.streams_complete.load(Relaxed),
            streams_error: self.streams_error.load(Relaxed),
            streams_cancelled: self.streams_cancelled.load(Relaxed),
            streams_timeout: self.streams_timeout.load(Relaxed),
            streams_rejected: self.streams_rejected.load(Relaxed),
            producers_dropped: self.producers_dropped.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
        }
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Relaxed);
}
