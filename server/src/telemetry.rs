//! The server's telemetry. Counters and gauges are plain atomics (`ServerStats`: per shard
//! for what changes per chunk, so the data path never shares a cache line between cores),
//! always on and readable without a metrics recorder; [`publish`] copies them into the
//! `metrics` facade, under the names in [`names`], just before a scrape renders (the admin
//! endpoint, `crate::admin`, does it). The client does the same (`nexus_client::telemetry`):
//! one model for both sides. Histograms are the exception the facade forces: a Prometheus
//! histogram is built from samples, so each stream's duration, size and time to first byte
//! go to the facade when they happen, through handles a shard takes once.
//!
//! Also here: a limiter that keeps a hostile client from flooding the logs.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::stats::{ServerStats, PROTOCOL_ERROR_CODES};

/// The Prometheus names of the server's metrics. Labels come from small fixed sets: never a
/// stream id or a peer address. Meters of the original system become `_total` counters
/// (their rates are PromQL's `rate()`).
pub mod names {
    /// Streams with a running producer on this server (original: `nexus.server.gauge`).
    pub const STREAMS_ACTIVE: &str = "nexus_server_streams_active";
    /// Open client connections (original: `nexus.server.connection.gauge`).
    pub const CONNECTIONS: &str = "nexus_server_connections";
    /// Chunks the server sent (original meter: `nexus.press.items.rate.meter`).
    pub const PRESS_ITEMS: &str = "nexus_press_items_total";
    /// Stream data bytes the server sent, before compression (original meter:
    /// `nexus.press.bytes.rate.meter`).
    pub const PRESS_BYTES: &str = "nexus_press_bytes_total";
    /// Chunks the server sent zstd-compressed (a subset of `nexus_press_items_total`).
    pub const CHUNKS_COMPRESSED: &str = "nexus_server_chunks_compressed_total";
    /// Stream requests refused before they started (original meter:
    /// `nexus.press.reject.rate.meter`).
    pub const PRESS_REJECTS: &str = "nexus_press_rejects_total";
    /// Streams the server finished, by `outcome`: complete, cancelled, error, timeout.
    pub const STREAMS_FINISHED: &str = "nexus_server_streams_finished_total";
    /// Streams the server accepted.
    pub const STREAMS_STARTED: &str = "nexus_server_streams_started_total";
    /// Connections the server accepted.
    pub const CONNECTIONS_ACCEPTED: &str = "nexus_server_connections_accepted_total";
    /// Connections refused at `burst.nexus.server.max.connections`.
    pub const CONNECTIONS_REFUSED: &str = "nexus_server_connections_refused_total";
    /// Connections closed because the peer broke the protocol, by `reason` (an error code).
    pub const PROTOCOL_ERRORS: &str = "nexus_protocol_errors_total";
    /// Seconds from a stream's start to its end on the server.
    pub const STREAM_DURATION: &str = "nexus_server_stream_duration_seconds";
    /// Bytes a stream sent, at its end on the server.
    pub const STREAM_SIZE: &str = "nexus_server_stream_size_bytes";
    /// 1, labelled with the IO `backend` in use: io_uring or epoll.
    pub const IO_BACKEND: &str = "nexus_io_backend";
    /// 1, labelled with the `version` of the binary.
    pub const BUILD_INFO: &str = "nexus_build_info";
    /// 1 while the server accepts new streams, 0 while starting or draining.
    pub const READY: &str = "nexus_server_ready";
    /// Time from a stream's INITIATE to its first chunk handed to the connection.
    pub const TIME_TO_FIRST_BYTE: &str = "nexus_server_time_to_first_byte_seconds";
    /// Bytes written to sockets (frames as sent: compressed data compressed), beside the payload
    /// of [`PRESS_BYTES`].
    pub const WIRE_BYTES: &str = "nexus_server_wire_bytes_total";
    /// Streams refused or failed, by error code.
    pub const STREAMS_FAILED: &str = "nexus_server_streams_failed_total";
    /// CPU time of the process (user and system), seconds.
    pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
    /// Resident memory of the process, bytes.
    pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
    /// Open file descriptors of the process.
    pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
    /// The process's limit of open file descriptors.
    pub const PROCESS_MAX_FDS: &str = "process_max_fds";
    /// When the process started, seconds since the Unix epoch.
    pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
    /// Stream data the server holds now: read from sources, not yet written to sockets.
    pub const MEMORY_HELD: &str = "nexus_server_stream_memory_bytes";
    /// Push streams running.
    pub const PUSHES_ACTIVE: &str = "nexus_server_pushes_active";
    /// Push streams accepted.
    pub const PUSHES_STARTED: &str = "nexus_server_pushes_started_total";
    /// Push streams finished, by outcome.
    pub const PUSHES_FINISHED: &str = "nexus_server_pushes_finished_total";
    /// Push data received.
    pub const PUSH_BYTES: &str = "nexus_server_push_bytes_total";
    /// Push data the sinks took.
    pub const SINK_BYTES: &str = "nexus_server_sink_bytes_written_total";
    /// Time to make a push durable.
    pub const PUSH_COMMIT: &str = "nexus_server_push_commit_seconds";
    /// Push duration.
    pub const PUSH_DURATION: &str = "nexus_server_push_duration_seconds";
    /// Seconds until the data port's TLS certificate expires (negative once it has); only
    /// with TLS on.
    pub const TLS_CERT_EXPIRY: &str = "nexus_server_tls_certificate_expiry_seconds";
    /// TLS handshakes that failed (refused certificates, plaintext peers, timeouts).
    pub const TLS_HANDSHAKE_FAILURES: &str = "nexus_server_tls_handshake_failures_total";
    /// TLS identity reloads, by `outcome`: ok or failed.
    pub const TLS_RELOADS: &str = "nexus_server_tls_reloads_total";
    /// Seconds until the admin endpoint's certificate expires (negative once it has); only
    /// with https on the admin endpoint.
    pub const ADMIN_TLS_CERT_EXPIRY: &str = "nexus_admin_tls_certificate_expiry_seconds";
    /// Admin certificate reloads, by `outcome`: ok or failed.
    pub const ADMIN_TLS_RELOADS: &str = "nexus_admin_tls_reloads_total";
}

