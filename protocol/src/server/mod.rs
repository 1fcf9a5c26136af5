//! The server side of a connection: answers BIND, checks AUTH ([`handshake`]), turns
//! INITIATEs into [`ServerEvent::StreamRequested`], and sends what the application produces
//! within each stream's window, round-robin between streams ([`stream`]).

mod handshake;
mod push;
mod stream;

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::compress;
use crate::conn::{self, Timers};
use crate::error::WireError;
use crate::frame::{Frame, Initiate, NONCE_LEN};
use crate::machine::{self, Connection, Core, Side};
use crate::types::{Completion, ErrorCode, ItemCounts, OperationId, StreamId, StreamMap};

/// The server half of one connection, without IO: see [`Connection`] for how to drive it.
pub type ServerConnection = Connection<ServerSide>;

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
    /// Heartbeat, handshake and stream timers.
    pub timers: Timers,
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
    /// The highest protocol version offered (at most [`crate::VERSION_MAX`]); 1 behaves as a
    /// server without push streams.
    pub max_version: u16,
    /// The window each push stream starts with (sent as CREDIT with INITIATED): the most
    /// data a pushing client has in flight or waiting for the sink, per stream.
    pub push_window: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_window: 16 << 20,
            max_frame_size: 4 << 20,
            max_streams: 1024,
            max_paradata: 64 << 10,
            timers: Timers::default(),
            progress_interval: Duration::from_secs(1),
            max_pending_control: 1 << 20,
            pending_control_timeout: Duration::from_secs(10),
            secret: None,
            name: concat!("nexus-server/", env!("CARGO_PKG_VERSION")).to_string(),
            max_version: crate::VERSION_MAX,
            push_window: 8 << 20,
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
    /// The stream timed out (a pull waiting for credit, a push waiting for data); ERROR
    /// `timeout` is queued. Stop its producer or drop its sink.
    StreamTimedOut {
        /// The stream.
        stream: StreamId,
    },
    /// Push data, in order, checked and decompressed: give it to the sink, then call
    /// [`ServerConnection::release`] with its length once the sink is done with it.
    PushChunk {
        /// The stream.
        stream: StreamId,
        /// The data.
        data: bytes::Bytes,
    },
    /// The client ended its push, and its counts and digest match what arrived: make the sink
    /// durable, then call [`ServerConnection::commit`] (or `reject` if it cannot be).
    PushEnded {
        /// The stream.
        stream: StreamId,
        /// What the client stated, equal to what arrived.
        completion: Completion,
    },
    /// The protocol failed a push (a sequence gap, a bad compressed chunk, a digest or size
    /// mismatch); its ERROR is queued. Drop the sink without keeping anything.
    StreamFailed {
        /// The stream.
        stream: StreamId,
        /// The code sent.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The connection is closed; every producer must stop. `None` when it ended cleanly.
    Closed(Option<WireError>),
}

/// What the handshake settled, kept in the phases that have it.
#[derive(Debug, Clone)]
struct Handshake {
    version: u16,
    client_nonce: [u8; NONCE_LEN],
    client_name: String,
    /// Largest chunk data the client accepts.
    max_chunk: usize,
    initial_window: u32,
}

#[derive(Debug)]
enum Phase {
    AwaitBind,
    AwaitAuth(Handshake),
    Established(Handshake),
    Closed,
}

/// Which phase, without its data: to match on while the phase itself changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseKind {
    AwaitBind,
    AwaitAuth,
    Established,
    Closed,
}

impl Phase {
    fn kind(&self) -> PhaseKind {
        match self {
            Phase::AwaitBind => PhaseKind::AwaitBind,
            Phase::AwaitAuth(_) => PhaseKind::AwaitAuth,
            Phase::Established(_) => PhaseKind::Established,
            Phase::Closed => PhaseKind::Closed,
        }
    }
}

/// One stream, from INITIATE to its terminal frame.
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
    /// What INITIATED announced ([`crate::UNKNOWN`] when nothing was): the stream must carry
    /// exactly this many bytes.
    expected: u64,
    /// The source's counters as last reported, for PROGRESS.
    items: ItemCounts,
    /// For a push stream, what only it has; `window`, `seq`, `bytes` and `digest` then count
    /// what the client may still send and what arrived.
    push: Option<PushIn>,
}

