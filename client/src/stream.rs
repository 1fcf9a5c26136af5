//! One stream as the application sees it: a [`StreamHandle`] whose receiving side is a
//! bounded crossbeam queue of [`Item`]s (chunks, then exactly one [`Item::End`]), readable
//! blocking (`recv`) or as a `futures::Stream` from any async runtime.
//!
//! Flow control: data taken out of the queue is handed back to the connection as credit, in
//! batches of a quarter of the granted window (one command per batch, not per chunk), so a
//! consumer that stops reading stops its stream only (the server has no window left for it)
//! while the other streams on the connection go on.
//!
//! The queue is bounded in items; the IO thread never blocks on it. When it is full, items
//! wait in the stream's spill (behind the queue, in order), which the IO thread moves into the
//! queue as room appears and the handle reads directly once the queue is empty. The window
//! bounds the spill. Because the spill belongs to the stream, not to the connection, chunks
//! and the end marker that arrived are delivered even after the connection is gone.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use nexus_protocol::{ErrorCode, Outcome, StreamRequest};
use parking_lot::Mutex;

use crate::client::Client;
use crate::conn::{Command, ConnHandle};
use crate::operation::OperationShared;
use crate::telemetry::Counters;

/// What a stream's queue yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Data, in order, sequence and (at the end) digest checked. Zero-copy from the socket
    /// buffer.
    Chunk(Bytes),
    /// The end: nothing follows. Exactly one per stream.
    End(Ended),
}

/// How a stream ended and how much of it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Complete (counts and digest verified), Error (code, message), Cancelled or TimedOut.
    pub outcome: Outcome,
    /// Data bytes delivered before the end.
    pub bytes_received: u64,
    /// A complete push's sink report, when the server sent one (e.g. how each replica of a
    /// replicated push ended); None for pulls.
    pub report: Option<String>,
}

impl Ended {
    /// Whether COMPLETE arrived and its counts and digest matched.
    pub fn is_complete(&self) -> bool {
        matches!(self.outcome, Outcome::Complete(_))
    }

    /// The error code, for Error outcomes.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match &self.outcome {
            Outcome::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn error(code: ErrorCode, message: impl Into<String>, bytes: u64) -> Ended {
        Ended {
            outcome: Outcome::Error {
                code,
                message: message.into(),
            },
            bytes_received: bytes,
            report: None,
        }
    }
}

/// A stream's counters so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamProgress {
    /// Data bytes received by the client.
    pub bytes_received: u64,
    /// Total the server announced, when it knows it.
    pub expected_bytes: Option<u64>,
    /// Items the server reports as sent (PROGRESS, COMPLETE).
    pub items_sent: u64,
    /// Items the server expects to send in all, when its source counts items.
    pub items_expected: Option<u64>,
}

/// A stream's identity inside one client, for its whole life: unlike the wire's stream id,
/// it stays the same when the stream is retried on another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StreamKey(pub(crate) u64);

/// State one stream shares between its handle, its connection's IO thread and its operation.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub(crate) key: StreamKey,
    pub(crate) endpoint: SocketAddr,
    pub(crate) request: StreamRequest,
    /// The connection the stream runs on; changes once if the stream is retried.
    pub(crate) route: Mutex<Option<Arc<ConnHandle>>>,
    pub(crate) cancel_requested: AtomicBool,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) expected_bytes: AtomicU64,
    pub(crate) items_sent: AtomicU64,
    pub(crate) items_expected: AtomicU64,
    pub(crate) ended: Mutex<Option<Ended>>,
    /// Bytes read per CREDIT batch: a quarter of the window the server granted.
    pub(crate) credit_batch: AtomicU64,
    /// Items behind a full queue, oldest first; only the IO thread adds.
    spill: Mutex<VecDeque<Item>>,
    /// `spill.len()`, readable without the lock.
    spilled: AtomicUsize,
    /// An async reader's waker; `waker_set` spares blocking readers the lock per chunk.
    waker: Mutex<Option<Waker>>,
    waker_set: AtomicBool,
    pub(crate) operation: Option<Arc<OperationShared>>,
    /// The client's stream counters.
    pub(crate) counters: Arc<Counters>,
    /// A push's window, shared with its handle.
    pub(crate) push: Option<crate::push::PushGate>,
}

impl StreamShared {
    pub(crate) fn new(
        key: StreamKey,
        endpoint: SocketAddr,
        request: StreamRequest,
        operation: Option<Arc<OperationShared>>,
        counters: Arc<Counters>,
    ) -> Self {
        let push = request.push.map(|_| crate::push::PushGate::default());
        StreamShared {
            key,
            endpoint,
            request,
            route: Mutex::new(None),
            cancel_requested: AtomicBool::new(false),
            bytes_received: AtomicU64::new(0),
            expected_bytes: AtomicU64::new(u64::MAX),
            items_sent: AtomicU64::new(0),
            items_expected: AtomicU64::new(u64::MAX),
            ended: Mutex::new(None),
            credit_batch: AtomicU64::new(1),
            spill: Mutex::new(VecDeque::new()),
            spilled: AtomicUsize::new(0),
            waker: Mutex::new(None),
            waker_set: AtomicBool::new(false),
            push,
            operation,
            counters,
        }
    }

