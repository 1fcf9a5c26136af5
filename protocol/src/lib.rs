//! The Nexus wire protocol, without IO.
//!
//! [`frame`] encodes and decodes every message of `PROTOCOL.md` (at the repository root, the
//! normative spec). [`ClientConnection`] and [`ServerConnection`] are the two ends of one
//! connection as state machines: a driver feeds them received bytes, end of file and the
//! current time, writes out the segments they give, and acts on their events. They own the
//! protocol's rules: the preface, version negotiation, authentication, stream ids, sequence
//! numbers, flow-control windows, digests, heartbeats and timeouts.
//!
//! This crate has no sockets, no runtime, no clock and no randomness of its own: time and
//! nonces come from the caller, which makes every rule testable with a fake clock.
//!
//! Data flow on the server: `send_chunk(raw)` -> digest, window, sequence -> a header segment
//! and the data segment (no copy) in the stream's queue -> `poll_transmit` round-robin over
//! streams. On the client: bytes -> `input_buffer` -> frames (CHUNK data is a slice of the
//! receive buffer) -> checks -> `ClientEvent::Chunk` -> the application calls `consume`,
//! which returns window to the server.
#![forbid(unsafe_code)]

pub mod auth;
mod client;
pub mod compress;
mod conn;
mod error;
pub mod file_range;
pub mod frame;
/// Fuzz entry points: for the fuzz targets and the tests that replay their corpus, not part of
/// the API (feature `fuzz`, or `cfg(fuzzing)` under cargo-fuzz).
#[cfg(any(fuzzing, feature = "fuzz"))]
pub mod fuzz;
mod machine;
mod receive;
mod server;
pub mod size;
pub mod text;
mod types;

pub use client::{
    ClientConnection, ClientEvent, ClientSettings, ClientSide, Outcome, StreamRequest,
};
pub use conn::{Timers, IDLE_HEARTBEATS, MAX_WINDOW, MIN_HEARTBEAT};
pub use error::{CallError, WireError};
pub use frame::{Frame, FrameType};
pub use machine::{Connection, Side};
pub use server::{ServerConnection, ServerEvent, ServerSettings, ServerSide};
pub use types::{
    Completion, ErrorCode, ItemCounts, OperationId, Progress, StreamId, StreamMap, UNKNOWN,
    VERSION_MAX, VERSION_MIN, VERSION_PUSH,
};
