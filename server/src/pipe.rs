//! The queue adapter: a producer on any thread feeds a stream through a bounded `crossbeam`
//! queue of chunks, closed by an end marker (with item counters) or an error. The depth is
//! `burst.nexus.pipe.size` chunks.
//!
//! When the queue is full, [`PipeSender::send`] blocks the producing thread: that is the
//! back-pressure, and it reaches the client's credit window through the shard, which only
//! takes a chunk when the window has room. When the stream ends early (cancel, timeout,
//! disconnect), the receiving side is dropped and `send` returns [`PipeClosed`], so a
//! producer stops within one chunk. A sender dropped without [`finish`](PipeSender::finish)
//! fails the stream with `source_failed`: a crashed producer never looks like a complete one.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nexus_protocol::{ErrorCode, ItemCounts};
use tokio::sync::Notify;

use crate::paradata::SourceError;
use crate::source::{NextChunk, Producer};

/// Creates a pipe of `depth` chunks (at least 1).
pub fn pipe(depth: usize) -> (PipeSender, PipeProducer) {
    let (tx, rx) = crossbeam_channel::bounded(depth.max(1));
    let ready = Arc::new(Notify::new());
    let alive = Arc::new(());
    (
        PipeSender {
            tx: Some(tx),
            ready: Arc::clone(&ready),
            reader: Arc::downgrade(&alive),
        },
        PipeProducer {
            rx,
            ready,
            _alive: alive,
            items: ItemCounts::default(),
            done: false,
        },
    )
}

enum Piece {
    Chunk(Bytes),
    End(ItemCounts),
    Error(SourceError),
}

/// The stream was ended by the server side (cancel, timeout, disconnect): stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream is closed; stop producing")]
pub struct PipeClosed;

/// The producing end; `Send`, so it can move to any thread.
pub struct PipeSender {
    tx: Option<Sender<Piece>>,
    ready: Arc<Notify>,
    reader: Weak<()>,
}

impl PipeSender {
    /// Whether the stream has ended on the server side (a producer that waits for data
    /// of its own, with nothing to send, looks here to stop).
    pub fn is_closed(&self) -> bool {
        self.reader.strong_count() == 0
    }

    /// Queues a chunk, blocking while the queue is full.
    pub fn send(&self, chunk: Bytes) -> Result<(), PipeClosed> {
        self.put(Piece::Chunk(chunk))
    }

    /// Ends the stream successfully with these item counters.
    pub fn finish(mut self, items: ItemCounts) -> Result<(), PipeClosed> {
        let result = self.put(Piece::End(items));
        self.tx = None;
        result
    }

    /// Fails the stream with this error.
    pub fn fail(mut self, error: SourceError) -> Result<(), PipeClosed> {
        let result = self.put(Piece::Error(error));
        self.tx = None;
        result
    }

    fn put(&self, piece: Piece) -> Result<(), PipeClosed> {
        let tx = self.tx.as_ref().ok_or(PipeClosed)?;
        tx.send(piece).map_err(|_| PipeClosed)?;
        self.ready.notify_one();
        Ok(())
    }
}

impl Drop for PipeSender {
    fn drop(&mut self) {
        // Dropping the channel's sender wakes the shard, which then sees `Disconnected`.
        self.tx = None;
        self.ready.notify_one();
    }
}

/// The consuming end: a [`Producer`] for the stream engine, returned from a
/// [`Source::open`](crate::Source::open).
pub struct PipeProducer {
    rx: Receiver<Piece>,
    ready: Arc<Notify>,
    /// Gone when the producer is dropped: [`PipeSender::is_closed`].
    _alive: Arc<()>,
    items: ItemCounts,
    done: bool,
}

impl Producer for PipeProducer {
    fn next(&mut self, _max: usize) -> NextChunk<'_> {
        Box::pin(async move {
            if self.done {
                return None;
            }
            loop {
                match self.rx.try_recv() {
                    Ok(Piece::Chunk(data)) => return Some(Ok(data)),
                    Ok(Piece::End(items)) => {
                        self.items = items;
                        self.done = true;
                        return None;
                    }
                    Ok(Piece::Error(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    // A send between `try_recv` and here leaves a permit in `ready`, so this
                    // never misses a wake-up.
                    Err(TryRecvError::Empty) => self.ready.notified().await,
                    Err(TryRecvError::Disconnected) => {
                        self.done = true;
                        return Some(Err(SourceError::new(
                            ErrorCode::SOURCE_FAILED,
                            "the producer stopped without finishing the stream",
                        )));
                    }
                }
            }
        })
    }

    fn items(&self) -> ItemCounts {
        self.items
    }
}
