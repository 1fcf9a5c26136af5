//! Nexus client: pulls streams from Nexus servers (PROTOCOL.md) over pooled, multiplexed
//! connections.
//!
//! - [`Client`] owns a pool keyed by endpoint: one connection per endpoint by default (more
//!   with `connections_per_endpoint`), idle ones kept in an LRU and closed by a tender when
//!   stale, dead ones replaced at checkout (a stream the server never accepted is retried
//!   once on a fresh connection; one that delivered data never is).
//! - [`Client::initiate`] returns a [`StreamHandle`]: a bounded queue of chunks then one end
//!   marker, read blocking from any thread or as a `futures::Stream` from any runtime.
//! - [`Operation`] groups streams: progress across all, cancel all, first error cancels the
//!   rest, a summary per stream.
//! - [`resume_paradata`] continues a failed `file:` stream from the first missing byte.
//! - [`transfer`] is what `nexus pull` does, for any application: streams into files or
//!   stdout with retry and backoff, resume, split and manifests, and a serde report.
//!
//! IO runs on `threads` client IO threads (io_uring or epoll, through `nexus-io`); the
//! protocol itself is `nexus-protocol`'s `ClientConnection`.

mod client;
mod config;
mod conn;
mod operation;
mod push;
pub mod replication;
mod resume;
mod stream;
pub mod telemetry;
pub mod transfer;

pub use client::{Client, ClientError, PoolStats, StreamOptions};
pub use config::{ClientConfig, TlsSettings};
pub use nexus_io::{Backend, BackendChoice, BackendError, ProbeError};
pub use nexus_protocol::{ClientSettings, Completion, ErrorCode, ItemCounts, OperationId, Outcome};
pub use operation::{Operation, OperationOptions, OperationProgress, StreamSummary};
pub use push::{PushHandle, PushOptions};
pub use resume::resume_paradata;
pub use stream::{Ended, Item, StreamHandle, StreamProgress};
pub use telemetry::StreamStats;
