//! The frame codec: byte-exact encoding and decoding of every message of PROTOCOL.md.
//!
//! Decoding takes bytes from a `BytesMut`, checks the frame length against the receiver's
//! limit before waiting for (or allocating) the payload, checks every inner length against
//! the bytes the frame really has, and never panics. CHUNK data is a zero-copy slice of the
//! receive buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::WireError;
use crate::types::{Completion, ErrorCode, ItemCounts, OperationId, Progress, StreamId};

/// The 8 bytes each side sends before its first frame: a non-ASCII first byte (so that no
/// text protocol and no TLS record starts like it), "NXS", CR LF, Ctrl-Z, LF.
pub const PREFACE: [u8; 8] = [0x89, b'N', b'X', b'S', b'\r', b'\n', 0x1A, b'\n'];

/// Length of the fixed frame header: length u32, type u8, flags u8, reserved u16, stream u32.
pub const HEADER_LEN: usize = 12;

/// Largest payload accepted before the handshake has negotiated limits (BIND, ACCEPT, AUTH,
/// an ERROR). Keeps a peer that has not yet identified itself from pinning memory.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 16 * 1024;

/// Length of a handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Length of an authentication proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// Bytes a CHUNK carries besides its data: the sequence number and, when compressed, the
/// uncompressed length.
pub const CHUNK_OVERHEAD_MAX: usize = 12;

/// Longest client or server name accepted in BIND and ACCEPT.
pub const MAX_NAME_LEN: usize = 256;

/// Longest message an ERROR, CANCEL or GOAWAY frame carries; senders truncate to it.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Longest W3C `traceparent` accepted in INITIATE.
pub const MAX_TRACEPARENT_LEN: usize = 256;

/// Frame flag on INITIATE: the client accepts zstd-compressed chunks.
pub const FLAG_ACCEPT_ZSTD: u8 = 0x01;
/// Frame flag on INITIATE (version 2): a push stream; the client sends the data, the server's
/// sink takes it. The payload then ends with the `u64` size of the push.
pub const FLAG_PUSH: u8 = 0x02;
/// Frame flag on INITIATED: the server may send zstd-compressed chunks on this stream.
pub const FLAG_ZSTD: u8 = 0x01;
/// Frame flag on CHUNK: the data is one zstd frame.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Frame flag on CHUNK: this chunk used up the stream's window; the server waits for CREDIT.
pub const FLAG_WINDOW_EMPTY: u8 = 0x02;
/// Frame flag on COMPLETE (version 2, a server's COMPLETE of a push only): the sink's report
/// follows the counters, a `u16`-length UTF-8 text of at most [`MAX_MESSAGE_LEN`] bytes.
pub const FLAG_REPORT: u8 = 0x01;
/// Frame flag on ACCEPT: the server requires AUTH before anything else.
pub const FLAG_AUTH_REQUIRED: u8 = 0x01;
/// Frame flag on CANCEL: cancel every stream of the operation on this connection.
pub const FLAG_OPERATION: u8 = 0x01;

/// Frame types are `0x00..=0x7F` for the core protocol; `0x80..=0xFF` are extensions that a
/// receiver which does not know them MUST ignore.
pub const FIRST_EXTENSION_TYPE: u8 = 0x80;

