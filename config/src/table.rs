//! Every `burst.nexus.*` property: the single source of truth for name, type, default, unit
//! and meaning. The environment variable is derived from the name ([`env_name`]).
//!
//! [`env_name`]: crate::env_name

/// What kind of value a property takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A whole number (the unit says of what).
    Integer,
    /// A byte count: digits with an optional unit (`64KiB`, `1GiB`, `10GB`).
    Size,
    /// A duration in milliseconds.
    Millis,
    /// `true` or `false`.
    Bool,
    /// An IP address.
    Address,
    /// `host:port`, or empty to switch the thing off.
    SocketAddress,
    /// A file or directory path.
    Path,
    /// One of a fixed set of words (the description lists them).
    Choice,
    /// Free text.
    Text,
}

impl Type {
    /// The name printed in tables.
    pub fn name(self) -> &'static str {
        match self {
            Type::Integer => "integer",
            Type::Size => "size (`64KiB`, `1GiB`)",
            Type::Millis => "duration (ms)",
            Type::Bool => "bool",
            Type::Address => "IP address",
            Type::SocketAddress => "host:port",
            Type::Path => "path",
            Type::Choice => "choice",
            Type::Text => "text",
        }
    }
}

/// One property.
#[derive(Debug)]
pub struct Property {
    /// `burst.nexus.*`.
    pub name: &'static str,
    /// The kind of value.
    pub ty: Type,
    /// Default, as text; empty when there is none (the value is then computed or absent).
    pub default: &'static str,
    /// Unit of the value, empty when it has none.
    pub unit: &'static str,
    /// What it does.
    pub description: &'static str,
    /// Whether the value is secret (redacted when printed).
    pub secret: bool,
}

const fn p(
    name: &'static str,
    ty: Type,
    default: &'static str,
    unit: &'static str,
    description: &'static str,
) -> Property {
    Property {
        name,
        ty,
        default,
        unit,
        description,
        secret: false,
    }
}

use Type::*;

