//! The server's settings. Each field maps to one `burst.nexus.*` property
//! ([`ServerConfig::from_values`]); embedders may also build it directly.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use nexus_config::{bind, BadValue, Binding, Values};
use nexus_protocol::ServerSettings;

use crate::io::tls::{Mode as TlsMode, ServerFiles};
use crate::io::BackendChoice;

/// An empty path means "not set".
fn non_empty(path: PathBuf) -> Option<PathBuf> {
    (!path.as_os_str().is_empty()).then_some(path)
}

/// Everything a [`Server`](crate::Server) needs to start.
#[derive(Debug, Clone, PartialEq)]
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
    /// Directory pushes to `file:` write into (`burst.nexus.server.upload.root`); `None`, the
    /// default: uploads are off.
    pub upload_root: Option<PathBuf>,
    /// Largest push a `file:` sink takes (`burst.nexus.server.upload.max.size`, 1 TiB).
    pub upload_max_size: u64,
    /// Follow symlinks under the root that stay under it (`burst.nexus.server.follow.symlinks`,
    /// default true); off, a `file:` path through any symlink is `permission_denied`.
    pub follow_symlinks: bool,
    /// Bytes per chunk read from a source (`burst.nexus.stream.chunk.size`, default 1 MiB).
    /// Memory: one buffer per producing stream, plus the client's window.
    pub chunk_size: usize,
    /// Depth in chunks of the queue adapter (`burst.nexus.pipe.size`, default 100).
    pub pipe_size: usize,
    /// Most open connections over all shards (`burst.nexus.server.max.connections`, default
    /// 10000); further connections get ERROR `resource_exhausted` and are closed.
    pub max_connections: usize,
    /// Stream data the whole server holds at once, in bytes (`burst.nexus.server.memory.max`,
    /// default 1 GiB), split evenly between the shards: chunks read from sources and not yet
    /// written to a socket. Over it, running streams pause and new streams are refused with
    /// `resource_exhausted`.
    pub memory_max: usize,
    /// Stream data one connection holds at once, in bytes
    /// (`burst.nexus.server.connection.memory.max`, default 64 MiB). Over it, that
    /// connection's streams pause until its client reads.
    pub connection_memory_max: usize,
    /// Failed authentications per client address per minute before its connections are
    /// refused for a backoff that doubles from 1 s to 5 min
    /// (`burst.nexus.server.auth.failures.max`, default 10).
    pub auth_failures_max: u32,
    /// How long running streams may go on after a shutdown starts
    /// (`burst.nexus.server.drain.timeout.ms`, default 30 s).
    pub drain_timeout: Duration,
    /// Allow a non-loopback bind address without a secret (`burst.nexus.server.insecure`).
    pub insecure: bool,
    /// Chunks a compressed stream may have in preparation at once
    /// (`burst.nexus.stream.parcel.packer.concurrency`, default 2): compressed on the packer's
    /// worker threads, sent in order.
    pub packer_concurrency: usize,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Protocol limits and timers: max frame size, streams per connection, window, heartbeat,
    /// handshake deadline, stream timeout, secret.
    pub protocol: ServerSettings,
    /// TLS on the data port (`burst.nexus.server.tls.*`), off by default.
    pub tls: TlsSettings,
}

/// TLS on the data port.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// off, tls or mutual (`burst.nexus.server.tls.mode`).
    pub mode: TlsMode,
    /// PEM certificate chain (`burst.nexus.server.tls.cert`).
    pub cert: Option<PathBuf>,
    /// PEM private key (`burst.nexus.server.tls.key`).
    pub key: Option<PathBuf>,
    /// PEM CA bundle for client certificates (`burst.nexus.server.tls.client.ca`).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for a change (`burst.nexus.server.tls.reload.ms`,
    /// default 10 s).
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: TlsMode::Off,
            cert: None,
            key: None,
            client_ca: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsSettings {
    /// The files to load, when TLS is on; an error names the property that is missing.
    pub fn files(&self) -> Result<Option<ServerFiles>, BadValue> {
        if self.mode == TlsMode::Off {
            return Ok(None);
        }
        let missing = |name: &str| {
            BadValue(format!(
                "burst.nexus.server.tls.mode is {} but {name} is not set",
                self.mode
            ))
        };
        let cert = self
            .cert
            .clone()
            .ok_or_else(|| missing("burst.nexus.server.tls.cert"))?;
        let key = self
            .key
            .clone()
            .ok_or_else(|| missing("burst.nexus.server.tls.key"))?;
        if self.mode == TlsMode::Mutual && self.client_ca.is_none() {
            return Err(missing("burst.nexus.server.tls.client.ca"));
        }
        Ok(Some(ServerFiles {
            mode: self.mode,
            cert,
            key,
            client_ca: self.client_ca.clone(),
        }))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 1270,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: BackendChoice::Auto,
            root: PathBuf::from("."),
            follow_symlinks: true,
            upload_root: None,
            upload_max_size: 1 << 40,
            chunk_size: 1 << 20,
            pipe_size: 100,
            max_connections: 10_000,
            memory_max: 1 << 30,
            auth_failures_max: 10,
            connection_memory_max: 64 << 20,
            drain_timeout: Duration::from_secs(30),
            insecure: false,
            packer_concurrency: 2,
            ring_entries: 256,
            protocol: ServerSettings::default(),
            tls: TlsSettings::default(),
        }
    }
}

