//! The stream engine: drives one connection's [`ServerConnection`] with real IO.
//!
//! Per connection, on its shard, `nexus_io::driver` runs the reader, the writer and the timer
//! (this file is their [`Host`]: it handles the protocol's events, recycles the chunk buffers
//! the socket is done with and counts the memory held), plus one task per stream, sharing
//! `ConnState` through `Rc` (one thread, no locks; no `RefCell` borrow is held across an
//! `.await`).
//!
//! Each stream's task asks its producer for a chunk only when the client's window has room, so
//! a stream holds at most its window (queued) plus one chunk (being split), whatever the
//! client does. The protocol's send queue is served round-robin across streams. A zstd stream
//! prepares up to the packer concurrency of chunks ahead, compressed on the packer's worker
//! threads (`packer.rs`), and sends them in order.
//!
//! Protocol decisions stay in `nexus-protocol`; this file only moves bytes and events.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use bytes::{Bytes, BytesMut};
use nexus_protocol::frame::NONCE_LEN;
use nexus_protocol::text::Printable;
use nexus_protocol::{
    CallError, ErrorCode, ServerConnection, ServerEvent, ServerSide, StreamId, StreamMap,
};
use tokio::sync::{oneshot, Notify};

use crate::io;
use crate::io::driver::{self, Host, Wakers, WriteBatch};
use crate::io::recv::{self, RecvBlocks};
use crate::shard::ShardContext;
use crate::source::Producer;
use crate::stats;

/// One connection's shared state.
pub(crate) struct ConnState {
    shard: Rc<ShardContext>,
    io: io::Connection,
    peer: SocketAddr,
    proto: RefCell<ServerConnection>,
    streams: RefCell<StreamMap<Rc<StreamSlot>>>,
    wakers: Wakers,
    finished: Cell<bool>,
    /// Stream data this connection holds, as last added to the shard's total.
    held: Cell<usize>,
    /// Bytes taken from producers and not yet queued in the protocol (split remainders,
    /// chunks taken ahead, chunks at the packer).
    prepared: Cell<usize>,
    /// Bytes the writer took from the protocol and has not written yet.
    in_flight: Cell<usize>,
    /// Refused at accept: its closing ERROR is ours, not the client's doing.
    refused: bool,
    /// Receive blocks, used while the connection has a push (bulk data coming in).
    blocks: RefCell<RecvBlocks>,
    /// Pushes running on the connection (started, their task not yet ended).
    pushes: Cell<usize>,
}

struct StreamSlot {
    /// Credit arrived (a pull), or data or the client's end (a push).
    credit: Notify,
    /// The stream ended from outside (cancel, timeout, connection closed).
    stop: Notify,
    stopped: Cell<bool>,
    /// A push's data and end, in order, waiting for its sink.
    inbox: RefCell<VecDeque<PushItem>>,
    /// Data bytes in `inbox` and at the sink, counted in the connection's `prepared`.
    inbox_bytes: Cell<usize>,
    /// A push: its ends count in the push counters.
    push: bool,
    /// Its paradata, kept only when a stream watcher wants to hear how streams end (taken
    /// by the report at the end).
    watched: RefCell<Option<String>>,
    /// Why it failed, for the watcher.
    failure: RefCell<Option<String>>,
    /// The digest of a complete stream, for the watcher.
    digest: Cell<Option<u64>>,
}

/// What the protocol hands a push's task.
enum PushItem {
    Data(Bytes),
    /// The client's COMPLETE matched: commit.
    End,
}

impl StreamSlot {
    fn new(push: bool, watched: Option<String>) -> Rc<StreamSlot> {
        Rc::new(StreamSlot {
            push,
            watched: RefCell::new(watched),
            failure: RefCell::new(None),
            digest: Cell::new(None),
            credit: Notify::new(),
            stop: Notify::new(),
            stopped: Cell::new(false),
            inbox: RefCell::new(VecDeque::new()),
            inbox_bytes: Cell::new(0),
        })
    }
}

impl StreamSlot {
    /// Keeps why the stream failed, when a stream watcher will hear of it.
    fn failed(&self, code: ErrorCode, message: &str) {
        if self.watched.borrow().is_some() {
            *self.failure.borrow_mut() = Some(format!("{code}: {message}"));
        }
    }

    fn halt(&self) {
        self.stopped.set(true);
        self.stop.notify_one();
        self.credit.notify_one();
    }
}

/// How a stream's task ended, for the counters.
#[derive(Clone, Copy)]
enum End {
    Complete,
    Error,
    Stopped,
}