/// Bucket bounds of [`names::STREAM_DURATION`], in seconds: 1 ms to an hour.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
];
/// Bucket bounds of [`names::STREAM_SIZE`], in bytes: 4 KiB to 1 TiB, by factors of 16.
pub const SIZE_BUCKETS: &[f64] = &[
    4096.0,
    65536.0,
    1048576.0,
    16777216.0,
    268435456.0,
    4294967296.0,
    68719476736.0,
    1099511627776.0,
];
/// Bucket bounds of [`names::TIME_TO_FIRST_BYTE`], in seconds: 50 us to 10 s.
pub const FIRST_BYTE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The server's metrics for the README and the exporter's descriptions: Prometheus name,
/// type, labels, name in the original system, meaning.
pub const METRICS: &[(&str, &str, &str, &str, &str)] = &[
    (
        names::STREAMS_ACTIVE,
        "gauge",
        "",
        "nexus.server.gauge",
        "Streams with a running producer.",
    ),
    (
        names::CONNECTIONS,
        "gauge",
        "",
        "nexus.server.connection.gauge",
        "Open client connections.",
    ),
    (
        names::PRESS_ITEMS,
        "counter",
        "",
        "nexus.press.items.rate.meter",
        "Chunks sent.",
    ),
    (
        names::PRESS_BYTES,
        "counter",
        "",
        "nexus.press.bytes.rate.meter",
        "Stream bytes sent (before compression).",
    ),
    (
        names::CHUNKS_COMPRESSED,
        "counter",
        "",
        "",
        "Chunks sent zstd-compressed (streams that asked for zstd, chunks that shrank).",
    ),
    (
        names::PRESS_REJECTS,
        "counter",
        "",
        "nexus.press.reject.rate.meter",
        "Stream requests refused before they started.",
    ),
    (
        names::STREAMS_STARTED,
        "counter",
        "",
        "",
        "Streams accepted.",
    ),
    (
        names::STREAMS_FINISHED,
        "counter",
        "outcome",
        "",
        "Streams finished: complete, cancelled, error, timeout.",
    ),
    (
        names::STREAM_DURATION,
        "histogram",
        "",
        "",
        "Stream duration, seconds.",
    ),
    (
        names::STREAM_SIZE,
        "histogram",
        "",
        "",
        "Stream size, bytes.",
    ),
    (
        names::CONNECTIONS_ACCEPTED,
        "counter",
        "",
        "",
        "Connections accepted.",
    ),
    (
        names::CONNECTIONS_REFUSED,
        "counter",
        "reason",
        "",
        "Connections refused before their handshake: connection_limit, auth_throttled (an address that failed authentication too often).",
    ),
    (
        names::PROTOCOL_ERRORS,
        "counter",
        "reason",
        "",
        "Connections closed for a protocol violation, by error code.",
    ),
    (
        names::READY,
        "gauge",
        "",
        "",
        "1 when serving, 0 while starting or draining.",
    ),
    (
        names::IO_BACKEND,
        "gauge",
        "backend",
        "",
        "1 for the IO backend in use.",
    ),
    (names::BUILD_INFO, "gauge", "version", "", "1, with the version."),
    (
        names::MEMORY_HELD,
        "gauge",
        "",
        "",
        "Stream data held now (read from sources, not yet written); bounded by burst.nexus.server.memory.max.",
    ),
    (
        names::TIME_TO_FIRST_BYTE,
        "histogram",
        "",
        "",
        "Time from a stream's INITIATE to its first chunk, seconds.",
    ),
    (
        names::WIRE_BYTES,
        "counter",
        "",
        "",
        "Bytes written to sockets, frames as sent (compressed chunks compressed): beside nexus_press_bytes_total, the payload.",
    ),
    (
        names::STREAMS_FAILED,
        "counter",
        "code",
        "",
        "Streams refused or failed, by error code (the codes of PROTOCOL.md and SOURCES.md, or other).",
    ),
    (
        names::PUSHES_ACTIVE,
        "gauge",
        "",
        "",
        "Push streams running (client to server, into a sink).",
    ),
    (
        names::PUSHES_STARTED,
        "counter",
        "",
        "",
        "Push streams accepted.",
    ),
    (
        names::PUSHES_FINISHED,
        "counter",
        "outcome",
        "",
        "Push streams finished: complete (committed), cancelled, error, timeout.",
    ),
    (
        names::PUSH_BYTES,
        "counter",
        "",
        "",
        "Push data received, uncompressed, after the protocol's checks.",
    ),
    (
        names::SINK_BYTES,
        "counter",
        "",
        "",
        "Push data the sinks took (written to files, discarded by discard:).",
    ),
    (
        names::PUSH_COMMIT,
        "histogram",
        "",
        "",
        "Time a sink took to make a push durable (sync and rename for file:), seconds.",
    ),
    (
        names::PUSH_DURATION,
        "histogram",
        "",
        "",
        "Push duration, seconds.",
    ),
    (names::PROCESS_CPU, "counter", "", "", "CPU time of the process, user and system, seconds."),
    (names::PROCESS_RSS, "gauge", "", "", "Resident memory of the process, bytes."),
    (names::PROCESS_OPEN_FDS, "gauge", "", "", "Open file descriptors."),
    (names::PROCESS_MAX_FDS, "gauge", "", "", "The limit of open file descriptors."),
    (
        names::TLS_CERT_EXPIRY,
        "gauge",
        "",
        "",
        "Seconds until the data port's TLS certificate expires (negative once it has); only with TLS on.",
    ),
    (
        names::TLS_HANDSHAKE_FAILURES,
        "counter",
        "",
        "",
        "TLS handshakes that failed: refused certificates, plaintext clients, timeouts.",
    ),
    (
        names::TLS_RELOADS,
        "counter",
        "outcome",
        "",
        "Reloads of the TLS files (on change or SIGHUP), by outcome: ok or failed.",
    ),
    (
        names::ADMIN_TLS_CERT_EXPIRY,
        "gauge",
        "",
        "",
        "Seconds until the admin endpoint's https certificate expires (negative once it has); only with https on the admin endpoint.",
    ),
    (
        names::ADMIN_TLS_RELOADS,
        "counter",
        "outcome",
        "",
        "Reloads of the admin endpoint's certificate files (on change or SIGHUP), by outcome: ok or failed.",
    ),
    (
        names::PROCESS_START_TIME,
        "gauge",
        "",
        "",
        "When the process started, seconds since the Unix epoch.",
    ),
];