macro_rules! frame_types {
    ($( $(#[$doc:meta])* $variant:ident = $value:literal, $name:literal; )*) => {
        /// The type byte of a frame.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType {
            $( $(#[$doc])* $variant = $value, )*
        }

        impl FrameType {
            /// Every frame type of this version.
            pub const ALL: &'static [FrameType] = &[$(FrameType::$variant),*];

            /// The type with this byte, `None` for an unknown one.
            pub fn from_u8(value: u8) -> Option<FrameType> {
                match value {
                    $( $value => Some(FrameType::$variant), )*
                    _ => None,
                }
            }

            /// The upper-case name PROTOCOL.md uses.
            pub fn name(self) -> &'static str {
                match self {
                    $( FrameType::$variant => $name, )*
                }
            }
        }
    };
}

frame_types! {
    /// Client hello: versions, nonce, limits.
    Bind = 0x01, "BIND";
    /// Server hello: chosen version, nonce, limits, whether AUTH is required.
    Accept = 0x02, "ACCEPT";
    /// An authentication proof, from the client and then from the server.
    Auth = 0x03, "AUTH";
    /// Client asks for a stream.
    Initiate = 0x10, "INITIATE";
    /// Server accepted the stream.
    Initiated = 0x11, "INITIATED";
    /// Stream data.
    Chunk = 0x12, "CHUNK";
    /// Server-side counters of a stream.
    Progress = 0x13, "PROGRESS";
    /// Flow-control window update from the client.
    Credit = 0x14, "CREDIT";
    /// Client cancels a stream or a whole operation.
    Cancel = 0x15, "CANCEL";
    /// Server acknowledges a cancel: it sends nothing more on the stream.
    Cancelled = 0x16, "CANCELLED";
    /// Server finished the stream: counts and digest.
    Complete = 0x17, "COMPLETE";
    /// A stream-level (stream id > 0) or connection-level (stream 0) error.
    Error = 0x18, "ERROR";
    /// Liveness on the connection (stream 0) or on a stream that has nothing to send yet.
    Heartbeat = 0x20, "HEARTBEAT";
    /// The server is draining: no new streams on this connection.
    GoAway = 0x21, "GOAWAY";
}

/// Client hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// Fresh random bytes, used in authentication.
    pub nonce: [u8; NONCE_LEN],
    /// The per-stream window, in bytes, the client grants at INITIATE.
    pub initial_window: u32,
    /// Largest frame payload, in bytes, the client accepts.
    pub max_frame_size: u32,
    /// Heartbeat interval the client asks for, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// Free text naming the client (software, host), at most 256 bytes.
    pub name: String,
}

/// Server hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The version both sides speak from now on.
    pub version: u16,
    /// Whether the client must send AUTH before anything else.
    pub auth_required: bool,
    /// Fresh random bytes, used in authentication.
    pub nonce: [u8; NONCE_LEN],
    /// The effective per-stream initial window in bytes (at most the client's).
    pub initial_window: u32,
    /// Largest frame payload, in bytes, the server accepts.
    pub max_frame_size: u32,
    /// Most concurrent streams the server takes on this connection.
    pub max_streams: u32,
    /// Longest paradata, in bytes, the server takes.
    pub max_paradata: u32,
    /// The heartbeat interval both sides use, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// Free text naming the server.
    pub name: String,
    /// The largest a stream's window may grow to with CREDIT (>= `initial_window`).
    pub max_window: u32,
}

/// A stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiate {
    /// The new stream, greater than every stream id used before on the connection.
    pub stream: StreamId,
    /// The macro operation this stream belongs to (0: none).
    pub operation: OperationId,
    /// Whether the client accepts zstd-compressed chunks.
    pub accept_zstd: bool,
    /// What to stream; opaque to the protocol, interpreted by the server's sources.
    pub paradata: String,
    /// An optional W3C `traceparent`.
    pub traceparent: Option<String>,
    /// `Some(size)` for a push stream (version 2): the client sends `size` bytes
    /// ([`crate::UNKNOWN`] when it does not know) and the server's sink takes them.
    pub push: Option<u64>,
}

