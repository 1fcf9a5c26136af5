//! The client: IO threads, the connection pool and its tender, and `initiate`.
//!
//! Threads: `threads` IO threads, each a current-thread runtime of the chosen backend running
//! the tasks of the connections assigned to it (round robin); one tender thread; and the
//! application's threads, which only touch the pool (one short lock per checkout) and send
//! commands. Nothing on the data path takes a lock shared with other connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use lru::LruCache;
use nexus_io::{select_backend, Backend};
use nexus_protocol::{ErrorCode, OperationId, StreamRequest};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::config::ClientConfig;
use crate::conn::{self, Command, ConnHandle, NewStream, Spawn};
use crate::operation::{Operation, OperationOptions, OperationShared};
use crate::push::{PushHandle, PushOptions};
use crate::stream::{Item, StreamHandle, StreamKey, StreamShared};
use crate::telemetry::{Counters, StreamStats};

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `io_uring` was forced and is unavailable.
    #[error(transparent)]
    Backend(#[from] nexus_io::BackendError),
    /// An IO thread could not be started.
    #[error("cannot start a client IO thread: {0}")]
    Thread(std::io::Error),
    /// A configuration value is out of range.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

/// Per-stream choices.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Ask for zstd-compressed chunks (the server compresses when it pays).
    pub accept_zstd: bool,
    /// A W3C `traceparent` to pass to the server.
    pub traceparent: Option<String>,
}

/// Pool counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections in the pool now.
    pub pooled: usize,
    /// Connections whose tasks still run (pooled, or draining with streams).
    pub open: usize,
    /// Connections made since start.
    pub created: u64,
    /// Idle connections closed by the tender for being stale.
    pub evicted_stale: u64,
    /// Idle connections closed to stay within `max_connections`.
    pub evicted_capacity: u64,
    /// Dead or draining connections dropped from the pool.
    pub evicted_dead: u64,
    /// Closed by [`Client::close`].
    pub closed: u64,
}

type Job = Box<dyn FnOnce() + Send>;

/// What every clone of a [`Client`], its connections and its tender share.
pub(crate) struct Shared {
    config: ClientConfig,
    backend: Backend,
    io: Vec<mpsc::UnboundedSender<Job>>,
    next_io: AtomicUsize,
    pool: Mutex<Pool>,
    next_key: AtomicU64,
    next_conn: AtomicU64,
    open: AtomicUsize,
    created: AtomicU64,
    evicted_stale: AtomicU64,
    evicted_capacity: AtomicU64,
    evicted_dead: AtomicU64,
    closed: AtomicU64,
    /// Stream counters, shared with the streams and connections.
    pub(crate) counters: Arc<Counters>,
    /// Dropping it stops the tender.
    _tender_stop: Mutex<Option<crossbeam_channel::Sender<()>>>,
    /// TLS for every connection, when on.
    tls: Option<conn::Tls>,
}

struct Pool {
    /// Keyed by endpoint and stripe; most recently used first.
    connections: LruCache<(SocketAddr, usize), Arc<ConnHandle>>,
}

/// A Nexus client: a pool of connections keyed by endpoint, streams multiplexed on them.
/// Cheap to clone; callable from any thread. The IO threads stop when the last clone and the
/// last [`StreamHandle`] are gone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.shared.backend)
            .field("pool", &self.pool_stats())
            .finish()
    }
}

