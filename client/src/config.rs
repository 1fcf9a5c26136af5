//! What a client is configured with: from `burst.nexus.*` properties ([`ClientConfig::from_values`]),
//! or built directly by embedders.

use std::path::PathBuf;
use std::time::Duration;

use nexus_config::{bind, BadValue, Binding, Values};
use nexus_io::tls::ClientFiles;
use nexus_io::BackendChoice;

/// An empty path means "not set".
fn non_empty(path: PathBuf) -> Option<PathBuf> {
    (!path.as_os_str().is_empty()).then_some(path)
}
use nexus_protocol::ClientSettings;

use crate::transfer::RetryPolicy;

/// Client configuration; `Default` gives the documented property defaults.
#[derive(Debug, Clone, PartialEq)]
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
    /// How long a blocking reader ([`StreamHandle::recv`](crate::StreamHandle::recv)) waiting
    /// for a stream's first item polls its queue before it sleeps
    /// (`burst.nexus.client.first.item.spin.us`, default 50 µs; 0: sleep at once). An item
    /// that comes within it spares the IO thread a futex wake and the reader a wake-up from
    /// an idle CPU: half the time to first byte on a warm connection (bench/RESULTS.md).
    pub first_item_spin: Duration,
    /// Time allowed for TCP connect (`burst.nexus.client.connect.timeout.ms`, default 10 s).
    pub connect_timeout: Duration,
    /// How transfers retry failures that can clear (`burst.nexus.client.retry.max`, default 8;
    /// `burst.nexus.client.retry.budget.ms`, default 60 s).
    pub retry: RetryPolicy,
    /// Protocol limits and timers: window, frame size, heartbeat, handshake deadline, stream
    /// timeout (`burst.nexus.stream.timeout.ms`), secret (`burst.nexus.auth.secret`).
    pub protocol: ClientSettings,
    /// TLS to the servers (`burst.nexus.client.tls.*`), off by default.
    pub tls: TlsSettings,
}

/// A client's TLS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSettings {
    /// Connect with TLS (`burst.nexus.client.tls`).
    pub enabled: bool,
    /// PEM CA bundle that signs server certificates (`burst.nexus.client.tls.ca`).
    pub ca: Option<PathBuf>,
    /// PEM certificate chain for mutual TLS (`burst.nexus.client.tls.cert`).
    pub cert: Option<PathBuf>,
    /// Its PEM key (`burst.nexus.client.tls.key`).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must hold (`burst.nexus.client.tls.server.name`);
    /// `None`: the address connected to.
    pub server_name: Option<String>,
}

impl TlsSettings {
    /// The files to load, when TLS is on; an error names what is missing.
    pub fn files(&self) -> Result<Option<ClientFiles>, String> {
        if !self.enabled {
            return Ok(None);
        }
        let ca = self.ca.clone().ok_or(
            "burst.nexus.client.tls is on but burst.nexus.client.tls.ca is not set: the \
             client needs the CA that signs the server's certificate",
        )?;
        Ok(Some(ClientFiles {
            ca,
            cert: self.cert.clone(),
            key: self.key.clone(),
        }))
    }
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
            first_item_spin: Duration::from_micros(50),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            protocol: ClientSettings::default(),
            tls: TlsSettings::default(),
        }
    }
}

