//! Errors of the protocol layer.

use crate::types::ErrorCode;

/// A violation that ends the whole connection: the code and message go out in a
/// connection-level ERROR frame, then the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The code from PROTOCOL.md's table.
    pub code: ErrorCode,
    /// What exactly was wrong, for logs on both ends.
    pub message: String,
}

impl WireError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// A `protocol_error`.
    pub fn protocol(message: impl Into<String>) -> Self {
        WireError::new(ErrorCode::PROTOCOL_ERROR, message)
    }
}

/// Why a call on a connection state machine was refused. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The handshake (and authentication) has not finished yet.
    #[error("the connection is not established yet")]
    NotReady,
    /// The connection is closed or closing.
    #[error("the connection is closed")]
    Closed,
    /// The server sent GOAWAY: no new streams on this connection.
    #[error("the server is draining")]
    Draining,
    /// The server's stream limit is reached on this connection.
    #[error("the connection already carries its maximum of {0} streams")]
    TooManyStreams(u32),
    /// All stream ids of this connection are used up; open another connection.
    #[error("stream ids exhausted on this connection")]
    StreamIdsExhausted,
    /// The paradata is longer than the server accepts.
    #[error("paradata of {len} bytes exceeds the server's limit of {max}")]
    ParadataTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// No stream with this id is open (it ended, or never existed).
    #[error("no open stream {0}")]
    UnknownStream(crate::types::StreamId),
    /// The stream is not in a state that allows this call (already accepted, cancelled...).
    #[error("stream {0} is not in a state that allows this")]
    WrongState(crate::types::StreamId),
    /// The source produced more than INITIATED announced.
    #[error("the source produced more than the {announced} bytes it announced")]
    BeyondAnnounced {
        /// Bytes announced in INITIATED.
        announced: u64,
    },
    /// The source ended short of what INITIATED announced.
    #[error("the source ended after {produced} of the {announced} bytes it announced")]
    ShortOfAnnounced {
        /// Bytes announced in INITIATED.
        announced: u64,
        /// Bytes it produced.
        produced: u64,
    },
    /// The peer speaks a protocol version without push streams.
    #[error("the server speaks protocol version {0}, which has no push streams (version 2 and later have them); upgrade the server")]
    PushUnsupported(u16),
    /// The push already sent more than the size it declared.
    #[error("the push goes past the {declared} bytes it declared")]
    BeyondDeclared {
        /// Bytes declared in INITIATE.
        declared: u64,
    },
    /// The push ends short of the size it declared.
    #[error("the push ends after {sent} of the {declared} bytes it declared")]
    ShortOfDeclared {
        /// Bytes declared in INITIATE.
        declared: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// The data is larger than the stream's current send capacity.
    #[error("{len} bytes exceed the send capacity of {capacity}")]
    NoCapacity {
        /// Bytes offered.
        len: usize,
        /// Bytes allowed now.
        capacity: usize,
    },
}
