//! One pooled connection: a [`ConnHandle`] any thread can send commands to, and the tasks on
//! a client IO thread that own the socket and the protocol state (`ClientConnection`).
//!
//! Per connection, on its IO thread (one thread, `Rc`, no `RefCell` borrow across `.await`),
//! `nexus_io::driver` runs the reader, the writer and the timer, with this file's `Actor` as
//! their [`Host`]: it dispatches the protocol's events to the streams' queues. Beside them a
//! command loop applies what handles, operations and the pool ask (initiate, credit, cancel,
//! close).
//!
//! Items reach a stream's handle through `StreamShared::deliver`, which never blocks (see
//! `stream.rs`); credit comes back as `Consume` commands, one per quarter window read.

use std::cell::{Cell, RefCell};
// Per stream, looked up on every frame: hashed as `StreamMap` is (foldhash, seeded).
use foldhash::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::Sender;
use nexus_io::driver::{self, Host, Wakers, WriteBatch};
use nexus_io::{Backend, Connection};
use nexus_protocol::frame::NONCE_LEN;
use nexus_protocol::text::Printable;
use nexus_protocol::{
    CallError, ClientConnection, ClientEvent, ClientSettings, ClientSide, ErrorCode, OperationId,
    Outcome, StreamId, StreamMap,
};
use parking_lot::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::client::Shared;
use crate::stream::{Ended, Item, StreamKey, StreamShared};
use nexus_io::recv::{self, RecvBlocks};

/// What other threads ask of a connection.
#[derive(Debug)]
pub(crate) enum Command {
    Initiate(NewStream),
    Consume {
        key: StreamKey,
        bytes: u64,
    },
    Cancel {
        key: StreamKey,
    },
    CancelOperation(OperationId),
    /// Push data, within the window the push's gate gave out.
    PushData {
        key: StreamKey,
        data: Bytes,
    },
    /// The push's data is all sent: queue the client's COMPLETE.
    PushFinish {
        key: StreamKey,
    },
    /// Fail the stream on the application's finding: CANCEL, and this error as its end.
    Abort {
        key: StreamKey,
        code: ErrorCode,
        message: String,
    },
    /// Close: with `idle`, only when no stream runs (a FIN, no error).
    Close {
        idle: bool,
    },
}

/// A stream on its way to a connection, with the sending side of its queue.
#[derive(Debug)]
pub(crate) struct NewStream {
    pub(crate) shared: Arc<StreamShared>,
    pub(crate) tx: Sender<Item>,
    /// Already moved once from a connection that died before the server accepted it.
    pub(crate) retried: bool,
}

impl NewStream {
    /// Ends a stream that never reached a server.
    pub(crate) fn fail(self, code: ErrorCode, message: &str) {
        let end = Ended::error(code, message, 0);
        finish(&self.shared, &self.tx, end);
    }
}

/// Records the end and queues its marker.
fn finish(shared: &StreamShared, tx: &Sender<Item>, end: Ended) {
    record_end(shared, &end);
    shared.deliver(tx, Item::End(end));
}

fn record_end(shared: &StreamShared, end: &Ended) {
    // A push's writer waits for window no more, however the push ended (even one that never
    // reached a server).
    if let Some(gate) = &shared.push {
        gate.close();
    }
    shared.counters.stream_ended(&end.outcome);
    *shared.ended.lock() = Some(end.clone());
    if let Some(op) = &shared.operation {
        op.stream_ended(shared, end);
    }
}

/// Where a connection is in its life. It only moves forward (a late GOAWAY cannot revive a
/// dead connection), which is why the order of the variants matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Status {
    /// Connecting or in the handshake: streams wait for it.
    Connecting = 0,
    Established = 1,
    /// The server sent GOAWAY: running streams finish, new ones go elsewhere.
    Draining = 2,
    Dead = 3,
}

impl Status {
    fn from_u8(value: u8) -> Status {
        match value {
            0 => Status::Connecting,
            1 => Status::Established,
            2 => Status::Draining,
            _ => Status::Dead,
        }
    }
}

