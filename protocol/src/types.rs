//! Small value types of the wire protocol: ids, versions, error codes, counters.

use std::fmt;

/// The protocol versions this implementation speaks (PROTOCOL.md, "Versioning").
pub const VERSION_MIN: u16 = 1;
/// The highest protocol version this implementation speaks: 2 adds push streams.
pub const VERSION_MAX: u16 = 2;
/// The first version with push streams (INITIATE's PUSH flag).
pub const VERSION_PUSH: u16 = 2;

/// A stream on one connection. Chosen by the client, strictly increasing, never 0
/// (0 addresses the connection itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

/// A map keyed by stream id, as every frame looks one up. Hashed with foldhash, seeded per
/// process: SipHash (std's default) on these integer keys was part of the per-stream cost that
/// the change to this map, sized frame encoding and reused send queues cut by 16-19%
/// (bench/RESULTS.md, issue 20). A peer chooses the ids, but cannot see the seed, and the map
/// never holds more than the streams it may have open.
pub type StreamMap<V> = foldhash::HashMap<StreamId, V>;

impl StreamId {
    /// The connection itself: frames on stream 0 are connection-scoped.
    pub const CONNECTION: StreamId = StreamId(0);

    /// Whether this id names the connection rather than a stream.
    pub fn is_connection(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A macro operation: groups streams (possibly across connections) so that they can be
/// cancelled, tracked and failed together. 0 means "no operation".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct OperationId(pub u64);

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// An error code as carried on the wire. Unknown codes from newer peers are preserved
/// as they are, never rejected.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $konst:ident = $value:literal, $name:literal; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $konst: ErrorCode = ErrorCode($value); )*

            /// Every code this version knows, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$konst),*];

            /// The snake_case name of a known code, `None` for a code from a newer peer.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($name), )*
                    _ => None,
                }
            }

            /// The code with this snake_case name.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                match name {
                    $( $name => Some(ErrorCode::$konst), )*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// The peer broke a rule of PROTOCOL.md (bad preface, bad frame, wrong state).
    PROTOCOL_ERROR = 0x0001, "protocol_error";
    /// A frame's length exceeds the receiver's advertised maximum.
    FRAME_TOO_LARGE = 0x0002, "frame_too_large";
    /// A CHUNK exceeded the stream's window, or CREDIT overflowed it.
    FLOW_CONTROL_VIOLATION = 0x0003, "flow_control_violation";
    /// Sequence gap, duplicate, count or digest mismatch, or a bad compressed chunk.
    INTEGRITY_FAILURE = 0x0004, "integrity_failure";
    /// Authentication failed, was missing, or was not offered when required.
    AUTH_FAILED = 0x0005, "auth_failed";
    /// A limit was reached: too many streams or connections, out of memory.
    RESOURCE_EXHAUSTED = 0x0006, "resource_exhausted";
    /// A bug or unexpected failure inside the sender.
    INTERNAL = 0x0007, "internal";
    /// The peer made no progress within the stream or connection timeout.
    TIMEOUT = 0x0008, "timeout";
    /// The stream was cancelled.
    CANCELLED = 0x0009, "cancelled";
    /// The server is shutting down and takes no new streams.
    DRAINING = 0x000A, "draining";
    /// No protocol version in common.
    UNSUPPORTED_VERSION = 0x000B, "unsupported_version";
    /// Local only, never sent: the transport closed before the stream ended.
    CONNECTION_LOST = 0x000C, "connection_lost";
    /// Local only, never sent: the server could not be reached (connect refused, timed out,
    /// no route): nothing was lost, and a retry may find it up again.
    UNREACHABLE = 0x000D, "unreachable";
    /// The paradata names a scheme no source is registered for.
    UNKNOWN_SOURCE = 0x0100, "unknown_source";
    /// The paradata is malformed for its scheme.
    BAD_PARADATA = 0x0101, "bad_paradata";
    /// The thing the paradata names does not exist.
    NOT_FOUND = 0x0102, "not_found";
    /// The thing the paradata names may not be read (outside the root, say).
    PERMISSION_DENIED = 0x0103, "permission_denied";
    /// The source failed while producing (an I/O error, say).
    SOURCE_FAILED = 0x0104, "source_failed";
    /// What the paradata names changed while it was streamed (a file rewritten, truncated or
    /// replaced under the reader): the bytes sent may match no version of it.
    SOURCE_CHANGED = 0x0105, "source_changed";
    /// The sink failed while taking a push (an I/O error, a full disk, ...): nothing of it
    /// was kept.
    SINK_FAILED = 0x0106, "sink_failed";
    /// The push would replace what its paradata names, and replacing was not asked for.
    ALREADY_EXISTS = 0x0107, "already_exists";
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown_0x{:04x}", self.0),
        }
    }
}

/// The original Burst counters of a stream, in items (records), as the source reports them.
///
/// A source that does not count items (both built-in sources stream bytes, not records)
/// reports [`ItemCounts::NOT_COUNTED`], which is also the default: nothing sent, potential or
/// rejected, and the total expected unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemCounts {
    /// Items sent so far.
    pub sent: u64,
    /// Items the source expects to send in all (`u64::MAX` when unknown).
    pub expected: u64,
    /// Items that could have been sent had nothing been filtered.
    pub potential: u64,
    /// Items the source rejected (filtered out or invalid).
    pub rejected: u64,
}

impl ItemCounts {
    /// The counters of a source that does not count items: 0 sent, expected [`UNKNOWN`],
    /// 0 potential, 0 rejected.
    pub const NOT_COUNTED: ItemCounts = ItemCounts {
        sent: 0,
        expected: UNKNOWN,
        potential: 0,
        rejected: 0,
    };
}

impl Default for ItemCounts {
    fn default() -> Self {
        ItemCounts::NOT_COUNTED
    }
}

/// What COMPLETE states about a finished stream. The receiver checks `bytes`, `chunks` and
/// `digest` against what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    /// Uncompressed data bytes sent.
    pub bytes: u64,
    /// CHUNK frames sent.
    pub chunks: u64,
    /// xxh3-64 (seed 0) of all uncompressed data bytes in order.
    pub digest: u64,
    /// The item counters.
    pub items: ItemCounts,
}

/// A PROGRESS report from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Uncompressed data bytes sent so far.
    pub bytes_sent: u64,
    /// The item counters so far.
    pub items: ItemCounts,
}

/// "Unknown" for `expected_bytes` and item totals.
pub const UNKNOWN: u64 = u64::MAX;