/// Every property, in the order `nexus config` prints them.
pub const PROPERTIES: &[Property] = &[
    p(
        "burst.nexus.server.bind",
        Address,
        "127.0.0.1",
        "",
        "Address to listen on.",
    ),
    p(
        "burst.nexus.server.port",
        Integer,
        "1270",
        "port",
        "TCP port to listen on.",
    ),
    p(
        "burst.nexus.server.threads",
        Integer,
        "",
        "threads",
        "Shards (threads with their own runtime); default: the number of cores.",
    ),
    p(
        "burst.nexus.server.root",
        Path,
        "",
        "",
        "Directory file: paths are relative to; default: the working directory.",
    ),
    p(
        "burst.nexus.server.upload.root",
        Path,
        "",
        "",
        "Directory pushes to file: write into (uploads); empty, the default: uploads are disabled and a push to file: gets permission_denied.",
    ),
    p(
        "burst.nexus.server.upload.max.size",
        Size,
        "1099511627776",
        "bytes",
        "Largest push a file: sink takes; a larger one gets resource_exhausted and nothing of it is kept.",
    ),
    p(
        "burst.nexus.server.push.window",
        Size,
        "8388608",
        "bytes",
        "Window each push stream gets: the most data one push has in flight or waiting for its sink.",
    ),
    p(
        "burst.nexus.server.follow.symlinks",
        Bool,
        "true",
        "",
        "Follow symlinks under the root that stay under it (checked by the kernel); false: refuse any path through a symlink.",
    ),
    p(
        "burst.nexus.io.backend",
        Choice,
        "auto",
        "",
        "IO backend: auto (io_uring, else epoll with a warning), io_uring (or fail), epoll.",
    ),
    p(
        "burst.nexus.pipe.size",
        Integer,
        "100",
        "chunks",
        "Depth of the queue adapter for producers on other threads.",
    ),
    p(
        "burst.nexus.stream.chunk.size",
        Size,
        "1048576",
        "bytes",
        "Bytes per chunk read from a source.",
    ),
    p(
        "burst.nexus.stream.timeout.ms",
        Millis,
        "60000",
        "ms",
        "A stream whose peer makes no progress this long ends with `timeout`.",
    ),
    p(
        "burst.nexus.stream.progress.ms",
        Millis,
        "1000",
        "ms",
        "How often the server sends PROGRESS on each running stream, also while it waits for credit.",
    ),
    p(
        "burst.nexus.stream.window.max",
        Size,
        "16777216",
        "bytes",
        "Largest per-stream window granted to a client.",
    ),
    p(
        "burst.nexus.stream.parcel.packer.concurrency",
        Integer,
        "2",
        "chunks",
        "Chunks a zstd stream may have in preparation at once: compressed on worker threads (one per shard) ahead of sending, in order, inside the stream's window.",
    ),
    p(
        "burst.nexus.server.max.connections",
        Integer,
        "10000",
        "connections",
        "Most open connections; more get `resource_exhausted`.",
    ),
    p(
        "burst.nexus.server.memory.max",
        Size,
        "1073741824",
        "bytes",
        "Stream data the server holds at once (read from sources, not yet written to sockets), split evenly between shards; over it, running streams pause and new ones get `resource_exhausted`.",
    ),
    p(
        "burst.nexus.server.connection.memory.max",
        Size,
        "67108864",
        "bytes",
        "Stream data one connection holds at once; over it, its streams pause until its client reads.",
    ),
    p(
        "burst.nexus.server.auth.failures.max",
        Integer,
        "10",
        "failures",
        "Failed authentications per client address per minute; past them its connections are refused with `auth_failed` for a backoff doubling from 1 s to 5 min.",
    ),
    p(
        "burst.nexus.server.max.streams",
        Integer,
        "1024",
        "streams",
        "Most concurrent streams per connection.",
    ),
    p(
        "burst.nexus.server.max.frame.size",
        Size,
        "4194304",
        "bytes",
        "Largest frame payload accepted.",
    ),
    p(
        "burst.nexus.server.max.paradata",
        Size,
        "65536",
        "bytes",
        "Longest paradata accepted.",
    ),
    p(
        "burst.nexus.server.max.pending.control",
        Size,
        "1048576",
        "bytes",
        "Frames other than stream data (64 bytes per frame counted besides its own) queued for a client that does not read them; at the limit the server reads nothing more from it.",
    ),
    p(
        "burst.nexus.server.pending.control.timeout.ms",
        Millis,
        "10000",
        "ms",
        "A client that stays at burst.nexus.server.max.pending.control this long is closed with `resource_exhausted`.",
    ),
    p(
        "burst.nexus.server.heartbeat.ms",
        Millis,
        "5000",
        "ms",
        "Longest heartbeat interval.",
    ),
    p(
        "burst.nexus.server.handshake.timeout.ms",
        Millis,
        "10000",
        "ms",
        "Time from connect until the handshake must be done.",
    ),
    p(
        "burst.nexus.server.drain.timeout.ms",
        Millis,
        "30000",
        "ms",
        "On SIGTERM/SIGINT, how long running streams may go on.",
    ),
    p(
        "burst.nexus.server.insecure",
        Bool,
        "false",
        "",
        "Allow a non-loopback bind address without a secret.",
    ),
    p(
        "burst.nexus.server.tls.mode",
        Choice,
        "off",
        "",
        "TLS on the data port: off (plaintext), tls (TLS 1.3; clients prove the shared secret, if one is set) or mutual (TLS 1.3 and a client certificate signed by burst.nexus.server.tls.client.ca, required; it may replace the secret).",
    ),
    p(
        "burst.nexus.server.tls.cert",
        Path,
        "",
        "",
        "PEM certificate chain of the server, leaf first (tls and mutual modes).",
    ),
    p(
        "burst.nexus.server.tls.key",
        Path,
        "",
        "",
        "PEM private key of that certificate.",
    ),
    p(
        "burst.nexus.server.tls.client.ca",
        Path,
        "",
        "",
        "PEM bundle of the CAs that sign client certificates (mutual mode).",
    ),
    p(
        "burst.nexus.server.tls.reload.ms",
        Millis,
        "10000",
        "ms",
        "How often the server checks its TLS files for a change and reloads them (SIGHUP reloads at once); running connections keep their session.",
    ),
    Property {
        name: "burst.nexus.auth.secret",
        ty: Text,
        default: "",
        unit: "",
        description: "Shared secret clients must prove (PROTOCOL.md, authentication).",
        secret: true,
    },
    p(
        "burst.nexus.auth.secret.file",
        Path,
        "",
        "",
        "File holding the shared secret (trailing newline ignored).",
    ),
    p(
        "burst.nexus.admin.address",
        SocketAddress,
        "127.0.0.1:1271",
        "",
        "Admin HTTP endpoint (/metrics, /healthz, /readyz; with a workflow also /runs and POST /sensors/NAME) of `nexus serve` and `nexus run`; empty: none.",
    ),
    p(
        "burst.nexus.admin.tls.cert",
        Path,
        "",
        "",
        "PEM certificate chain for the admin endpoint: with .tls.key it serves https (TLS 1.3) instead of http; empty, the default: http.",
    ),
    p(
        "burst.nexus.admin.tls.key",
        Path,
        "",
        "",
        "PEM private key of the admin endpoint's certificate.",
    ),
    p(
        "burst.nexus.admin.tls.reload.ms",
        Millis,
        "10000",
        "ms",
        "How often the admin endpoint checks its certificate files for a change and reloads them (SIGHUP reloads at once).",
    ),
    p(
        "burst.nexus.log.format",
        Choice,
        "text",
        "",
        "Log lines on stderr: text, or json (one object per line, for containers).",
    ),
    p(
        "burst.nexus.client.threads",
        Integer,
        "",
        "threads",
        "Client IO threads (each with its own runtime); default: the number of cores.",
    ),
    p(
        "burst.nexus.client.connections.per.endpoint",
        Integer,
        "1",
        "connections",
        "Connections per server that a client stripes its streams over.",
    ),
    p(
        "burst.nexus.client.pool.stale.ms",
        Millis,
        "3600000",
        "ms",
        "An idle pooled connection unused this long is closed (alias nexus.client.pool.stale.ms).",
    ),
    p(
        "burst.nexus.client.cache.tender.ms",
        Millis,
        "600000",
        "ms",
        "How often the pool's tender closes stale connections.",
    ),
    p(
        "burst.nexus.client.pool.max.connections",
        Integer,
        "1024",
        "connections",
        "Most pooled connections; beyond it the least recently used idle one is closed.",
    ),
    p(
        "burst.nexus.client.queue.size",
        Integer,
        "100",
        "items",
        "Items a stream's consumer queue holds (memory is bounded by the window either way).",
    ),
    p(
        "burst.nexus.client.first.item.spin.us",
        Integer,
        "50",
        "µs",
        "How long a blocking reader waiting for a stream's first item polls before it sleeps: spares a thread wake-up on the time to first byte; 0: sleep at once.",
    ),
    p(
        "burst.nexus.client.window",
        Size,
        "4194304",
        "bytes",
        "Per-stream window a client asks for: the most data in flight per stream.",
    ),
    p(
        "burst.nexus.client.window.max",
        Size,
        "16777216",
        "bytes",
        "Largest a stream's window grows to (doubling) while its reader keeps up, capped by the server's `burst.nexus.stream.window.max`; a lagging reader keeps the initial window.",
    ),
    p(
        "burst.nexus.client.retry.max",
        Integer,
        "8",
        "retries",
        "Most times a transfer (nexus pull) tries a stream again after a failure that can clear (unreachable, connection lost, draining, timeout).",
    ),
    p(
        "burst.nexus.client.retry.budget.ms",
        Millis,
        "60000",
        "ms",
        "Time from a stream's first try after which no retry starts; the waits between tries double from 100 ms up to 5 s.",
    ),
    p(
        "burst.nexus.client.connect.timeout.ms",
        Millis,
        "10000",
        "ms",
        "Time allowed for a client's TCP connect.",
    ),
    p(
        "burst.nexus.client.tls",
        Bool,
        "false",
        "",
        "Connect with TLS 1.3 (the server's burst.nexus.server.tls.mode must be tls or mutual).",
    ),
    p(
        "burst.nexus.client.tls.ca",
        Path,
        "",
        "",
        "PEM bundle of the CAs that sign server certificates; required with TLS.",
    ),
    p(
        "burst.nexus.client.tls.cert",
        Path,
        "",
        "",
        "PEM certificate chain the client presents (mutual TLS).",
    ),
    p(
        "burst.nexus.client.tls.key",
        Path,
        "",
        "",
        "PEM private key of the client certificate.",
    ),
    p(
        "burst.nexus.client.tls.server.name",
        Text,
        "",
        "",
        "Name the server's certificate must hold; default: the host as given (a name or an IP address).",
    ),
    p(
        "burst.nexus.s3.endpoint",
        Text,
        "",
        "",
        "S3 endpoint URL for the s3 sensor and the s3: source and sink (http:// only where named so, as for a local S3); empty: AWS, for the region. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or the instance's role.",
    ),
    p(
        "burst.nexus.s3.region",
        Text,
        "us-east-1",
        "",
        "S3 region.",
    ),
    p(
        "burst.nexus.s3.buckets",
        Text,
        "",
        "",
        "Comma-separated buckets nexus serve serves as s3:BUCKET/KEY and takes pushes into; empty: none (other buckets are permission_denied).",
    ),
    p(
        "burst.nexus.workflow.state",
        Path,
        "nexus-workflow.db",
        "",
        "The workflow's SQLite database (event log, checkpoints, runs): nexus run, nexus serve --rules and nexus runs use it; a relative path is from the working directory.",
    ),
    p(
        "burst.nexus.workflow.bus",
        Text,
        "embedded",
        "",
        "How nodes share the workflow: embedded (this node runs what its sensors raise), or the AMQP URL of a RabbitMQ broker (amqp://USER:PASSWORD@HOST:PORT/VHOST) whose queues every node with the same rules consumes.",
    ),
    p(
        "burst.nexus.workflow.rule.concurrency",
        Integer,
        "4",
        "runs",
        "Runs of one rule at once, unless the rule sets concurrency.",
    ),
    p(
        "burst.nexus.workflow.step.retries",
        Integer,
        "3",
        "retries",
        "Times a failed workflow step is tried again, unless the step sets retries.",
    ),
    p(
        "burst.nexus.workflow.step.backoff.ms",
        Millis,
        "1000",
        "ms",
        "Wait before a step's first retry, doubling after each (at most 5 min), unless the step sets backoff.",
    ),
    p(
        "burst.nexus.workflow.step.timeout.ms",
        Millis,
        "3600000",
        "ms",
        "Longest one try of a workflow step, unless the step sets timeout.",
    ),
    p(
        "burst.nexus.workflow.retention.ms",
        Millis,
        "604800000",
        "ms",
        "How long the workflow keeps events that ended, with their runs and steps (open ones stay whatever their age); deleted every 10 minutes.",
    ),
    p(
        "burst.nexus.workflow.streams.events",
        Choice,
        "all",
        "",
        "Which stream ends become events of the streams sensor: all (the event log sees every one), or rules (only those a rule's filter matches; with no rule on streams, nexus serve --rules does not watch its streams at all).",
    ),
    p(
        "burst.nexus.workflow.http.body.max",
        Size,
        "1MiB",
        "bytes",
        "Largest body POST /sensors/NAME on the admin endpoint takes (413 above).",
    ),
];

/// Other names accepted for a property (as `-D`, in a file and as environment variables), for
/// operators of the original system. The canonical name wins when both are set.
pub const ALIASES: &[(&str, &str)] = &[(
    "nexus.client.pool.stale.ms",
    "burst.nexus.client.pool.stale.ms",
)];
