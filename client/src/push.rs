//! Push streams as the application sees them: a [`PushHandle`] that takes data from any
//! thread (`write`, or `copy_from` a reader) and hands it to the connection's IO thread only
//! within the window the server granted, then `finish`es with the server's verdict.
//!
//! Flow control: the handle's [`PushGate`] counts the window the server granted and the
//! handle has not yet used. `write` waits while it is 0; the IO thread adds each CREDIT to it
//! and closes it when the push ends. So at most the window is ever queued towards the server,
//! and a slow sink at the server slows the writer here.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::Receiver;
use nexus_protocol::ErrorCode;
use parking_lot::{Condvar, Mutex};

use crate::client::Client;
use crate::conn::Command;
use crate::stream::{Ended, Item, StreamShared};

/// The window a push may still use, shared by its handle and its IO thread.
#[derive(Debug, Default)]
pub(crate) struct PushGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    window: u64,
    /// The server accepted the push (its first CREDIT came with INITIATED).
    opened: bool,
    closed: bool,
    /// The sink's report from the server's COMPLETE.
    report: Option<String>,
}

impl PushGate {
    /// IO thread: the server granted `bytes` more.
    pub(crate) fn grant(&self, bytes: u64) {
        let mut state = self.state.lock();
        state.window += bytes;
        state.opened = true;
        drop(state);
        self.changed.notify_all();
    }

    /// IO thread: the push ended; writers stop waiting.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.changed.notify_all();
    }

    /// IO thread: the server's COMPLETE carried a report.
    pub(crate) fn set_report(&self, text: String) {
        self.state.lock().report = Some(text);
    }

    /// IO thread: the report, for the push's end.
    pub(crate) fn take_report(&self) -> Option<String> {
        self.state.lock().report.take()
    }

    /// Handle: waits until the server accepted the push; false if it ended first.
    fn wait_open(&self) -> bool {
        let mut state = self.state.lock();
        loop {
            if state.closed {
                return false;
            }
            if state.opened {
                return true;
            }
            self.changed.wait(&mut state);
        }
    }

    /// Handle: waits for window, takes up to `want` of it; 0 once the push ended.
    fn take(&self, want: u64) -> u64 {
        let mut state = self.state.lock();
        loop {
            if state.closed {
                return 0;
            }
            if state.window > 0 {
                let n = want.min(state.window);
                state.window -= n;
                return n;
            }
            self.changed.wait(&mut state);
        }
    }
}

/// What a push is started with (besides endpoint and paradata).
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The total size, when known: the server can refuse a push too large for it at once, and
    /// both ends hold the push to exactly this size.
    pub size: Option<u64>,
    /// A W3C `traceparent` to pass to the server.
    pub traceparent: Option<String>,
}

/// A running push. Write its data with [`write`](Self::write) or
/// [`copy_from`](Self::copy_from), then [`finish`](Self::finish): the push is complete only
/// when the server has committed the data durably and confirmed its counts and digest.
/// Dropping the handle before `finish` cancels the push (the server keeps nothing of it).
#[derive(Debug)]
pub struct PushHandle {
    _client: Client,
    shared: Arc<StreamShared>,
    rx: Receiver<Item>,
    sent: u64,
    finished: bool,
}

impl PushHandle {
    pub(crate) fn new(client: Client, shared: Arc<StreamShared>, rx: Receiver<Item>) -> Self {
        PushHandle {
            _client: client,
            shared,
            rx,
            sent: 0,
            finished: false,
        }
    }

    fn gate(&self) -> &PushGate {
        self.shared
            .push
            .as_ref()
            .expect("a push handle's stream has a gate")
    }