/// Starts the tasks of a new connection. With `refuse`, the connection only gets that ERROR
/// (after the preface) and is closed.
pub(crate) fn start(
    shard: Rc<ShardContext>,
    io: io::Connection,
    peer: SocketAddr,
    refuse: Option<(ErrorCode, String)>,
) -> Rc<ConnState> {
    let mut nonce = [0u8; NONCE_LEN];
    let nonce_failed = getrandom::fill(&mut nonce).is_err();
    let proto = ServerConnection::new(shard.config().protocol.clone(), nonce, Instant::now());
    let state = Rc::new(ConnState {
        shard,
        io,
        peer,
        proto: RefCell::new(proto),
        streams: RefCell::new(StreamMap::default()),
        wakers: Wakers::default(),
        finished: Cell::new(false),
        held: Cell::new(0),
        prepared: Cell::new(0),
        in_flight: Cell::new(0),
        refused: refuse.is_some(),
        blocks: RefCell::new(RecvBlocks::default()),
        pushes: Cell::new(0),
    });
    if let Some((code, message)) = refuse {
        state.close(code, &message);
    } else if nonce_failed {
        tracing::error!(peer = %peer, "No randomness for the handshake nonce; closing.");
        state.close(
            ErrorCode::INTERNAL,
            "the server has no source of randomness",
        );
    }
    tracing::debug!(peer = %peer, "Connection accepted.");
    tokio::task::spawn_local(run(Rc::clone(&state)));
    state
}

async fn run(state: Rc<ConnState>) {
    if state.tls_handshake().await {
        driver::drive(Rc::clone(&state), WriteBatch::default()).await;
    }
    state.halt_all_streams();
    // The connection's buffers go with it: its share of the shard's memory is free.
    state.release_all();
    state.finished.set(true);
    state.prepared.set(0);
    stats::sub(&state.shard.stats.connections_open, 1);
    state.shard.connection_ended.notify_one();
    tracing::debug!(peer = %state.peer, "Connection ended.");
}

impl ConnState {
    /// Runs the TLS handshake, when the connection has TLS, within the handshake deadline.
    /// False when it failed: counted, logged, and a plaintext Nexus client told why in
    /// plaintext (a preface and a connection ERROR it can read).
    async fn tls_handshake(&self) -> bool {
        if !self.io.is_tls() {
            return true;
        }
        let limit = self.shard.config().protocol.timers.handshake_timeout;
        let result = match tokio::time::timeout(limit, self.io.handshake()).await {
            Ok(result) => result,
            Err(_) => Err(io::tls::HandshakeError::Timeout(limit)),
        };
        let Err(error) = result else {
            return true;
        };
        stats::add(&self.shard.stats.tls_handshake_failures, 1);
        if let Some(suppressed) = self.shard.peer_log() {
            tracing::warn!(peer = %self.peer, suppressed, %error, "TLS handshake failed.");
        }
        if let io::tls::HandshakeError::PlaintextNexus(_) = error {
            let mut refusal = BytesMut::from(&nexus_protocol::frame::PREFACE[..]);
            nexus_protocol::Frame::Error {
                stream: StreamId::CONNECTION,
                code: ErrorCode::PROTOCOL_ERROR,
                message: "this port requires TLS: connect with burst.nexus.client.tls=true and \
                          the server's CA in burst.nexus.client.tls.ca"
                    .into(),
            }
            .encode(&mut refusal);
            let deadline = Instant::now() + driver::LINGER;
            self.io
                .refuse_in_plaintext(refusal.freeze(), deadline)
                .await;
        } else {
            self.io.shutdown();
        }
        false
    }
}

impl Host for ConnState {
    type Side = ServerSide;

    fn protocol(&self) -> &RefCell<ServerConnection> {
        &self.proto
    }

    fn socket(&self) -> &io::Connection {
        &self.io
    }