/// A connection as the pool and the handles see it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub(crate) id: u64,
    pub(crate) endpoint: SocketAddr,
    commands: UnboundedSender<Command>,
    status: AtomicU8,
    /// Streams checked out on it and not yet ended.
    pub(crate) active: AtomicUsize,
    pub(crate) last_used: Mutex<Instant>,
    /// Why the connection could not be made, once it failed to: set before its commands
    /// close, so a stream refused by the closed channel can say why.
    connect_error: OnceLock<(ErrorCode, String)>,
}

impl ConnHandle {
    pub(crate) fn new(
        id: u64,
        endpoint: SocketAddr,
        commands: UnboundedSender<Command>,
    ) -> ConnHandle {
        ConnHandle {
            id,
            endpoint,
            commands,
            status: AtomicU8::new(Status::Connecting as u8),
            active: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            connect_error: OnceLock::new(),
        }
    }

    /// Sends a command; it is dropped when the connection is gone (its streams have ended).
    pub(crate) fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Hands a stream to the connection, or back when the connection is gone.
    pub(crate) fn start(&self, stream: NewStream) -> Result<(), NewStream> {
        self.commands
            .send(Command::Initiate(stream))
            .map_err(|e| match e.0 {
                Command::Initiate(stream) => stream,
                _ => unreachable!("sent an Initiate"),
            })
    }

    fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Moves the status forward to `to`; never back.
    fn advance(&self, to: Status) {
        self.status.fetch_max(to as u8, Ordering::AcqRel);
    }

    /// Whether new streams may go here.
    pub(crate) fn is_usable(&self) -> bool {
        self.status() < Status::Draining && !self.commands.is_closed()
    }

    /// Why the connection could not be made, if that is how it ended.
    pub(crate) fn connect_error(&self) -> Option<(ErrorCode, &str)> {
        self.connect_error
            .get()
            .map(|(code, message)| (*code, message.as_str()))
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.status() == Status::Dead || self.commands.is_closed()
    }