    pub(crate) fn send(&self, command: Command) {
        if let Some(route) = self.route.lock().as_ref() {
            route.send(command);
        }
    }

    /// Asks for the stream to stop: chunks not yet read are dropped from now on, and the
    /// connection sends CANCEL (or ends a stream not yet sent at once).
    pub(crate) fn request_cancel(&self) {
        if !self.cancel_requested.swap(true, Ordering::AcqRel) && !self.is_ended() {
            self.send(Command::Cancel { key: self.key });
        }
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.lock().is_some()
    }

    /// IO thread: queues `item` behind everything queued before, without blocking.
    pub(crate) fn deliver(&self, tx: &Sender<Item>, item: Item) {
        if self.spilled.load(Ordering::Acquire) == 0 {
            match tx.try_send(item) {
                Ok(()) => return self.wake(),
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(item)) => self.spill.lock().push_back(item),
            }
        } else {
            self.spill.lock().push_back(item);
        }
        // Move what fits: the reader may have emptied the queue meanwhile.
        let mut spill = self.spill.lock();
        let mut moved = false;
        while let Some(item) = spill.pop_front() {
            match tx.try_send(item) {
                Ok(()) => moved = true,
                Err(TrySendError::Full(item)) => {
                    spill.push_front(item);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => spill.clear(),
            }
        }
        self.spilled.store(spill.len(), Ordering::Release);
        drop(spill);
        if moved {
            self.wake();
        }
    }

    /// Reader: the next item when the queue is empty. Under the spill lock the queue is looked
    /// at again, as the IO thread may have just moved older items into it.
    fn take_spilled(&self, rx: &Receiver<Item>) -> Option<Item> {
        if self.spilled.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut spill = self.spill.lock();
        if let Ok(item) = rx.try_recv() {
            return Some(item);
        }
        let item = spill.pop_front();
        self.spilled.store(spill.len(), Ordering::Release);
        item
    }

    /// Drops the chunks waiting in the spill of a cancelled stream (its end marker stays).
    pub(crate) fn purge_spilled_chunks(&self) {
        let mut spill = self.spill.lock();
        spill.retain(|item| matches!(item, Item::End(_)));
        self.spilled.store(spill.len(), Ordering::Release);
    }

    fn wake(&self) {
        if self.waker_set.load(Ordering::SeqCst) {
            if let Some(waker) = self.waker.lock().take() {
                waker.wake();
            }
        }
    }

    pub(crate) fn progress(&self) -> StreamProgress {
        let expected = self.expected_bytes.load(Ordering::Relaxed);
        StreamProgress {
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            expected_bytes: (expected != u64::MAX).then_some(expected),
            items_sent: self.items_sent.load(Ordering::Relaxed),
            items_expected: Some(self.items_expected.load(Ordering::Relaxed))
                .filter(|&n| n != u64::MAX),
        }
    }
}

/// A running stream. Read it with [`recv`](Self::recv) (blocking, from any thread) or as a
/// `futures::Stream`; it yields [`Item::Chunk`]s, then one [`Item::End`], then nothing.
/// Dropping the handle before the end cancels the stream.
#[derive(Debug)]
pub struct StreamHandle {
    _client: Client,
    shared: Arc<StreamShared>,
    rx: Receiver<Item>,
    /// Bytes read and not yet handed back as credit.
    unconsumed: u64,
    finished: bool,
    /// Whether an item has been read.
    started: bool,
    /// See [`ClientConfig::first_item_spin`](crate::ClientConfig::first_item_spin).
    first_item_spin: Duration,
}

impl StreamHandle {
    pub(crate) fn new(
        client: Client,
        shared: Arc<StreamShared>,
        rx: Receiver<Item>,
        first_item_spin: Duration,
    ) -> Self {
        StreamHandle {
            _client: client,
            shared,
            rx,
            unconsumed: 0,
            finished: false,
            started: false,
            first_item_spin,
        }
    }

    /// The next item without waiting: from the queue, else from the spill; `Err` says whether
    /// the queue is still open.
    fn next_ready(&self) -> Result<Item, TryRecvError> {
        match self.rx.try_recv() {
            Ok(item) => Ok(item),
            Err(e) => self.shared.take_spilled(&self.rx).ok_or(e),
        }
    }

    /// The next item, waiting for it; `None` once the end has been returned.
    pub fn recv(&mut self) -> Option<Item> {
        loop {
            if self.finished {
                return None;
            }
            let item = match self.next_ready() {
                Ok(item) => item,
                Err(TryRecvError::Empty) => {
                    let spun = self.poll_first(self.first_item_spin);
                    match spun.map_or_else(|| self.rx.recv(), Ok) {
                        Ok(item) => item,
                        Err(_) => match self.shared.take_spilled(&self.rx) {
                            Some(item) => item,
                            None => self.lost(),
                        },
                    }
                }
                Err(TryRecvError::Disconnected) => self.lost(),
            };
            if let Some(item) = self.accept(item) {
                return Some(item);
            }
        }
    }

