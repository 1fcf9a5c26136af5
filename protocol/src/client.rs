//! The client side of a connection: BIND and AUTH, INITIATE, receiving chunks with sequence,
//! window and digest checks, CREDIT as the application consumes, CANCEL.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, Role};
use crate::compress;
use crate::conn::{self, earliest, Clock, Inbox, Outbox, MIN_HEARTBEAT};
use crate::error::{CallError, WireError};
use crate::frame::{Accept, Bind, Chunk, Frame, Initiate, CHUNK_OVERHEAD_MAX, NONCE_LEN, PREFACE};
use crate::server::frame_name;
use crate::types::{
    Completion, ErrorCode, OperationId, Progress, StreamId, UNKNOWN, VERSION_MAX, VERSION_MIN,
};

/// Limits and timers of the client side. Defaults are PROTOCOL.md's.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// Per-stream window asked for, in bytes: the most data one stream can have in flight
    /// or waiting for the application until its window grows (see `max_window`).
    pub initial_window: u32,
    /// Largest window a stream grows to while its application keeps up with the data (the
    /// stream is limited by its window, not by its reader). Equal to the initial window: no
    /// growth. The memory a stream pins is bounded by the larger of the two.
    pub max_window: u32,
    /// Largest frame payload accepted from the server, in bytes (chunk data + 12).
    pub max_frame_size: u32,
    /// Heartbeat interval asked for.
    pub heartbeat_interval: Duration,
    /// Time from connect until ACCEPT (and AUTH) must be done.
    pub handshake_timeout: Duration,
    /// A stream that may receive (window > 0) but hears nothing this long ends with
    /// [`Outcome::TimedOut`] and is cancelled.
    pub stream_timeout: Duration,
    /// Shared secret; when set, the server must require and pass authentication.
    pub secret: Option<Vec<u8>>,
    /// Sent in BIND.
    pub name: String,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            initial_window: 4 << 20,
            max_window: 16 << 20,
            max_frame_size: 4 << 20,
            heartbeat_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(60),
            secret: None,
            name: concat!("nexus-client/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What a stream asks the server for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRequest {
    /// What to stream, interpreted by the server's sources (`file:data.bin`, ...).
    pub paradata: String,
    /// The macro operation the stream belongs to (0: none).
    pub operation: OperationId,
    /// Whether zstd-compressed chunks are welcome.
    pub accept_zstd: bool,
    /// An optional W3C `traceparent`.
    pub traceparent: Option<String>,
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// COMPLETE arrived and its counts and digest match what was received.
    Complete(Completion),
    /// The server (or this side, for integrity failures and lost connections) failed it.
    Error {
        /// The code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Cancelled by the application, and acknowledged (or the connection ended).
    Cancelled,
    /// Nothing arrived within the stream timeout while the server could have sent.
    TimedOut,
}

/// What the client application learns from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Handshake (and authentication) done: streams may be initiated.
    Established {
        /// Negotiated version.
        version: u16,
        /// The server's name.
        server_name: String,
    },
    /// The server accepted a stream.
    Initiated {
        /// The stream.
        stream: StreamId,
        /// Total bytes expected, `u64::MAX` when unknown.
        expected_bytes: u64,
    },
    /// Data, in order, already checked and decompressed. Hand the byte count back with
    /// [`ClientConnection::consume`] once the application is done with it.
    Chunk {
        /// The stream.
        stream: StreamId,
        /// The data.
        data: Bytes,
    },
    /// Server counters.
    Progress {
        /// The stream.
        stream: StreamId,
        /// The counters.
        progress: Progress,
    },
    /// The stream ended; nothing more comes for it. Exactly one per initiated stream.
    StreamEnd {
        /// The stream.
        stream: StreamId,
        /// How.
        outcome: Outcome,
        /// Data bytes delivered before the end.
        bytes_received: u64,
    },
    /// The server drains: no new streams here; running ones go on.
    GoAway {
        /// Why.
        message: String,
    },
    /// The connection is closed (after every open stream got its `StreamEnd`).
    Closed(Option<WireError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitAccept,
    AwaitAuth,
    Established,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Initiating,
    Open,
    /// The application has been told how it ended; waiting for the server's terminal frame
    /// (after a CANCEL) so the id is not reused and late chunks are recognised and dropped.
    Reported,
    /// CANCEL sent on the application's request; `Cancelled` is reported on the server's
    /// terminal frame.
    Cancelling,
}

#[derive(Debug)]
struct Stream {
    state: StreamState,
    operation: OperationId,
    accept_zstd: bool,
    zstd: bool,
    /// What the server may still send.
    window: u64,
    /// The window's full size: initial, then grown (see `consume`).
    limit: u64,
    /// Consumed by the application and not yet credited.
    unacknowledged: u64,
    /// A CHUNK said the server used up the window, and no consume has looked at it yet.
    window_emptied: bool,
    next_seq: u64,
    bytes: u64,
    digest: conn::Digest,
    /// The last frame of the stream, or the moment its window reopened: the stream timeout
    /// counts from here while the window is above 0.
    last_heard: Instant,
    /// What INITIATED announced ([`UNKNOWN`] if nothing): the stream must carry exactly this.
    expected: u64,
}

/// The client half of one connection, without IO. Same driving contract as
/// [`ServerConnection`](crate::ServerConnection).
#[derive(Debug)]
pub struct ClientConnection {
    settings: ClientSettings,
    phase: Phase,
    nonce: [u8; NONCE_LEN],
    accept: Option<Accept>,
    next_stream: u32,
    draining: bool,
    streams: HashMap<StreamId, Stream>,
    inbox: Inbox,
    outbox: Outbox,
    clock: Clock,
    /// The earliest an open stream may time out; checked then, not at the next tick.
    stream_check: Option<Instant>,
    events: VecDeque<ClientEvent>,
    /// Kept across compressed chunks: no zstd context per chunk.
    unpacker: compress::ChunkDecompressor,
}

impl ClientConnection {
    /// A connection whose socket connected at `now`: queues the preface and BIND.
    /// `nonce` must be fresh random bytes.
    pub fn new(settings: ClientSettings, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        let mut outbox = Outbox::default();
        outbox.raw_control(Bytes::from_static(&PREFACE));
        outbox.control(&Frame::Bind(Bind {
            min_version: VERSION_MIN,
            max_version: VERSION_MAX,
            nonce,
            initial_window: settings.initial_window,
            max_frame_size: settings.max_frame_size,
            heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u32,
            name: settings.name.clone(),
        }));
        let clock = Clock::new(now, settings.heartbeat_interval, settings.handshake_timeout);
        let inbox = Inbox::new();
        ClientConnection {
            settings,
            phase: Phase::AwaitAccept,
            nonce,
            accept: None,
            next_stream: 1,
            draining: false,
            streams: HashMap::new(),
            inbox,
            outbox,
            clock,
            stream_check: None,
            events: VecDeque::new(),
            unpacker: compress::ChunkDecompressor::default(),
        }
    }

    /// The receive buffer (see [`ServerConnection::input_buffer`](crate::ServerConnection::input_buffer)).
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.inbox.buf
    }

    /// The length (header included) of the frame whose start the receive buffer holds, once
    /// its header is complete: a reader can make room for all of it before reading on.
    pub fn pending_frame_len(&self) -> Option<usize> {
        self.inbox.pending_frame_len()
    }

    /// Bytes received from the peer.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        self.inbox.buf.extend_from_slice(data);
        self.process_input(now);
    }

    /// Processes whatever the receive buffer holds.
    pub fn process_input(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            self.inbox.buf.clear();
            return;
        }
        self.clock.last_received = now;
        loop {
            match self.inbox.next_frame("server") {
                Ok(Some(frame)) => {
                    if let Err(err) = self.on_frame(frame, now) {
                        self.fail_connection(err, true);
                    }
                }
                Ok(None) => break,
                Err(err) => self.fail_connection(err, true),
            }
            if self.phase == Phase::Closed {
                self.inbox.buf.clear();
                break;
            }
        }
    }

    /// The peer closed the connection (or the socket failed): every open stream ends with
    /// `connection_lost` and its byte count.
    pub fn handle_eof(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        let clean = self.streams.is_empty() && !self.inbox.is_mid_frame();
        let err = if clean { None } else { Some(conn::lost(0)) };
        self.close_with(err, false);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != Phase::Closed).then(|| {
            let tick = self.clock.next_deadline();
            self.stream_check.map_or(tick, |at| at.min(tick))
        })
    }

    /// Runs the timers due at `now`: handshake deadline, heartbeats, idle and stream timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if self.phase == Phase::Established && self.stream_check.is_some_and(|at| now >= at) {
            self.time_out_silent_streams(now);
        }
    }

    /// The heartbeat tick: handshake deadline, idle timeout, HEARTBEAT.
    fn tick(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(deadline) = self.clock.handshake_deadline {
            if now >= deadline {
                let ms = self.settings.handshake_timeout.as_millis();
                let message = format!("server did not finish the handshake within {ms} ms");
                self.fail_connection(WireError::new(ErrorCode::TIMEOUT, message), true);
                return;
            }
        }
        if now < self.clock.next_tick {
            return;
        }
        self.clock.next_tick = now + self.clock.interval;
        if self.phase != Phase::Established {
            return;
        }
        if now.duration_since(self.clock.last_received) >= self.clock.idle_limit() {
            let ms = self.clock.idle_limit().as_millis();
            let message = format!("nothing received from the server for {ms} ms");
            self.fail_connection(WireError::new(ErrorCode::TIMEOUT, message), true);
            return;
        }
        self.outbox.control(&Frame::Heartbeat {
            stream: StreamId::CONNECTION,
        });
    }

    /// Ends the streams that could receive (window above 0) and heard nothing for the stream
    /// timeout, and schedules the next check for the earliest of the others.
    fn time_out_silent_streams(&mut self, now: Instant) {
        let timeout = self.settings.stream_timeout;
        let mut timed_out = Vec::new();
        let mut next = None;
        for (&id, s) in &self.streams {
            if !matches!(s.state, StreamState::Initiating | StreamState::Open) || s.window == 0 {
                continue;
            }
            let at = s.last_heard + timeout;
            if now >= at {
                timed_out.push(id);
            } else {
                next = earliest(next, at);
            }
        }
        self.stream_check = next;
        timed_out.sort();
        for stream in timed_out {
            let ms = self.settings.stream_timeout.as_millis();
            self.send_cancel(stream, format!("nothing received for {ms} ms"));
            self.report(stream, Outcome::TimedOut);
        }
    }

    /// The next segment to write, in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.outbox.poll()
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has nothing.
    pub fn is_transmit_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Whether the connection is closed: flush what is queued, then close the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether streams can be initiated now.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Whether the server sent GOAWAY.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The per-stream window the server granted (ACCEPT), once known: the most data a stream
    /// has in flight. CREDIT goes out per quarter of it.
    pub fn stream_window(&self) -> Option<u32> {
        self.accept.as_ref().map(|a| a.initial_window)
    }

    /// Streams initiated and not yet finished with the server.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Starts a stream: queues INITIATE.
    pub fn initiate(
        &mut self,
        request: StreamRequest,
        now: Instant,
    ) -> Result<StreamId, CallError> {
        let accept = match self.phase {
            Phase::Closed => return Err(CallError::Closed),
            Phase::Established => self.accept.as_ref().expect("established after ACCEPT"),
            _ => return Err(CallError::NotReady),
        };
        if self.draining {
            return Err(CallError::Draining);
        }
        if self.streams.len() >= accept.max_streams as usize {
            return Err(CallError::TooManyStreams(accept.max_streams));
        }
        if request.paradata.len() > accept.max_paradata as usize {
            return Err(CallError::ParadataTooLong {
                len: request.paradata.len(),
                max: accept.max_paradata,
            });
        }
        if self.next_stream == u32::MAX {
            return Err(CallError::StreamIdsExhausted);
        }
        let stream = StreamId(self.next_stream);
        self.next_stream += 1;
        let window = accept.initial_window.into();
        // A traceparent is a value, never truncated: one too long is left out (PROTOCOL.md 3).
        let traceparent = request
            .traceparent
            .filter(|t| t.len() <= crate::frame::MAX_TRACEPARENT_LEN);
        self.outbox.control(&Frame::Initiate(Initiate {
            stream,
            operation: request.operation,
            accept_zstd: request.accept_zstd,
            paradata: request.paradata,
            traceparent,
        }));
        self.streams.insert(
            stream,
            Stream {
                state: StreamState::Initiating,
                operation: request.operation,
                accept_zstd: request.accept_zstd,
                zstd: false,
                window,
                limit: window,
                unacknowledged: 0,
                window_emptied: false,
                next_seq: 0,
                bytes: 0,
                digest: conn::Digest::default(),
                last_heard: now,
                expected: UNKNOWN,
            },
        );
        self.stream_check = earliest(self.stream_check, now + self.settings.stream_timeout);
        Ok(stream)
    }

    /// The application is done with `bytes` bytes of the stream's data: they count as window
    /// again. CREDIT goes out once a quarter of the initial window has been consumed.
    ///
    /// The window also grows here, doubling up to `max_window` (and ACCEPT's): when the
    /// server said a chunk used up the window (WINDOW_EMPTY) and the application, consuming,
    /// has read all but at most a quarter of the window, the window, not the reader, is what
    /// held the stream back. A stream whose reader lags keeps its window.
    ///
    /// CREDIT that reopens a window that was at 0 restarts the stream timeout at `now`: the
    /// server could not send while the window was closed.
    pub fn consume(&mut self, stream: StreamId, bytes: usize, now: Instant) {
        let (threshold, allowed) = self.accept.as_ref().map_or((1, 0), |a| {
            (u64::from(a.initial_window / 4).max(1), a.max_window)
        });
        let max = u64::from(self.settings.max_window.min(allowed));
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if !matches!(s.state, StreamState::Open | StreamState::Initiating) {
            return;
        }
        s.unacknowledged += bytes as u64;
        // Received and not yet consumed: the window's full size less what the server may
        // still send and what was consumed but not yet credited.
        let backlog = s.limit.saturating_sub(s.window + s.unacknowledged);
        let emptied = std::mem::take(&mut s.window_emptied);
        let mut growth = 0;
        if emptied && s.limit < max && backlog <= s.limit / 4 {
            let grown = (s.limit * 2).min(max);
            growth = grown - s.limit;
            s.limit = grown;
        }
        if s.unacknowledged >= threshold || growth > 0 {
            let increment = (s.unacknowledged + growth).min(u64::from(u32::MAX));
            s.unacknowledged -= increment - growth;
            if s.window == 0 {
                s.last_heard = now;
                self.stream_check = earliest(self.stream_check, now + self.settings.stream_timeout);
            }
            s.window += increment;
            self.outbox.control(&Frame::Credit {
                stream,
                increment: increment as u32,
            });
        }
    }

    /// Cancels one stream: queues CANCEL; no chunk of it is delivered from now on, and its
    /// `StreamEnd { outcome: Cancelled }` comes with the server's acknowledgement.
    pub fn cancel(&mut self, stream: StreamId, reason: &str) -> Result<(), CallError> {
        if self.phase == Phase::Closed {
            return Err(CallError::Closed);
        }
        let s = self
            .streams
            .get_mut(&stream)
            .ok_or(CallError::UnknownStream(stream))?;
        if !matches!(s.state, StreamState::Open | StreamState::Initiating) {
            return Err(CallError::WrongState(stream));
        }
        s.state = StreamState::Cancelling;
        // Chunks decoded before the call but not yet polled are dropped too.
        self.events
            .retain(|e| !matches!(e, ClientEvent::Chunk { stream: s, .. } if *s == stream));
        let reason = reason.to_string();
        self.outbox.control(&Frame::Cancel {
            stream,
            operation: None,
            reason,
        });
        Ok(())
    }

    /// Cancels every stream of `operation` on this connection with one CANCEL frame.
    /// Returns how many streams it covered.
    pub fn cancel_operation(&mut self, operation: OperationId, reason: &str) -> usize {
        if self.phase != Phase::Established {
            return 0;
        }
        let mut covered = 0;
        for s in self.streams.values_mut() {
            if s.operation == operation
                && matches!(s.state, StreamState::Open | StreamState::Initiating)
            {
                s.state = StreamState::Cancelling;
                covered += 1;
            }
        }
        if covered > 0 {
            let streams = &self.streams;
            self.events.retain(|e| match e {
                ClientEvent::Chunk { stream, .. } => streams
                    .get(stream)
                    .is_none_or(|s| s.state != StreamState::Cancelling),
                _ => true,
            });
            self.outbox.control(&Frame::Cancel {
                stream: StreamId::CONNECTION,
                operation: Some(operation),
                reason: reason.to_string(),
            });
        }
        covered
    }

    /// Closes the connection: every open stream ends `Cancelled`; a connection ERROR with
    /// `code` tells the server why.
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        let err = WireError::new(code, message);
        self.outbox.control(&conn::error_frame(&err));
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.report(id, Outcome::Cancelled);
        }
        self.close_with(None, false);
    }

    fn send_cancel(&mut self, stream: StreamId, reason: String) {
        self.outbox.control(&Frame::Cancel {
            stream,
            operation: None,
            reason,
        });
    }

    /// After GOAWAY: streams above the server's `last_stream` crossed it and will never run
    /// here. They end now with `draining` (a cancelled one as `Cancelled`), so the application
    /// can retry them elsewhere without waiting; a late answer for them is dropped.
    fn end_unanswered(&mut self, last_stream: StreamId) {
        let mut ids: Vec<StreamId> = self
            .streams
            .keys()
            .copied()
            .filter(|id| *id > last_stream)
            .collect();
        ids.sort();
        for id in ids {
            let outcome = if self.streams[&id].state == StreamState::Cancelling {
                Outcome::Cancelled
            } else {
                Outcome::Error {
                    code: ErrorCode::DRAINING,
                    message: format!(
                        "the server is draining and did not take stream {id}; retry on another \
                         connection"
                    ),
                }
            };
            self.report(id, outcome);
            self.streams.remove(&id);
        }
    }

    /// Tells the application how the stream ended, once; the entry stays until the server's
    /// terminal frame if one is still due.
    fn report(&mut self, stream: StreamId, outcome: Outcome) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.state == StreamState::Reported {
            return;
        }
        s.state = StreamState::Reported;
        let bytes_received = s.bytes;
        self.events.push_back(ClientEvent::StreamEnd {
            stream,
            outcome,
            bytes_received,
        });
    }

    /// The server's terminal frame for a stream: report `outcome` unless already reported
    /// (a cancelled stream reports `Cancelled` whatever the server's last word was).
    fn finish(&mut self, stream: StreamId, outcome: Outcome) {
        let Some(s) = self.streams.get(&stream) else {
            return;
        };
        let outcome = if s.state == StreamState::Cancelling {
            Outcome::Cancelled
        } else {
            outcome
        };
        self.report(stream, outcome);
        self.streams.remove(&stream);
    }

    fn fail_connection(&mut self, err: WireError, tell_peer: bool) {
        if self.phase == Phase::Closed {
            return;
        }
        if tell_peer {
            self.outbox.control(&conn::error_frame(&err));
        }
        self.close_with(Some(err), true);
    }

    /// Ends every stream (with the error's code, or `connection_lost`) and the connection.
    fn close_with(&mut self, err: Option<WireError>, ends_streams_with_err: bool) {
        let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
        ids.sort();
        for id in ids {
            let s = &self.streams[&id];
            let outcome = if s.state == StreamState::Cancelling {
                Outcome::Cancelled
            } else {
                let e = match (&err, ends_streams_with_err) {
                    (Some(e), true) => e.clone(),
                    _ => conn::lost(s.bytes),
                };
                Outcome::Error {
                    code: e.code,
                    message: e.message,
                }
            };
            self.report(id, outcome);
        }
        self.streams.clear();
        self.phase = Phase::Closed;
        self.events.push_back(ClientEvent::Closed(err));
    }

    fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<(), WireError> {
        match (self.phase, frame) {
            (_, Frame::Extension { .. }) => Ok(()),
            (
                _,
                Frame::Error {
                    stream,
                    code,
                    message,
                },
            ) if stream.is_connection() => {
                let err = WireError::new(code, format!("server closed the connection: {message}"));
                self.close_with(Some(err), true);
                Ok(())
            }
            (Phase::AwaitAccept, Frame::Accept(accept)) => self.on_accept(accept, now),
            (Phase::AwaitAccept, other) => Err(WireError::protocol(format!(
                "expected ACCEPT first, got {}",
                frame_name(&other)
            ))),
            (Phase::AwaitAuth, Frame::Auth { proof }) => {
                let secret = self.settings.secret.as_deref().unwrap_or_default();
                let accept = self.accept.as_ref().expect("AUTH comes after ACCEPT");
                let ok = auth::verify(
                    secret,
                    accept.version,
                    Role::Server,
                    &self.nonce,
                    &accept.nonce,
                    &proof,
                );
                if !ok {
                    return Err(WireError::new(
                        ErrorCode::AUTH_FAILED,
                        "the server's authentication proof is wrong: it does not know the secret",
                    ));
                }
                self.establish();
                Ok(())
            }
            (Phase::AwaitAuth, other) => Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                format!("expected the server's AUTH, got {}", frame_name(&other)),
            )),
            (Phase::Established, frame) => self.on_stream_frame(frame, now),
            (Phase::Closed, _) => Ok(()),
        }
    }

    fn on_accept(&mut self, accept: Accept, now: Instant) -> Result<(), WireError> {
        if !(VERSION_MIN..=VERSION_MAX).contains(&accept.version) {
            return Err(WireError::new(
                ErrorCode::UNSUPPORTED_VERSION,
                format!("server chose version {}, not offered", accept.version),
            ));
        }
        if accept.initial_window == 0 || accept.initial_window > self.settings.initial_window {
            return Err(WireError::protocol(format!(
                "ACCEPT initial_window {} is 0 or above the {} asked for",
                accept.initial_window, self.settings.initial_window
            )));
        }
        let min_frame = (CHUNK_OVERHEAD_MAX + 1024) as u32;
        if accept.max_frame_size < min_frame {
            return Err(WireError::protocol(format!(
                "ACCEPT max_frame_size {} is below the minimum of {min_frame}",
                accept.max_frame_size
            )));
        }
        if accept.max_window < accept.initial_window {
            return Err(WireError::protocol(format!(
                "ACCEPT max_window {} is below its initial_window {}",
                accept.max_window, accept.initial_window
            )));
        }
        let interval = Duration::from_millis(accept.heartbeat_interval_ms.into());
        self.clock.negotiated(interval.max(MIN_HEARTBEAT), now);
        match (accept.auth_required, self.settings.secret.as_deref()) {
            (true, Some(secret)) => {
                let proof = auth::proof(
                    secret,
                    accept.version,
                    Role::Client,
                    &self.nonce,
                    &accept.nonce,
                );
                self.outbox.control(&Frame::Auth { proof });
                self.accept = Some(accept);
                self.phase = Phase::AwaitAuth;
            }
            (true, None) => {
                return Err(WireError::new(
                    ErrorCode::AUTH_FAILED,
                    "the server requires authentication and no secret is configured",
                ))
            }
            (false, Some(_)) => {
                return Err(WireError::new(
                    ErrorCode::AUTH_FAILED,
                    "a secret is configured but the server does not authenticate: refusing an \
                     unauthenticated server",
                ))
            }
            (false, None) => {
                self.accept = Some(accept);
                self.establish();
            }
        }
        Ok(())
    }

    fn establish(&mut self) {
        let accept = self.accept.as_ref().expect("established after ACCEPT");
        self.phase = Phase::Established;
        self.clock.handshake_deadline = None;
        self.inbox.max_payload = self.settings.max_frame_size;
        self.events.push_back(ClientEvent::Established {
            version: accept.version,
            server_name: accept.name.clone(),
        });
    }

    fn on_stream_frame(&mut self, frame: Frame, now: Instant) -> Result<(), WireError> {
        let id = frame.stream();
        if !id.is_connection() && id.0 >= self.next_stream {
            return Err(WireError::protocol(format!(
                "{} for stream {id}, which was never initiated",
                frame_name(&frame)
            )));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return match frame {
                Frame::Heartbeat { .. } => Ok(()),
                Frame::GoAway {
                    message,
                    last_stream,
                    ..
                } => {
                    self.draining = true;
                    self.events.push_back(ClientEvent::GoAway { message });
                    self.end_unanswered(last_stream);
                    Ok(())
                }
                // Frames for a stream that ended (in flight when it ended) are dropped.
                _ if !id.is_connection() => Ok(()),
                other => Err(WireError::protocol(format!(
                    "{} is not valid from a server here",
                    frame_name(&other)
                ))),
            };
        };
        s.last_heard = now;
        let live = matches!(s.state, StreamState::Open | StreamState::Initiating);
        match frame {
            Frame::Initiated {
                zstd,
                expected_bytes,
                ..
            } => {
                if s.state == StreamState::Initiating {
                    if zstd && !s.accept_zstd {
                        return Err(WireError::protocol(format!(
                            "INITIATED with compression on stream {id}, which did not accept it"
                        )));
                    }
                    s.state = StreamState::Open;
                    s.zstd = zstd;
                    s.expected = expected_bytes;
                    self.events.push_back(ClientEvent::Initiated {
                        stream: id,
                        expected_bytes,
                    });
                } else if live {
                    return Err(WireError::protocol(format!(
                        "second INITIATED on stream {id}"
                    )));
                }
                Ok(())
            }
            Frame::Chunk(chunk) => self.on_chunk(chunk),
            Frame::Progress { progress, .. } => {
                if live {
                    self.events.push_back(ClientEvent::Progress {
                        stream: id,
                        progress,
                    });
                }
                Ok(())
            }
            Frame::Heartbeat { .. } => Ok(()),
            Frame::Cancelled { .. } => {
                self.finish(id, Outcome::Cancelled);
                Ok(())
            }
            Frame::Error { code, message, .. } => {
                self.finish(id, Outcome::Error { code, message });
                Ok(())
            }
            Frame::Complete { completion, .. } => {
                let outcome = if s.state == StreamState::Initiating {
                    Outcome::Error {
                        code: ErrorCode::PROTOCOL_ERROR,
                        message: "COMPLETE before INITIATED".into(),
                    }
                } else {
                    verify_completion(s, &completion)
                };
                self.finish(id, outcome);
                Ok(())
            }
            other => Err(WireError::protocol(format!(
                "{} is not valid from a server",
                frame_name(&other)
            ))),
        }
    }

    fn on_chunk(&mut self, chunk: Chunk) -> Result<(), WireError> {
        let id = chunk.stream;
        let s = self
            .streams
            .get_mut(&id)
            .expect("caller checked the stream exists");
        let raw_len = chunk.raw_len.map_or(chunk.data.len(), |n| n as usize) as u64;
        if raw_len > s.window {
            return Err(WireError::new(
                ErrorCode::FLOW_CONTROL_VIOLATION,
                format!(
                    "CHUNK of {raw_len} bytes on stream {id} exceeds its window of {}",
                    s.window
                ),
            ));
        }
        s.window -= raw_len;
        s.window_emptied |= chunk.window_empty;
        match s.state {
            StreamState::Open => {}
            StreamState::Initiating => {
                return Err(WireError::protocol(format!(
                    "CHUNK before INITIATED on stream {id}"
                )))
            }
            // Cancelled or already failed: dropped, never delivered.
            StreamState::Cancelling | StreamState::Reported => return Ok(()),
        }
        let beyond = s.expected != UNKNOWN && s.bytes + raw_len > s.expected;
        let failure = if chunk.seq != s.next_seq {
            let what = if chunk.seq < s.next_seq {
                "duplicate"
            } else {
                "gap"
            };
            Some(format!(
                "sequence {what}: expected chunk {}, got {}",
                s.next_seq, chunk.seq
            ))
        } else if chunk.raw_len.is_some() && !s.zstd {
            Some("compressed CHUNK on a stream without compression".to_string())
        } else if chunk.raw_len.is_none() && chunk.data.is_empty() {
            Some("empty CHUNK".to_string())
        } else if beyond {
            Some(format!(
                "the stream goes past the {} bytes INITIATED announced",
                s.expected
            ))
        } else {
            None
        };
        let data = match (failure, chunk.raw_len) {
            (Some(why), _) => Err(why),
            (None, None) => Ok(chunk.data),
            (None, Some(raw)) => self
                .unpacker
                .decompress(&chunk.data, raw)
                .map_err(|e| e.message),
        };
        match data {
            Ok(data) => {
                s.next_seq += 1;
                s.bytes += data.len() as u64;
                s.digest.update(&data);
                self.events
                    .push_back(ClientEvent::Chunk { stream: id, data });
            }
            Err(why) => {
                // The stream is unusable: stop the producer and report the failure now.
                self.send_cancel(id, why.clone());
                let code = ErrorCode::INTEGRITY_FAILURE;
                self.report(id, Outcome::Error { code, message: why });
            }
        }
        Ok(())
    }
}

fn verify_completion(s: &Stream, c: &Completion) -> Outcome {
    let digest = s.digest.value();
    let message = if s.expected != UNKNOWN && s.bytes != s.expected {
        format!(
            "the stream ended after {} of the {} bytes INITIATED announced",
            s.bytes, s.expected
        )
    } else if c.bytes != s.bytes {
        format!("COMPLETE says {} bytes, received {}", c.bytes, s.bytes)
    } else if c.chunks != s.next_seq {
        format!("COMPLETE says {} chunks, received {}", c.chunks, s.next_seq)
    } else if c.digest != digest {
        format!(
            "digest mismatch: COMPLETE says {:016x}, received data hashes to {digest:016x}",
            c.digest
        )
    } else {
        return Outcome::Complete(*c);
    };
    Outcome::Error {
        code: ErrorCode::INTEGRITY_FAILURE,
        message,
    }
}