impl Client {
    /// Starts a client: resolves the backend (probing io_uring for `auto`, with one WARN on
    /// fallback), starts the IO threads and the tender.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.threads == 0 {
            return Err(ClientError::Config("threads must be at least 1".into()));
        }
        if config.connections_per_endpoint == 0 {
            return Err(ClientError::Config(
                "connections per endpoint must be at least 1".into(),
            ));
        }
        if config.queue_size == 0 {
            return Err(ClientError::Config("queue size must be at least 1".into()));
        }
        if config.tender_interval.is_zero() || config.pool_stale.is_zero() {
            return Err(ClientError::Config(
                "pool stale time and tender interval must be above 0".into(),
            ));
        }
        let tls = match config.tls.files().map_err(ClientError::Config)? {
            None => None,
            Some(files) => {
                let server_name = match &config.tls.server_name {
                    Some(name) => Some(nexus_io::tls::server_name(name).map_err(|e| {
                        ClientError::Config(format!("burst.nexus.client.tls.server.name: {e}"))
                    })?),
                    None => None,
                };
                let config = nexus_io::tls::client_config(&files)
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                Some(conn::Tls {
                    config,
                    server_name,
                })
            }
        };
        let (backend, fallback) = select_backend(config.backend).map_err(ClientError::Backend)?;
        if let Some(reason) = fallback {
            tracing::warn!(%reason, "io_uring is unavailable; the client uses epoll.");
        }
        let mut io = Vec::with_capacity(config.threads);
        for index in 0..config.threads {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            std::thread::Builder::new()
                .name(format!("nexus-client-{index}"))
                .spawn(move || {
                    let result = nexus_io::block_on(backend, 256, async move {
                        while let Some(job) = rx.recv().await {
                            job();
                        }
                    });
                    if let Err(e) = result {
                        tracing::error!(error = %e, "A client IO thread could not start its runtime.");
                    }
                })
                .map_err(ClientError::Thread)?;
            io.push(tx);
        }
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let shared = Arc::new(Shared {
            backend,
            io,
            next_io: AtomicUsize::new(0),
            pool: Mutex::new(Pool {
                connections: LruCache::unbounded(),
            }),
            next_key: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            created: AtomicU64::new(0),
            evicted_stale: AtomicU64::new(0),
            evicted_capacity: AtomicU64::new(0),
            evicted_dead: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            counters: Arc::default(),
            _tender_stop: Mutex::new(Some(stop_tx)),
            tls,
            config,
        });
        let weak = Arc::downgrade(&shared);
        let interval = shared.config.tender_interval;
        std::thread::Builder::new()
            .name("nexus-pool-tender".into())
            .spawn(move || tend(weak, interval, stop_rx))
            .map_err(ClientError::Thread)?;
        Ok(Client { shared })
    }

    /// One client per process, started on first use, configured from the process
    /// environment (`BURST_NEXUS_CLIENT_*` and the other `burst.nexus.*` variables). A bad
    /// variable is logged as an error and its default used: an embedding application should
    /// not die of a typo in an operator's environment. Panics only if no thread can be started
    /// at all.
    pub fn global() -> Client {
        static GLOBAL: OnceLock<Client> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let config = nexus_config::Values::from_process_env()
                    .and_then(|values| ClientConfig::from_values(&values))
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "Bad client property in the environment; using the defaults.");
                        ClientConfig::default()
                    });
                #[allow(clippy::expect_used)]
                Client::new(config).expect("cannot start the global client")
            })
            .clone()
    }

    /// The IO backend in use.
    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// Starts a stream of `paradata` from `endpoint` on a pooled connection.
    pub fn initiate(
        &self,
        endpoint: SocketAddr,
        paradata: &str,
        options: StreamOptions,
    ) -> StreamHandle {
        self.initiate_in(endpoint, paradata, options, None)
    }

    /// Starts a push of data into the sink `paradata` names at `endpoint` (`file:PATH`,
    /// `discard:`), on a pooled connection. Write the data to the handle, then `finish`.
    pub fn push(&self, endpoint: SocketAddr, paradata: &str, options: PushOptions) -> PushHandle {
        self.push_in(endpoint, paradata, options, None)
    }

    pub(crate) fn push_in(
        &self,
        endpoint: SocketAddr,
        paradata: &str,
        options: PushOptions,
        operation: Option<Arc<OperationShared>>,
    ) -> PushHandle {
        let request = StreamRequest {
            paradata: paradata.to_string(),
            operation: operation.as_ref().map_or(OperationId(0), |op| op.id),
            accept_zstd: false,
            traceparent: options.traceparent,
            push: Some(options.size.unwrap_or(nexus_protocol::UNKNOWN)),
        };
        // Only the end marker ever goes through a push's queue.
        let (shared, tx, rx) = self.register(endpoint, request, operation, 1);
        let handle = PushHandle::new(self.clone(), Arc::clone(&shared), rx);
        self.start_registered(shared, tx);
        handle
    }

    /// A new stream's shared state and queue, counted and added to its operation.
    fn register(
        &self,
        endpoint: SocketAddr,
        request: StreamRequest,
        operation: Option<Arc<OperationShared>>,
        queue: usize,
    ) -> (Arc<StreamShared>, Sender<Item>, Receiver<Item>) {
        let key = StreamKey(self.shared.next_key.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(StreamShared::new(
            key,
            endpoint,
            request,
            operation,
            Arc::clone(&self.shared.counters),
        ));
        self.shared.counters.stream_started();
        let (tx, rx) = crossbeam_channel::bounded(queue);
        if let Some(op) = &shared.operation {
            op.add(Arc::clone(&shared));
        }
        (shared, tx, rx)
    }

    /// Hands a registered stream to its connection.
    fn start_registered(&self, shared: Arc<StreamShared>, tx: Sender<Item>) {
        self.shared.start(NewStream {
            shared,
            tx,
            retried: false,
        });
    }

    /// A macro operation: streams across endpoints, cancelled, watched and summarised together.
    pub fn operation(&self, options: OperationOptions) -> Operation {
        Operation::new(self.clone(), options)
    }

    pub(crate) fn initiate_in(
        &self,
        endpoint: SocketAddr,
        paradata: &str,
        options: StreamOptions,
        operation: Option<Arc<OperationShared>>,
    ) -> StreamHandle {
        let request = StreamRequest {
            paradata: paradata.to_string(),
            operation: operation.as_ref().map_or(OperationId(0), |op| op.id),
            accept_zstd: options.accept_zstd,
            traceparent: options.traceparent,
            push: None,
        };
        let queue = self.shared.config.queue_size;
        let (shared, tx, rx) = self.register(endpoint, request, operation, queue);
        let spin = self.shared.config.first_item_spin;
        let handle = StreamHandle::new(self.clone(), Arc::clone(&shared), rx, spin);
        self.start_registered(shared, tx);
        handle
    }

    /// Stream counters (what `telemetry::publish` exports).
    pub fn stream_stats(&self) -> StreamStats {
        self.shared.counters.snapshot()
    }

    /// Pool counters.
    pub fn pool_stats(&self) -> PoolStats {
        let s = &self.shared;
        PoolStats {
            pooled: s.pool.lock().connections.len(),
            open: s.open.load(Ordering::Acquire),
            created: s.created.load(Ordering::Relaxed),
            evicted_stale: s.evicted_stale.load(Ordering::Relaxed),
            evicted_capacity: s.evicted_capacity.load(Ordering::Relaxed),
            evicted_dead: s.evicted_dead.load(Ordering::Relaxed),
            closed: s.closed.load(Ordering::Relaxed),
        }
    }

    /// Runs the tender's sweep now (it also runs every `tender_interval`): closes idle
    /// connections unused for `pool_stale`, drops dead ones. Returns how many it closed.
    pub fn tend(&self) -> usize {
        self.tend_at(Instant::now())
    }

    /// The tender's sweep as if the time were `now`: a connection is stale when it has been
    /// idle for `pool_stale` at `now`. For tests and for applications that drive the pool's
    /// ageing from their own clock (with `tender_interval` set long).
    pub fn tend_at(&self, now: Instant) -> usize {
        self.shared.sweep(now)
    }

    /// Closes every pooled connection; their running streams end with `cancelled`.
    pub fn close(&self) {
        let connections: Vec<Arc<ConnHandle>> = {
            let mut pool = self.shared.pool.lock();
            let all = pool
                .connections
                .iter()
                .map(|(_, c)| Arc::clone(c))
                .collect();
            pool.connections.clear();
            all
        };
        for connection in connections {
            self.shared.closed.fetch_add(1, Ordering::Relaxed);
            connection.send(Command::Close { idle: false });
        }
    }
}

