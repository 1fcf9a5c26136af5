//! Nexus server: serves streams over the Nexus protocol (PROTOCOL.md) from a thread-per-core
//! runtime, with sources an embedding application can extend.
//!
//! Data flow: a shard (one OS thread, one runtime, one SO_REUSEPORT listener) accepts a
//! connection and runs its [`engine`](crate) tasks; an INITIATE goes through the [`Registry`]
//! to a [`Source`], whose [`Producer`] yields chunks when the client's window has room; chunks
//! go through `nexus-protocol`'s `ServerConnection` (digest, sequence, framing, round-robin
//! between streams) and out with one gathered write per batch. A connection and its streams
//! never leave their shard. IO goes through `nexus-io`, the seam between io_uring and epoll.
//!
//! Not here: configuration from the environment (the `nexus` binary does that), metrics
//! export, the client.

pub mod admin;
mod builtin;
mod config;
mod engine;
/// Fuzz entry point for paradata: for the fuzz target and the tests that replay its corpus,
/// not part of the API (feature `fuzz`, or `cfg(fuzzing)` under cargo-fuzz).
#[cfg(any(fuzzing, feature = "fuzz"))]
pub mod fuzz;
mod packer;
pub mod paradata;
mod pipe;
pub mod replica;
pub mod root;
mod server;
mod shard;
pub mod sink;
mod source;
mod stats;
pub mod synthetic;
pub mod telemetry;
mod throttle;
mod tls;
mod upload;

use nexus_io as io;

pub use builtin::{FileSource, SyntheticSource};
pub use config::{ServerConfig, TlsSettings};
pub use nexus_io::tls::Mode as TlsMode;
pub use nexus_io::{
    probe_io_uring, select_backend, Backend, BackendChoice, BackendError, ProbeError,
};
pub use paradata::SourceError;
pub use pipe::{pipe, PipeClosed, PipeProducer, PipeSender};
pub use replica::{Forward, Forwarder};
pub use server::{Server, StartError};
pub use shard::ShardContext;
pub use sink::{BlockingConsumer, Consumer, DiscardSink, PushRequest, Sink};
pub use source::{
    NextChunk, Opened, Producer, Registry, Source, StreamEnded, StreamRequest, StreamWatcher,
};
pub use stats::{stream_error_labels, ServerStats, StatsSnapshot, PROTOCOL_ERROR_CODES};
pub use upload::FileSink;