impl ServerConfig {
    /// Every property the server reads, bound to its field. The secret
    /// (`burst.nexus.auth.secret` or `.secret.file`) is read apart: two properties, one value.
    pub const PROPERTIES: &'static [Binding<ServerConfig>] = &[
        bind!("burst.nexus.server.bind", parse::<IpAddr>, |c, v| c.bind =
            v),
        bind!("burst.nexus.server.port", parse::<u16>, |c, v| c.port = v),
        bind!("burst.nexus.server.threads", positive::<usize>, |c, v| {
            c.threads = v
        }),
        bind!("burst.nexus.server.root", parse::<PathBuf>, |c, v| c.root =
            v),
        bind!(
            "burst.nexus.server.upload.root",
            parse::<PathBuf>,
            |c, v| { c.upload_root = (!v.as_os_str().is_empty()).then_some(v) }
        ),
        bind!("burst.nexus.server.upload.max.size", size, |c, v| {
            c.upload_max_size = v
        }),
        bind!("burst.nexus.server.push.window", size_as::<u32>, |c, v| {
            c.protocol.push_window = v
        }),
        bind!(
            "burst.nexus.server.follow.symlinks",
            parse::<bool>,
            |c, v| c.follow_symlinks = v
        ),
        bind!("burst.nexus.io.backend", parse::<BackendChoice>, |c, v| {
            c.backend = v
        }),
        bind!("burst.nexus.pipe.size", positive::<usize>, |c, v| {
            c.pipe_size = v
        }),
        bind!("burst.nexus.stream.chunk.size", size_as::<usize>, |c, v| {
            c.chunk_size = v
        }),
        bind!("burst.nexus.stream.timeout.ms", millis, |c, v| {
            c.protocol.timers.stream_timeout = v
        }),
        bind!("burst.nexus.stream.progress.ms", millis, |c, v| {
            c.protocol.progress_interval = v
        }),
        bind!("burst.nexus.stream.window.max", size_as::<u32>, |c, v| {
            c.protocol.max_window = v
        }),
        bind!(
            "burst.nexus.stream.parcel.packer.concurrency",
            positive::<usize>,
            |c, v| { c.packer_concurrency = v }
        ),
        bind!(
            "burst.nexus.server.max.connections",
            positive::<usize>,
            |c, v| { c.max_connections = v }
        ),
        bind!("burst.nexus.server.memory.max", size_as::<usize>, |c, v| {
            c.memory_max = v
        }),
        bind!(
            "burst.nexus.server.connection.memory.max",
            size_as::<usize>,
            |c, v| { c.connection_memory_max = v }
        ),
        bind!(
            "burst.nexus.server.auth.failures.max",
            positive::<u32>,
            |c, v| { c.auth_failures_max = v }
        ),
        bind!("burst.nexus.server.max.streams", positive::<u32>, |c, v| {
            c.protocol.max_streams = v
        }),
        bind!(
            "burst.nexus.server.max.frame.size",
            size_as::<u32>,
            |c, v| { c.protocol.max_frame_size = v }
        ),
        bind!("burst.nexus.server.max.paradata", size_as::<u32>, |c, v| {
            c.protocol.max_paradata = v
        }),
        bind!(
            "burst.nexus.server.max.pending.control",
            size_as::<usize>,
            |c, v| { c.protocol.max_pending_control = v }
        ),
        bind!(
            "burst.nexus.server.pending.control.timeout.ms",
            millis,
            |c, v| { c.protocol.pending_control_timeout = v }
        ),
        bind!("burst.nexus.server.heartbeat.ms", millis, |c, v| {
            c.protocol.timers.heartbeat_interval = v
        }),
        bind!("burst.nexus.server.handshake.timeout.ms", millis, |c, v| {
            c.protocol.timers.handshake_timeout = v
        }),
        bind!("burst.nexus.server.drain.timeout.ms", millis, |c, v| {
            c.drain_timeout = v
        }),
        bind!("burst.nexus.server.insecure", parse::<bool>, |c, v| {
            c.insecure = v
        }),
        bind!("burst.nexus.server.tls.mode", parse::<TlsMode>, |c, v| {
            c.tls.mode = v
        }),
        bind!("burst.nexus.server.tls.cert", parse::<PathBuf>, |c, v| {
            c.tls.cert = non_empty(v)
        }),
        bind!("burst.nexus.server.tls.key", parse::<PathBuf>, |c, v| {
            c.tls.key = non_empty(v)
        }),
        bind!(
            "burst.nexus.server.tls.client.ca",
            parse::<PathBuf>,
            |c, v| { c.tls.client_ca = non_empty(v) }
        ),
        bind!("burst.nexus.server.tls.reload.ms", millis, |c, v| {
            c.tls.reload_interval = v
        }),
    ];

    /// The configuration `values` describe, checked as a whole ([`check`](Self::check)).
    pub fn from_values(values: &Values) -> Result<ServerConfig, BadValue> {
        let mut c = ServerConfig::default();
        nexus_config::apply(&mut c, values, Self::PROPERTIES)?;
        c.protocol.secret = values.secret()?;
        c.check()?;
        Ok(c)
    }

    /// The rules between values, each error naming the properties and the values: a chunk
    /// fits a frame, a frame fits a chunk header and 1 KiB, the secret is there when the
    /// address is not loopback (or `insecure` says the network is trusted).
    pub fn check(&self) -> Result<(), BadValue> {
        let frame = self.protocol.max_frame_size as usize;
        if self.threads == 0 {
            return Err(BadValue(
                "burst.nexus.server.threads must be at least 1".into(),
            ));
        }
        if self.chunk_size == 0 || self.chunk_size > frame {
            return Err(BadValue(format!(
                "burst.nexus.stream.chunk.size ({}) must be between 1 and \
                 burst.nexus.server.max.frame.size ({frame}): a chunk travels in one frame",
                self.chunk_size
            )));
        }
        if frame < nexus_protocol::frame::CHUNK_OVERHEAD_MAX + 1024 {
            return Err(BadValue(format!(
                "burst.nexus.server.max.frame.size ({frame}) must be at least 1036 bytes \
                 (PROTOCOL.md 4.1)"
            )));
        }
        self.tls.files()?;
        // Mutual TLS authenticates every client by its certificate: it may stand in for the
        // secret. Plain TLS authenticates only the server.
        let authenticated = self.protocol.secret.is_some() || self.tls.mode == TlsMode::Mutual;
        if !self.bind.is_loopback() && !authenticated && !self.insecure {
            return Err(BadValue(format!(
                "refusing to listen on {} without authentication: anyone who can reach it could \
                 read every file under the root. Set burst.nexus.auth.secret (or \
                 burst.nexus.auth.secret.file), or burst.nexus.server.tls.mode=mutual, or \
                 burst.nexus.server.insecure=true if the network is trusted",
                self.bind
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> Values {
        Values::from_env_vars(pairs).unwrap()
    }

    #[test]
    fn server_properties_reach_the_server_config() {
        let c = ServerConfig::from_values(&values(&[
            ("BURST_NEXUS_SERVER_PORT", "2000"),
            ("BURST_NEXUS_SERVER_BIND", "::1"),
            ("BURST_NEXUS_SERVER_THREADS", "3"),
            ("BURST_NEXUS_PIPE_SIZE", "7"),
            ("BURST_NEXUS_STREAM_PARCEL_PACKER_CONCURRENCY", "4"),
            ("BURST_NEXUS_STREAM_TIMEOUT_MS", "1234"),
            ("BURST_NEXUS_SERVER_MAX_STREAMS", "5"),
            ("BURST_NEXUS_SERVER_DRAIN_TIMEOUT_MS", "99"),
            ("BURST_NEXUS_IO_BACKEND", "epoll"),
        ]))
        .unwrap();
        assert_eq!((c.port, c.threads, c.pipe_size), (2000, 3, 7));
        assert_eq!(c.bind, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.packer_concurrency, 4);
        assert_eq!(
            c.protocol.timers.stream_timeout,
            Duration::from_millis(1234)
        );
        assert_eq!(c.protocol.max_streams, 5);
        assert_eq!(c.drain_timeout, Duration::from_millis(99));
        assert_eq!(c.backend, BackendChoice::Epoll);
        let d = ServerConfig::from_values(&values(&[])).unwrap();
        assert_eq!((d.port, d.pipe_size, d.packer_concurrency), (1270, 100, 2));
        assert_eq!(d.protocol.timers.stream_timeout, Duration::from_secs(60));
    }

    /// The property table and `Default` are one source of defaults: resolving no property
    /// at all gives exactly `ServerConfig::default()`.
    #[test]
    fn the_defaults_are_the_property_tables() {
        assert_eq!(
            ServerConfig::from_values(&values(&[])).unwrap(),
            ServerConfig::default()
        );
    }

    #[test]
    fn cross_checks_name_the_properties_and_values() {
        let err = ServerConfig::from_values(&values(&[
            ("BURST_NEXUS_STREAM_CHUNK_SIZE", "8MiB"),
            ("BURST_NEXUS_SERVER_MAX_FRAME_SIZE", "4MiB"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("burst.nexus.stream.chunk.size (8388608)")
                && err.contains("burst.nexus.server.max.frame.size (4194304)"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        for (var, value) in [
            ("BURST_NEXUS_SERVER_PORT", "abc"),
            ("BURST_NEXUS_SERVER_PORT", "-1"),
            ("BURST_NEXUS_SERVER_PORT", "70000"),
            ("BURST_NEXUS_STREAM_TIMEOUT_MS", "0"),
            ("BURST_NEXUS_STREAM_PARCEL_PACKER_CONCURRENCY", "0"),
            ("BURST_NEXUS_IO_BACKEND", "kqueue"),
        ] {
            let err = ServerConfig::from_values(&values(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var) && err.contains(value), "{err}");
        }
    }
}
