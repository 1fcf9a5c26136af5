//! One shard: an OS thread with its own runtime and listening socket (SO_REUSEPORT spreads
//! connections over shards). Everything a connection touches lives here, behind `Rc` and
//! `RefCell`: no locks and no shared atomics on the data path.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nexus_protocol::ErrorCode;
use tokio::sync::{watch, Notify};

use crate::config::ServerConfig;
use crate::engine::{self, ConnState};
use crate::io::{self, Backend};
use crate::packer::Packer;
use crate::source::Registry;
use crate::stats::{self, ServerStats, ShardTraffic};
use crate::synthetic;
use crate::telemetry::{LogLimiter, ShardMetrics};
use crate::throttle::AuthThrottle;

/// Free buffers kept per shard while it has streams running; more are dropped.
const POOL_MAX_FREE: usize = 64;
/// Free buffers kept while no stream runs: the next stream starts without fresh memory,
/// and what a burst needed beyond these goes back to the system.
const POOL_IDLE_FREE: usize = 4;

/// What sources and the engine may use of their shard.
pub struct ShardContext {
    index: usize,
    backend: Backend,
    config: Arc<ServerConfig>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) stats: Arc<ServerStats>,
    /// Compression workers, shared by the server's shards.
    pub(crate) packer: Arc<Packer>,
    /// Failed authentications per client address, shared by the server's shards.
    pub(crate) throttle: Arc<AuthThrottle>,
    pool: RefCell<Vec<BytesMut>>,
    /// Streams running on this shard: the pool is kept only while there are some.
    streams_running: Cell<usize>,
    /// The synthetic tile (`PERIOD + MAX_CHUNK` bytes), made on first use.
    tile: std::cell::OnceCell<Bytes>,
    pub(crate) connections: RefCell<Vec<Weak<ConnState>>>,
    /// Notified whenever a connection of this shard ends.
    pub(crate) connection_ended: Notify,
    pub(crate) metrics: ShardMetrics,
    /// Protocol-error log lines: 10 per 10 s per shard, then a count of those held back.
    pub(crate) protocol_error_log: LogLimiter,
    /// Every other line a client can cause (refused, failed or timed-out streams, closed or
    /// refused connections): 20 per 10 s per shard, then a count of those held back.
    peer_log: LogLimiter,
    /// Stream data this shard's connections hold, in bytes (see `ConnState::account`).
    pub(crate) held: Cell<usize>,
    /// This shard's share of `burst.nexus.server.memory.max`.
    pub(crate) budget: usize,
    /// Notified whenever a connection holds less than before: paused streams look again.
    pub(crate) budget_freed: Notify,
    /// Stream tasks waiting on `budget_freed`: with none, freeing memory wakes no one (and
    /// skips `Notify`'s lock, once per chunk).
    pub(crate) budget_waiters: Cell<usize>,
}

impl ShardContext {
    /// The IO backend of this shard.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Bytes per chunk (`burst.nexus.stream.chunk.size`).
    pub fn chunk_size(&self) -> usize {
        self.config.chunk_size
    }

    /// Depth of queue adapters (`burst.nexus.pipe.size`).
    pub fn pipe_size(&self) -> usize {
        self.config.pipe_size
    }

    /// An empty buffer with room for one chunk, starting at a page boundary, reused from the
    /// pool when one is free.
    pub fn buffer(&self) -> BytesMut {
        let size = self.config.chunk_size;
        self.pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| page_aligned(size))
    }

    /// Takes back a buffer once the socket is done with it. Only whole, unshared chunk buffers
    /// are kept; slices of shared memory (headers, synthetic tiles) are simply dropped.
    /// Only a few are kept while no stream runs.
    pub(crate) fn recycle(&self, data: Bytes) {
        if data.len() < self.config.chunk_size / 2 {
            return;
        }
        if let Ok(mut buf) = data.try_into_mut() {
            buf.clear();
            let mut pool = self.pool.borrow_mut();
            let keep = match self.streams_running.get() {
                0 => POOL_IDLE_FREE,
                _ => POOL_MAX_FREE,
            };
            let aligned = buf.as_ptr().align_offset(4096) == 0;
            if aligned && buf.capacity() >= self.config.chunk_size && pool.len() < keep {
                pool.push(buf);
            }
        }
    }

    /// A stream started on this shard.
    pub(crate) fn stream_started(&self) {
        self.streams_running.set(self.streams_running.get() + 1);
    }

    /// A stream of this shard ended; the last one shrinks the buffer pool to a few buffers.
    pub(crate) fn stream_ended(&self) {
        let running = self.streams_running.get().saturating_sub(1);
        self.streams_running.set(running);
        if running == 0 {
            self.pool.borrow_mut().truncate(POOL_IDLE_FREE);
        }
    }

    /// The synthetic tile every `synthetic:` stream of the shard slices.
    pub(crate) fn synthetic_tile(&self) -> Bytes {
        self.tile
            .get_or_init(|| Bytes::from(synthetic::tile()))
            .clone()
    }

    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// `Some(lines held back since the last one)` when a line a client caused may be logged.
    pub(crate) fn peer_log(&self) -> Option<u64> {
        self.peer_log.allow(Instant::now())
    }

    /// This shard's own traffic counters.
    pub(crate) fn traffic(&self) -> &ShardTraffic {
        &self.stats.shards[self.index]
    }
}

/// An empty buffer of at least `size` bytes whose first byte is at a page boundary: the
/// kernel copies file pages into a page-aligned buffer several times faster than into one a
/// few bytes off (shared/PERF-NOTES.md), and allocators give large blocks 16 bytes past a
/// boundary. One page more is allocated, and the start moved up to the boundary.
fn page_aligned(size: usize) -> BytesMut {
    const PAGE: usize = 4096;
    let mut buf = BytesMut::with_capacity(size + PAGE);
    let skip = buf.as_ptr().align_offset(PAGE).min(PAGE);
    buf.resize(skip, 0);
    bytes::Buf::advance(&mut buf, skip);
    buf
}