impl Shared {
    /// Sends a stream to a usable connection of its endpoint (made if needed). A connection
    /// that died since it was pooled refuses the stream, which then goes to a fresh one.
    pub(crate) fn start(self: &Arc<Self>, mut stream: NewStream) {
        let endpoint = stream.shared.endpoint;
        for _ in 0..3 {
            let connection = self.checkout(endpoint);
            *stream.shared.route.lock() = Some(Arc::clone(&connection));
            match connection.start(stream) {
                Ok(()) => return,
                Err(back) => {
                    connection.active.fetch_sub(1, Ordering::AcqRel);
                    self.remove_dead(&connection);
                    // A connection that could not be made, however fast it failed, is the
                    // answer: the endpoint is unreachable (its caller decides on retries).
                    if let Some((code, message)) = connection.connect_error() {
                        back.fail(code, message);
                        return;
                    }
                    stream = back;
                }
            }
        }
        stream.fail(
            ErrorCode::CONNECTION_LOST,
            &format!("no connection to {endpoint} could take the stream"),
        );
    }

    /// A usable connection for one more stream on `endpoint`, counted as active.
    fn checkout(self: &Arc<Self>, endpoint: SocketAddr) -> Arc<ConnHandle> {
        let stripes = self.config.connections_per_endpoint;
        let mut pool = self.pool.lock();
        let mut best: Option<Arc<ConnHandle>> = None;
        let mut free_stripe = None;
        for stripe in 0..stripes {
            let key = (endpoint, stripe);
            match pool.connections.get(&key) {
                Some(c) if c.is_usable() => {
                    let load = c.active.load(Ordering::Acquire);
                    if best
                        .as_ref()
                        .is_none_or(|b| load < b.active.load(Ordering::Acquire))
                    {
                        best = Some(Arc::clone(c));
                    }
                }
                Some(_) => {
                    pool.connections.pop(&key);
                    self.evicted_dead.fetch_add(1, Ordering::Relaxed);
                    free_stripe = free_stripe.or(Some(stripe));
                }
                None => free_stripe = free_stripe.or(Some(stripe)),
            }
        }
        let reuse = best
            .as_ref()
            .is_some_and(|b| b.active.load(Ordering::Acquire) == 0 || free_stripe.is_none());
        let connection = match (reuse, best, free_stripe) {
            (true, Some(best), _) | (false, Some(best), None) => best,
            (_, _, Some(stripe)) => {
                self.make_room(&mut pool);
                let connection = self.connect(endpoint);
                pool.connections
                    .put((endpoint, stripe), Arc::clone(&connection));
                connection
            }
            (_, None, None) => unreachable!("no stripe and no connection"),
        };
        connection.active.fetch_add(1, Ordering::AcqRel);
        *connection.last_used.lock() = Instant::now();
        connection
    }

