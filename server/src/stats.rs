//! Server counters, read by tests and by the metrics endpoint. The shared ones change per
//! connection and per stream; the per-chunk ones (bytes and chunks sent) live in one
//! cache-line-aligned cell per shard that only its shard writes, so the data path never
//! shares a cache line between cores.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nexus_protocol::ErrorCode;

/// The error codes that close a connection for a protocol violation; their names
/// (`ErrorCode::name`) are the `reason` labels of the protocol-error counter.
pub const PROTOCOL_ERROR_CODES: [ErrorCode; 4] = [
    ErrorCode::PROTOCOL_ERROR,
    ErrorCode::FRAME_TOO_LARGE,
    ErrorCode::FLOW_CONTROL_VIOLATION,
    ErrorCode::AUTH_FAILED,
];

/// The index of a connection-closing error code, if it is a protocol violation.
pub(crate) fn protocol_error_reason(code: ErrorCode) -> Option<usize> {
    PROTOCOL_ERROR_CODES.iter().position(|c| *c == code)
}

/// The `code` labels of failed and refused streams: every code PROTOCOL.md and SOURCES.md
/// define, then `other` for codes an embedded source invents. A fixed set.
pub fn stream_error_labels() -> impl Iterator<Item = &'static str> {
    ErrorCode::ALL
        .iter()
        .filter_map(|c| c.name())
        .chain(std::iter::once("other"))
}

fn stream_error_index(code: ErrorCode) -> usize {
    ErrorCode::ALL
        .iter()
        .position(|c| *c == code)
        .unwrap_or(ErrorCode::ALL.len())
}

/// What one shard sent; written by that shard only.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct ShardTraffic {
    pub(crate) bytes: AtomicU64,
    pub(crate) chunks: AtomicU64,
    pub(crate) chunks_compressed: AtomicU64,
    /// Bytes written to sockets: every frame, headers and compressed data as sent.
    pub(crate) wire_bytes: AtomicU64,
    /// Stream data the shard holds now (its budget's use).
    pub(crate) memory_held: AtomicU64,
    /// Push data received (after decompression), checked by the protocol.
    pub(crate) push_bytes: AtomicU64,
    /// Push data the sinks took.
    pub(crate) sink_bytes: AtomicU64,
}

/// Live counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) connections_refused_auth: AtomicU64,
    pub(crate) streams_open: AtomicU64,
    pub(crate) streams_total: AtomicU64,
    pub(crate) streams_complete: AtomicU64,
    pub(crate) streams_error: AtomicU64,
    pub(crate) streams_cancelled: AtomicU64,
    pub(crate) streams_timeout: AtomicU64,
    pub(crate) streams_rejected: AtomicU64,
    pub(crate) producers_dropped: AtomicU64,
    pub(crate) pushes_open: AtomicU64,
    pub(crate) pushes_total: AtomicU64,
    pub(crate) pushes_complete: AtomicU64,
    pub(crate) pushes_error: AtomicU64,
    pub(crate) pushes_cancelled: AtomicU64,
    pub(crate) pushes_timeout: AtomicU64,
    pub(crate) protocol_errors: [AtomicU64; 4],
    pub(crate) packer_peak: AtomicU64,
    /// TLS handshakes that failed (certificates, alerts, plaintext peers, timeouts).
    pub(crate) tls_handshake_failures: AtomicU64,
    /// The TLS identity, when TLS is on (its expiry and reloads are metrics).
    pub(crate) tls: std::sync::OnceLock<std::sync::Arc<crate::tls::Identity>>,
    pub(crate) shards: Box<[ShardTraffic]>,
    /// Failed and refused streams by code, in the order of [`stream_error_labels`].
    stream_errors: Box<[AtomicU64]>,
    /// The IO backend in use.
    pub(crate) backend: Option<nexus_io::Backend>,
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
    /// Connections refused because their address failed authentication too often.
    pub connections_refused_auth: u64,
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
    /// The same by reason, in the order of [`PROTOCOL_ERROR_CODES`].
    pub protocol_errors_by_reason: [u64; 4],
    /// Stream data bytes handed to the protocol (before compression), as they are sent.
    pub bytes_sent: u64,
    /// Data chunks handed to the protocol.
    pub chunks_sent: u64,
    /// Of those, the chunks sent zstd-compressed.
    pub chunks_compressed: u64,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: u64,
    /// The most chunks one stream has had in preparation (being compressed, or compressed and
    /// waiting for their turn) at once: at most `burst.nexus.stream.parcel.packer.concurrency`.
    pub packer_peak: u64,
    /// Stream data held now, in bytes: read from sources and not yet written to sockets.
    pub memory_held: u64,
    /// Bytes written to sockets: frames as sent (compressed data compressed).
    pub wire_bytes: u64,
    /// Pushes running now.
    pub pushes_open: u64,
    /// Pushes accepted since start.
    pub pushes_total: u64,
    /// Pushes committed (the client got COMPLETE).
    pub pushes_complete: u64,
    /// Pushes failed: checks, sink errors, lost connections.
    pub pushes_error: u64,
    /// Pushes cancelled by their client.
    pub pushes_cancelled: u64,
    /// Pushes ended by the stream timeout.
    pub pushes_timeout: u64,
    /// Push data bytes received (uncompressed).
    pub push_bytes: u64,
    /// Push data bytes the sinks took.
    pub sink_bytes: u64,
}

