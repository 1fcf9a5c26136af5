//! The server handle: binds the shards' sockets, starts their threads, shuts them down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::io::{self, Backend};
use crate::packer::Packer;
use crate::shard;
use crate::source::Registry;
use crate::stats::{ServerStats, StatsSnapshot};
use crate::throttle::AuthThrottle;
use crate::tls::{self, Identity};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is inconsistent or unsafe.
    #[error("{0}")]
    Config(String),
    /// `io_uring` was required and is not available.
    #[error(transparent)]
    Backend(#[from] nexus_io::BackendError),
    /// The listening socket could not be set up.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// Where.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (another `nexus serve`?) holds the port.
    #[error(
        "{0} is already in use by another process (another nexus serve?); choose another port \
         with --port or burst.nexus.server.port"
    )]
    PortInUse(SocketAddr),
    /// A shard thread could not be started.
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
}

/// A running server. Dropping it shuts it down without a drain period.
pub struct Server {
    address: SocketAddr,
    backend: Backend,
    stats: Arc<ServerStats>,
    shutdown: watch::Sender<Option<Duration>>,
    threads: Vec<JoinHandle<()>>,
    tls: Option<Arc<Identity>>,
    /// Dropped to stop the TLS file watcher.
    tls_watch: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    /// Binds the port and starts `config.threads` shards serving the sources of `registry`.
    /// Refuses a non-loopback address without a secret unless `config.insecure` is set.
    /// With backend `auto`, a missing io_uring is logged once (WARN) and epoll is used.
    pub fn start(config: ServerConfig, registry: Registry) -> Result<Server, StartError> {
        if config.threads == 0 {
            return Err(StartError::Config(
                "burst.nexus.server.threads must be at least 1".into(),
            ));
        }
        config.check().map_err(|e| StartError::Config(e.0))?;
        let (backend, fallback) =
            io::select_backend(config.backend).map_err(StartError::Backend)?;
        if let Some(reason) = fallback {
            tracing::warn!(%reason, "io_uring is unavailable; using epoll.");
        }
        let tls = load_tls(&config)?;
        let listeners = bind(&config)?;
        let address = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Listen {
                address: (config.bind, config.port).into(),
                source,
            })?;
        let config = Arc::new(config);
        let registry = Arc::new(registry);
        let stats = Arc::new(ServerStats::new(listeners.len(), backend));
        if let Some(identity) = &tls {
            let _ = stats.tls.set(Arc::clone(identity));
        }
        let packer = Arc::new(Packer::start(listeners.len()).map_err(StartError::Thread)?);
        let throttle = Arc::new(AuthThrottle::new(config.auth_failures_max));
        let (shutdown, _) = watch::channel(None);
        let mut threads = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shard::Shared {
                config: config.clone(),
                registry: registry.clone(),
                stats: stats.clone(),
                packer: packer.clone(),
                throttle: throttle.clone(),
            };
            let receiver = shutdown.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("nexus-shard-{index}"))
                .spawn(move || {
                    if let Err(e) = shard::run(index, backend, listener, shared, receiver) {
                        tracing::error!(shard = index, error = %e, "Shard failed.");
                    }
                })
                .map_err(StartError::Thread)?;
            threads.push(thread);
        }
        let tls_watch = match &tls {
            Some(identity) => {
                let (stop, stopped) = crossbeam_channel::bounded(1);
                let thread = tls::watch(Arc::clone(identity), config.tls.reload_interval, stopped)
                    .map_err(StartError::Thread)?;
                Some((stop, thread))
            }
            None => None,
        };
        let mode = config.tls.mode;
        tracing::info!(%address, %backend, shards = threads.len(), tls = %mode, "Listening.");
        Ok(Server {
            address,
            backend,
            stats,
            shutdown,
            threads,
            tls,
            tls_watch,
        })
    }

    /// Loads the TLS files again for new connections (running ones keep their session).
    /// `nexus serve` calls it on SIGHUP; the files are also checked every
    /// `burst.nexus.server.tls.reload.ms`. A failed reload keeps the previous identity.
    pub fn reload_tls(&self) -> Result<(), String> {
        match &self.tls {
            Some(identity) => identity.reload("asked"),
            None => Err("TLS is off (burst.nexus.server.tls.mode)".into()),
        }
    }

    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The IO backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The live counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live counters themselves, to read after the server is gone from scope (a metrics
    /// endpoint, say).
    pub fn stats_handle(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Graceful shutdown: stop accepting, send GOAWAY (new INITIATEs get `draining`), let
    /// running streams go on for up to `drain`, then end the rest with ERROR `draining`.
    /// Returns when every shard has stopped.
    pub fn shutdown(mut self, drain: Duration) {
        self.stop(drain);
    }

    fn stop(&mut self, drain: Duration) {
        // Receivers gone means the shards have stopped already.
        let _ = self.shutdown.send(Some(drain));
        if let Some((stop, thread)) = self.tls_watch.take() {
            drop(stop);
            let _ = thread.join();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("A shard thread panicked.");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The TLS identity, when TLS is on; says once whether the kernel could have taken the
/// records (kernel TLS), which this version does not use either way.
fn load_tls(config: &ServerConfig) -> Result<Option<Arc<Identity>>, StartError> {
    let Some(files) = config.tls.files().map_err(|e| StartError::Config(e.0))? else {
        return Ok(None);
    };
    let identity = Identity::load(tls::Endpoint::Data, files).map_err(StartError::Config)?;
    match std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp") {
        Ok(ulps) if ulps.split_whitespace().any(|ulp| ulp == "tls") => tracing::info!(
            "TLS runs in user space (rustls); this version does not hand sessions to kernel TLS."
        ),
        _ => tracing::info!(
            "Kernel TLS is unavailable (no tls in /proc/sys/net/ipv4/tcp_available_ulp); TLS runs in user space (rustls)."
        ),
    }
    Ok(Some(Arc::new(identity)))
}

/// One listening socket per shard on the same address (SO_REUSEPORT); with port 0 the first
/// socket picks the port and the others join it.
///
/// SO_REUSEPORT would also let another process join the port and silently take half the
/// connections: so a port given explicitly is first bound once without SO_REUSEPORT, which
/// fails if any other socket holds it, and only then by the shards.
fn bind(config: &ServerConfig) -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut address = SocketAddr::new(config.bind, config.port);
    if address.port() != 0 {
        check_port_free(address)?;
    }
    let mut listeners = Vec::with_capacity(config.threads);
    for _ in 0..config.threads {
        let listen_error = |source| StartError::Listen { address, source };
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(listen_error)?;
        socket.set_reuse_address(true).map_err(listen_error)?;
        socket.set_reuse_port(true).map_err(listen_error)?;
        socket.set_nonblocking(true).map_err(listen_error)?;
        socket.bind(&address.into()).map_err(listen_error)?;
        socket.listen(1024).map_err(listen_error)?;
        let listener: std::net::TcpListener = socket.into();
        if address.port() == 0 {
            address = listener.local_addr().map_err(listen_error)?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Fails with [`StartError::PortInUse`] when another socket holds `address`.
fn check_port_free(address: SocketAddr) -> Result<(), StartError> {
    let listen_error = |source| StartError::Listen { address, source };
    let probe = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(listen_error)?;
    // SO_REUSEADDR only lets the bind succeed over connections in TIME_WAIT.
    probe.set_reuse_address(true).map_err(listen_error)?;
    match probe.bind(&address.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(StartError::PortInUse(address)),
        Err(source) => Err(StartError::Listen { address, source }),
    }
}