/// Copies `stats` and the process's own figures into the `metrics` facade (a no-op without a
/// recorder). Call it just before rendering a scrape.
pub fn publish(stats: &ServerStats) {
    use metrics::{counter, gauge};
    publish_process();
    gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    if let Some(backend) = stats.backend {
        gauge!(names::IO_BACKEND, "backend" => backend.to_string()).set(1.0);
    }
    let s = stats.snapshot();
    gauge!(names::STREAMS_ACTIVE).set(s.streams_open as f64);
    gauge!(names::CONNECTIONS).set(s.connections_open as f64);
    gauge!(names::MEMORY_HELD).set(s.memory_held as f64);
    counter!(names::PRESS_ITEMS).absolute(s.chunks_sent);
    counter!(names::PRESS_BYTES).absolute(s.bytes_sent);
    counter!(names::CHUNKS_COMPRESSED).absolute(s.chunks_compressed);
    counter!(names::PRESS_REJECTS).absolute(s.streams_rejected);
    counter!(names::STREAMS_STARTED).absolute(s.streams_total);
    counter!(names::WIRE_BYTES).absolute(s.wire_bytes);
    gauge!(names::PUSHES_ACTIVE).set(s.pushes_open as f64);
    counter!(names::PUSHES_STARTED).absolute(s.pushes_total);
    counter!(names::PUSH_BYTES).absolute(s.push_bytes);
    counter!(names::SINK_BYTES).absolute(s.sink_bytes);
    for (outcome, value) in [
        ("complete", s.pushes_complete),
        ("cancelled", s.pushes_cancelled),
        ("error", s.pushes_error),
        ("timeout", s.pushes_timeout),
    ] {
        counter!(names::PUSHES_FINISHED, "outcome" => outcome).absolute(value);
    }
    for (outcome, value) in [
        ("complete", s.streams_complete),
        ("cancelled", s.streams_cancelled),
        ("error", s.streams_error),
        ("timeout", s.streams_timeout),
    ] {
        counter!(names::STREAMS_FINISHED, "outcome" => outcome).absolute(value);
    }
    for (code, value) in stats.stream_errors() {
        counter!(names::STREAMS_FAILED, "code" => code).absolute(value);
    }
    counter!(names::CONNECTIONS_ACCEPTED).absolute(s.connections_total);
    counter!(names::CONNECTIONS_REFUSED, "reason" => "connection_limit")
        .absolute(s.connections_refused);
    counter!(names::CONNECTIONS_REFUSED, "reason" => "auth_throttled")
        .absolute(s.connections_refused_auth);
    for (code, value) in PROTOCOL_ERROR_CODES.iter().zip(s.protocol_errors_by_reason) {
        let reason = code.name().unwrap_or("unknown");
        counter!(names::PROTOCOL_ERRORS, "reason" => reason).absolute(value);
    }
    if let Some(identity) = stats.tls.get() {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(seconds) = identity.expires_in() {
            gauge!(names::TLS_CERT_EXPIRY).set(seconds);
        }
        counter!(names::TLS_HANDSHAKE_FAILURES)
            .absolute(stats.tls_handshake_failures.load(Relaxed));
        counter!(names::TLS_RELOADS, "outcome" => "ok").absolute(identity.reloads.load(Relaxed));
        counter!(names::TLS_RELOADS, "outcome" => "failed")
            .absolute(identity.reload_failures.load(Relaxed));
    }
}

