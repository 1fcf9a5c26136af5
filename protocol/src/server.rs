//! The server side of a connection: answers BIND, checks AUTH, turns INITIATEs into
//! [`ServerEvent::StreamRequested`], and sends what the application produces within each
//! stream's window, round-robin between streams.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, Role};
use crate::conn::{self, earliest, Clock, Inbox, Outbox, MAX_WINDOW, MIN_HEARTBEAT};
use crate::error::{CallError, WireError};
use crate::frame::{self, Accept, Bind, Frame, Initiate, CHUNK_OVERHEAD_MAX, NONCE_LEN, PREFACE};
use crate::types::{
    Completion, ErrorCode, ItemCounts, OperationId, Progress, StreamId, UNKNOWN, VERSION_MAX,
    VERSION_MIN,
};

/// Limits and timers of the server side. Defaults are PROTOCOL.md's.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Largest per-stream window granted, in bytes; a client asking for more gets this.
    pub max_window: u32,
    /// Largest frame payload accepted from clients, in bytes.
    pub max_frame_size: u32,
    /// Most concurrent streams per connection.
    pub max_streams: u32,
    /// Longest paradata accepted, in bytes.
    pub max_paradata: u32,
    /// Longest heartbeat interval; the effective one is the smaller of this and the client's.
    pub heartbeat_interval: Duration,
    /// Time from connect until BIND (and AUTH) must be done.
    pub handshake_timeout: Duration,
    /// A stream whose window stays at zero this long without CREDIT ends with `timeout`.
    pub stream_timeout: Duration,
    /// How often every running stream gets a PROGRESS frame, whether it is sending or
    /// waiting for credit (PROTOCOL.md, PROGRESS).
    pub progress_interval: Duration,
    /// Most bytes of frames other than CHUNK data (counting 64 bytes per frame besides its
    /// own) queued for a client that does not read them. At the limit the connection stops
    /// taking input until the client reads: what a client can make the server queue without
    /// a window (INITIATE and CANCEL pairs, say) stays bounded.
    pub max_pending_control: usize,
    /// A connection that stays at `max_pending_control` this long is closed with
    /// `resource_exhausted`.
    pub pending_control_timeout: Duration,
    /// Shared secret; when set, clients must authenticate before anything else.
    pub secret: Option<Vec<u8>>,
    /// Sent in ACCEPT.
    pub name: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_window: 16 << 20,
            max_frame_size: 4 << 20,
            max_streams: 1024,
            max_paradata: 64 << 10,
            heartbeat_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(60),
            progress_interval: Duration::from_secs(1),
            max_pending_control: 1 << 20,
            pending_control_timeout: Duration::from_secs(10),
            secret: None,
            name: concat!("nexus-server/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What the server application learns from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Handshake (and authentication) done.
    Established {
        /// Negotiated version.
        version: u16,
        /// The client's name from BIND.
        client_name: String,
    },
    /// A client asks for a stream; answer with [`ServerConnection::accept`] or
    /// [`ServerConnection::reject`].
    StreamRequested(Initiate),
    /// An INITIATE was refused by the protocol itself (draining, too many streams, paradata
    /// too long): its ERROR is queued; the application never saw the stream.
    StreamRefused {
        /// The stream.
        stream: StreamId,
        /// The code of its ERROR.
        code: ErrorCode,
    },
    /// CREDIT arrived: the stream may send more.
    Credit {
        /// The stream.
        stream: StreamId,
    },
    /// The client cancelled the stream; CANCELLED is queued. Stop its producer.
    StreamCancelled {
        /// The stream.
        stream: StreamId,
    },
    /// The stream timed out waiting for credit; ERROR `timeout` is queued. Stop its producer.
    StreamTimedOut {
        /// The stream.
        stream: StreamId,
    },
    /// The connection is closed; every producer must stop. `None` when it ended cleanly.
    Closed(Option<WireError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitBind,
    AwaitAuth,
    Established,
    Closed,
}

#[derive(Debug)]
struct Stream {
    operation: OperationId,
    accepted: bool,
    zstd: bool,
    window: u64,
    seq: u64,
    bytes: u64,
    digest: conn::Digest,
    sent_since_tick: bool,
    starved_since: Option<Instant>,
    /// What INITIATED announced ([`UNKNOWN`] when nothing was): the stream must carry
    /// exactly this many bytes.
    expected: u64,
    /// The source's counters as last reported, for PROGRESS.
    items: ItemCounts,
}

/// The server half of one connection, without IO.
///
/// Drive it with [`handle_input`](Self::handle_input) / [`input_buffer`](Self::input_buffer),
/// [`handle_timeout`](Self::handle_timeout) and [`handle_eof`](Self::handle_eof); write out
/// what [`poll_transmit`](Self::poll_transmit) yields, in order; act on
/// [`poll_event`](Self::poll_event).
#[derive(Debug)]
pub struct ServerConnection {
    settings: ServerSettings,
    phase: Phase,
    nonce: [u8; NONCE_LEN],
    client_nonce: [u8; NONCE_LEN],
    client_name: String,
    version: u16,
    /// Largest chunk data the client accepts.
    max_chunk: usize,
    initial_window: u32,
    last_stream: StreamId,
    draining: bool,
    streams: HashMap<StreamId, Stream>,
    inbox: Inbox,
    outbox: Outbox,
    clock: Clock,
    /// The earliest a starved stream may time out; checked then, not at the next tick.
    stream_check: Option<Instant>,
    /// When the next round of PROGRESS frames is due (once established).
    next_progress: Option<Instant>,
    /// Since when the client has left `max_pending_control` bytes unread.
    blocked_since: Option<Instant>,
    events: std::collections::VecDeque<ServerEvent>,
    /// Where CHUNK headers are carved from, so sending a chunk does not allocate.
    header_arena: BytesMut,
}

impl ServerConnection {
    /// A connection just accepted at `now`. `nonce` must be fresh random bytes.
    pub fn new(settings: ServerSettings, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        let mut outbox = Outbox::default();
        outbox.raw_control(Bytes::from_static(&PREFACE));
        let clock = Clock::new(now, settings.heartbeat_interval, settings.handshake_timeout);
        ServerConnection {
            settings,
            phase: Phase::AwaitBind,
            nonce,
            client_nonce: [0; NONCE_LEN],
            client_name: String::new(),
            version: 0,
            max_chunk: 0,
            initial_window: 0,
            last_stream: StreamId::CONNECTION,
            draining: false,
            streams: HashMap::new(),
            inbox: Inbox::new(),
            outbox,
            clock,
            stream_check: None,
            next_progress: None,
            blocked_since: None,
            events: Default::default(),
            header_arena: BytesMut::new(),
        }
    }

    /// The receive buffer: read socket bytes into its spare capacity, then call
    /// [`process_input`](Self::process_input). Lets a driver read without a copy.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.inbox.buf
    }

    /// Bytes received from the peer.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        self.inbox.buf.extend_from_slice(data);
        self.process_input(now);
    }

    /// Processes whatever the receive buffer holds, up to the limit of control frames the
    /// client leaves unread: the rest waits in the buffer (see [`wants_input`](Self::wants_input)).
    pub fn process_input(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            self.inbox.buf.clear();
            return;
        }
        self.clock.last_received = now;
        loop {
            if self.is_blocked() {
                self.blocked_since.get_or_insert(now);
                break;
            }
            self.blocked_since = None;
            match self.inbox.next_frame("client") {
                Ok(Some(frame)) => {
                    if let Err(err) = self.on_frame(frame, now) {
                        self.fail_connection(err);
                    }
                }
                Ok(None) => break,
                Err(err) => self.fail_connection(err),
            }
            if self.phase == Phase::Closed {
                self.inbox.buf.clear();
                break;
            }
        }
    }

    /// The peer closed its sending side (or the socket failed). EOF inside a frame or before
    /// the handshake finished is a protocol error, answered with ERROR: the peer may have
    /// closed only its sending side and still read the reason.
    pub fn handle_eof(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.inbox.is_mid_frame() {
            return self.fail_connection(WireError::protocol(
                "connection closed in the middle of a frame",
            ));
        }
        if self.clock.handshake_deadline.is_some() {
            return self.fail_connection(WireError::protocol(
                "connection closed before the handshake finished",
            ));
        }
        self.phase = Phase::Closed;
        self.streams.clear();
        self.events.push_back(ServerEvent::Closed(None));
    }

    /// Whether the driver should read more input. `false` while the client leaves
    /// `max_pending_control` bytes of frames unread: read nothing more, and call
    /// [`process_input`](Self::process_input) again once some went out (what is buffered
    /// was not all processed). Past `pending_control_timeout` the connection closes.
    pub fn wants_input(&self) -> bool {
        self.phase != Phase::Closed && !self.is_blocked()
    }

    fn is_blocked(&self) -> bool {
        self.outbox.control_bytes() >= self.settings.max_pending_control
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        let blocked = self
            .blocked_since
            .map(|since| since + self.settings.pending_control_timeout);
        let deadlines = [self.stream_check, self.next_progress, blocked];
        Some(
            deadlines
                .into_iter()
                .flatten()
                .fold(self.clock.next_deadline(), Instant::min),
        )
    }

    /// Runs the timers due at `now`: handshake deadline, heartbeats, idle and stream
    /// timeouts, PROGRESS.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(since) = self.blocked_since {
            if !self.is_blocked() {
                self.blocked_since = None;
            } else if now.duration_since(since) >= self.settings.pending_control_timeout {
                let ms = self.settings.pending_control_timeout.as_millis();
                return self.fail_connection(WireError::new(
                    ErrorCode::RESOURCE_EXHAUSTED,
                    format!("the client left frames unread for {ms} ms"),
                ));
            }
        }
        self.tick(now);
        if self.phase != Phase::Established {
            return;
        }
        if self.stream_check.is_some_and(|at| now >= at) {
            self.time_out_starved_streams(now);
        }
        if self.next_progress.is_some_and(|at| now >= at) {
            self.send_progress(now);
        }
    }

    /// The heartbeat tick: handshake deadline, idle timeout, HEARTBEAT on the connection and on
    /// streams whose source has had nothing to send.
    fn tick(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(deadline) = self.clock.handshake_deadline {
            if now >= deadline {
                self.fail_connection(WireError::new(
                    ErrorCode::TIMEOUT,
                    format!(
                        "handshake not finished within {} ms",
                        self.settings.handshake_timeout.as_millis()
                    ),
                ));
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
            self.fail_connection(WireError::new(
                ErrorCode::TIMEOUT,
                format!(
                    "nothing received for {} ms",
                    self.clock.idle_limit().as_millis()
                ),
            ));
            return;
        }
        self.outbox.control(&Frame::Heartbeat {
            stream: StreamId::CONNECTION,
        });
        for (&id, stream) in &mut self.streams {
            if !stream.accepted {
                continue;
            }
            if !stream.sent_since_tick && stream.window > 0 && self.outbox.is_stream_empty(id) {
                // The producer is alive but has had nothing to send: tell the client, so
                // that its stream timeout does not fire on a slow source.
                self.outbox
                    .stream_frame(id, &Frame::Heartbeat { stream: id });
            }
            stream.sent_since_tick = false;
        }
    }

    /// Ends the streams whose window has been at 0 without CREDIT for the stream timeout, and
    /// schedules the next check for the earliest of the others.
    fn time_out_starved_streams(&mut self, now: Instant) {
        let timeout = self.settings.stream_timeout;
        let mut timed_out = Vec::new();
        let mut next = None;
        for (&id, stream) in &self.streams {
            if let Some(since) = stream.starved_since.filter(|_| stream.accepted) {
                let at = since + timeout;
                if now >= at {
                    timed_out.push(id);
                } else {
                    next = earliest(next, at);
                }
            }
        }
        self.stream_check = next;
        timed_out.sort();
        for id in timed_out {
            let message = format!(
                "no credit from the client for {} ms",
                self.settings.stream_timeout.as_millis()
            );
            self.end_stream(
                id,
                &Frame::Error {
                    stream: id,
                    code: ErrorCode::TIMEOUT,
                    message,
                },
            );
            self.events
                .push_back(ServerEvent::StreamTimedOut { stream: id });
        }
    }

    /// Queues PROGRESS for every running stream, sending or waiting for credit.
    fn send_progress(&mut self, now: Instant) {
        self.next_progress = Some(now + self.settings.progress_interval);
        for (&stream, s) in &mut self.streams {
            if !s.accepted {
                continue;
            }
            s.sent_since_tick = true;
            let progress = Progress {
                bytes_sent: s.bytes,
                items: s.items,
            };
            self.outbox
                .stream_frame(stream, &Frame::Progress { stream, progress });
        }
    }

    /// The next segment to write. Segments must be written in the order given; a CHUNK comes
    /// as two segments, its header and then its data.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.outbox.poll()
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has nothing.
    pub fn is_transmit_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Bytes queued for sending, headers and data: at most the sum of the streams' windows
    /// plus control frames.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Whether the connection is closed: flush what is queued, then close the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether the handshake is done.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Streams that have been requested and have not ended.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Accepts a requested stream: queues INITIATED. `expected_bytes` is the total when known
    /// (`u64::MAX` otherwise); `zstd` is honoured only if the client accepts compression.
    pub fn accept(
        &mut self,
        stream: StreamId,
        expected_bytes: u64,
        zstd: bool,
    ) -> Result<(), CallError> {
        let s = self.stream_mut(stream)?;
        if s.accepted {
            return Err(CallError::WrongState(stream));
        }
        s.accepted = true;
        s.zstd &= zstd;
        s.expected = expected_bytes;
        let zstd = s.zstd;
        self.outbox.stream_frame(
            stream,
            &Frame::Initiated {
                stream,
                zstd,
                expected_bytes,
            },
        );
        Ok(())
    }

    /// Refuses a requested stream, or fails an accepted one: queues ERROR and forgets it.
    pub fn reject(
        &mut self,
        stream: StreamId,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), CallError> {
        self.stream_mut(stream)?;
        let message = message.to_string();
        self.end_stream(
            stream,
            &Frame::Error {
                stream,
                code,
                message,
            },
        );
        Ok(())
    }

    /// How many data bytes the stream may send now: its window, capped by the largest chunk
    /// the client accepts. 0 when it must wait for credit (or does not exist).
    pub fn send_capacity(&self, stream: StreamId) -> usize {
        match self.streams.get(&stream) {
            Some(s) if s.accepted => (s.window as usize).min(self.max_chunk),
            _ => 0,
        }
    }

    /// Whether the stream negotiated compression.
    pub fn is_compressed(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_some_and(|s| s.zstd)
    }

    /// Queues one CHUNK: `raw` is the data (at most [`send_capacity`](Self::send_capacity)
    /// bytes, never empty); `compressed`, when the stream negotiated compression, is `raw` as
    /// one zstd frame. No data is copied.
    ///
    /// Data beyond what INITIATED announced is refused with [`CallError::BeyondAnnounced`],
    /// and nothing is queued: the caller fails the stream (`source_failed`).
    pub fn send_chunk(
        &mut self,
        stream: StreamId,
        raw: Bytes,
        compressed: Option<Bytes>,
        now: Instant,
    ) -> Result<(), CallError> {
        let capacity = self.send_capacity(stream);
        let max_chunk = self.max_chunk;
        let s = self.stream_mut(stream)?;
        if !s.accepted {
            return Err(CallError::WrongState(stream));
        }
        if raw.is_empty() || raw.len() > capacity {
            return Err(CallError::NoCapacity {
                len: raw.len(),
                capacity,
            });
        }
        if s.expected != UNKNOWN && s.bytes + raw.len() as u64 > s.expected {
            return Err(CallError::BeyondAnnounced {
                announced: s.expected,
            });
        }
        let compressed = compressed.filter(|c| s.zstd && c.len() <= max_chunk);
        s.digest.update(&raw);
        s.window -= raw.len() as u64;
        s.bytes += raw.len() as u64;
        s.sent_since_tick = true;
        let starved = s.window == 0;
        if starved {
            s.starved_since = Some(now);
        }
        let seq = s.seq;
        s.seq += 1;
        let data_len = raw.len() as u64;
        if starved {
            self.stream_check = earliest(self.stream_check, now + self.settings.stream_timeout);
        }
        // Tells the client its window, not its reader, stopped the stream (PROTOCOL.md 6.3).
        let empty = starved;
        let arena = &mut self.header_arena;
        let (head, body) = match compressed {
            Some(c) => {
                let raw_len = Some(raw.len() as u32);
                (
                    frame::chunk_header_in(arena, stream, seq, raw_len, empty, c.len()),
                    c,
                )
            }
            None => (
                frame::chunk_header_in(arena, stream, seq, None, empty, raw.len()),
                raw,
            ),
        };
        self.outbox.stream_segments(stream, head, body, data_len);
        Ok(())
    }

    /// The source's item counters now: sent in the next PROGRESS (which goes out every
    /// `progress_interval` on its own).
    pub fn set_items(&mut self, stream: StreamId, items: ItemCounts) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.items = items;
        }
    }

    /// Queues a PROGRESS report with the stream's byte count and these item counters.
    pub fn progress(&mut self, stream: StreamId, items: ItemCounts) -> Result<(), CallError> {
        let s = self.stream_mut(stream)?;
        if !s.accepted {
            return Err(CallError::WrongState(stream));
        }
        s.sent_since_tick = true;
        let progress = Progress {
            bytes_sent: s.bytes,
            items,
        };
        self.outbox
            .stream_frame(stream, &Frame::Progress { stream, progress });
        Ok(())
    }

    /// Ends the stream successfully: queues COMPLETE with the byte and chunk counts and the
    /// digest of all data sent, plus the source's item counters. COMPLETE carries no data and
    /// never waits for window.
    ///
    /// A stream that sent fewer bytes than INITIATED announced is refused with
    /// [`CallError::ShortOfAnnounced`] and nothing is queued: the caller fails it
    /// (`source_failed`), since a short copy must never look complete.
    pub fn complete(&mut self, stream: StreamId, items: ItemCounts) -> Result<(), CallError> {
        let s = self.stream_mut(stream)?;
        if !s.accepted {
            return Err(CallError::WrongState(stream));
        }
        if s.expected != UNKNOWN && s.bytes != s.expected {
            return Err(CallError::ShortOfAnnounced {
                announced: s.expected,
                produced: s.bytes,
            });
        }
        let completion = Completion {
            bytes: s.bytes,
            chunks: s.seq,
            digest: s.digest.value(),
            items,
        };
        self.end_stream(stream, &Frame::Complete { stream, completion });
        Ok(())
    }

    /// Starts draining: queues GOAWAY; every later INITIATE gets ERROR `draining`. The
    /// connection closes cleanly (`Closed(None)`: flush, then FIN) as soon as no stream runs,
    /// at once if none does. A connection still in its handshake is closed with ERROR
    /// `draining` instead: nothing runs on it yet.
    pub fn go_away(&mut self, drain: Duration, message: &str) {
        if self.draining || self.phase == Phase::Closed {
            return;
        }
        if self.phase != Phase::Established {
            self.fail_connection(WireError::new(ErrorCode::DRAINING, message));
            return;
        }
        self.draining = true;
        let drain_ms = drain.as_millis().min(u32::MAX as u128) as u32;
        let message = message.to_string();
        self.outbox.control(&Frame::GoAway {
            last_stream: self.last_stream,
            drain_ms,
            message,
        });
        self.close_if_drained();
    }

    /// A draining connection with no stream left is done: it closes cleanly.
    fn close_if_drained(&mut self) {
        if self.draining && self.phase == Phase::Established && self.streams.is_empty() {
            self.phase = Phase::Closed;
            self.events.push_back(ServerEvent::Closed(None));
        }
    }

    /// Closes the connection with a connection-level ERROR (at a drain deadline, say).
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        self.fail_connection(WireError::new(code, message));
    }

    fn stream_mut(&mut self, stream: StreamId) -> Result<&mut Stream, CallError> {
        if self.phase == Phase::Closed {
            return Err(CallError::Closed);
        }
        self.streams
            .get_mut(&stream)
            .ok_or(CallError::UnknownStream(stream))
    }

    /// Queues the stream's last frame and forgets the stream.
    fn end_stream(&mut self, stream: StreamId, last: &Frame) {
        self.streams.remove(&stream);
        self.outbox.stream_frame(stream, last);
        self.close_if_drained();
    }

    fn fail_connection(&mut self, err: WireError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.streams.clear();
        self.outbox.discard_streams();
        self.outbox.control(&conn::error_frame(&err));
        self.events.push_back(ServerEvent::Closed(Some(err)));
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
                self.phase = Phase::Closed;
                self.streams.clear();
                let err = WireError::new(code, format!("client closed the connection: {message}"));
                self.events.push_back(ServerEvent::Closed(Some(err)));
                Ok(())
            }
            (Phase::AwaitBind, Frame::Bind(bind)) => self.on_bind(bind, now),
            (Phase::AwaitBind, other) => Err(WireError::protocol(format!(
                "expected BIND first, got {}",
                frame_name(&other)
            ))),
            (Phase::AwaitAuth, Frame::Auth { proof }) => {
                let secret = self.settings.secret.as_deref().unwrap_or_default();
                let (c, s) = (&self.client_nonce, &self.nonce);
                if !auth::verify(secret, self.version, Role::Client, c, s, &proof) {
                    return Err(WireError::new(
                        ErrorCode::AUTH_FAILED,
                        "wrong authentication proof",
                    ));
                }
                let proof = auth::proof(secret, self.version, Role::Server, c, s);
                self.outbox.control(&Frame::Auth { proof });
                self.establish(now);
                Ok(())
            }
            (Phase::AwaitAuth, other) => Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                format!("authentication required before {}", frame_name(&other)),
            )),
            (Phase::Established, Frame::Heartbeat { .. }) => Ok(()),
            (Phase::Established, Frame::Initiate(initiate)) => {
                self.on_initiate(initiate);
                Ok(())
            }
            (Phase::Established, Frame::Credit { stream, increment }) => {
                self.on_credit(stream, increment)
            }
            (
                Phase::Established,
                Frame::Cancel {
                    stream, operation, ..
                },
            ) => {
                match operation {
                    Some(op) => {
                        let mut ids: Vec<StreamId> = self
                            .streams
                            .iter()
                            .filter(|(_, s)| s.operation == op)
                            .map(|(id, _)| *id)
                            .collect();
                        ids.sort();
                        for id in ids {
                            self.cancel_stream(id);
                        }
                    }
                    None => {
                        self.check_known(stream)?;
                        // A stream that already ended sent its terminal frame: nothing to do.
                        if self.streams.contains_key(&stream) {
                            self.cancel_stream(stream);
                        }
                    }
                }
                Ok(())
            }
            (_, other) => Err(WireError::protocol(format!(
                "{} is not valid from a client here",
                frame_name(&other)
            ))),
        }
    }

    fn on_bind(&mut self, bind: Bind, now: Instant) -> Result<(), WireError> {
        let version = bind.max_version.min(VERSION_MAX);
        if version < bind.min_version.max(VERSION_MIN) {
            return Err(WireError::new(
                ErrorCode::UNSUPPORTED_VERSION,
                format!(
                    "client speaks versions {}..={}, server {VERSION_MIN}..={VERSION_MAX}",
                    bind.min_version, bind.max_version
                ),
            ));
        }
        if bind.initial_window == 0 {
            return Err(WireError::protocol("BIND initial_window is 0"));
        }
        if (bind.max_frame_size as usize) < CHUNK_OVERHEAD_MAX + 1024 {
            return Err(WireError::protocol(format!(
                "BIND max_frame_size {} is below the minimum of {}",
                bind.max_frame_size,
                CHUNK_OVERHEAD_MAX + 1024
            )));
        }
        self.version = version;
        self.client_nonce = bind.nonce;
        self.max_chunk = bind.max_frame_size as usize - CHUNK_OVERHEAD_MAX;
        self.initial_window = bind
            .initial_window
            .min(self.settings.max_window)
            .min(MAX_WINDOW as u32);
        // 0: no preference, the server's own interval. Below 100 ms is raised to 100 ms.
        let asked = Duration::from_millis(bind.heartbeat_interval_ms.into());
        let interval = match asked.is_zero() {
            true => self.settings.heartbeat_interval,
            false => asked.min(self.settings.heartbeat_interval),
        }
        .max(MIN_HEARTBEAT);
        self.clock.negotiated(interval, now);
        let auth_required = self.settings.secret.is_some();
        self.outbox.control(&Frame::Accept(Accept {
            version,
            auth_required,
            nonce: self.nonce,
            initial_window: self.initial_window,
            max_frame_size: self.settings.max_frame_size,
            max_streams: self.settings.max_streams,
            max_paradata: self.settings.max_paradata,
            heartbeat_interval_ms: interval.as_millis() as u32,
            name: self.settings.name.clone(),
            max_window: self.max_window(),
        }));
        if auth_required {
            self.phase = Phase::AwaitAuth;
        } else {
            self.establish(now);
        }
        self.client_name = bind.name;
        Ok(())
    }

    /// The largest window a stream may reach (ACCEPT `max_window`).
    fn max_window(&self) -> u32 {
        self.settings
            .max_window
            .max(self.initial_window)
            .min(MAX_WINDOW as u32)
    }

    fn establish(&mut self, now: Instant) {
        self.phase = Phase::Established;
        self.clock.handshake_deadline = None;
        self.next_progress = Some(now + self.settings.progress_interval);
        self.inbox.max_payload = self.settings.max_frame_size;
        self.events.push_back(ServerEvent::Established {
            version: self.version,
            client_name: self.client_name.clone(),
        });
    }

    fn on_initiate(&mut self, initiate: Initiate) {
        let stream = initiate.stream;
        if stream <= self.last_stream {
            self.fail_connection(WireError::protocol(format!(
                "INITIATE for stream {stream}, not above the last stream {}",
                self.last_stream
            )));
            return;
        }
        self.last_stream = stream;
        let refuse = if self.draining {
            Some((
                ErrorCode::DRAINING,
                "server is draining; retry on another connection".into(),
            ))
        } else if self.streams.len() >= self.settings.max_streams as usize {
            Some((
                ErrorCode::RESOURCE_EXHAUSTED,
                format!(
                    "connection already carries {} streams",
                    self.settings.max_streams
                ),
            ))
        } else if initiate.paradata.len() > self.settings.max_paradata as usize {
            Some((
                ErrorCode::BAD_PARADATA,
                format!(
                    "paradata of {} bytes exceeds the limit of {}",
                    initiate.paradata.len(),
                    self.settings.max_paradata
                ),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refuse {
            self.outbox.control(&Frame::Error {
                stream,
                code,
                message,
            });
            self.events
                .push_back(ServerEvent::StreamRefused { stream, code });
            return;
        }
        self.streams.insert(
            stream,
            Stream {
                operation: initiate.operation,
                accepted: false,
                zstd: initiate.accept_zstd,
                window: self.initial_window.into(),
                seq: 0,
                bytes: 0,
                digest: conn::Digest::default(),
                sent_since_tick: false,
                starved_since: None,
                expected: UNKNOWN,
                items: ItemCounts::NOT_COUNTED,
            },
        );
        self.events
            .push_back(ServerEvent::StreamRequested(initiate));
    }

    fn on_credit(&mut self, stream: StreamId, increment: u32) -> Result<(), WireError> {
        self.check_known(stream)?;
        if increment == 0 {
            return Err(WireError::protocol(format!(
                "CREDIT of 0 on stream {stream}"
            )));
        }
        let max = u64::from(self.max_window());
        let Some(s) = self.streams.get_mut(&stream) else {
            return Ok(()); // The stream ended while the credit was in flight.
        };
        // A client may grow a stream's window (PROTOCOL.md 6.3), up to what ACCEPT allowed:
        // the window bounds what a stream buffers here.
        let window = s.window + u64::from(increment);
        if window > max {
            return Err(WireError::new(
                ErrorCode::FLOW_CONTROL_VIOLATION,
                format!(
                    "CREDIT takes stream {stream}'s window to {window}, above the {max} allowed"
                ),
            ));
        }
        s.window = window;
        s.starved_since = None;
        self.events.push_back(ServerEvent::Credit { stream });
        Ok(())
    }

    fn cancel_stream(&mut self, stream: StreamId) {
        let Some(s) = self.streams.get(&stream) else {
            return;
        };
        let produced = s.bytes;
        // Unsent chunks are dropped: the acknowledgement is the last thing on the stream, and
        // it counts only the data that went out before it.
        let bytes_sent = produced - self.outbox.discard(stream);
        self.end_stream(stream, &Frame::Cancelled { stream, bytes_sent });
        self.events
            .push_back(ServerEvent::StreamCancelled { stream });
    }

    /// A frame for a stream id the client never opened is a protocol error.
    fn check_known(&self, stream: StreamId) -> Result<(), WireError> {
        if stream > self.last_stream {
            return Err(WireError::protocol(format!(
                "frame for stream {stream}, never initiated"
            )));
        }
        Ok(())
    }
}

pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    frame
        .frame_type()
        .map_or("an extension frame", |t| t.name())
}
