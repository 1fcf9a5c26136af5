//! The server's settings. Each field maps to one `burst.nexus.*` property; the `nexus` binary
//! fills this struct from flags, the environment and defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use nexus_protocol::ServerSettings;

use crate::io::BackendChoice;

/// Everything a [`Server`](crate::Server) needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (`burst.nexus.server.bind`, default 127.0.0.1).
    pub bind: IpAddr,
    /// TCP port (`burst.nexus.server.port`, default 1270; 0 picks a free one).
    pub port: u16,
    /// Shards: OS threads, each with its own runtime and listening socket
    /// (`burst.nexus.server.threads`, default the number of cores).
    pub threads: usize,
    /// IO backend (`burst.nexus.io.backend`, default auto).
    pub backend: BackendChoice,
    /// Directory `file:` paths are relative to (`burst.nexus.server.root`, default the
    /// working directory).
    pub root: PathBuf,
    /// Bytes per chunk read from a source (`burst.nexus.stream.chunk.size`, default 1 MiB).
    /// Memory: one buffer per producing stream, plus the client's window.
    pub chunk_size: usize,
    /// Depth in chunks of the queue adapter (`burst.nexus.pipe.size`, default 100).
    pub pipe_size: usize,
    /// Most open connections over all shards (`burst.nexus.server.max.connections`, default
    /// 10000); further connections get ERROR `resource_exhausted` and are closed.
    pub max_connections: usize,
    /// How long running streams may go on after a shutdown starts
    /// (`burst.nexus.server.drain.timeout.ms`, default 30 s).
    pub drain_timeout: Duration,
    /// Allow a non-loopback bind address without a secret (`burst.nexus.server.insecure`).
    pub insecure: bool,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Protocol limits and timers: max frame size, streams per connection, window, heartbeat,
    /// handshake deadline, stream timeout, secret.
    pub protocol: ServerSettings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 1270,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: BackendChoice::Auto,
            root: PathBuf::from("."),
            chunk_size: 1 << 20,
            pipe_size: 100,
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            insecure: false,
            ring_entries: 256,
            protocol: ServerSettings::default(),
        }
    }
}