    /// Closes least recently used idle connections while the pool is full.
    fn make_room(&self, pool: &mut Pool) {
        while pool.connections.len() >= self.config.max_connections {
            let victim = pool
                .connections
                .iter()
                .rev()
                .find(|(_, c)| c.active.load(Ordering::Acquire) == 0)
                .map(|(k, _)| *k);
            let Some(key) = victim else { return };
            if let Some(c) = pool.connections.pop(&key) {
                self.evicted_capacity.fetch_add(1, Ordering::Relaxed);
                c.send(Command::Close { idle: true });
            }
        }
    }

    /// A new connection; its tasks start on the next IO thread.
    fn connect(self: &Arc<Self>, endpoint: SocketAddr) -> Arc<ConnHandle> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(ConnHandle::new(id, endpoint, tx));
        self.created.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        let spawn = Spawn {
            handle: Arc::clone(&handle),
            commands: rx,
            client: Arc::downgrade(self),
            backend: self.backend,
            settings: self.config.protocol.clone(),
            connect_timeout: self.config.connect_timeout,
            tls: self.tls.clone(),
        };
        let index = self.next_io.fetch_add(1, Ordering::Relaxed) % self.io.len();
        let job: Job = Box::new(move || {
            tokio::task::spawn_local(conn::run(spawn));
        });
        if self.io[index].send(job).is_err() {
            // The IO thread is gone (its runtime failed): the receiver was dropped with the
            // job, so the handle reports closed and checkout moves on.
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
        handle
    }

    /// A connection's tasks ended.
    pub(crate) fn connection_ended(&self, connection: &Arc<ConnHandle>) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.remove_dead(connection);
    }

    /// Drops a dead `connection` from the pool if it is still there.
    fn remove_dead(&self, connection: &Arc<ConnHandle>) {
        let mut pool = self.pool.lock();
        let key = pool
            .connections
            .iter()
            .find(|(_, c)| Arc::ptr_eq(c, connection))
            .map(|(k, _)| *k);
        if let Some(key) = key {
            pool.connections.pop(&key);
            self.evicted_dead.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The tender's sweep.
    fn sweep(&self, now: Instant) -> usize {
        let stale = self.config.pool_stale;
        let mut closed = 0;
        let mut pool = self.pool.lock();
        let victims: Vec<((SocketAddr, usize), bool)> = pool
            .connections
            .iter()
            .filter_map(|(k, c)| {
                if c.is_dead() {
                    Some((*k, false))
                } else if c.active.load(Ordering::Acquire) == 0
                    && now.saturating_duration_since(*c.last_used.lock()) >= stale
                {
                    Some((*k, true))
                } else {
                    None
                }
            })
            .collect();
        for (key, is_stale) in victims {
            if let Some(c) = pool.connections.pop(&key) {
                if is_stale {
                    self.evicted_stale.fetch_add(1, Ordering::Relaxed);
                    c.send(Command::Close { idle: true });
                    closed += 1;
                    tracing::debug!(endpoint = %c.endpoint, "Closed a stale pooled connection.");
                } else {
                    self.evicted_dead.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        closed
    }
}

fn tend(client: Weak<Shared>, interval: Duration, stop: crossbeam_channel::Receiver<()>) {
    loop {
        match stop.recv_timeout(interval) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(client) = client.upgrade() else {
            return;
        };
        client.sweep(Instant::now());
    }
}