/// The process metrics Prometheus's own clients export, read from /proc at scrape time.
fn publish_process() {
    use metrics::{counter, gauge};
    let ticks = rustix::param::clock_ticks_per_second();
    let page = rustix::param::page_size() as u64;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) closed by ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if let (Some(utime), Some(stime), true) = (field(14), field(15), ticks > 0) {
            // The facade's counters are whole numbers: whole seconds, enough for rate().
            counter!(names::PROCESS_CPU).absolute((utime + stime) / ticks);
        }
        if let Some(pages) = field(24) {
            gauge!(names::PROCESS_RSS).set((pages * page) as f64);
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(start), Some(boot), true) = (field(22), boot, ticks > 0) {
            gauge!(names::PROCESS_START_TIME).set(boot as f64 + start as f64 / ticks as f64);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!(names::PROCESS_OPEN_FDS).set(fds.count() as f64);
    }
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(limit) = limit {
        gauge!(names::PROCESS_MAX_FDS).set(limit as f64);
    }
}

/// Describes the server's metrics to the installed recorder (its `# HELP` lines).
pub fn describe() {
    for (name, kind, _, _, meaning) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *meaning),
            "histogram" => metrics::describe_histogram!(*name, *meaning),
            _ => metrics::describe_gauge!(*name, *meaning),
        }
    }
}

