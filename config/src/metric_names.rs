//! Every metric Nexus exports, in one place: the Prometheus name, and the name operators of
//! the original system know it by. Meters of the original become `_total` counters (their
//! rates are PromQL's `rate()`). Labels are from small fixed sets: never a stream id or a
//! peer address.

/// Streams with a running producer on this server (original: `nexus.server.gauge`).
pub const SERVER_STREAMS_ACTIVE: &str = "nexus_server_streams_active";
/// Open client connections of this server (original: `nexus.server.connection.gauge`).
pub const SERVER_CONNECTIONS: &str = "nexus_server_connections";
/// Streams open in this client process (original: `nexus.client.gauge`).
pub const CLIENT_STREAMS_ACTIVE: &str = "nexus_client_streams_active";
/// Open connections of this client process (original: `nexus.client.connection.gauge`).
pub const CLIENT_CONNECTIONS: &str = "nexus_client_connections";
/// Chunks the server sent (original meter: `nexus.press.items.rate.meter`).
pub const PRESS_ITEMS: &str = "nexus_press_items_total";
/// Stream data bytes the server sent, before compression (original meter:
/// `nexus.press.bytes.rate.meter`).
pub const PRESS_BYTES: &str = "nexus_press_bytes_total";
/// Chunks the server sent zstd-compressed (a subset of `nexus_press_items_total`).
pub const SERVER_CHUNKS_COMPRESSED: &str = "nexus_server_chunks_compressed_total";
/// Stream requests refused before they started (original meter:
/// `nexus.press.reject.rate.meter`).
pub const PRESS_REJECTS: &str = "nexus_press_rejects_total";
/// Streams the server finished, by `outcome`: complete, cancelled, error, timeout.
pub const SERVER_STREAMS_FINISHED: &str = "nexus_server_streams_finished_total";
/// Streams the server accepted.
pub const SERVER_STREAMS_STARTED: &str = "nexus_server_streams_started_total";
/// Connections the server accepted.
pub const SERVER_CONNECTIONS_ACCEPTED: &str = "nexus_server_connections_accepted_total";
/// Connections refused at `burst.nexus.server.max.connections`.
pub const SERVER_CONNECTIONS_REFUSED: &str = "nexus_server_connections_refused_total";
/// Connections closed because the peer broke the protocol, by `reason` (an error code).
pub const PROTOCOL_ERRORS: &str = "nexus_protocol_errors_total";
/// Seconds from a stream's start to its end on the server.
pub const SERVER_STREAM_DURATION: &str = "nexus_server_stream_duration_seconds";
/// Bytes a stream sent, at its end on the server.
pub const SERVER_STREAM_SIZE: &str = "nexus_server_stream_size_bytes";
/// Stream data bytes this client process received (uncompressed).
pub const CLIENT_BYTES_RECEIVED: &str = "nexus_client_bytes_received_total";
/// Streams this client process finished, by `outcome`: complete, cancelled, error, timeout.
pub const CLIENT_STREAMS_FINISHED: &str = "nexus_client_streams_finished_total";
/// Pooled connections the client closed, by `reason`: stale, capacity, dead, closed.
pub const CLIENT_POOL_EVICTIONS: &str = "nexus_client_pool_evictions_total";
/// 1, labelled with the IO `backend` in use: io_uring or epoll.
pub const IO_BACKEND: &str = "nexus_io_backend";
/// 1, labelled with the `version` of the binary and the protocol versions.
pub const BUILD_INFO: &str = "nexus_build_info";
/// 1 while the server accepts new streams, 0 while starting or draining.
pub const SERVER_READY: &str = "nexus_server_ready";

/// Bucket bounds of [`SERVER_STREAM_DURATION`], in seconds: 1 ms to an hour.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
];
/// Bucket bounds of [`SERVER_STREAM_SIZE`], in bytes: 4 KiB to 1 TiB, by factors of 16.
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

/// Time from a stream's INITIATE to its first chunk handed to the connection.
pub const SERVER_TIME_TO_FIRST_BYTE: &str = "nexus_server_time_to_first_byte_seconds";
/// Bucket bounds of [`SERVER_TIME_TO_FIRST_BYTE`], in seconds: 50 us to 10 s.
pub const FIRST_BYTE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];
/// Bytes written to sockets (frames as sent: compressed data compressed), beside the payload
/// of [`PRESS_BYTES`].
pub const SERVER_WIRE_BYTES: &str = "nexus_server_wire_bytes_total";
/// Streams refused or failed, by error code.
pub const SERVER_STREAMS_FAILED: &str = "nexus_server_streams_failed_total";
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
pub const SERVER_MEMORY_HELD: &str = "nexus_server_stream_memory_bytes";

