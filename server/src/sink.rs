//! Sinks: where push streams go (PROTOCOL.md 6.8), the mirror of sources. An embedding
//! application registers its own [`Sink`] for a scheme in the same [`Registry`] as its
//! sources (`Registry::register_sink`), next to the built-in `file:` and `discard:`.
//!
//! A [`Sink`] is shared by all shards; for each push it opens a [`Consumer`], which lives on
//! the shard of the push's connection. The engine hands it the data in order, one chunk at a
//! time, and returns window to the client only once `write` has returned, so a slow sink
//! slows its pusher and a push holds at most its window. When the client's COMPLETE has
//! matched, the engine calls `commit`: the consumer makes the data durable, and only then does
//! the client hear COMPLETE. Dropping a consumer without a commit (cancel, failure, timeout,
//! a lost connection, shutdown) is its abort: it must keep nothing of the push.
//!
//! A consumer that blocks (files, pipes, a database) runs on its own thread through
//! [`threaded`]: a bounded queue between the shard and the thread, so the shard never waits
//! on the disk.
//!
//! [`Registry`]: crate::Registry

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use nexus_protocol::{ErrorCode, OperationId, StreamId};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::paradata::{Paradata, SourceError};
use crate::shard::ShardContext;

/// What a consumer's `write` returns.
pub type Pending<'a> = Pin<Box<dyn Future<Output = Result<(), SourceError>> + 'a>>;

/// What a consumer's `commit` returns: the sink's report, if it has one, sent to the client
/// with the push's COMPLETE (at most 4096 bytes of UTF-8; PROTOCOL.md flag REPORT).
pub type Committing<'a> = Pin<Box<dyn Future<Output = Result<Option<String>, SourceError>> + 'a>>;

/// A kind of push target, named by the scheme of its paradata (`file`, `discard`, ...).
pub trait Sink: Send + Sync + 'static {
    /// The paradata scheme this sink serves, without the colon.
    fn scheme(&self) -> &str;

    /// Checks the request and opens a consumer for it. Runs on the push's shard and must not
    /// block for long. An error is sent to the client as the push's ERROR.
    fn open(&self, request: &PushRequest<'_>) -> Result<Box<dyn Consumer>, SourceError>;
}

/// Takes one push's data on its shard.
pub trait Consumer {
    /// The next piece of the push, in order (never empty). An error fails the push with it.
    fn write(&mut self, data: Bytes) -> Pending<'_>;

    /// Everything arrived and matched its digest: make it durable and visible. An error fails
    /// the push with it, and nothing of it may stay visible.
    fn commit(&mut self) -> Committing<'_>;
}

/// One push request as a sink sees it.
pub struct PushRequest<'a> {
    /// The stream.
    pub stream: StreamId,
    /// The macro operation it belongs to (0: none).
    pub operation: OperationId,
    /// The full paradata text.
    pub text: &'a str,
    /// The paradata split into scheme, body and parameters.
    pub paradata: &'a Paradata<'a>,
    /// The size the client declared, when it knew it.
    pub declared: Option<u64>,
    /// The shard the push runs on.
    pub shard: &'a Rc<ShardContext>,
}

/// `discard:`: takes the data (the protocol has checked sequence, window and digest) and
/// keeps none of it. For benchmarks and for checking a path end to end.
pub struct DiscardSink;

impl Sink for DiscardSink {
    fn scheme(&self) -> &str {
        "discard"
    }

    fn open(&self, request: &PushRequest<'_>) -> Result<Box<dyn Consumer>, SourceError> {
        if !request.paradata.body.is_empty() || !request.paradata.params.is_empty() {
            return Err(SourceError::bad("discard: takes no path and no parameters"));
        }
        Ok(Box::new(Discard))
    }
}

struct Discard;

impl Consumer for Discard {
    fn write(&mut self, _data: Bytes) -> Pending<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn commit(&mut self) -> Committing<'_> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// A consumer that blocks, for [`threaded`]: it runs on its own thread.
pub trait BlockingConsumer: Send + 'static {
    /// Writes the next piece of the push.
    fn write(&mut self, data: &[u8]) -> Result<(), SourceError>;
    /// [`write`](Self::write) for a consumer that keeps or forwards the buffer itself, which
    /// saves it a copy. Calls `write` by default.
    fn write_bytes(&mut self, data: Bytes) -> Result<(), SourceError> {
        self.write(&data)
    }
    /// Makes everything written durable and visible. What it returns is the sink's report
    /// ([`Committing`]).
    fn commit(&mut self) -> Result<Option<String>, SourceError>;
    /// Called when the push ends any other way: keep nothing of it. Also runs if `write` or
    /// `commit` failed.
    fn abort(&mut self);
}

enum Job {
    Data(Bytes),
    Commit(oneshot::Sender<Result<Option<String>, SourceError>>),
}

/// Runs `consumer` on a thread of its own (named `nexus-sink`), behind a queue of `depth`
/// chunks: `write` returns once the chunk is queued, so up to `depth` chunks wait for the
/// thread, and a thread that falls behind holds `write` (and so the push's window) back. An
/// error of the thread fails the next `write` or the `commit`. Dropping the returned consumer
/// without a commit makes the thread call `abort`.
pub fn threaded(
    consumer: impl BlockingConsumer,
    depth: usize,
) -> Result<Box<dyn Consumer>, SourceError> {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let failure = Arc::new(Mutex::new(None));
    let thread_failure = Arc::clone(&failure);
    std::thread::Builder::new()
        .name("nexus-sink".into())
        .spawn(move || work(consumer, rx, &thread_failure))
        .map_err(|e| {
            SourceError::new(
                ErrorCode::RESOURCE_EXHAUSTED,
                format!("cannot start a sink thread: {e}"),
            )
        })?;
    Ok(Box::new(Threaded { tx, failure }))
}

fn work(
    mut consumer: impl BlockingConsumer,
    mut rx: mpsc::Receiver<Job>,
    failure: &Mutex<Option<SourceError>>,
) {
    while let Some(job) = rx.blocking_recv() {
        match job {
            Job::Data(data) => {
                if let Err(e) = consumer.write_bytes(data) {
                    *failure.lock() = Some(e);
                    break;
                }
            }
            Job::Commit(done) => {
                let result = consumer.commit();
                if result.is_err() {
                    consumer.abort();
                }
                let _ = done.send(result);
                return;
            }
        }
    }
    // The push ended without a commit (or a write failed): keep nothing.
    consumer.abort();
}

struct Threaded {
    tx: mpsc::Sender<Job>,
    failure: Arc<Mutex<Option<SourceError>>>,
}

impl Threaded {
    fn failed(&self) -> SourceError {
        self.failure.lock().take().unwrap_or_else(|| {
            SourceError::new(
                ErrorCode::SINK_FAILED,
                "the sink's thread ended unexpectedly",
            )
        })
    }
}

impl Consumer for Threaded {
    fn write(&mut self, data: Bytes) -> Pending<'_> {
        Box::pin(async move {
            match self.tx.send(Job::Data(data)).await {
                Ok(()) => Ok(()),
                Err(_) => Err(self.failed()),
            }
        })
    }

    fn commit(&mut self) -> Committing<'_> {
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            if self.tx.send(Job::Commit(done)).await.is_err() {
                return Err(self.failed());
            }
            match result.await {
                Ok(result) => result,
                Err(_) => Err(self.failed()),
            }
        })
    }
}