/// Handles to the stream histograms, taken once per shard so that recording one is an atomic
/// push into a bucket, not a registry lookup.
pub(crate) struct ShardMetrics {
    duration: metrics::Histogram,
    size: metrics::Histogram,
    first_byte: metrics::Histogram,
    push_duration: metrics::Histogram,
    commit: metrics::Histogram,
}

impl ShardMetrics {
    pub(crate) fn new() -> ShardMetrics {
        ShardMetrics {
            duration: metrics::histogram!(names::STREAM_DURATION),
            size: metrics::histogram!(names::STREAM_SIZE),
            first_byte: metrics::histogram!(names::TIME_TO_FIRST_BYTE),
            push_duration: metrics::histogram!(names::PUSH_DURATION),
            commit: metrics::histogram!(names::PUSH_COMMIT),
        }
    }

    /// A stream's first chunk went to its connection `elapsed` after its INITIATE.
    pub(crate) fn first_byte(&self, elapsed: Duration) {
        self.first_byte.record(elapsed.as_secs_f64());
    }

    /// A push ended after `elapsed`, its sink having taken `bytes`.
    pub(crate) fn push_ended(&self, elapsed: Duration, _bytes: u64) {
        self.push_duration.record(elapsed.as_secs_f64());
    }

    /// A sink committed a push in `elapsed`.
    pub(crate) fn commit(&self, elapsed: Duration) {
        self.commit.record(elapsed.as_secs_f64());
    }

    /// A stream ended after `elapsed`, having sent `bytes`.
    pub(crate) fn stream_ended(&self, elapsed: Duration, bytes: u64) {
        self.duration.record(elapsed.as_secs_f64());
        self.size.record(bytes as f64);
    }
}

/// Lets through at most `burst` lines per `window`; says how many it held back since.
pub(crate) struct LogLimiter {
    window: Duration,
    burst: u32,
    started: Cell<Option<Instant>>,
    allowed: Cell<u32>,
    suppressed: Cell<u64>,
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            window,
            burst,
            started: Cell::new(None),
            allowed: Cell::new(0),
            suppressed: Cell::new(0),
        }
    }

    /// `Some(lines suppressed since the last one let through)` if a line may be logged now.
    pub(crate) fn allow(&self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .get()
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if fresh {
            self.started.set(Some(now));
            self.allowed.set(0);
        }
        if self.allowed.get() >= self.burst {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.allowed.set(self.allowed.get() + 1);
        Some(self.suppressed.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_a_burst_through_per_window_and_counts_the_rest() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let firsts: Vec<_> = (0..3).map(|_| limiter.allow(t0)).collect();
        assert_eq!(firsts, vec![Some(0), Some(0), Some(0)]);
        for i in 0..100 {
            assert_eq!(limiter.allow(t0 + Duration::from_millis(i)), None);
        }
        // The next window lets lines through again and reports the 100 held back once.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limiter.allow(t1), Some(100));
        assert_eq!(limiter.allow(t1), Some(0));
    }
}