    fn stream_done(&self) {
        *self.last_used.lock() = Instant::now();
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection's tasks run and what they need.
pub(crate) struct Spawn {
    pub(crate) handle: Arc<ConnHandle>,
    pub(crate) commands: UnboundedReceiver<Command>,
    pub(crate) client: Weak<Shared>,
    pub(crate) backend: Backend,
    pub(crate) settings: ClientSettings,
    pub(crate) connect_timeout: Duration,
    pub(crate) tls: Option<Tls>,
}

/// A client's TLS: its configuration and the name servers must hold (`None`: the address).
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// A stream on this connection, from its Initiate command to its end (then removed).
struct Slot {
    shared: Arc<StreamShared>,
    tx: Sender<Item>,
    id: Option<StreamId>,
    initiated: bool,
    retried: bool,
}

struct Actor {
    handle: Arc<ConnHandle>,
    client: Weak<Shared>,
    io: Connection,
    proto: RefCell<ClientConnection>,
    slots: RefCell<HashMap<StreamKey, Slot>>,
    ids: RefCell<StreamMap<StreamKey>>,
    /// Streams waiting for the handshake, in order.
    waiting: RefCell<Vec<StreamKey>>,
    wakers: Wakers,
    /// The receive buffer's blocks (see `recv.rs`).
    blocks: RefCell<RecvBlocks>,
    closing_idle: Cell<bool>,
    /// Whether this client has a secret, for the hint on an authentication failure.
    has_secret: bool,
    /// Why the connection closed, when it closed with an error.
    closed_with: RefCell<Option<nexus_protocol::WireError>>,
    /// Whether the handshake ever finished.
    established: Cell<bool>,
}

/// Runs a connection to its end. Call on a client IO thread (inside its runtime).
pub(crate) async fn run(spawn: Spawn) {
    let Spawn {
        handle,
        mut commands,
        client,
        backend,
        settings,
        connect_timeout,
        tls,
    } = spawn;
    let endpoint = handle.endpoint;
    let connected =
        tokio::time::timeout(connect_timeout, Connection::connect(backend, endpoint)).await;
    let io = match connected {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            return refuse(
                &handle,
                &mut commands,
                ErrorCode::UNREACHABLE,
                &format!("cannot connect to {endpoint}: {e}"),
            )
        }
        Err(_) => {
            let ms = connect_timeout.as_millis();
            return refuse(
                &handle,
                &mut commands,
                ErrorCode::UNREACHABLE,
                &format!("cannot connect to {endpoint} within {ms} ms"),
            );
        }
    };
    let io = match tls {
        None => io,
        Some(tls) => match secure(io, tls, endpoint, settings.timers.handshake_timeout).await {
            Ok(io) => io,
            Err((code, message)) => return refuse(&handle, &mut commands, code, &message),
        },
    };
    let mut nonce = [0u8; NONCE_LEN];
    if getrandom::fill(&mut nonce).is_err() {
        return refuse(
            &handle,
            &mut commands,
            ErrorCode::INTERNAL,
            "no source of randomness for the handshake",
        );
    }
    let has_secret = settings.secret.is_some();
    let actor = Rc::new(Actor {
        handle: Arc::clone(&handle),
        client,
        io,
        proto: RefCell::new(ClientConnection::new(settings, nonce, Instant::now())),
        slots: RefCell::new(HashMap::default()),
        ids: RefCell::new(StreamMap::default()),
        waiting: RefCell::new(Vec::new()),
        wakers: Wakers::default(),
        blocks: RefCell::new(RecvBlocks::default()),
        closing_idle: Cell::new(false),
        has_secret,
        closed_with: RefCell::new(None),
        established: Cell::new(false),
    });
    tracing::debug!(endpoint = %endpoint, connection = handle.id, "Connected.");
    let command_actor = Rc::clone(&actor);
    let command_loop = tokio::task::spawn_local(async move {
        while let Some(command) = commands.recv().await {
            command_actor.apply(command);
        }
        commands
    });
    driver::drive(Rc::clone(&actor), WriteBatch::default()).await;
    handle.advance(Status::Dead);
    command_loop.abort();
    // Streams still queued aside end here too; anything sent from now on is refused.
    if let Ok(mut commands) = command_loop.await {
        commands.close();
        while let Ok(command) = commands.try_recv() {
            actor.apply(command);
        }
    }
    actor.end_remaining();
    if let Some(client) = actor.client.upgrade() {
        client.connection_ended(&handle);
    }
    tracing::debug!(endpoint = %endpoint, connection = handle.id, "Connection ended.");
}

/// The connection could not be made: every stream sent to it fails with `message`.
/// Runs the TLS handshake on a new connection, within the handshake deadline. A refused
/// certificate or a server without TLS is `auth_failed` or `protocol_error` (a retry will not
/// change it); a connection that broke or timed out is `unreachable`, as a failed connect.
async fn secure(
    io: Connection,
    tls: Tls,
    endpoint: SocketAddr,
    limit: Duration,
) -> Result<Connection, (ErrorCode, String)> {
    use nexus_io::tls::HandshakeError;
    let name = tls
        .server_name
        .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(endpoint.ip().into()));
    let io = io
        .client_tls(tls.config, name)
        .map_err(|e| (ErrorCode::INTERNAL, format!("cannot start TLS: {e}")))?;
    let error = match tokio::time::timeout(limit, io.handshake()).await {
        Ok(Ok(())) => return Ok(io),
        Ok(Err(error)) => error,
        Err(_) => HandshakeError::Timeout(limit),
    };
    let code = match error {
        HandshakeError::Tls(_) => ErrorCode::AUTH_FAILED,
        HandshakeError::PlaintextNexus(_) | HandshakeError::NotTls(_) => ErrorCode::PROTOCOL_ERROR,
        _ => ErrorCode::UNREACHABLE,
    };
    Err((code, format!("{endpoint}: {error}")))
}

fn refuse(
    handle: &ConnHandle,
    commands: &mut UnboundedReceiver<Command>,
    code: ErrorCode,
    message: &str,
) {
    // `unreachable`, not `connection_lost`: nothing was connected, so nothing was lost.
    tracing::debug!(endpoint = %handle.endpoint, reason = %Printable(message), "Cannot connect.");
    let _ = handle.connect_error.set((code, message.to_string()));
    handle.advance(Status::Dead);
    commands.close();
    while let Ok(command) = commands.try_recv() {
        if let Command::Initiate(stream) = command {
            handle.stream_done();
            stream.fail(code, message);
        }
    }
}

