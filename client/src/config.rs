//! What a client is configured with. The `nexus` binary fills it from `burst.nexus.client.*`
//! properties; embedders build it directly.

use std::time::Duration;

use nexus_io::BackendChoice;
use nexus_protocol::ClientSettings;

/// Client configuration; `Default` gives the documented property defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// IO threads, each with its own runtime (`burst.nexus.client.threads`, default: cores).
    pub threads: usize,
    /// IO backend (`burst.nexus.io.backend`): io_uring, epoll, or auto with fallback.
    pub backend: BackendChoice,
    /// Connections per endpoint that streams are striped over
    /// (`burst.nexus.client.connections.per.endpoint`, default 1).
    pub connections_per_endpoint: usize,
    /// An idle pooled connection unused this long is closed by the tender
    /// (`burst.nexus.client.pool.stale.ms`, default 1 h).
    pub pool_stale: Duration,
    /// How often the tender looks at idle connections (`burst.nexus.client.cache.tender.ms`,
    /// default 10 min).
    pub tender_interval: Duration,
    /// Most pooled connections; beyond it the least recently used idle one is closed
    /// (`burst.nexus.client.pool.max.connections`, default 1024).
    pub max_connections: usize,
    /// Items a stream's queue holds before the IO thread keeps the rest aside
    /// (`burst.nexus.client.queue.size`, default 100). Memory is bounded by the window either way.
    pub queue_size: usize,
    /// Time allowed for TCP connect (`burst.nexus.client.connect.timeout.ms`, default 10 s).
    pub connect_timeout: Duration,
    /// Protocol limits and timers: window, frame size, heartbeat, handshake deadline, stream
    /// timeout (`burst.nexus.stream.timeout.ms`), secret (`burst.nexus.auth.secret`).
    pub protocol: ClientSettings,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            backend: BackendChoice::Auto,
            connections_per_endpoint: 1,
            pool_stale: Duration::from_secs(3600),
            tender_interval: Duration::from_secs(600),
            max_connections: 1024,
            queue_size: 100,
            connect_timeout: Duration::from_secs(10),
            protocol: ClientSettings::default(),
        }
    }
}