impl ServerStats {
    /// Counters for a server of `shards` shards.
    pub(crate) fn new(shards: usize, backend: nexus_io::Backend) -> ServerStats {
        ServerStats {
            backend: Some(backend),
            shards: (0..shards).map(|_| ShardTraffic::default()).collect(),
            stream_errors: stream_error_labels().map(|_| AtomicU64::new(0)).collect(),
            ..ServerStats::default()
        }
    }

    /// A stream was refused or failed with `code` (per stream, not per chunk).
    pub(crate) fn stream_failed(&self, code: ErrorCode) {
        if let Some(counter) = self.stream_errors.get(stream_error_index(code)) {
            counter.fetch_add(1, Relaxed);
        }
    }

    /// Failed and refused streams so far, by code label ([`stream_error_labels`]).
    pub fn stream_errors(&self) -> Vec<(&'static str, u64)> {
        stream_error_labels()
            .zip(self.stream_errors.iter())
            .map(|(label, n)| (label, n.load(Relaxed)))
            .collect()
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let by_reason = std::array::from_fn(|i| self.protocol_errors[i].load(Relaxed));
        StatsSnapshot {
            connections_open: self.connections_open.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            connections_refused_auth: self.connections_refused_auth.load(Relaxed),
            streams_open: self.streams_open.load(Relaxed),
            streams_total: self.streams_total.load(Relaxed),
            streams_complete: self.streams_complete.load(Relaxed),
            streams_error: self.streams_error.load(Relaxed),
            streams_cancelled: self.streams_cancelled.load(Relaxed),
            streams_timeout: self.streams_timeout.load(Relaxed),
            streams_rejected: self.streams_rejected.load(Relaxed),
            producers_dropped: self.producers_dropped.load(Relaxed),
            protocol_errors: by_reason.iter().sum(),
            protocol_errors_by_reason: by_reason,
            bytes_sent: self.shards.iter().map(|s| s.bytes.load(Relaxed)).sum(),
            chunks_sent: self.shards.iter().map(|s| s.chunks.load(Relaxed)).sum(),
            chunks_compressed: self
                .shards
                .iter()
                .map(|s| s.chunks_compressed.load(Relaxed))
                .sum(),
            packer_peak: self.packer_peak.load(Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Relaxed),
            memory_held: self
                .shards
                .iter()
                .map(|s| s.memory_held.load(Relaxed))
                .sum(),
            wire_bytes: self.shards.iter().map(|s| s.wire_bytes.load(Relaxed)).sum(),
            pushes_open: self.pushes_open.load(Relaxed),
            pushes_total: self.pushes_total.load(Relaxed),
            pushes_complete: self.pushes_complete.load(Relaxed),
            pushes_error: self.pushes_error.load(Relaxed),
            pushes_cancelled: self.pushes_cancelled.load(Relaxed),
            pushes_timeout: self.pushes_timeout.load(Relaxed),
            push_bytes: self.shards.iter().map(|s| s.push_bytes.load(Relaxed)).sum(),
            sink_bytes: self.shards.iter().map(|s| s.sink_bytes.load(Relaxed)).sum(),
        }
    }
}

/// Adds to a counter that only the calling shard writes: a plain load and store, no locked
/// instruction on the data path.
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed) + n, Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Relaxed);
}