impl Host for Actor {
    type Side = ClientSide;

    fn protocol(&self) -> &RefCell<ClientConnection> {
        &self.proto
    }

    fn socket(&self) -> &Connection {
        &self.io
    }

    fn wakers(&self) -> &Wakers {
        &self.wakers
    }

    fn peer(&self) -> SocketAddr {
        self.handle.endpoint
    }

    fn before_events(self: &Rc<Self>) {
        if self.proto.borrow().is_closed() {
            // Before the streams' ends are handled, so a retry does not pick this connection.
            self.handle.advance(Status::Dead);
        }
        if self.proto.borrow().is_established() {
            self.initiate_waiting();
        }
    }

    fn on_event(self: &Rc<Self>, event: ClientEvent) {
        match event {
            ClientEvent::Established {
                version,
                server_name,
            } => {
                tracing::debug!(endpoint = %self.handle.endpoint, version, server = %server_name, "Handshake done.");
                self.established.set(true);
                self.handle.advance(Status::Established);
                self.initiate_waiting();
            }
            ClientEvent::Initiated {
                stream,
                expected_bytes,
            } => {
                if let Some(slot) = self.slot_of(stream).as_mut() {
                    slot.initiated = true;
                    slot.shared
                        .expected_bytes
                        .store(expected_bytes, Ordering::Relaxed);
                }
            }
            ClientEvent::Chunk { stream, data } => self.deliver_chunk(stream, data),
            ClientEvent::Credit { stream, increment } => {
                if let Some(slot) = self.slot_of(stream).as_ref() {
                    if let Some(gate) = &slot.shared.push {
                        gate.grant(u64::from(increment));
                    }
                }
            }
            ClientEvent::Report { stream, text } => {
                if let Some(slot) = self.slot_of(stream).as_ref() {
                    if let Some(gate) = &slot.shared.push {
                        gate.set_report(text);
                    }
                }
            }
            ClientEvent::Progress { stream, progress } => {
                if let Some(slot) = self.slot_of(stream).as_mut() {
                    let shared = &slot.shared;
                    shared
                        .items_sent
                        .store(progress.items.sent, Ordering::Relaxed);
                    shared
                        .items_expected
                        .store(progress.items.expected, Ordering::Relaxed);
                }
            }
            ClientEvent::StreamEnd {
                stream,
                outcome,
                bytes_received,
            } => {
                let Some(key) = self.ids.borrow_mut().remove(&stream) else {
                    return;
                };
                self.stream_ended(key, outcome, bytes_received);
            }
            ClientEvent::GoAway { message } => {
                tracing::debug!(endpoint = %self.handle.endpoint, message = %Printable(&message), "Server drains.");
                self.handle.advance(Status::Draining);
                // Streams not yet sent go to another connection.
                self.initiate_waiting();
            }
            ClientEvent::Closed(error) => {
                self.handle.advance(Status::Dead);
                // A TLS failure after the handshake (in TLS 1.3 the server judges a client
                // certificate only then) says more than "connection lost".
                let error = match self.io.tls_failure() {
                    Some(message) => Some(nexus_protocol::WireError {
                        code: ErrorCode::AUTH_FAILED,
                        message,
                    }),
                    None => error,
                };
                match error {
                    Some(e) => {
                        tracing::debug!(endpoint = %self.handle.endpoint, code = %e.code, reason = %Printable(&e.message), "Connection closed.");
                        *self.closed_with.borrow_mut() = Some(e);
                    }
                    None => {
                        tracing::debug!(endpoint = %self.handle.endpoint, "Connection closed.")
                    }
                }
            }
        }
    }

    /// Reads land in the connection's receive blocks, so chunks are handed out without a
    /// copy (`recv.rs`).
    fn prepare_read(&self, buf: &mut BytesMut, pending: Option<usize>) -> usize {
        self.blocks.borrow_mut().prepare(buf, pending)
    }