/// A push stream's receiving state.
#[derive(Debug)]
struct PushIn {
    /// The size the client declared ([`crate::UNKNOWN`] when it did not know).
    declared: u64,
    /// Bytes the sink took and that are not yet credited back.
    released: u64,
    /// The client's COMPLETE arrived and matched: waiting for the sink to commit.
    client_done: bool,
    /// The last frame of the stream, or the moment its window reopened: the stream timeout
    /// counts from here while the client may send.
    last_heard: Instant,
}

/// The server's own state; see [`ServerConnection`].
#[derive(Debug)]
pub struct ServerSide {
    settings: ServerSettings,
    phase: Phase,
    nonce: [u8; NONCE_LEN],
    last_stream: StreamId,
    draining: bool,
    streams: StreamMap<Stream>,
    /// When the next round of PROGRESS frames is due (once established).
    next_progress: Option<Instant>,
    /// Since when the client has left `max_pending_control` bytes unread.
    blocked_since: Option<Instant>,
    /// Where CHUNK headers are carved from, so sending a chunk does not allocate.
    header_arena: BytesMut,
    /// Kept across compressed push chunks: no zstd context per chunk.
    unpacker: compress::ChunkDecompressor,
}

impl ServerSide {
    /// The negotiated version, once known.
    fn version(&self) -> u16 {
        self.handshake().map_or(0, |h| h.version)
    }

    fn handshake(&self) -> Option<&Handshake> {
        match &self.phase {
            Phase::AwaitAuth(h) | Phase::Established(h) => Some(h),
            Phase::AwaitBind | Phase::Closed => None,
        }
    }

    fn over_pending_limit(conn: &ServerConnection) -> bool {
        conn.core.outbox.control_bytes() >= conn.side.settings.max_pending_control
    }
}

impl Side for ServerSide {
    type Event = ServerEvent;
    const PEER: &'static str = "client";

    fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established(_))
    }

    /// At the limit of frames the client leaves unread, input waits; the time it began is
    /// kept for the deadline.
    fn blocked(conn: &mut ServerConnection, now: Instant) -> bool {
        let blocked = ServerSide::over_pending_limit(conn);
        match blocked {
            true => {
                conn.side.blocked_since.get_or_insert(now);
            }
            false => conn.side.blocked_since = None,
        }
        blocked
    }

    fn input_paused(conn: &ServerConnection) -> bool {
        ServerSide::over_pending_limit(conn)
    }

    fn on_peer_error(conn: &mut ServerConnection, err: WireError) {
        conn.side.phase = Phase::Closed;
        conn.side.streams.clear();
        conn.core.events.push_back(ServerEvent::Closed(Some(err)));
    }

    fn on_frame(conn: &mut ServerConnection, frame: Frame, now: Instant) -> Result<(), WireError> {
        match (conn.side.phase.kind(), frame) {
            (PhaseKind::AwaitBind, Frame::Bind(bind)) => handshake::on_bind(conn, bind, now),
            (PhaseKind::AwaitBind, other) => Err(WireError::protocol(format!(
                "expected BIND first, got {}",
                machine::frame_name(&other)
            ))),
            (PhaseKind::AwaitAuth, Frame::Auth { proof }) => handshake::on_auth(conn, &proof, now),
            (PhaseKind::AwaitAuth, other) => Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                format!(
                    "authentication required before {}",
                    machine::frame_name(&other)
                ),
            )),
            (PhaseKind::Established, frame) => stream::on_frame(conn, frame, now),
            (PhaseKind::Closed, _) => Ok(()),
        }
    }

    fn fail(conn: &mut ServerConnection, err: WireError) {
        if conn.side.is_closed() {
            return;
        }
        conn.side.phase = Phase::Closed;
        conn.side.streams.clear();
        conn.core.outbox.discard_streams();
        conn.core.outbox.control(&machine::error_frame(&err));
        conn.core.events.push_back(ServerEvent::Closed(Some(err)));
    }

    /// EOF inside a frame or before the handshake finished is a protocol error, answered with
    /// ERROR: the peer may have closed only its sending side and still read the reason.
    fn on_eof(conn: &mut ServerConnection) {
        if conn.core.inbox.is_mid_frame() {
            let err = WireError::protocol("connection closed in the middle of a frame");
            return ServerSide::fail(conn, err);
        }
        if conn.core.clock.handshake_deadline.is_some() {
            let err = WireError::protocol("connection closed before the handshake finished");
            return ServerSide::fail(conn, err);
        }
        conn.side.phase = Phase::Closed;
        conn.side.streams.clear();
        conn.core.events.push_back(ServerEvent::Closed(None));
    }

    fn on_tick(conn: &mut ServerConnection, _now: Instant) {
        stream::heartbeat_idle_streams(conn);
    }

    fn deadline(conn: &ServerConnection) -> Option<Instant> {
        let blocked = conn
            .side
            .blocked_since
            .map(|since| since + conn.side.settings.pending_control_timeout);
        [conn.side.next_progress, blocked]
            .into_iter()
            .flatten()
            .min()
    }

    fn time_out_streams(conn: &mut ServerConnection, now: Instant) {
        stream::time_out_starved_streams(conn, now);
    }

    fn on_timers(conn: &mut ServerConnection, now: Instant) {
        if let Some(since) = conn.side.blocked_since {
            if !ServerSide::over_pending_limit(conn) {
                conn.side.blocked_since = None;
            } else if now.duration_since(since) >= conn.side.settings.pending_control_timeout {
                let ms = conn.side.settings.pending_control_timeout.as_millis();
                let err = WireError::new(
                    ErrorCode::RESOURCE_EXHAUSTED,
                    format!("the client left frames unread for {ms} ms"),
                );
                return ServerSide::fail(conn, err);
            }
        }
        if conn.side.next_progress.is_some_and(|at| now >= at) {
            stream::send_progress(conn, now);
        }
    }
}