/// What every shard of a server shares; touched per connection or per stream, never per
/// uncompressed chunk.
pub(crate) struct Shared {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) stats: Arc<ServerStats>,
    pub(crate) packer: Arc<Packer>,
    pub(crate) throttle: Arc<AuthThrottle>,
}

/// Runs one shard until shutdown: accepts connections, and on shutdown drains them.
pub(crate) fn run(
    index: usize,
    backend: Backend,
    listener: std::net::TcpListener,
    shared: Shared,
    mut shutdown: watch::Receiver<Option<Duration>>,
) -> std::io::Result<()> {
    let Shared {
        config,
        registry,
        stats,
        packer,
        throttle,
    } = shared;
    let ring_entries = config.ring_entries;
    let budget = config.memory_max / config.threads.max(1);
    io::block_on(backend, ring_entries, async move {
        let shard = Rc::new(ShardContext {
            index,
            backend,
            config,
            registry,
            stats,
            packer,
            throttle,
            pool: RefCell::new(Vec::new()),
            streams_running: Cell::new(0),
            tile: std::cell::OnceCell::new(),
            connections: RefCell::new(Vec::new()),
            connection_ended: Notify::new(),
            metrics: ShardMetrics::new(),
            protocol_error_log: LogLimiter::new(10, Duration::from_secs(10)),
            peer_log: LogLimiter::new(20, Duration::from_secs(10)),
            held: Cell::new(0),
            budget,
            budget_freed: Notify::new(),
            budget_waiters: Cell::new(0),
        });
        let listener = io::Listener::from_std(backend, listener)?;
        let drain = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((connection, peer)) => accept(&shard, connection, peer),
                    // EMFILE and friends: log, back off a little, go on.
                    Err(e) => {
                        tracing::warn!(shard = index, error = %e, "Accept failed.");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                changed = shutdown.changed() => {
                    let drain = *shutdown.borrow();
                    match (changed, drain) {
                        (Ok(()), Some(drain)) => break drain,
                        (Ok(()), None) => continue,
                        (Err(_), _) => break Duration::ZERO,
                    }
                }
            }
        };
        drop(listener);
        drain_connections(&shard, drain).await;
        Ok(())
    })?
}

fn accept(shard: &Rc<ShardContext>, connection: io::Connection, peer: std::net::SocketAddr) {
    let open = shard.stats.connections_open.fetch_add(1, Ordering::Relaxed);
    stats::add(&shard.stats.connections_total, 1);
    let throttled = match shard.config.protocol.secret {
        Some(_) => shard.throttle.blocked(peer.ip(), Instant::now()),
        None => None,
    };
    let refuse = if open >= shard.config.max_connections as u64 {
        stats::add(&shard.stats.connections_refused, 1);
        if let Some(suppressed) = shard.peer_log() {
            tracing::warn!(%peer, limit = shard.config.max_connections, suppressed, "Connection refused: at the connection limit.");
        }
        let message = "too many connections; try again later";
        Some((ErrorCode::RESOURCE_EXHAUSTED, message.to_string()))
    } else if let Some(left) = throttled {
        stats::add(&shard.stats.connections_refused_auth, 1);
        if let Some(suppressed) = shard.peer_log() {
            tracing::warn!(%peer, retry_in_ms = left.as_millis() as u64, suppressed, "Connection refused: too many failed authentications from this address.");
        }
        let message = format!(
            "too many failed authentications from {}; retry in {} s",
            peer.ip(),
            left.as_secs() + 1
        );
        Some((ErrorCode::AUTH_FAILED, message))
    } else {
        None
    };
    // With TLS, the connection is wrapped here and its handshake runs first in the
    // engine's task: a refusal then reaches the client inside TLS, where it can read it.
    let connection = match shard.stats.tls.get() {
        None => connection,
        Some(identity) => match connection.server_tls(identity.current()) {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "Cannot start a TLS session.");
                shard.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        },
    };
    let mut connections = shard.connections.borrow_mut();
    connections.retain(|c| c.strong_count() > 0);
    let state = engine::start(Rc::clone(shard), connection, peer, refuse);
    connections.push(Rc::downgrade(&state));
}

async fn drain_connections(shard: &Rc<ShardContext>, drain: Duration) {
    let deadline = Instant::now() + drain;
    for state in live(shard) {
        state.go_away(drain);
    }
    // Connections close themselves once their streams are done; wait for that or the deadline.
    loop {
        if live(shard).is_empty() {
            return;
        }
        tokio::select! {
            _ = shard.connection_ended.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => break,
        }
    }
    for state in live(shard) {
        state.close(
            ErrorCode::DRAINING,
            "the server shut down; the drain deadline has passed",
        );
    }
    // Give writers a moment to flush the ERROR frames; then the runtime ends the rest.
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    while !live(shard).is_empty() {
        tokio::select! {
            _ = shard.connection_ended.notified() => {}
            _ = tokio::time::sleep_until(flush_deadline.into()) => return,
        }
    }
}

fn live(shard: &ShardContext) -> Vec<Rc<ConnState>> {
    shard
        .connections
        .borrow()
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|c| !c.is_finished())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::page_aligned;

    #[test]
    fn chunk_buffers_start_at_a_page_boundary_with_their_whole_size() {
        for size in [1, 4096, 1 << 20, (1 << 20) + 17] {
            let buf = page_aligned(size);
            assert_eq!(buf.as_ptr().align_offset(4096), 0, "{size}");
            assert!(buf.capacity() >= size && buf.is_empty(), "{size}");
        }
    }
}