    fn after_read(&self) {
        if self.proto.borrow().active_streams() == 0 {
            self.blocks.borrow_mut().release_idle();
        }
    }

    /// The pool closes an idle connection with a FIN once its last frames are out.
    fn close_when_flushed(&self) -> bool {
        self.closing_idle.get() && self.slots.borrow().is_empty()
    }
}

impl Actor {
    fn apply(self: &Rc<Self>, command: Command) {
        match command {
            Command::Initiate(stream) => {
                let key = stream.shared.key;
                self.slots.borrow_mut().insert(
                    key,
                    Slot {
                        shared: stream.shared,
                        tx: stream.tx,
                        id: None,
                        initiated: false,
                        retried: stream.retried,
                    },
                );
                self.waiting.borrow_mut().push(key);
                self.closing_idle.set(false);
            }
            Command::Consume { key, bytes } => {
                let id = self.slots.borrow().get(&key).and_then(|s| s.id);
                if let Some(id) = id {
                    self.proto
                        .borrow_mut()
                        .consume(id, bytes as usize, Instant::now());
                }
            }
            Command::Cancel { key } => self.cancel(key),
            Command::PushData { key, data } => self.push_data(key, data),
            Command::PushFinish { key } => {
                let id = self.slots.borrow().get(&key).and_then(|s| s.id);
                if let Some(id) = id {
                    let result = self.proto.borrow_mut().finish_push(id, Instant::now());
                    if let Err(e) = result {
                        self.abort(key, ErrorCode::INTERNAL, &e.to_string());
                    }
                }
            }
            Command::Abort { key, code, message } => self.abort(key, code, &message),
            Command::CancelOperation(operation) => {
                let keys: Vec<StreamKey> = self
                    .slots
                    .borrow()
                    .iter()
                    .filter(|(_, s)| s.shared.request.operation == operation)
                    .map(|(k, _)| *k)
                    .collect();
                let mut sent = Vec::new();
                for key in keys {
                    if self
                        .slots
                        .borrow()
                        .get(&key)
                        .is_some_and(|s| s.id.is_none())
                    {
                        self.cancel(key);
                    } else {
                        sent.push(key);
                    }
                }
                if !sent.is_empty() {
                    self.proto
                        .borrow_mut()
                        .cancel_operation(operation, "cancelled by the application");
                    for key in sent {
                        self.purge_chunks(key);
                    }
                }
            }
            Command::Close { idle } => {
                if idle {
                    if self.slots.borrow().is_empty() {
                        self.closing_idle.set(true);
                    }
                } else {
                    self.proto
                        .borrow_mut()
                        .close(ErrorCode::CANCELLED, "the client closed the connection");
                }
            }
        }
        driver::changed(self);
    }

    fn cancel(&self, key: StreamKey) {
        let id = match self.slots.borrow().get(&key) {
            None => return,
            Some(slot) => slot.id,
        };
        match id {
            Some(id) => {
                let _ = self
                    .proto
                    .borrow_mut()
                    .cancel(id, "cancelled by the application");
                self.purge_chunks(key);
            }
            None => {
                self.waiting.borrow_mut().retain(|k| *k != key);
                self.end(key, Outcome::Cancelled, 0);
            }
        }
    }

    /// Hands push data to the protocol in pieces it takes (at most a frame each). The handle
    /// took it from the gate, so it is within the window the server granted.
    fn push_data(&self, key: StreamKey, mut data: Bytes) {
        let Some(id) = self.slots.borrow().get(&key).and_then(|s| s.id) else {
            return;
        };
        let now = Instant::now();
        while !data.is_empty() {
            let capacity = self.proto.borrow().push_capacity(id);
            if capacity == 0 {
                // Cancelled or failed meanwhile: the rest is dropped with the push.
                return;
            }
            let piece = data.split_to(capacity.min(data.len()));
            let result = self.proto.borrow_mut().send_push_chunk(id, piece, now);
            if let Err(e) = result {
                return self.abort(key, ErrorCode::INTERNAL, &e.to_string());
            }
        }
    }