    /// Sends `data` (any size; it goes out in pieces as the window allows), waiting while the
    /// server holds the window closed. `Err` with the push's end when it ended meanwhile
    /// (failed at the server, cancelled, connection lost): then nothing more can be sent.
    pub fn write(&mut self, mut data: Bytes) -> Result<(), Ended> {
        if let Some(size) = self.declared() {
            if self.sent + data.len() as u64 > size {
                let message = format!(
                    "the data goes past the {size} bytes this push declared; nothing more is sent"
                );
                return Err(self.abort(ErrorCode::SOURCE_FAILED, &message));
            }
        }
        while !data.is_empty() {
            let n = self.gate().take(data.len() as u64) as usize;
            if n == 0 {
                return Err(self.wait_end());
            }
            let piece = data.split_to(n);
            self.sent += n as u64;
            self.shared
                .bytes_received
                .store(self.sent, Ordering::Relaxed);
            self.shared.send(Command::PushData {
                key: self.shared.key,
                data: piece,
            });
        }
        Ok(())
    }

    /// Sends everything `reader` yields, in reads of `chunk` bytes, until it ends. Returns the
    /// bytes sent. A read error cancels the push and ends it with `source_failed`.
    pub fn copy_from(&mut self, mut reader: impl Read, chunk: usize) -> Result<u64, Ended> {
        let chunk = chunk.max(4096);
        let start = self.sent;
        // One allocation for several reads, taken again once the connection dropped what was
        // cut from it: no fresh memory (and its page faults) per read.
        let mut arena = BytesMut::new();
        loop {
            if arena.capacity() < chunk {
                arena.reserve(chunk * 8);
            }
            arena.resize(chunk, 0);
            let mut buf = arena.split_to(chunk);
            let n = loop {
                match reader.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let message = format!("reading the data to push failed: {e}");
                        return Err(self.abort(ErrorCode::SOURCE_FAILED, &message));
                    }
                }
            };
            if n == 0 {
                return Ok(self.sent - start);
            }
            buf.truncate(n);
            self.write(buf.freeze())?;
        }
    }

    /// Sends every piece of `pieces` in order.
    pub fn send_all(&mut self, pieces: impl IntoIterator<Item = Bytes>) -> Result<(), Ended> {
        for piece in pieces {
            self.write(piece)?;
        }
        Ok(())
    }

    /// Ends the data and waits for the server's verdict: `Complete` once the server has made
    /// the data durable and confirmed the counts and digest of what was sent.
    pub fn finish(mut self) -> Ended {
        if let Some(size) = self.declared() {
            if self.sent != size {
                let message = format!(
                    "the data ended after {} of the {size} bytes this push declared",
                    self.sent
                );
                return self.abort(ErrorCode::SOURCE_FAILED, &message);
            }
        }
        // The end goes to an accepted push only (an empty push may get here before that).
        if self.gate().wait_open() {
            self.shared.send(Command::PushFinish {
                key: self.shared.key,
            });
        }
        self.wait_end()
    }

    /// Cancels the push: the server drops what it received and keeps nothing.
    pub fn cancel(&self) {
        self.shared.request_cancel();
    }

    /// Bytes handed to the connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// The sink paradata it was started with.
    pub fn paradata(&self) -> &str {
        &self.shared.request.paradata
    }

    /// The server it pushes to.
    pub fn endpoint(&self) -> SocketAddr {
        self.shared.endpoint
    }

    fn declared(&self) -> Option<u64> {
        self.shared
            .request
            .push
            .filter(|&n| n != nexus_protocol::UNKNOWN)
    }

    /// Fails the push here, with this reason, and returns its end.
    fn abort(&mut self, code: ErrorCode, message: &str) -> Ended {
        self.shared.send(Command::Abort {
            key: self.shared.key,
            code,
            message: message.to_string(),
        });
        self.wait_end()
    }

    /// The push's end, waiting for it.
    fn wait_end(&mut self) -> Ended {
        self.finished = true;
        let end = loop {
            match self.rx.recv() {
                Ok(Item::End(end)) => break end,
                Ok(Item::Chunk(_)) => continue,
                Err(_) => {
                    break self.shared.ended.lock().clone().unwrap_or_else(|| {
                        Ended::error(
                            ErrorCode::CONNECTION_LOST,
                            "the client shut down before the push ended",
                            self.sent,
                        )
                    })
                }
            }
        };
        end
    }
}

impl Drop for PushHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.request_cancel();
        }
    }
}