impl ServerConnection {
    /// A connection just accepted at `now`. `nonce` must be fresh random bytes.
    pub fn new(settings: ServerSettings, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        Connection {
            core: Core::new(
                now,
                settings.timers.heartbeat_interval,
                settings.timers.handshake_timeout,
            ),
            side: ServerSide {
                settings,
                phase: Phase::AwaitBind,
                nonce,
                last_stream: StreamId::CONNECTION,
                draining: false,
                streams: StreamMap::default(),
                next_progress: None,
                blocked_since: None,
                header_arena: BytesMut::new(),
                unpacker: compress::ChunkDecompressor::default(),
            },
        }
    }

    /// Streams that have been requested and have not ended.
    pub fn active_streams(&self) -> usize {
        self.side.streams.len()
    }

    /// Starts draining: queues GOAWAY; every later INITIATE gets ERROR `draining`. The
    /// connection closes cleanly (`Closed(None)`: flush, then FIN) as soon as no stream runs,
    /// at once if none does. A connection still in its handshake is closed with ERROR
    /// `draining` instead: nothing runs on it yet.
    pub fn go_away(&mut self, drain: Duration, message: &str) {
        if self.side.draining || self.is_closed() {
            return;
        }
        if !self.is_established() {
            return ServerSide::fail(self, WireError::new(ErrorCode::DRAINING, message));
        }
        self.side.draining = true;
        let drain_ms = drain.as_millis().min(u32::MAX as u128) as u32;
        self.core.outbox.control(&Frame::GoAway {
            last_stream: self.side.last_stream,
            drain_ms,
            message: message.to_string(),
        });
        self.close_if_drained();
    }

    /// Closes the connection with a connection-level ERROR (at a drain deadline, say).
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        ServerSide::fail(self, WireError::new(code, message));
    }

    /// A draining connection with no stream left is done: it closes cleanly.
    fn close_if_drained(&mut self) {
        if self.side.draining && self.is_established() && self.side.streams.is_empty() {
            self.side.phase = Phase::Closed;
            self.core.events.push_back(ServerEvent::Closed(None));
        }
    }
}