/// The README's metric table: Prometheus name, type, labels, original name, meaning.
pub const TABLE: &[(&str, &str, &str, &str, &str)] = &[
    (
        SERVER_STREAMS_ACTIVE,
        "gauge",
        "",
        "nexus.server.gauge",
        "Streams with a running producer.",
    ),
    (
        SERVER_CONNECTIONS,
        "gauge",
        "",
        "nexus.server.connection.gauge",
        "Open client connections.",
    ),
    (
        CLIENT_STREAMS_ACTIVE,
        "gauge",
        "",
        "nexus.client.gauge",
        "Streams open in a client process.",
    ),
    (
        CLIENT_CONNECTIONS,
        "gauge",
        "",
        "nexus.client.connection.gauge",
        "Open connections of a client process.",
    ),
    (
        PRESS_ITEMS,
        "counter",
        "",
        "nexus.press.items.rate.meter",
        "Chunks sent.",
    ),
    (
        PRESS_BYTES,
        "counter",
        "",
        "nexus.press.bytes.rate.meter",
        "Stream bytes sent (before compression).",
    ),
    (
        SERVER_CHUNKS_COMPRESSED,
        "counter",
        "",
        "",
        "Chunks sent zstd-compressed (streams that asked for zstd, chunks that shrank).",
    ),
    (
        PRESS_REJECTS,
        "counter",
        "",
        "nexus.press.reject.rate.meter",
        "Stream requests refused before they started.",
    ),
    (
        SERVER_STREAMS_STARTED,
        "counter",
        "",
        "",
        "Streams accepted.",
    ),
    (
        SERVER_STREAMS_FINISHED,
        "counter",
        "outcome",
        "",
        "Streams finished: complete, cancelled, error, timeout.",
    ),
    (
        SERVER_STREAM_DURATION,
        "histogram",
        "",
        "",
        "Stream duration, seconds.",
    ),
    (
        SERVER_STREAM_SIZE,
        "histogram",
        "",
        "",
        "Stream size, bytes.",
    ),
    (
        SERVER_CONNECTIONS_ACCEPTED,
        "counter",
        "",
        "",
        "Connections accepted.",
    ),
    (
        SERVER_CONNECTIONS_REFUSED,
        "counter",
        "reason",
        "",
        "Connections refused before their handshake: connection_limit, auth_throttled (an address that failed authentication too often).",
    ),
    (
        PROTOCOL_ERRORS,
        "counter",
        "reason",
        "",
        "Connections closed for a protocol violation, by error code.",
    ),
    (
        CLIENT_BYTES_RECEIVED,
        "counter",
        "",
        "",
        "Stream bytes a client process received.",
    ),
    (
        CLIENT_STREAMS_FINISHED,
        "counter",
        "outcome",
        "",
        "Streams a client process finished.",
    ),
    (
        CLIENT_POOL_EVICTIONS,
        "counter",
        "reason",
        "",
        "Pooled connections closed: stale, capacity, dead, closed.",
    ),
    (
        SERVER_READY,
        "gauge",
        "",
        "",
        "1 when serving, 0 while starting or draining.",
    ),
    (
        IO_BACKEND,
        "gauge",
        "backend",
        "",
        "1 for the IO backend in use.",
    ),
    (BUILD_INFO, "gauge", "version", "", "1, with the version."),
    (
        SERVER_MEMORY_HELD,
        "gauge",
        "",
        "",
        "Stream data held now (read from sources, not yet written); bounded by burst.nexus.server.memory.max.",
    ),
    (
        SERVER_TIME_TO_FIRST_BYTE,
        "histogram",
        "",
        "",
        "Time from a stream's INITIATE to its first chunk, seconds.",
    ),
    (
        SERVER_WIRE_BYTES,
        "counter",
        "",
        "",
        "Bytes written to sockets, frames as sent (compressed chunks compressed): beside nexus_press_bytes_total, the payload.",
    ),
    (
        SERVER_STREAMS_FAILED,
        "counter",
        "code",
        "",
        "Streams refused or failed, by error code (the codes of PROTOCOL.md and SOURCES.md, or other).",
    ),
    (PROCESS_CPU, "counter", "", "", "CPU time of the process, user and system, seconds."),
    (PROCESS_RSS, "gauge", "", "", "Resident memory of the process, bytes."),
    (PROCESS_OPEN_FDS, "gauge", "", "", "Open file descriptors."),
    (PROCESS_MAX_FDS, "gauge", "", "", "The limit of open file descriptors."),
    (
        PROCESS_START_TIME,
        "gauge",
        "",
        "",
        "When the process started, seconds since the Unix epoch.",
    ),
];

/// [`TABLE`] as Markdown.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| Prometheus metric | type | labels | original name | meaning |\n|---|---|---|---|---|\n",
    );
    for (name, kind, labels, original, meaning) in TABLE {
        let labels = if labels.is_empty() {
            "-".to_string()
        } else {
            format!("`{labels}`")
        };
        let original = if original.is_empty() {
            "-".to_string()
        } else {
            format!("`{original}`")
        };
        out.push_str(&format!(
            "| `{name}` | {kind} | {labels} | {original} | {meaning} |\n"
        ));
    }
    out
}