impl ClientConfig {
    /// Every property the client reads, bound to its field; the secret is read apart.
    pub const PROPERTIES: &'static [Binding<ClientConfig>] = &[
        bind!("burst.nexus.client.threads", positive::<usize>, |c, v| {
            c.threads = v
        }),
        bind!("burst.nexus.io.backend", parse::<BackendChoice>, |c, v| {
            c.backend = v
        }),
        bind!(
            "burst.nexus.client.connections.per.endpoint",
            positive::<usize>,
            |c, v| { c.connections_per_endpoint = v }
        ),
        bind!("burst.nexus.client.pool.stale.ms", millis, |c, v| {
            c.pool_stale = v
        }),
        bind!("burst.nexus.client.cache.tender.ms", millis, |c, v| {
            c.tender_interval = v
        }),
        bind!(
            "burst.nexus.client.pool.max.connections",
            positive::<usize>,
            |c, v| { c.max_connections = v }
        ),
        bind!(
            "burst.nexus.client.queue.size",
            positive::<usize>,
            |c, v| c.queue_size = v
        ),
        bind!(
            "burst.nexus.client.first.item.spin.us",
            parse::<u64>,
            |c, v| c.first_item_spin = Duration::from_micros(v)
        ),
        bind!("burst.nexus.client.window", size_as::<u32>, |c, v| {
            c.protocol.initial_window = v
        }),
        bind!("burst.nexus.client.window.max", size_as::<u32>, |c, v| {
            c.protocol.max_window = v
        }),
        bind!("burst.nexus.client.connect.timeout.ms", millis, |c, v| {
            c.connect_timeout = v
        }),
        bind!("burst.nexus.client.retry.max", parse::<u32>, |c, v| {
            c.retry.max_retries = v
        }),
        bind!("burst.nexus.client.retry.budget.ms", millis, |c, v| {
            c.retry.budget = v
        }),
        bind!("burst.nexus.stream.timeout.ms", millis, |c, v| {
            c.protocol.timers.stream_timeout = v
        }),
        bind!("burst.nexus.client.tls", parse::<bool>, |c, v| {
            c.tls.enabled = v
        }),
        bind!("burst.nexus.client.tls.ca", parse::<PathBuf>, |c, v| {
            c.tls.ca = non_empty(v)
        }),
        bind!("burst.nexus.client.tls.cert", parse::<PathBuf>, |c, v| {
            c.tls.cert = non_empty(v)
        }),
        bind!("burst.nexus.client.tls.key", parse::<PathBuf>, |c, v| {
            c.tls.key = non_empty(v)
        }),
        bind!(
            "burst.nexus.client.tls.server.name",
            parse::<String>,
            |c, v| { c.tls.server_name = (!v.is_empty()).then_some(v) }
        ),
    ];

    /// The configuration `values` describe: `burst.nexus.client.*`, `burst.nexus.io.backend`,
    /// `burst.nexus.stream.timeout.ms` and the secret; the defaults for the rest.
    pub fn from_values(values: &Values) -> Result<ClientConfig, BadValue> {
        let mut c = ClientConfig::default();
        nexus_config::apply(&mut c, values, Self::PROPERTIES)?;
        c.protocol.secret = values.secret()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> Values {
        Values::from_env_vars(pairs).unwrap()
    }

    /// The property table and `Default` are one source of defaults.
    #[test]
    fn the_defaults_are_the_property_tables() {
        assert_eq!(
            ClientConfig::from_values(&values(&[])).unwrap(),
            ClientConfig::default()
        );
    }

    #[test]
    fn client_properties_reach_the_client_config() {
        let c = ClientConfig::from_values(&values(&[
            ("BURST_NEXUS_CLIENT_THREADS", "3"),
            ("BURST_NEXUS_CLIENT_CONNECTIONS_PER_ENDPOINT", "2"),
            ("BURST_NEXUS_CLIENT_CACHE_TENDER_MS", "1000"),
            ("NEXUS_CLIENT_POOL_STALE_MS", "1500"),
            ("BURST_NEXUS_CLIENT_POOL_MAX_CONNECTIONS", "12"),
            ("BURST_NEXUS_CLIENT_QUEUE_SIZE", "9"),
            ("BURST_NEXUS_CLIENT_FIRST_ITEM_SPIN_US", "0"),
            ("BURST_NEXUS_CLIENT_WINDOW", "65536"),
            ("BURST_NEXUS_CLIENT_WINDOW_MAX", "131072"),
            ("BURST_NEXUS_CLIENT_CONNECT_TIMEOUT_MS", "700"),
            ("BURST_NEXUS_STREAM_TIMEOUT_MS", "5000"),
            ("BURST_NEXUS_IO_BACKEND", "epoll"),
            ("BURST_NEXUS_AUTH_SECRET", "s3"),
        ]))
        .unwrap();
        assert_eq!((c.threads, c.connections_per_endpoint), (3, 2));
        assert_eq!(c.tender_interval, Duration::from_secs(1));
        assert_eq!(c.pool_stale, Duration::from_millis(1500));
        assert_eq!((c.max_connections, c.queue_size), (12, 9));
        assert_eq!(c.first_item_spin, Duration::ZERO);
        assert_eq!(
            (c.protocol.initial_window, c.protocol.max_window),
            (65536, 131072)
        );
        assert_eq!(c.connect_timeout, Duration::from_millis(700));
        assert_eq!(c.protocol.timers.stream_timeout, Duration::from_secs(5));
        assert_eq!(c.backend, BackendChoice::Epoll);
        assert_eq!(c.protocol.secret.as_deref(), Some(&b"s3"[..]));
        let d = ClientConfig::from_values(&values(&[])).unwrap();
        assert_eq!(d.pool_stale, Duration::from_secs(3600));
        assert_eq!(d.tender_interval, Duration::from_secs(600));
        assert_eq!(d.first_item_spin, Duration::from_micros(50));
        for bad in ["0", "-1", "abc"] {
            let v = values(&[("BURST_NEXUS_CLIENT_CACHE_TENDER_MS", bad)]);
            let err = ClientConfig::from_values(&v).unwrap_err().to_string();
            assert!(
                err.contains("BURST_NEXUS_CLIENT_CACHE_TENDER_MS") && err.contains(bad),
                "{err}"
            );
        }
    }
}