    fn wakers(&self) -> &Wakers {
        &self.wakers
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A connection with a push reads into receive blocks (no page faults, no frame moved,
    /// chunks handed to the sink without a copy); one that only pulls takes small frames
    /// and keeps a small buffer.
    fn prepare_read(&self, buf: &mut BytesMut, pending: Option<usize>) -> usize {
        if self.has_push() {
            return self.blocks.borrow_mut().prepare(buf, pending);
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        usize::MAX
    }

    fn after_read(&self) {
        if !self.has_push() {
            self.blocks.borrow_mut().release_idle();
        }
    }

    fn on_event(self: &Rc<Self>, event: ServerEvent) {
        match event {
            ServerEvent::Established {
                version,
                client_name,
            } => {
                if self.shard.config().protocol.secret.is_some() {
                    self.shard.throttle.succeeded(self.peer.ip());
                }
                tracing::debug!(peer = %self.peer, version, client = %client_name, "Handshake done.");
            }
            ServerEvent::StreamRequested(initiate) if initiate.push.is_some() => {
                self.start_push(initiate)
            }
            ServerEvent::StreamRequested(initiate) => self.start_stream(initiate),
            ServerEvent::PushChunk { stream, data } => {
                let len = data.len();
                // A small chunk must not pin a whole receive block.
                let data = match len < recv::COPY_BELOW {
                    true => Bytes::copy_from_slice(&data),
                    false => data,
                };
                stats::bump(&self.shard.traffic().push_bytes, len as u64);
                if let Some(slot) = self.streams.borrow().get(&stream) {
                    slot.inbox_bytes.set(slot.inbox_bytes.get() + len);
                    slot.inbox.borrow_mut().push_back(PushItem::Data(data));
                    slot.credit.notify_one();
                    self.prepare(len);
                }
            }
            ServerEvent::PushEnded { stream, .. } => {
                if let Some(slot) = self.streams.borrow().get(&stream) {
                    slot.inbox.borrow_mut().push_back(PushItem::End);
                    slot.credit.notify_one();
                }
            }
            ServerEvent::StreamFailed {
                stream,
                code,
                message,
            } => {
                self.shard.stats.stream_failed(code);
                stats::add(&self.shard.stats.pushes_error, 1);
                if let Some(suppressed) = self.shard.peer_log() {
                    tracing::info!(peer = %self.peer, stream = stream.0, code = %code, reason = %Printable(&message), suppressed, "Push failed its checks.");
                }
                self.halt_stream(stream);
            }
            ServerEvent::StreamRefused { code, .. } => {
                stats::add(&self.shard.stats.streams_rejected, 1);
                self.shard.stats.stream_failed(code);
            }
            ServerEvent::Credit { stream } => {
                if let Some(slot) = self.streams.borrow().get(&stream) {
                    slot.credit.notify_one();
                }
            }
            ServerEvent::StreamCancelled { stream } => {
                let stats = &self.shard.stats;
                match self.is_push(stream) {
                    true => stats::add(&stats.pushes_cancelled, 1),
                    false => stats::add(&stats.streams_cancelled, 1),
                }
                self.halt_stream(stream);
            }
            ServerEvent::StreamTimedOut { stream } => {
                let stats = &self.shard.stats;
                let push = self.is_push(stream);
                match push {
                    true => stats::add(&stats.pushes_timeout, 1),
                    false => stats::add(&stats.streams_timeout, 1),
                }
                stats.stream_failed(ErrorCode::TIMEOUT);
                if let Some(suppressed) = self.shard.peer_log() {
                    let why = match push {
                        true => "Push timed out: no data from the client.",
                        false => "Stream timed out: no credit from the client.",
                    };
                    tracing::info!(peer = %self.peer, stream = stream.0, suppressed, "{why}");
                }
                self.halt_stream(stream);
            }
            ServerEvent::Closed(_) if self.refused => self.halt_all_streams(),
            ServerEvent::Closed(error) => {
                if error
                    .as_ref()
                    .is_some_and(|e| e.code == ErrorCode::AUTH_FAILED)
                {
                    self.shard.throttle.failed(self.peer.ip(), Instant::now());
                }
                let reason = error
                    .as_ref()
                    .and_then(|e| stats::protocol_error_reason(e.code));
                match (&error, reason) {
                    (Some(e), Some(reason)) => {
                        stats::add(&self.shard.stats.protocol_errors[reason], 1);
                        // A hostile client must not flood the logs: a few lines per window.
                        if let Some(suppressed) =
                            self.shard.protocol_error_log.allow(Instant::now())
                        {
                            tracing::warn!(peer = %self.peer, code = %e.code, reason = %Printable(&e.message), suppressed, "Connection closed: protocol error.");
                        }
                    }
                    (Some(e), None) => {
                        if let Some(suppressed) = self.shard.peer_log() {
                            tracing::info!(peer = %self.peer, code = %e.code, reason = %Printable(&e.message), suppressed, "Connection closed.");
                        }
                    }
                    (None, _) => {
                        tracing::debug!(peer = %self.peer, "Connection closed cleanly.")
                    }
                }
                self.halt_all_streams();
            }
        }
    }

    fn after_events(&self) {
        self.account();
    }

    fn writing(&self, bytes: usize) {
        self.in_flight.set(bytes);
        self.account();
        stats::bump(&self.shard.traffic().wire_bytes, bytes as u64);
    }

    fn written(&self, segments: &mut Vec<Bytes>) {
        for segment in segments.drain(..) {
            self.shard.recycle(segment);
        }
        self.in_flight.set(0);
        self.account();
    }
}

impl ConnState {
    /// Whether a push is open on the connection.
    fn has_push(&self) -> bool {
        self.pushes.get() > 0
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished.get()
    }

    /// Recounts the stream data this connection holds (queued in the protocol, in the
    /// writer's hands, taken from producers) into the shard's total; wakes paused streams
    /// when it shrank. Called after every change of any of them.
    fn account(&self) {
        if self.finished.get() {
            return; // Released in one go at the end (`release_all`).
        }
        let now = self.proto.borrow().queued_bytes() + self.in_flight.get() + self.prepared.get();
        self.set_held(now);
    }

    fn set_held(&self, now: usize) {
        let before = self.held.replace(now);
        let shard = &self.shard.held;
        shard.set(shard.get() - before + now);
        let published = &self.shard.traffic().memory_held;
        published.store(shard.get() as u64, std::sync::atomic::Ordering::Relaxed);
        if now < before && self.shard.budget_waiters.get() > 0 {
            self.shard.budget_freed.notify_waiters();
        }
    }

    fn release_all(&self) {
        self.prepared.set(0);
        self.in_flight.set(0);
        self.set_held(0);
    }

    /// Whether one more chunk of `bytes` fits both this connection's and the shard's memory
    /// budget. The first chunk always fits, so a budget below the chunk size still moves.
    fn has_room(&self, bytes: usize) -> bool {
        let (conn, shard) = (self.held.get(), self.shard.held.get());
        let limit = self.shard.config().connection_memory_max;
        (conn == 0 || conn + bytes <= limit) && (shard == 0 || shard + bytes <= self.shard.budget)
    }

    /// Bytes taken from a producer (`+`) or handed on or dropped (`-`).
    fn prepare(&self, bytes: usize) {
        self.prepared.set(self.prepared.get() + bytes);
        self.account();
    }

    fn unprepare(&self, bytes: usize) {
        // Saturating: a halted stream task may let go after `release_all`.
        self.prepared.set(self.prepared.get().saturating_sub(bytes));
        self.account();
    }

    /// Starts draining: GOAWAY now; the protocol closes the connection cleanly when its last
    /// stream ends (a connection still in its handshake gets ERROR `draining`).
    pub(crate) fn go_away(self: &Rc<Self>, drain: Duration) {
        self.proto
            .borrow_mut()
            .go_away(drain, "the server is shutting down");
        driver::changed(self);
    }

    /// Closes the connection with a connection-level ERROR.
    pub(crate) fn close(self: &Rc<Self>, code: ErrorCode, message: &str) {
        self.proto.borrow_mut().close(code, message);
        driver::changed(self);
    }

    fn halt_all_streams(&self) {
        for (_, slot) in self.streams.borrow_mut().drain() {
            slot.halt();
        }
    }

    fn is_push(&self, stream: StreamId) -> bool {
        self.streams.borrow().get(&stream).is_some_and(|s| s.push)
    }

    fn halt_stream(&self, stream: StreamId) {
        if let Some(slot) = self.streams.borrow_mut().remove(&stream) {
            slot.halt();
        }
    }

    fn start_stream(self: &Rc<Self>, initiate: nexus_protocol::frame::Initiate) {
        let stream = initiate.stream;
        // Every line about the stream carries its stream and operation ids.
        let span = tracing::info_span!(
            "stream",
            stream = stream.0,
            operation = initiate.operation.0
        );
        let _entered = span.enter();
        if self.shard.held.get() + self.shard.chunk_size() > self.shard.budget {
            stats::add(&self.shard.stats.streams_rejected, 1);
            self.shard
                .stats
                .stream_failed(ErrorCode::RESOURCE_EXHAUSTED);
            if let Some(suppressed) = self.shard.peer_log() {
                tracing::warn!(peer = %self.peer, stream = stream.0, suppressed, "Stream refused: the server is at its memory budget.");
            }
            let message = "the server holds as much stream data as burst.nexus.server.memory.max allows; try again later";
            let _ = self
                .proto
                .borrow_mut()
                .reject(stream, ErrorCode::RESOURCE_EXHAUSTED, message);
            return;
        }
        let opened =
            self.shard
                .registry
                .open(stream, initiate.operation, &initiate.paradata, &self.shard);
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                stats::add(&self.shard.stats.streams_rejected, 1);
                self.shard.stats.stream_failed(e.code);
                if let Some(suppressed) = self.shard.peer_log() {
                    tracing::info!(peer = %self.peer, stream = stream.0, paradata = %Printable(&initiate.paradata), code = %e.code, reason = %Printable(&e.message), suppressed, "Stream refused.");
                }
                let _ = self.proto.borrow_mut().reject(stream, e.code, &e.message);
                return;
            }
        };
        let expected = opened.expected_bytes.unwrap_or(u64::MAX);
        if let Err(e) = self
            .proto
            .borrow_mut()
            .accept(stream, expected, initiate.accept_zstd)
        {
            // The client cancelled it before it could start (both frames in one read).
            tracing::debug!(peer = %self.peer, stream = stream.0, error = %e, "Stream ended before it started.");
            return;
        }
        let slot = StreamSlot::new(false, self.watched(&initiate.paradata));
        self.streams.borrow_mut().insert(stream, Rc::clone(&slot));
        stats::add(&self.shard.stats.streams_total, 1);
        stats::add(&self.shard.stats.streams_open, 1);
        self.shard.stream_started();
        tracing::debug!(peer = %self.peer, stream = stream.0, paradata = %Printable(&initiate.paradata), "Stream started.");
        tokio::task::spawn_local(
            run_stream(Rc::clone(self), slot, stream, opened.producer).instrument(span.clone()),
        );
    }
}

impl ConnState {
    /// The paradata to keep for the stream watcher, when there is one.
    fn watched(&self, paradata: &str) -> Option<String> {
        self.shard.registry.watcher().map(|_| paradata.to_string())
    }