/// One piece of stream data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The stream.
    pub stream: StreamId,
    /// 0 for the first chunk of a stream, then +1 per chunk.
    pub seq: u64,
    /// `Some(uncompressed length)` when `data` is a zstd frame.
    pub raw_len: Option<u32>,
    /// This chunk used up the stream's window: the server can send no more until CREDIT.
    pub window_empty: bool,
    /// The data as sent (compressed or not): a slice of the receive buffer.
    pub data: Bytes,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Bind`].
    Bind(Bind),
    /// See [`Accept`].
    Accept(Accept),
    /// An HMAC-SHA256 proof.
    Auth {
        /// The proof.
        proof: [u8; PROOF_LEN],
    },
    /// See [`Initiate`].
    Initiate(Initiate),
    /// The server accepted the stream.
    Initiated {
        /// The stream.
        stream: StreamId,
        /// Whether chunks may come compressed.
        zstd: bool,
        /// Total uncompressed bytes the stream will carry, `u64::MAX` when unknown.
        expected_bytes: u64,
    },
    /// See [`Chunk`].
    Chunk(Chunk),
    /// Server counters of a stream.
    Progress {
        /// The stream.
        stream: StreamId,
        /// The counters.
        progress: Progress,
    },
    /// The client grants more window.
    Credit {
        /// The stream.
        stream: StreamId,
        /// Bytes added to the window, > 0.
        increment: u32,
    },
    /// The client cancels a stream (or with `operation`, every stream of an operation).
    Cancel {
        /// The stream, or 0 with an operation.
        stream: StreamId,
        /// With stream 0: the operation whose streams to cancel.
        operation: Option<OperationId>,
        /// Why, for the server's log.
        reason: String,
    },
    /// The server stopped the stream's producer; nothing more comes on it.
    Cancelled {
        /// The stream.
        stream: StreamId,
        /// Uncompressed bytes the server had sent on the stream.
        bytes_sent: u64,
    },
    /// The stream finished.
    Complete {
        /// The stream.
        stream: StreamId,
        /// Counts and digest.
        completion: Completion,
        /// The sink's report (server's COMPLETE of a push only; flag REPORT), e.g. how each
        /// replica of a replicated push ended.
        report: Option<String>,
    },
    /// An error on a stream (stream > 0) or the connection (stream 0).
    Error {
        /// The stream, or 0.
        stream: StreamId,
        /// The code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Liveness.
    Heartbeat {
        /// 0 for the connection, else a stream whose producer is alive but has nothing yet.
        stream: StreamId,
    },
    /// The server drains.
    GoAway {
        /// The highest stream id the server accepted; later INITIATEs get `draining`.
        last_stream: StreamId,
        /// How long, in milliseconds, running streams may still take.
        drain_ms: u32,
        /// Why.
        message: String,
    },
    /// A frame of an extension type (>= 0x80) this version does not know; ignored.
    Extension {
        /// Its type byte.
        kind: u8,
        /// Its stream.
        stream: StreamId,
    },
}

impl Frame {
    /// The stream a frame belongs to (0 for connection frames).
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Bind(_) | Frame::Accept(_) | Frame::Auth { .. } | Frame::GoAway { .. } => {
                StreamId::CONNECTION
            }
            Frame::Initiate(m) => m.stream,
            Frame::Chunk(m) => m.stream,
            Frame::Initiated { stream, .. }
            | Frame::Progress { stream, .. }
            | Frame::Credit { stream, .. }
            | Frame::Cancel { stream, .. }
            | Frame::Cancelled { stream, .. }
            | Frame::Complete { stream, .. }
            | Frame::Error { stream, .. }
            | Frame::Heartbeat { stream }
            | Frame::Extension { stream, .. } => *stream,
        }
    }

    /// The frame's type; `None` for an extension.
    pub fn frame_type(&self) -> Option<FrameType> {
        Some(match self {
            Frame::Bind(_) => FrameType::Bind,
            Frame::Accept(_) => FrameType::Accept,
            Frame::Auth { .. } => FrameType::Auth,
            Frame::Initiate(_) => FrameType::Initiate,
            Frame::Initiated { .. } => FrameType::Initiated,
            Frame::Chunk(_) => FrameType::Chunk,
            Frame::Progress { .. } => FrameType::Progress,
            Frame::Credit { .. } => FrameType::Credit,
            Frame::Cancel { .. } => FrameType::Cancel,
            Frame::Cancelled { .. } => FrameType::Cancelled,
            Frame::Complete { .. } => FrameType::Complete,
            Frame::Error { .. } => FrameType::Error,
            Frame::Heartbeat { .. } => FrameType::Heartbeat,
            Frame::GoAway { .. } => FrameType::GoAway,
            Frame::Extension { .. } => return None,
        })
    }

    /// Appends the whole frame, header and payload, to `dst`. CHUNK data is copied: the data
    /// path uses [`chunk_header_in`] and sends the data from its own buffer instead.
    ///
    /// Strings longer than their field allows are truncated at a character boundary
    /// (names to 256 bytes, messages to 4096); extension frames encode as nothing.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        let connection = StreamId::CONNECTION;
        // Each type writes its own payload (below) and says its flags.
        let (kind, flags, stream) = match self {
            Frame::Bind(m) => (FrameType::Bind, m.put(dst), connection),
            Frame::Accept(m) => (FrameType::Accept, m.put(dst), connection),
            Frame::Auth { proof } => (FrameType::Auth, put_auth(dst, proof), connection),
            Frame::Initiate(m) => (FrameType::Initiate, m.put(dst), m.stream),
            Frame::Initiated {
                stream,
                zstd,
                expected_bytes,
            } => (
                FrameType::Initiated,
                put_initiated(dst, *zstd, *expected_bytes),
                *stream,
            ),
            Frame::Chunk(m) => (FrameType::Chunk, m.put(dst), m.stream),
            Frame::Progress { stream, progress } => {
                (FrameType::Progress, put_progress(dst, progress), *stream)
            }
            Frame::Credit { stream, increment } => {
                dst.put_u32(*increment);
                (FrameType::Credit, 0, *stream)
            }
            Frame::Cancel {
                stream,
                operation,
                reason,
            } => (
                FrameType::Cancel,
                put_cancel(dst, *operation, reason),
                *stream,
            ),
            Frame::Cancelled { stream, bytes_sent } => {
                dst.put_u64(*bytes_sent);
                (FrameType::Cancelled, 0, *stream)
            }
            Frame::Complete {
                stream,
                completion,
                report,
            } => (
                FrameType::Complete,
                put_complete(dst, completion, report.as_deref()),
                *stream,
            ),
            Frame::Error {
                stream,
                code,
                message,
            } => (FrameType::Error, put_error(dst, *code, message), *stream),
            Frame::Heartbeat { stream } => (FrameType::Heartbeat, 0, *stream),
            Frame::GoAway {
                last_stream,
                drain_ms,
                message,
            } => (
                FrameType::GoAway,
                put_goaway(dst, *last_stream, *drain_ms, message),
                connection,
            ),
            Frame::Extension { .. } => {
                dst.truncate(start);
                return;
            }
        };
        let len = (dst.len() - start - HEADER_LEN) as u32;
        let header = encode_header(len, kind as u8, flags, stream);
        dst[start..start + HEADER_LEN].copy_from_slice(&header);
    }

    /// Enough room for most encodings of this frame: the header, the fixed fields and the
    /// strings it carries (a hint, never a limit).
    fn size_hint(&self) -> usize {
        let strings = match self {
            Frame::Initiate(m) => m.paradata.len() + m.traceparent.as_ref().map_or(0, String::len),
            Frame::Bind(m) => m.name.len(),
            Frame::Accept(m) => m.name.len(),
            Frame::Chunk(m) => m.data.len(),
            Frame::Cancel { reason, .. } => reason.len(),
            Frame::Complete { report, .. } => report.as_ref().map_or(0, String::len),
            Frame::Error { message, .. } | Frame::GoAway { message, .. } => message.len(),
            _ => 0,
        };
        HEADER_LEN + 96 + strings
    }

    /// The frame as one `Bytes`, header and payload.
    pub fn to_bytes(&self) -> Bytes {
        // Sized up front: growing a BytesMut from empty reallocates (and copies) on the way,
        // which was a tenth of a small stream's instructions on each side.
        let mut dst = BytesMut::with_capacity(self.size_hint());
        self.encode(&mut dst);
        dst.freeze()
    }
}

// Encoders, one per type: each appends its payload and returns its flags.

impl Bind {
    fn put(&self, dst: &mut BytesMut) -> u8 {
        dst.put_u16(self.min_version);
        dst.put_u16(self.max_version);
        dst.put_slice(&self.nonce);
        dst.put_u32(self.initial_window);
        dst.put_u32(self.max_frame_size);
        dst.put_u32(self.heartbeat_interval_ms);
        put_str16(dst, &self.name, MAX_NAME_LEN);
        0
    }
}

impl Accept {
    fn put(&self, dst: &mut BytesMut) -> u8 {
        dst.put_u16(self.version);
        dst.put_slice(&self.nonce);
        dst.put_u32(self.initial_window);
        dst.put_u32(self.max_frame_size);
        dst.put_u32(self.max_streams);
        dst.put_u32(self.max_paradata);
        dst.put_u32(self.heartbeat_interval_ms);
        put_str16(dst, &self.name, MAX_NAME_LEN);
        dst.put_u32(self.max_window);
        flag(self.auth_required, FLAG_AUTH_REQUIRED)
    }
}

impl Initiate {
    fn put(&self, dst: &mut BytesMut) -> u8 {
        dst.put_u64(self.operation.0);
        dst.put_u32(self.paradata.len() as u32);
        dst.put_slice(self.paradata.as_bytes());
        let trace = self.traceparent.as_deref().unwrap_or("");
        put_str16(dst, trace, MAX_TRACEPARENT_LEN);
        if let Some(size) = self.push {
            dst.put_u64(size);
        }
        flag(self.accept_zstd, FLAG_ACCEPT_ZSTD) | flag(self.push.is_some(), FLAG_PUSH)
    }
}

impl Chunk {
    fn put(&self, dst: &mut BytesMut) -> u8 {
        dst.put_u64(self.seq);
        if let Some(raw_len) = self.raw_len {
            dst.put_u32(raw_len);
        }
        dst.put_slice(&self.data);
        chunk_flags(self.raw_len, self.window_empty)
    }
}

fn put_auth(dst: &mut BytesMut, proof: &[u8; PROOF_LEN]) -> u8 {
    dst.put_slice(proof);
    0
}

fn put_initiated(dst: &mut BytesMut, zstd: bool, expected_bytes: u64) -> u8 {
    dst.put_u64(expected_bytes);
    flag(zstd, FLAG_ZSTD)
}

fn put_progress(dst: &mut BytesMut, progress: &Progress) -> u8 {
    dst.put_u64(progress.bytes_sent);
    put_items(dst, &progress.items);
    0
}

fn put_cancel(dst: &mut BytesMut, operation: Option<OperationId>, reason: &str) -> u8 {
    dst.put_u64(operation.map_or(0, |o| o.0));
    put_str16(dst, reason, MAX_MESSAGE_LEN);
    flag(operation.is_some(), FLAG_OPERATION)
}

fn put_complete(dst: &mut BytesMut, completion: &Completion, report: Option<&str>) -> u8 {
    dst.put_u64(completion.bytes);
    dst.put_u64(completion.chunks);
    dst.put_u64(completion.digest);
    put_items(dst, &completion.items);
    match report {
        Some(report) => {
            put_str16(dst, report, MAX_MESSAGE_LEN);
            FLAG_REPORT
        }
        None => 0,
    }
}

fn put_error(dst: &mut BytesMut, code: ErrorCode, message: &str) -> u8 {
    dst.put_u16(code.0);
    put_str16(dst, message, MAX_MESSAGE_LEN);
    0
}

fn put_goaway(dst: &mut BytesMut, last_stream: StreamId, drain_ms: u32, message: &str) -> u8 {
    dst.put_u32(last_stream.0);
    dst.put_u32(drain_ms);
    put_str16(dst, message, MAX_MESSAGE_LEN);
    0
}

fn flag(set: bool, bit: u8) -> u8 {
    if set {
        bit
    } else {
        0
    }
}

/// The 12-byte frame header.
pub fn encode_header(payload_len: u32, kind: u8, flags: u8, stream: StreamId) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&payload_len.to_be_bytes());
    h[4] = kind;
    h[5] = flags;
    // h[6..8]: reserved, zero.
    h[8..12].copy_from_slice(&stream.0.to_be_bytes());
    h
}

fn chunk_flags(raw_len: Option<u32>, window_empty: bool) -> u8 {
    let compressed = if raw_len.is_some() {
        FLAG_COMPRESSED
    } else {
        0
    };
    let empty = if window_empty { FLAG_WINDOW_EMPTY } else { 0 };
    compressed | empty
}

/// Header plus the CHUNK fields before the data: what the data path writes in front of a
/// data buffer it sends as it is. `raw_len` is `Some` for compressed data; `window_empty`
/// sets FLAG_WINDOW_EMPTY. Carved out of `arena`, which is refilled 4 KiB at a time: the
/// data path allocates once per ~200 chunks instead of once per chunk.
pub fn chunk_header_in(
    arena: &mut BytesMut,
    stream: StreamId,
    seq: u64,
    raw_len: Option<u32>,
    window_empty: bool,
    data_len: usize,
) -> Bytes {
    let extra = if raw_len.is_some() { 12 } else { 8 };
    if arena.capacity() - arena.len() < HEADER_LEN + extra {
        arena.reserve(4096);
    }
    let flags = chunk_flags(raw_len, window_empty);
    let kind = FrameType::Chunk as u8;
    arena.put_slice(&encode_header(
        (extra + data_len) as u32,
        kind,
        flags,
        stream,
    ));
    arena.put_u64(seq);
    if let Some(raw_len) = raw_len {
        arena.put_u32(raw_len);
    }
    arena.split().freeze()
}

/// Takes one whole frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and an
/// error, always connection-fatal, for a frame longer than `max_payload`, a malformed payload
/// or an unknown core frame type. The length check comes first, so a peer can never make the
/// caller buffer more than `HEADER_LEN + max_payload` bytes for one frame.
pub fn decode(buf: &mut BytesMut, max_payload: u32) -> Result<Option<Frame>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max_payload {
        return Err(WireError::new(
            ErrorCode::FRAME_TOO_LARGE,
            format!("frame of {len} bytes exceeds the limit of {max_payload}"),
        ));
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[4];
    let flags = buf[5];
    let stream = StreamId(u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]));
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_LEN);
    decode_payload(kind, flags, stream, frame.freeze()).map(Some)
}

/// Decodes a payload whose header has been read. Trailing bytes after the fields this version
/// knows are ignored (PROTOCOL.md, "Versioning"); missing bytes are an error.
pub fn decode_payload(
    kind: u8,
    flags: u8,
    stream: StreamId,
    payload: Bytes,
) -> Result<Frame, WireError> {
    let Some(frame_type) = FrameType::from_u8(kind) else {
        if kind >= FIRST_EXTENSION_TYPE {
            return Ok(Frame::Extension { kind, stream });
        }
        return Err(WireError::protocol(format!(
            "unknown frame type 0x{kind:02x}"
        )));
    };
    let mut r = Reader {
        buf: payload,
        frame: frame_type,
    };
    let connection_only = matches!(
        frame_type,
        FrameType::Bind | FrameType::Accept | FrameType::Auth | FrameType::GoAway
    );
    let stream_only = matches!(
        frame_type,
        FrameType::Initiate
            | FrameType::Initiated
            | FrameType::Chunk
            | FrameType::Progress
            | FrameType::Credit
            | FrameType::Cancelled
            | FrameType::Complete
    );
    if connection_only && !stream.is_connection() {
        return Err(WireError::protocol(format!(
            "{} on stream {stream}",
            frame_type.name()
        )));
    }
    if stream_only && stream.is_connection() {
        return Err(WireError::protocol(format!(
            "{} on stream 0",
            frame_type.name()
        )));
    }
    // Each type reads its own payload (below).
    match frame_type {
        FrameType::Bind => Bind::get(&mut r).map(Frame::Bind),
        FrameType::Accept => Accept::get(&mut r, flags).map(Frame::Accept),
        FrameType::Auth => Ok(Frame::Auth { proof: r.array()? }),
        FrameType::Initiate => Initiate::get(&mut r, flags, stream).map(Frame::Initiate),
        FrameType::Initiated => Ok(Frame::Initiated {
            stream,
            zstd: flags & FLAG_ZSTD != 0,
            expected_bytes: r.u64()?,
        }),
        FrameType::Chunk => Chunk::get(r, flags, stream).map(Frame::Chunk),
        FrameType::Progress => Ok(Frame::Progress {
            stream,
            progress: Progress {
                bytes_sent: r.u64()?,
                items: r.items()?,
            },
        }),
        FrameType::Credit => Ok(Frame::Credit {
            stream,
            increment: r.u32()?,
        }),
        FrameType::Cancel => get_cancel(&mut r, flags, stream),
        FrameType::Cancelled => Ok(Frame::Cancelled {
            stream,
            bytes_sent: r.u64()?,
        }),
        FrameType::Complete => Ok(Frame::Complete {
            stream,
            completion: Completion {
                bytes: r.u64()?,
                chunks: r.u64()?,
                digest: r.u64()?,
                items: r.items()?,
            },
            report: if flags & FLAG_REPORT != 0 {
                Some(r.str16(MAX_MESSAGE_LEN)?)
            } else {
                None
            },
        }),
        FrameType::Error => Ok(Frame::Error {
            stream,
            code: ErrorCode(r.u16()?),
            message: r.str16(MAX_MESSAGE_LEN)?,
        }),
        FrameType::Heartbeat => Ok(Frame::Heartbeat { stream }),
        FrameType::GoAway => Ok(Frame::GoAway {
            last_stream: StreamId(r.u32()?),
            drain_ms: r.u32()?,
            message: r.str16(MAX_MESSAGE_LEN)?,
        }),
    }
}

// Decoders of the types with more than a field or two.

impl Bind {
    fn get(r: &mut Reader) -> Result<Bind, WireError> {
        Ok(Bind {
            min_version: r.u16()?,
            max_version: r.u16()?,
            nonce: r.array()?,
            initial_window: r.u32()?,
            max_frame_size: r.u32()?,
            heartbeat_interval_ms: r.u32()?,
            name: r.str16(MAX_NAME_LEN)?,
        })
    }
}

impl Accept {
    fn get(r: &mut Reader, flags: u8) -> Result<Accept, WireError> {
        Ok(Accept {
            version: r.u16()?,
            auth_required: flags & FLAG_AUTH_REQUIRED != 0,
            nonce: r.array()?,
            initial_window: r.u32()?,
            max_frame_size: r.u32()?,
            max_streams: r.u32()?,
            max_paradata: r.u32()?,
            heartbeat_interval_ms: r.u32()?,
            name: r.str16(MAX_NAME_LEN)?,
            max_window: r.u32()?,
        })
    }
}

impl Initiate {
    fn get(r: &mut Reader, flags: u8, stream: StreamId) -> Result<Initiate, WireError> {
        let operation = OperationId(r.u64()?);
        let len = r.u32()? as usize;
        let paradata = r.string(len, usize::MAX)?;
        let trace = r.str16(MAX_TRACEPARENT_LEN)?;
        let push = if flags & FLAG_PUSH != 0 {
            Some(r.u64()?)
        } else {
            None
        };
        Ok(Initiate {
            stream,
            operation,
            accept_zstd: flags & FLAG_ACCEPT_ZSTD != 0,
            paradata,
            traceparent: (!trace.is_empty()).then_some(trace),
            push,
        })
    }
}

impl Chunk {
    fn get(mut r: Reader, flags: u8, stream: StreamId) -> Result<Chunk, WireError> {
        let seq = r.u64()?;
        let raw_len = if flags & FLAG_COMPRESSED != 0 {
            Some(r.u32()?)
        } else {
            None
        };
        // CHUNK has no trailing extension room: everything after the fields is data.
        Ok(Chunk {
            stream,
            seq,
            raw_len,
            window_empty: flags & FLAG_WINDOW_EMPTY != 0,
            data: r.buf,
        })
    }
}

fn get_cancel(r: &mut Reader, flags: u8, stream: StreamId) -> Result<Frame, WireError> {
    let operation = r.u64()?;
    let reason = r.str16(MAX_MESSAGE_LEN)?;
    let by_operation = flags & FLAG_OPERATION != 0;
    if by_operation != stream.is_connection() {
        return Err(WireError::protocol(
            "CANCEL names either a stream, or stream 0 with the operation flag",
        ));
    }
    Ok(Frame::Cancel {
        stream,
        operation: by_operation.then_some(OperationId(operation)),
        reason,
    })
}

fn put_items(dst: &mut BytesMut, items: &ItemCounts) {
    dst.put_u64(items.sent);
    dst.put_u64(items.expected);
    dst.put_u64(items.potential);
    dst.put_u64(items.rejected);
}

fn put_str16(dst: &mut BytesMut, s: &str, max: usize) {
    let s = truncate_str(s, max);
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked cursor over one frame's payload.
struct Reader {
    buf: Bytes,
    frame: FrameType,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            return Err(WireError::protocol(format!(
                "{} payload truncated: needs {n} more bytes, has {}",
                self.frame.name(),
                self.buf.remaining()
            )));
        }
        Ok(())
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn items(&mut self) -> Result<ItemCounts, WireError> {
        Ok(ItemCounts {
            sent: self.u64()?,
            expected: self.u64()?,
            potential: self.u64()?,
            rejected: self.u64()?,
        })
    }

    fn str16(&mut self, max: usize) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        self.string(len, max)
    }

    /// A UTF-8 string of `len` bytes; `len` is checked against `max` and against the bytes the
    /// frame really holds before anything is copied.
    fn string(&mut self, len: usize, max: usize) -> Result<String, WireError> {
        if len > max {
            return Err(WireError::protocol(format!(
                "{} string of {len} bytes exceeds its limit of {max}",
                self.frame.name()
            )));
        }
        self.need(len)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec())
            .map_err(|_| WireError::protocol(format!("{} string is not UTF-8", self.frame.name())))
    }
}
