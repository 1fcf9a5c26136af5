//! Sources: what turns paradata into bytes. The server is a library first: an embedding
//! application registers its own [`Source`] for a scheme next to the built-in `file:` and
//! `synthetic:`.
//!
//! A [`Source`] is shared by all shards (`Send + Sync`); for each stream it opens a
//! [`Producer`], which lives on the shard of the stream's connection and is never sent to
//! another thread. The stream engine asks the producer for one chunk at a time, and only when
//! the client's window has room, so a producer never runs ahead of its consumer by more than
//! one chunk. Dropping the producer is its cleanup: the engine drops it exactly once, when the
//! stream ends for any reason (complete, error, cancel, timeout, disconnect, shutdown).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use nexus_protocol::{ErrorCode, ItemCounts, OperationId, StreamId};

use crate::paradata::{Paradata, SourceError};
use crate::shard::ShardContext;
use crate::sink::{Consumer, PushRequest, Sink};

/// The future a producer returns for its next chunk.
pub type NextChunk<'a> = Pin<Box<dyn Future<Output = Option<Result<Bytes, SourceError>>> + 'a>>;

/// A kind of stream, named by the scheme of its paradata (`file`, `synthetic`, ...).
pub trait Source: Send + Sync + 'static {
    /// The paradata scheme this source serves, without the colon.
    fn scheme(&self) -> &str;

    /// Checks the request and opens a producer for it. Runs on the stream's shard and must not
    /// block for long (opening a file is fine; waiting for a remote system is not: do that in
    /// the producer). An error is sent to the client as the stream's ERROR.
    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError>;
}

/// What [`Source::open`] returns.
pub struct Opened {
    /// Produces the stream's data.
    pub producer: Box<dyn Producer>,
    /// The total length when known in advance: sent in INITIATED so clients can show an ETA.
    pub expected_bytes: Option<u64>,
}

/// Produces one stream's data on its shard.
pub trait Producer {
    /// The next chunk: `Some(Ok(data))`, `Some(Err(e))` to fail the stream with `e`, or `None`
    /// at the end. `max` is how much the client can take now; a longer chunk is split by the
    /// engine (without copying) and the rest kept until credit arrives, so returning more is
    /// allowed but holds memory. Empty chunks are skipped.
    fn next(&mut self, max: usize) -> NextChunk<'_>;

    /// The item counters reported in PROGRESS and COMPLETE (all zero by default).
    fn items(&self) -> ItemCounts {
        ItemCounts::default()
    }
}

/// One stream request as a source sees it.
pub struct StreamRequest<'a> {
    /// The stream.
    pub stream: StreamId,
    /// The macro operation it belongs to (0: none).
    pub operation: OperationId,
    /// The full paradata text.
    pub text: &'a str,
    /// The paradata split into scheme, body and parameters.
    pub paradata: &'a Paradata<'a>,
    /// The shard the stream runs on: backend, buffers, chunk size.
    pub shard: &'a Rc<ShardContext>,
}

/// A stream that ended on this server, for a [`Registry::watch_streams`] watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnded {
    /// A push (into a sink) or a pull (from a source).
    pub push: bool,
    /// Its paradata.
    pub paradata: String,
    /// The client.
    pub peer: std::net::SocketAddr,
    /// `complete`, `error` or `cancelled`.
    pub outcome: &'static str,
    /// Why it failed (`code: message`), when it did and the server knows.
    pub error: Option<String>,
    /// Data bytes sent (pull) or taken (push).
    pub bytes: u64,
    /// The xxh3-64 of the data, when it completed.
    pub digest: Option<u64>,
}

/// Called on the shard's thread as each stream ends: it must only hand the report on (a
/// channel send), never block.
pub type StreamWatcher = Arc<dyn Fn(StreamEnded) + Send + Sync>;

/// Maps schemes to sources (pulls) and to sinks (pushes).
#[derive(Clone, Default)]
pub struct Registry {
    sources: BTreeMap<String, Arc<dyn Source>>,
    sinks: BTreeMap<String, Arc<dyn Sink>>,
    watcher: Option<StreamWatcher>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a source, replacing any earlier one for the same scheme.
    pub fn register(&mut self, source: impl Source) -> &mut Self {
        self.sources
            .insert(source.scheme().to_string(), Arc::new(source));
        self
    }

    /// Calls `watcher` with every stream that ends (the workflow's `streams` sensor). It
    /// runs on the shard's thread: it must hand the report on, never block.
    pub fn watch_streams(&mut self, watcher: StreamWatcher) -> &mut Self {
        self.watcher = Some(watcher);
        self
    }

    pub(crate) fn watcher(&self) -> Option<&StreamWatcher> {
        self.watcher.as_ref()
    }

    /// The registered schemes, sorted.
    pub fn schemes(&self) -> Vec<&str> {
        self.sources.keys().map(String::as_str).collect()
    }

    /// Adds a sink, replacing any earlier one for the same scheme. A scheme may have both a
    /// source and a sink (`file:`): pulls go to the one, pushes to the other.
    pub fn register_sink(&mut self, sink: impl Sink) -> &mut Self {
        self.sinks.insert(sink.scheme().to_string(), Arc::new(sink));
        self
    }

    /// The registered sink schemes, sorted.
    pub fn sink_schemes(&self) -> Vec<&str> {
        self.sinks.keys().map(String::as_str).collect()
    }

    /// Parses `text` and opens the push with the sink of its scheme. An unknown scheme is
    /// `unknown_source` naming the known sinks.
    pub(crate) fn open_sink(
        &self,
        stream: StreamId,
        operation: OperationId,
        text: &str,
        declared: Option<u64>,
        shard: &Rc<ShardContext>,
    ) -> Result<Box<dyn Consumer>, SourceError> {
        let schemes = self.sink_schemes();
        let paradata = Paradata::parse_for(text, &schemes, "sink")?;
        let sink = self.sinks.get(paradata.scheme).ok_or_else(|| {
            SourceError::new(ErrorCode::UNKNOWN_SOURCE, "no sink for this scheme")
        })?;
        sink.open(&PushRequest {
            stream,
            operation,
            text,
            paradata: &paradata,
            declared,
            shard,
        })
    }

    /// Parses `text` and opens the stream with the source of its scheme. An unknown scheme is
    /// `unknown_source` naming the known ones.
    pub(crate) fn open(
        &self,
        stream: StreamId,
        operation: OperationId,
        text: &str,
        shard: &Rc<ShardContext>,
    ) -> Result<Opened, SourceError> {
        let schemes = self.schemes();
        let paradata = Paradata::parse(text, &schemes)?;
        let source = self.sources.get(paradata.scheme).ok_or_else(|| {
            // Paradata::parse already checked the scheme; this is a defensive fallback.
            SourceError::new(ErrorCode::UNKNOWN_SOURCE, "no source for this scheme")
        })?;
        source.open(&StreamRequest {
            stream,
            operation,
            text,
            paradata: &paradata,
            shard,
        })
    }
}