    fn start_push(self: &Rc<Self>, initiate: nexus_protocol::frame::Initiate) {
        let stream = initiate.stream;
        let span = tracing::info_span!("push", stream = stream.0, operation = initiate.operation.0);
        let _entered = span.enter();
        let declared = initiate.push.filter(|&n| n != nexus_protocol::UNKNOWN);
        let window = self.shard.config().protocol.push_window as usize;
        let refused = if self.shard.held.get() + window > self.shard.budget {
            Err(crate::SourceError::new(
                ErrorCode::RESOURCE_EXHAUSTED,
                "the server holds as much stream data as burst.nexus.server.memory.max allows; try again later",
            ))
        } else {
            self.shard.registry.open_sink(
                stream,
                initiate.operation,
                &initiate.paradata,
                declared,
                &self.shard,
            )
        };
        let consumer = match refused {
            Ok(consumer) => consumer,
            Err(e) => {
                stats::add(&self.shard.stats.streams_rejected, 1);
                self.shard.stats.stream_failed(e.code);
                if let Some(suppressed) = self.shard.peer_log() {
                    tracing::info!(peer = %self.peer, stream = stream.0, paradata = %Printable(&initiate.paradata), code = %e.code, reason = %Printable(&e.message), suppressed, "Push refused.");
                }
                let _ = self.proto.borrow_mut().reject(stream, e.code, &e.message);
                return;
            }
        };
        let accepted =
            self.proto
                .borrow_mut()
                .accept_push(stream, initiate.accept_zstd, Instant::now());
        if let Err(e) = accepted {
            tracing::debug!(peer = %self.peer, stream = stream.0, error = %e, "Push ended before it started.");
            return;
        }
        let slot = StreamSlot::new(true, self.watched(&initiate.paradata));
        self.streams.borrow_mut().insert(stream, Rc::clone(&slot));
        stats::add(&self.shard.stats.pushes_total, 1);
        stats::add(&self.shard.stats.pushes_open, 1);
        self.pushes.set(self.pushes.get() + 1);
        self.shard.stream_started();
        tracing::debug!(peer = %self.peer, stream = stream.0, paradata = %Printable(&initiate.paradata), "Push started.");
        tokio::task::spawn_local(
            run_push(Rc::clone(self), slot, stream, consumer).instrument(span.clone()),
        );
    }
}

/// Takes one push into its sink until it ends; the consumer is dropped (its abort, unless it
/// committed) exactly once, here.
async fn run_push(
    state: Rc<ConnState>,
    slot: Rc<StreamSlot>,
    stream: StreamId,
    mut consumer: Box<dyn crate::sink::Consumer>,
) {
    let started = Instant::now();
    let (end, bytes) = consume(&state, &slot, stream, consumer.as_mut()).await;
    drop(consumer);
    state.unprepare(slot.inbox_bytes.replace(0));
    slot.inbox.borrow_mut().clear();
    let stats = &state.shard.stats;
    stats::sub(&stats.pushes_open, 1);
    state.pushes.set(state.pushes.get() - 1);
    state.shard.stream_ended();
    state.shard.metrics.push_ended(started.elapsed(), bytes);
    report_end(&state, &slot, end, bytes);
    match end {
        End::Complete => stats::add(&stats.pushes_complete, 1),
        End::Error => stats::add(&stats.pushes_error, 1),
        End::Stopped => {
            if state.proto.borrow().is_closed() {
                stats::add(&stats.pushes_error, 1);
                stats.stream_failed(ErrorCode::CONNECTION_LOST);
            }
        }
    }
    state.streams.borrow_mut().remove(&stream);
    driver::changed(&state);
}

/// Hands a push's data to its consumer in order, returning window as each piece is taken,
/// and commits at the client's end; returns how it ended and the bytes taken.
async fn consume(
    state: &Rc<ConnState>,
    slot: &StreamSlot,
    stream: StreamId,
    consumer: &mut dyn crate::sink::Consumer,
) -> (End, u64) {
    let mut taken = 0u64;
    loop {
        if slot.stopped.get() {
            return (End::Stopped, taken);
        }
        let next = slot.inbox.borrow_mut().pop_front();
        let Some(item) = next else {
            tokio::select! {
                _ = slot.credit.notified() => {}
                _ = slot.stop.notified() => {}
            }
            continue;
        };
        match item {
            PushItem::Data(data) => {
                let len = data.len();
                let written = tokio::select! {
                    written = consumer.write(data) => written,
                    _ = slot.stop.notified() => return (End::Stopped, taken),
                };
                slot.inbox_bytes.set(slot.inbox_bytes.get() - len);
                state.unprepare(len);
                if let Err(e) = written {
                    sink_failed(state, stream, &e);
                    return (End::Error, taken);
                }
                taken += len as u64;
                stats::bump(&state.shard.traffic().sink_bytes, len as u64);
                state
                    .proto
                    .borrow_mut()
                    .release(stream, len, Instant::now());
                driver::changed(state);
            }
            PushItem::End => {
                let commit_started = Instant::now();
                let committed = tokio::select! {
                    committed = consumer.commit() => committed,
                    _ = slot.stop.notified() => return (End::Stopped, taken),
                };
                state.shard.metrics.commit(commit_started.elapsed());
                let report = match committed {
                    Ok(report) => report,
                    Err(e) => {
                        sink_failed(state, stream, &e);
                        return (End::Error, taken);
                    }
                };
                let result = state.proto.borrow_mut().commit(stream, report);
                driver::changed(state);
                return match result {
                    Ok(digest) => {
                        slot.digest.set(Some(digest));
                        (End::Complete, taken)
                    }
                    // Cancelled or closed while committing: what the client hears is CANCELLED
                    // or nothing. The data stays, as the commit finished: the client does not
                    // count on it either way.
                    Err(_) => (End::Stopped, taken),
                };
            }
        }
    }
}

/// Tells the registry's stream watcher, if any, how a stream ended.
fn report_end(state: &ConnState, slot: &StreamSlot, end: End, bytes: u64) {
    let (Some(watcher), Some(paradata)) = (
        state.shard.registry.watcher(),
        slot.watched.borrow_mut().take(),
    ) else {
        return;
    };
    let closed = state.proto.borrow().is_closed();
    let (outcome, error) = match end {
        End::Complete => ("complete", None),
        End::Error => ("error", slot.failure.borrow_mut().take()),
        End::Stopped if closed => ("error", Some("connection_lost".to_string())),
        End::Stopped => ("cancelled", None),
    };
    watcher(crate::source::StreamEnded {
        push: slot.push,
        paradata,
        peer: state.peer,
        outcome,
        error,
        bytes,
        digest: slot.digest.get(),
    });
}

/// Keeps why a stream failed, for the stream watcher.
fn note_failure(state: &ConnState, stream: StreamId, code: ErrorCode, message: &str) {
    if let Some(slot) = state.streams.borrow().get(&stream) {
        slot.failed(code, message);
    }
}

/// Fails a push whose sink refused or broke: its ERROR says why.
fn sink_failed(state: &ConnState, stream: StreamId, e: &crate::SourceError) {
    note_failure(state, stream, e.code, &e.message);
    state.shard.stats.stream_failed(e.code);
    if let Some(suppressed) = state.shard.peer_log() {
        tracing::info!(peer = %state.peer, stream = stream.0, code = %e.code, reason = %Printable(&e.message), suppressed, "Push failed in its sink.");
    }
    let _ = state.proto.borrow_mut().reject(stream, e.code, &e.message);
}

async fn run_stream(
    state: Rc<ConnState>,
    slot: Rc<StreamSlot>,
    stream: StreamId,
    mut producer: Box<dyn Producer>,
) {
    let started = Instant::now();
    let (end, bytes) = produce(&state, &slot, stream, producer.as_mut(), started).await;
    drop(producer); // the source's cleanup, exactly once
    let stats = &state.shard.stats;
    stats::add(&stats.producers_dropped, 1);
    stats::sub(&stats.streams_open, 1);
    state.shard.stream_ended();
    state.shard.metrics.stream_ended(started.elapsed(), bytes);
    report_end(&state, &slot, end, bytes);
    match end {
        End::Complete => stats::add(&stats.streams_complete, 1),
        End::Error => stats::add(&stats.streams_error, 1),
        // Cancel and timeout are counted where the event arrives; a closed connection fails
        // the stream with it.
        End::Stopped => {
            if state.proto.borrow().is_closed() {
                stats::add(&stats.streams_error, 1);
                stats.stream_failed(ErrorCode::CONNECTION_LOST);
            }
        }
    }
    state.streams.borrow_mut().remove(&stream);
    driver::changed(&state);
}

/// A chunk taken from the producer and counted against the window, not yet queued.
struct Prepared {
    data: Bytes,
    /// The compressed form, on its way from the packer; `None` for an uncompressed stream.
    packed: Option<oneshot::Receiver<Option<Bytes>>>,
}

/// What asking the producer for a chunk gave.
enum Next {
    Data(Bytes),
    /// The source is done.
    Exhausted,
    /// The stream ended: stopped from outside, or failed in its source (ERROR queued).
    Ended(End),
}

/// Feeds one stream from its producer until it ends; returns how and the bytes sent.
///
/// Chunks are prepared ahead, up to the packer concurrency for a compressed stream (one
/// otherwise), and sent in order. Every prepared chunk is already inside the client's window,
/// so the stream holds at most its window plus one chunk being split, whatever the client does.
/// When the window is at 0, one chunk is taken ahead (that same one chunk): a source that turns
/// out to be done completes at once, since COMPLETE carries no data and needs no window.
async fn produce(
    state: &Rc<ConnState>,
    slot: &StreamSlot,
    stream: StreamId,
    producer: &mut dyn Producer,
    started: Instant,
) -> (End, u64) {
    let compressed = state.proto.borrow().is_compressed(stream);
    let ahead = if compressed {
        state.shard.config().packer_concurrency.max(1)
    } else {
        1
    };
    let mut queue: VecDeque<Prepared> = VecDeque::with_capacity(ahead);
    // Window bytes taken by the chunks in `queue`.
    let mut reserved = 0usize;
    let mut peak = 0usize;
    let mut pending: Option<Bytes> = None;
    let mut exhausted = false;
    let mut sent = 0u64;
    let mut items = producer.items();
    let chunk_size = state.shard.chunk_size();
    let holding = Holding::new(state);
    loop {
        if slot.stopped.get() {
            return (End::Stopped, sent);
        }
        // Prepare chunks while there is window and room in the queue.
        while !exhausted && queue.len() < ahead {
            let capacity = state
                .proto
                .borrow()
                .send_capacity(stream)
                .saturating_sub(reserved);
            if capacity == 0 {
                break;
            }
            let mut data = match pending.take() {
                Some(data) => data,
                None => match next_chunk(state, slot, stream, producer, capacity, &holding).await {
                    Next::Data(data) => data,
                    Next::Exhausted => {
                        exhausted = true;
                        break;
                    }
                    Next::Ended(end) => return (end, sent),
                },
            };
            // The window is only ever grown by CREDIT while we wait, so `capacity` still holds.
            if data.len() > capacity {
                pending = Some(data.split_off(capacity));
            }
            reserved += data.len();
            let packed = compressed.then(|| state.shard.packer.submit(data.clone()));
            queue.push_back(Prepared { data, packed });
        }
        if queue.len() > peak {
            peak = queue.len();
            state
                .shard
                .stats
                .packer_peak
                .fetch_max(peak as u64, Ordering::Relaxed);
        }
        let Some(Prepared { data, packed }) = queue.pop_front() else {
            if exhausted {
                let result = state.proto.borrow_mut().complete(stream, producer.items());
                return match result {
                    Ok(digest) => {
                        slot.digest.set(Some(digest));
                        (End::Complete, sent)
                    }
                    Err(e @ CallError::ShortOfAnnounced { .. }) => {
                        fail_in_source(state, stream, &e.to_string());
                        (End::Error, sent)
                    }
                    Err(_) => (End::Stopped, sent),
                };
            }
            if pending.is_none() {
                // The window is at 0: look one chunk ahead, to learn whether the source is done.
                match next_chunk(state, slot, stream, producer, chunk_size, &holding).await {
                    Next::Data(data) => pending = Some(data),
                    Next::Exhausted => exhausted = true,
                    Next::Ended(end) => return (end, sent),
                }
                continue;
            }
            slot.credit.notified().await;
            continue;
        };
        let zstd = match packed {
            None => None,
            // A pool that is gone (the server is stopping) fails the receiver: send raw.
            Some(packed) => tokio::select! {
                packed = packed => packed.unwrap_or(None),
                _ = slot.stop.notified() => return (End::Stopped, sent),
            },
        };
        if slot.stopped.get() {
            return (End::Stopped, sent);
        }
        reserved -= data.len();
        let len = data.len() as u64;
        let compressed_sent = zstd.is_some();
        let now = Instant::now();
        let result = state.proto.borrow_mut().send_chunk(stream, data, zstd, now);
        match result {
            Ok(()) => {
                holding.hand_on(len as usize);
                if sent == 0 {
                    state.shard.metrics.first_byte(started.elapsed());
                }
            }
            Err(e @ CallError::BeyondAnnounced { .. }) => {
                fail_in_source(state, stream, &e.to_string());
                return (End::Error, sent);
            }
            Err(e) => {
                // Only a bug gets here: capacity was checked, the stream is known.
                tracing::error!(peer = %state.peer, stream = stream.0, error = %e, "Cannot queue a chunk.");
                let _ = state.proto.borrow_mut().reject(
                    stream,
                    ErrorCode::INTERNAL,
                    "the server could not queue a chunk",
                );
                return (End::Error, sent);
            }
        }
        sent += len;
        let traffic = state.shard.traffic();
        stats::bump(&traffic.bytes, len);
        stats::bump(&traffic.chunks, 1);
        if compressed_sent {
            stats::bump(&traffic.chunks_compressed, 1);
        }
        let now_items = producer.items();
        if now_items != items {
            items = now_items;
            state.proto.borrow_mut().set_items(stream, items);
        }
        driver::changed(state);
    }
}

/// The producer's next chunk (empty ones skipped), counted in `holding`, or how the stream
/// ended while waiting. First waits until a chunk of the configured size fits the
/// connection's and the shard's memory budgets, and reserves it before the producer starts
/// (reads are asynchronous: streams that all found room would otherwise all read at once).
/// A stream over a budget pauses; its client gets HEARTBEATs meanwhile.
async fn next_chunk(
    state: &ConnState,
    slot: &StreamSlot,
    stream: StreamId,
    producer: &mut dyn Producer,
    max: usize,
    holding: &Holding<'_>,
) -> Next {
    let reserve = state.shard.chunk_size();
    if !state.has_room(reserve) {
        let _waiting = BudgetWaiter::new(&state.shard);
        while !state.has_room(reserve) {
            tokio::select! {
                _ = state.shard.budget_freed.notified() => {}
                _ = slot.stop.notified() => return Next::Ended(End::Stopped),
            }
        }
    }
    holding.take(reserve);
    let next = loop {
        let next = tokio::select! {
            next = producer.next(max) => next,
            _ = slot.stop.notified() => break Next::Ended(End::Stopped),
        };
        match next {
            Some(Ok(data)) if data.is_empty() => continue,
            Some(Ok(data)) => break Next::Data(data),
            None => break Next::Exhausted,
            Some(Err(e)) => {
                slot.failed(e.code, &e.message);
                state.shard.stats.stream_failed(e.code);
                if let Some(suppressed) = state.shard.peer_log() {
                    tracing::info!(peer = %state.peer, stream = stream.0, code = %e.code, reason = %Printable(&e.message), suppressed, "Stream failed in its source.");
                }
                let _ = state.proto.borrow_mut().reject(stream, e.code, &e.message);
                break Next::Ended(End::Error);
            }
        }
    };
    // The reservation becomes what really came.
    let came = match &next {
        Next::Data(data) => data.len(),
        _ => 0,
    };
    holding.settle(reserve, came);
    next
}

/// Counts a stream task among those waiting for memory to free, while it lives.
struct BudgetWaiter<'a>(&'a ShardContext);

