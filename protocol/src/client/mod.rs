//! The client side of a connection: BIND and AUTH ([`handshake`]), INITIATE, receiving chunks
//! with sequence, window, size and digest checks, CREDIT as the application consumes, CANCEL
//! ([`stream`]).

mod handshake;
mod push;
mod stream;

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::compress;
use crate::conn::{self, Timers};
use crate::error::WireError;
use crate::frame::{Accept, Bind, Frame, NONCE_LEN};
use crate::machine::{self, Connection, Core, Side};
use crate::types::{
    Completion, ErrorCode, OperationId, Progress, StreamId, StreamMap, VERSION_MAX, VERSION_MIN,
};

/// The client half of one connection, without IO: see [`Connection`] for how to drive it.
pub type ClientConnection = Connection<ClientSide>;

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
    /// Heartbeat, handshake and stream timers.
    pub timers: Timers,
    /// Shared secret; when set, the server must require and pass authentication.
    pub secret: Option<Vec<u8>>,
    /// Sent in BIND.
    pub name: String,
    /// The highest protocol version offered in BIND (at most [`crate::VERSION_MAX`]); 1
    /// behaves as a client without push streams.
    pub max_version: u16,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            initial_window: 4 << 20,
            max_window: 16 << 20,
            max_frame_size: 4 << 20,
            timers: Timers::default(),
            secret: None,
            name: concat!("nexus-client/", env!("CARGO_PKG_VERSION")).to_string(),
            max_version: VERSION_MAX,
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
    /// `Some(size)` makes it a push (version 2): the client sends `size` bytes
    /// ([`crate::UNKNOWN`] when it does not know yet) into the server's sink for `paradata`.
    pub push: Option<u64>,
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
    /// Nothing arrived within the stream timeout while the server could have sent (for a
    /// push: while the server held the window closed, or did not commit).
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
    /// The server granted a push more window: [`ClientConnection::push_capacity`] grew.
    Credit {
        /// The stream.
        stream: StreamId,
        /// Bytes added to the window.
        increment: u32,
    },
    /// Server counters (for a push, `bytes_sent` counts what the server received).
    Progress {
        /// The stream.
        stream: StreamId,
        /// The counters.
        progress: Progress,
    },
    /// The server's COMPLETE of a push carried its sink's report (flag REPORT); the push's
    /// `StreamEnd` (complete) follows.
    Report {
        /// The stream.
        stream: StreamId,
        /// The report, as the sink wrote it.
        text: String,
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

/// Where the connection is; the phases after ACCEPT keep it.
#[derive(Debug)]
enum Phase {
    AwaitAccept,
    AwaitAuth(Accept),
    Established(Accept),
    Closed,
}

/// Which phase, without its data: to match on while the phase itself changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseKind {
    AwaitAccept,
    AwaitAuth,
    Established,
    Closed,
}

impl Phase {
    fn kind(&self) -> PhaseKind {
        match self {
            Phase::AwaitAccept => PhaseKind::AwaitAccept,
            Phase::AwaitAuth(_) => PhaseKind::AwaitAuth,
            Phase::Established(_) => PhaseKind::Established,
            Phase::Closed => PhaseKind::Closed,
        }
    }
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
    /// What INITIATED announced ([`crate::UNKNOWN`] if nothing): the stream must carry
    /// exactly this.
    expected: u64,
    /// For a push: `window`, `next_seq`, `bytes` and `digest` then count what the server
    /// still takes and what was sent.
    push: Option<PushOut>,
}

/// A push stream's sending state.
#[derive(Debug)]
struct PushOut {
    /// The size declared in INITIATE ([`crate::UNKNOWN`] if not known).
    declared: u64,
    /// The client's COMPLETE is queued: waiting for the server's commit.
    finished: bool,
}

/// The client's own state; see [`ClientConnection`].
#[derive(Debug)]
pub struct ClientSide {
    settings: ClientSettings,
    phase: Phase,
    nonce: [u8; NONCE_LEN],
    next_stream: u32,
    draining: bool,
    streams: StreamMap<Stream>,
    /// Kept across compressed chunks: no zstd context per chunk.
    unpacker: compress::ChunkDecompressor,
    /// Where push CHUNK headers are carved from.
    header_arena: BytesMut,
}

impl ClientSide {
    /// ACCEPT, once it arrived.
    fn accept(&self) -> Option<&Accept> {
        match &self.phase {
            Phase::AwaitAuth(a) | Phase::Established(a) => Some(a),
            Phase::AwaitAccept | Phase::Closed => None,
        }
    }
}