    /// Fails a stream on this side's finding; its end comes as the protocol reports it.
    fn abort(&self, key: StreamKey, code: ErrorCode, message: &str) {
        let id = match self.slots.borrow().get(&key) {
            None => return,
            Some(slot) => slot.id,
        };
        match id {
            Some(id) => {
                let _ = self.proto.borrow_mut().abort(id, code, message);
            }
            None => {
                self.waiting.borrow_mut().retain(|k| *k != key);
                self.end(key, error(code, message), 0);
            }
        }
    }

    /// Chunks waiting for a cancelled stream's reader are not delivered.
    fn purge_chunks(&self, key: StreamKey) {
        if let Some(slot) = self.slots.borrow().get(&key) {
            slot.shared.purge_spilled_chunks();
        }
    }

    fn slot_of(&self, stream: StreamId) -> Option<std::cell::RefMut<'_, Slot>> {
        let key = *self.ids.borrow().get(&stream)?;
        std::cell::RefMut::filter_map(self.slots.borrow_mut(), |slots| slots.get_mut(&key)).ok()
    }

    /// Sends INITIATE for the streams waiting for the handshake, or moves them elsewhere if
    /// this connection cannot take them.
    fn initiate_waiting(self: &Rc<Self>) {
        let keys = std::mem::take(&mut *self.waiting.borrow_mut());
        for key in keys {
            let (request, cancelled) = match self.slots.borrow().get(&key) {
                Some(slot) => (
                    slot.shared.request.clone(),
                    slot.shared.cancel_requested.load(Ordering::Acquire),
                ),
                None => continue,
            };
            if cancelled {
                self.end(key, Outcome::Cancelled, 0);
                continue;
            }
            let result = self.proto.borrow_mut().initiate(request, Instant::now());
            match result {
                Ok(id) => {
                    self.ids.borrow_mut().insert(id, key);
                    let window = self.proto.borrow().stream_window().unwrap_or(1);
                    if let Some(slot) = self.slots.borrow_mut().get_mut(&key) {
                        slot.id = Some(id);
                        // The same batch as the protocol's CREDIT: one command per CREDIT.
                        let batch = u64::from(window / 4).max(1);
                        slot.shared.credit_batch.store(batch, Ordering::Relaxed);
                    }
                }
                Err(CallError::Draining) | Err(CallError::Closed) => {
                    let message = "the server is draining or the connection closed";
                    self.retry_or_end(key, ErrorCode::DRAINING, message);
                }
                Err(e @ CallError::TooManyStreams(_)) => {
                    let message = format!("{e}; raise burst.nexus.client.connections.per.endpoint");
                    self.end(key, error(ErrorCode::RESOURCE_EXHAUSTED, &message), 0);
                }
                Err(e @ CallError::ParadataTooLong { .. }) => {
                    self.end(key, error(ErrorCode::BAD_PARADATA, &e.to_string()), 0);
                }
                Err(e @ CallError::PushUnsupported(_)) => {
                    let message = format!("{}: {e}", self.handle.endpoint);
                    self.end(key, error(ErrorCode::UNSUPPORTED_VERSION, &message), 0);
                }
                Err(e) => self.end(key, error(ErrorCode::INTERNAL, &e.to_string()), 0),
            }
        }
    }

    fn stream_ended(self: &Rc<Self>, key: StreamKey, outcome: Outcome, bytes: u64) {
        let retry = match (&outcome, self.slots.borrow().get(&key)) {
            (Outcome::Error { code, .. }, Some(slot)) => {
                !slot.initiated
                    && !slot.retried
                    && (*code == ErrorCode::CONNECTION_LOST || *code == ErrorCode::DRAINING)
            }
            _ => false,
        };
        if retry {
            let message = match &outcome {
                Outcome::Error { message, .. } => message.clone(),
                _ => String::new(),
            };
            self.retry_or_end(key, ErrorCode::CONNECTION_LOST, &message);
        } else {
            self.end(key, outcome, bytes);
        }
    }

    /// A stream the server never accepted goes to a fresh connection, once.
    fn retry_or_end(self: &Rc<Self>, key: StreamKey, code: ErrorCode, message: &str) {
        let retried = self.slots.borrow().get(&key).is_some_and(|s| s.retried);
        let client = self.client.upgrade();
        match (retried, client) {
            (false, Some(client)) => {
                let Some(slot) = self.slots.borrow_mut().remove(&key) else {
                    return;
                };
                if let Some(id) = slot.id {
                    self.ids.borrow_mut().remove(&id);
                }
                self.handle.stream_done();
                tracing::debug!(endpoint = %self.handle.endpoint, reason = %Printable(message), "Retrying a stream on a fresh connection.");
                client.start(NewStream {
                    shared: slot.shared,
                    tx: slot.tx,
                    retried: true,
                });
            }
            _ => self.end(key, error(code, message), 0),
        }
    }

    fn deliver_chunk(&self, stream: StreamId, data: Bytes) {
        let Some(key) = self.ids.borrow().get(&stream).copied() else {
            return;
        };
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(&key) else {
            return;
        };
        slot.shared
            .bytes_received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        slot.shared.counters.received(data.len());
        let data = if data.len() < recv::COPY_BELOW {
            Bytes::copy_from_slice(&data)
        } else {
            data
        };
        slot.shared.deliver(&slot.tx, Item::Chunk(data));
    }

    /// The stream ended: its marker is queued after its data, the pool learns it is free.
    fn end(&self, key: StreamKey, outcome: Outcome, bytes: u64) {
        let Some(slot) = self.slots.borrow_mut().remove(&key) else {
            return;
        };
        let report = slot
            .shared
            .push
            .as_ref()
            .and_then(|gate| gate.take_report());
        let end = Ended {
            outcome,
            bytes_received: bytes,
            report,
        };
        // Idle before the end marker is queued: a reader that sees the end sees the
        // connection free (and its idle clock started).
        self.handle.stream_done();
        finish(&slot.shared, &slot.tx, end);
    }

    /// The connection is over. The protocol ended every stream it knew; the streams still
    /// here never reached it (waiting for the handshake, or sent to this connection as it
    /// died). After a transient end they go elsewhere, once; after an error that a retry
    /// cannot clear (authentication, a peer that is not a Nexus server, no common version)
    /// they end with that error, said plainly.
    fn end_remaining(self: &Rc<Self>) {
        let keys: Vec<StreamKey> = self.slots.borrow().keys().copied().collect();
        let closed_with = self.closed_with.borrow().clone();
        for key in keys {
            match &closed_with {
                Some(e) if !is_transient(e.code) => {
                    let message = self.explain(e);
                    self.end(key, error(e.code, &message), 0)
                }
                Some(e) => {
                    let message = self.explain(e);
                    self.retry_or_end(key, e.code, &message)
                }
                None => self.retry_or_end(key, ErrorCode::CONNECTION_LOST, "the connection closed"),
            }
        }
    }

    /// A connection error as a user should read it: what to change, where that is known.
    fn explain(&self, e: &nexus_protocol::WireError) -> String {
        let endpoint = self.handle.endpoint;
        if self.io.tls_failure().is_some() {
            return format!("{endpoint}: {}", e.message);
        }
        match e.code {
            ErrorCode::AUTH_FAILED if self.has_secret => format!(
                "{endpoint} refused our authentication: {} (check burst.nexus.auth.secret \
                 or burst.nexus.auth.secret.file against the server's)",
                e.message
            ),
            ErrorCode::AUTH_FAILED => format!(
                "{endpoint} requires a shared secret: {} (set burst.nexus.auth.secret or \
                 burst.nexus.auth.secret.file)",
                e.message
            ),
            ErrorCode::TIMEOUT if !self.established.get() => format!(
                "{endpoint}: {} (is a Nexus server listening on that port?)",
                e.message
            ),
            _ => format!("{endpoint}: {}", e.message),
        }
    }
}

/// Whether a connection that ended with `code` may work on another try.
fn is_transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::CONNECTION_LOST
            | ErrorCode::DRAINING
            | ErrorCode::TIMEOUT
            | ErrorCode::UNREACHABLE
    )
}

fn error(code: ErrorCode, message: &str) -> Outcome {
    Outcome::Error {
        code,
        message: message.to_string(),
    }
}