    /// Before the stream's first item, polls the queue for up to `first_item_spin` instead
    /// of sleeping at once (`burst.nexus.client.first.item.spin.us`): a first byte that comes
    /// within it needs no futex wake from the IO thread and no wake-up of this one.
    fn poll_first(&self, limit: Duration) -> Option<Item> {
        if self.started || limit.is_zero() {
            return None;
        }
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                match self.next_ready() {
                    Ok(item) => return Some(item),
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) => std::hint::spin_loop(),
                }
            }
            if start.elapsed() >= limit {
                return None;
            }
            // The thread that will deliver may be waiting for this CPU.
            std::thread::yield_now();
        }
    }

    /// Like [`recv`](Self::recv), waiting at most `timeout`; `Err(())` when it passed.
    #[allow(clippy::result_unit_err)]
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Item>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.finished {
                return Ok(None);
            }
            let item = match self.next_ready() {
                Ok(item) => item,
                Err(TryRecvError::Empty) => match self
                    .poll_first(self.first_item_spin.min(timeout))
                    .map_or_else(|| self.rx.recv_deadline(deadline), Ok)
                {
                    Ok(item) => item,
                    Err(RecvTimeoutError::Timeout) => return Err(()),
                    Err(RecvTimeoutError::Disconnected) => {
                        match self.shared.take_spilled(&self.rx) {
                            Some(item) => item,
                            None => self.lost(),
                        }
                    }
                },
                Err(TryRecvError::Disconnected) => self.lost(),
            };
            if let Some(item) = self.accept(item) {
                return Ok(Some(item));
            }
        }
    }

    /// Reads everything, handing each chunk to `sink`; returns how the stream ended.
    pub fn for_each_chunk(&mut self, mut sink: impl FnMut(&Bytes)) -> Ended {
        loop {
            match self.recv() {
                Some(Item::Chunk(data)) => sink(&data),
                Some(Item::End(end)) => return end,
                None => {
                    return self
                        .shared
                        .ended
                        .lock()
                        .clone()
                        .unwrap_or_else(|| Ended::error(ErrorCode::INTERNAL, "no end", 0))
                }
            }
        }
    }

    /// Cancels the stream: every server producer stops and acknowledges; no chunk is returned
    /// from now on, only the end marker (`Cancelled`, unless it had already ended).
    pub fn cancel(&self) {
        self.shared.request_cancel();
    }

    /// Counters so far.
    pub fn progress(&self) -> StreamProgress {
        self.shared.progress()
    }

    /// How the stream ended, once the connection knows (the end marker may still be queued).
    pub fn ended(&self) -> Option<Ended> {
        self.shared.ended.lock().clone()
    }

    /// The paradata it was started with.
    pub fn paradata(&self) -> &str {
        &self.shared.request.paradata
    }

    /// The server it reads from.
    pub fn endpoint(&self) -> SocketAddr {
        self.shared.endpoint
    }

    /// Handles one item from the queue: counts credit, drops chunks after a cancel.
    fn accept(&mut self, item: Item) -> Option<Item> {
        self.started = true;
        match item {
            Item::Chunk(data) => {
                self.unconsumed += data.len() as u64;
                if self.unconsumed >= self.shared.credit_batch.load(Ordering::Relaxed) {
                    self.shared.send(Command::Consume {
                        key: self.shared.key,
                        bytes: self.unconsumed,
                    });
                    self.unconsumed = 0;
                }
                if self.shared.cancel_requested.load(Ordering::Acquire) {
                    return None;
                }
                Some(Item::Chunk(data))
            }
            Item::End(end) => {
                self.finished = true;
                Some(Item::End(end))
            }
        }
    }

    /// The queue's sender is gone without an end marker: the client was shut down.
    fn lost(&mut self) -> Item {
        let bytes = self.shared.bytes_received.load(Ordering::Relaxed);
        Item::End(Ended::error(
            ErrorCode::CONNECTION_LOST,
            "the client shut down before the stream ended",
            bytes,
        ))
    }
}

impl futures_core::Stream for StreamHandle {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let item = match this.next_ready() {
                Ok(item) => item,
                Err(TryRecvError::Disconnected) => this.lost(),
                Err(TryRecvError::Empty) => {
                    *this.shared.waker.lock() = Some(cx.waker().clone());
                    this.shared.waker_set.store(true, Ordering::SeqCst);
                    // The IO thread wakes after each push it sees a waker for; look again in
                    // case it pushed before the waker was stored.
                    match this.next_ready() {
                        Ok(item) => item,
                        Err(TryRecvError::Disconnected) => this.lost(),
                        Err(TryRecvError::Empty) => return Poll::Pending,
                    }
                }
            };
            if let Some(item) = this.accept(item) {
                return Poll::Ready(Some(item));
            }
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.request_cancel();
        }
    }
}