impl<'a> BudgetWaiter<'a> {
    fn new(shard: &'a ShardContext) -> Self {
        shard.budget_waiters.set(shard.budget_waiters.get() + 1);
        BudgetWaiter(shard)
    }
}

impl Drop for BudgetWaiter<'_> {
    fn drop(&mut self) {
        self.0.budget_waiters.set(self.0.budget_waiters.get() - 1);
    }
}

/// Bytes a stream task holds outside the protocol (split remainders, chunks taken ahead or at
/// the packer), counted in its connection's `prepared`; what is left when the task ends is
/// let go.
struct Holding<'a> {
    state: &'a ConnState,
    bytes: Cell<usize>,
}

impl<'a> Holding<'a> {
    fn new(state: &'a ConnState) -> Self {
        Holding {
            state,
            bytes: Cell::new(0),
        }
    }

    /// `bytes` more came from the producer.
    fn take(&self, bytes: usize) {
        self.bytes.set(self.bytes.get() + bytes);
        self.state.prepare(bytes);
    }

    /// `bytes` went into the protocol's queue (where `account` counts them).
    fn hand_on(&self, bytes: usize) {
        self.bytes.set(self.bytes.get() - bytes);
        self.state.unprepare(bytes);
    }

    /// A reservation of `reserved` bytes turns into the `came` bytes the producer gave: one
    /// recount instead of a take and a hand-on.
    fn settle(&self, reserved: usize, came: usize) {
        self.bytes.set(self.bytes.get() + came - reserved);
        if came > reserved {
            self.state.prepare(came - reserved);
        } else {
            self.state.unprepare(reserved - came);
        }
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.state.unprepare(self.bytes.get());
    }
}

/// Fails a stream whose source broke a promise (its announced size): `source_failed`.
fn fail_in_source(state: &ConnState, stream: StreamId, why: &str) {
    note_failure(state, stream, ErrorCode::SOURCE_FAILED, why);
    state.shard.stats.stream_failed(ErrorCode::SOURCE_FAILED);
    if let Some(suppressed) = state.shard.peer_log() {
        tracing::warn!(peer = %state.peer, stream = stream.0, reason = %why, suppressed, "Stream failed in its source.");
    }
    let _ = state
        .proto
        .borrow_mut()
        .reject(stream, ErrorCode::SOURCE_FAILED, why);
}