impl Side for ClientSide {
    type Event = ClientEvent;
    const PEER: &'static str = "server";

    fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established(_))
    }

    fn on_peer_error(conn: &mut ClientConnection, err: WireError) {
        close_with(conn, Some(err), true);
    }

    fn on_frame(conn: &mut ClientConnection, frame: Frame, now: Instant) -> Result<(), WireError> {
        match (conn.side.phase.kind(), frame) {
            (PhaseKind::AwaitAccept, Frame::Accept(accept)) => {
                handshake::on_accept(conn, accept, now)
            }
            (PhaseKind::AwaitAccept, other) => Err(WireError::protocol(format!(
                "expected ACCEPT first, got {}",
                machine::frame_name(&other)
            ))),
            (PhaseKind::AwaitAuth, Frame::Auth { proof }) => handshake::on_auth(conn, &proof),
            (PhaseKind::AwaitAuth, other) => Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                format!(
                    "expected the server's AUTH, got {}",
                    machine::frame_name(&other)
                ),
            )),
            (PhaseKind::Established, frame) => stream::on_frame(conn, frame, now),
            (PhaseKind::Closed, _) => Ok(()),
        }
    }

    fn fail(conn: &mut ClientConnection, err: WireError) {
        if conn.side.is_closed() {
            return;
        }
        conn.core.outbox.control(&machine::error_frame(&err));
        close_with(conn, Some(err), true);
    }

    /// Every open stream ends with `connection_lost` and its byte count.
    fn on_eof(conn: &mut ClientConnection) {
        let clean = conn.side.streams.is_empty() && !conn.core.inbox.is_mid_frame();
        let err = if clean { None } else { Some(conn::lost(0)) };
        close_with(conn, err, false);
    }

    fn time_out_streams(conn: &mut ClientConnection, now: Instant) {
        stream::time_out_silent_streams(conn, now);
    }
}

impl ClientConnection {
    /// A connection whose socket connected at `now`: queues the preface and BIND.
    /// `nonce` must be fresh random bytes.
    pub fn new(settings: ClientSettings, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        let mut core = Core::new(
            now,
            settings.timers.heartbeat_interval,
            settings.timers.handshake_timeout,
        );
        core.outbox.control(&Frame::Bind(Bind {
            min_version: VERSION_MIN,
            max_version: settings.max_version.clamp(VERSION_MIN, VERSION_MAX),
            nonce,
            initial_window: settings.initial_window,
            max_frame_size: settings.max_frame_size,
            heartbeat_interval_ms: settings.timers.heartbeat_interval.as_millis() as u32,
            name: settings.name.clone(),
        }));
        Connection {
            core,
            side: ClientSide {
                settings,
                phase: Phase::AwaitAccept,
                nonce,
                next_stream: 1,
                draining: false,
                streams: StreamMap::default(),
                unpacker: compress::ChunkDecompressor::default(),
                header_arena: BytesMut::new(),
            },
        }
    }

    /// Whether the server sent GOAWAY.
    pub fn is_draining(&self) -> bool {
        self.side.draining
    }

    /// The per-stream window the server granted (ACCEPT), once known: the most data a stream
    /// has in flight. CREDIT goes out per quarter of it.
    pub fn stream_window(&self) -> Option<u32> {
        self.side.accept().map(|a| a.initial_window)
    }

    /// Streams initiated and not yet finished with the server.
    pub fn active_streams(&self) -> usize {
        self.side.streams.len()
    }

    /// Closes the connection: every open stream ends `Cancelled`; a connection ERROR with
    /// `code` tells the server why.
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        if self.is_closed() {
            return;
        }
        let err = WireError::new(code, message);
        self.core.outbox.control(&machine::error_frame(&err));
        let ids: Vec<StreamId> = self.side.streams.keys().copied().collect();
        for id in ids {
            stream::report(self, id, Outcome::Cancelled);
        }
        close_with(self, None, false);
    }
}

/// Ends every stream (with the error's code, or `connection_lost`) and the connection.
fn close_with(conn: &mut ClientConnection, err: Option<WireError>, ends_streams_with_err: bool) {
    let mut ids: Vec<StreamId> = conn.side.streams.keys().copied().collect();
    ids.sort();
    for id in ids {
        let s = &conn.side.streams[&id];
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
        stream::report(conn, id, outcome);
    }
    conn.side.streams.clear();
    conn.side.phase = Phase::Closed;
    conn.core.events.push_back(ClientEvent::Closed(err));
}
