//! The connection core both state machines share: a [`Connection`] is this shell (receive
//! buffer and preface check, send queues, heartbeat tick, idle and handshake deadlines,
//! events) around one [`Side`], the client's or the server's own state and rules.
//!
//! What is written once here: taking input and turning it into frames, the heartbeat tick and
//! the idle check, the handshake deadline, the earliest deadline, and the `poll_*` surface a
//! driver uses. A side supplies what differs: what a frame means, how it fails, how it ends at
//! end of file, and its own timers.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::conn::{Clock, Inbox, Outbox};
use crate::error::WireError;
use crate::frame::{Frame, PREFACE};
use crate::types::{ErrorCode, StreamId};

/// What both sides keep alike: buffers, clock, events, and the earliest stream timeout.
#[derive(Debug)]
pub(crate) struct Core<E> {
    pub(crate) inbox: Inbox,
    pub(crate) outbox: Outbox,
    pub(crate) clock: Clock,
    pub(crate) events: VecDeque<E>,
    /// The earliest a stream may time out; checked then, not at the next tick.
    pub(crate) stream_check: Option<Instant>,
}

impl<E> Core<E> {
    /// A connection opened at `now`, with its preface queued (each side sends it first).
    pub(crate) fn new(now: Instant, heartbeat: Duration, handshake_timeout: Duration) -> Self {
        let mut outbox = Outbox::default();
        outbox.raw_control(Bytes::from_static(&PREFACE));
        Core {
            inbox: Inbox::new(),
            outbox,
            clock: Clock::new(now, heartbeat, handshake_timeout),
            events: VecDeque::new(),
            stream_check: None,
        }
    }
}

/// Of `deadlines` (a stream and when it would time out), the streams due at `now`, sorted,
/// and the earliest of the others: when to look again.
pub(crate) fn due_streams(
    deadlines: impl Iterator<Item = (StreamId, Instant)>,
    now: Instant,
) -> (Vec<StreamId>, Option<Instant>) {
    let mut due = Vec::new();
    let mut next: Option<Instant> = None;
    for (id, at) in deadlines {
        if now >= at {
            due.push(id);
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    due.sort();
    (due, next)
}

mod sealed {
    pub trait Sealed {}
}

/// One side of a connection: the client's or the server's state and rules. Sealed: this
/// crate's two sides are the only ones. Its items are the hooks of [`Connection`], not API.
pub trait Side: sealed::Sealed + Sized + fmt::Debug {
    /// What the application learns from this side.
    type Event: fmt::Debug;
    #[doc(hidden)]
    /// The peer, as messages name it ("client" or "server").
    const PEER: &'static str;
    #[doc(hidden)]
    fn is_closed(&self) -> bool;
    #[doc(hidden)]
    fn is_established(&self) -> bool;
    #[doc(hidden)]
    /// Whether input must wait now (the server: too many frames left unread by its client);
    /// may note when that began.
    fn blocked(_conn: &mut Connection<Self>, _now: Instant) -> bool {
        false
    }
    #[doc(hidden)]
    /// The same, without noting anything.
    fn input_paused(_conn: &Connection<Self>) -> bool {
        false
    }
    #[doc(hidden)]
    /// A frame other than an extension or a connection ERROR, which the core handles.
    fn on_frame(conn: &mut Connection<Self>, frame: Frame, now: Instant) -> Result<(), WireError>;
    #[doc(hidden)]
    /// The peer closed the connection with ERROR `err` (in any phase).
    fn on_peer_error(conn: &mut Connection<Self>, err: WireError);
    #[doc(hidden)]
    /// Closes with a connection ERROR.
    fn fail(conn: &mut Connection<Self>, err: WireError);
    #[doc(hidden)]
    /// The peer closed its sending side.
    fn on_eof(conn: &mut Connection<Self>);
    #[doc(hidden)]
    /// At each heartbeat tick once established, after the connection's HEARTBEAT is queued.
    fn on_tick(_conn: &mut Connection<Self>, _now: Instant) {}
    #[doc(hidden)]
    /// The side's own earliest deadline, besides the tick and the stream check.
    fn deadline(_conn: &Connection<Self>) -> Option<Instant> {
        None
    }
    #[doc(hidden)]
    /// Ends the streams whose stream timeout has passed (the stream check is due).
    fn time_out_streams(conn: &mut Connection<Self>, now: Instant);
    #[doc(hidden)]
    /// Runs the side's own timers due at `now`, once established.
    fn on_timers(_conn: &mut Connection<Self>, _now: Instant) {}
}

impl sealed::Sealed for crate::client::ClientSide {}
impl sealed::Sealed for crate::server::ServerSide {}

/// One connection, without IO: the shared core and one side. Drive it with
/// [`input_buffer`](Self::input_buffer) and [`process_input`](Self::process_input) (or
/// [`handle_input`](Self::handle_input)), [`handle_timeout`](Self::handle_timeout) at
/// [`poll_timeout`](Self::poll_timeout), and [`handle_eof`](Self::handle_eof); write out what
/// [`poll_transmit`](Self::poll_transmit) yields, in order; act on
/// [`poll_event`](Self::poll_event).
#[derive(Debug)]
pub struct Connection<S: Side> {
    pub(crate) core: Core<S::Event>,
    pub(crate) side: S,
}

impl<S: Side> Connection<S> {
    /// The receive buffer: read socket bytes into its spare capacity, then call
    /// [`process_input`](Self::process_input). Lets a driver read without a copy.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.core.inbox.buf
    }

    /// The length (header included) of the frame whose start the receive buffer holds, once
    /// its header is complete: a reader can make room for all of it before reading on.
    pub fn pending_frame_len(&self) -> Option<usize> {
        self.core.inbox.pending_frame_len()
    }

    /// Bytes received from the peer.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        self.core.inbox.buf.extend_from_slice(data);
        self.process_input(now);
    }

    /// Processes whatever the receive buffer holds, as far as the side takes input now (see
    /// [`wants_input`](Self::wants_input)); the rest waits in the buffer.
    pub fn process_input(&mut self, now: Instant) {
        if self.side.is_closed() {
            self.core.inbox.buf.clear();
            return;
        }
        self.core.clock.last_received = now;
        loop {
            if S::blocked(self, now) {
                break;
            }
            match self.core.inbox.next_frame(S::PEER) {
                Ok(Some(frame)) => {
                    if let Err(err) = self.on_frame(frame, now) {
                        S::fail(self, err);
                    }
                }
                Ok(None) => break,
                Err(err) => S::fail(self, err),
            }
            if self.side.is_closed() {
                self.core.inbox.buf.clear();
                break;
            }
        }
    }

    /// What both sides do alike in every phase (PROTOCOL.md 3): ignore extension frames, and
    /// close at a connection ERROR from the peer; the rest is the side's.
    fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<(), WireError> {
        match frame {
            Frame::Extension { .. } => Ok(()),
            Frame::Error {
                stream,
                code,
                message,
            } if stream.is_connection() => {
                let err = WireError::new(
                    code,
                    format!("{} closed the connection: {message}", S::PEER),
                );
                S::on_peer_error(self, err);
                Ok(())
            }
            frame => S::on_frame(self, frame, now),
        }
    }

    /// The peer closed its sending side (or the socket failed).
    pub fn handle_eof(&mut self) {
        if !self.side.is_closed() {
            S::on_eof(self);
        }
    }

    /// Whether the driver should read more input now. `false` while the server's client
    /// leaves too much unread: read nothing more, and call
    /// [`process_input`](Self::process_input) again once some went out (what is buffered
    /// was not all processed).
    pub fn wants_input(&self) -> bool {
        !self.side.is_closed() && !S::input_paused(self)
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.side.is_closed() {
            return None;
        }
        let tick = self.core.clock.next_deadline();
        Some(
            [self.core.stream_check, S::deadline(self)]
                .into_iter()
                .flatten()
                .fold(tick, Instant::min),
        )
    }

    /// Runs the timers due at `now`: the handshake deadline, the heartbeat tick and idle
    /// check, and the side's own (stream timeouts, PROGRESS, ...).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.side.is_closed() {
            return;
        }
        if let Some(deadline) = self.core.clock.handshake_deadline {
            if now >= deadline {
                let ms = self.core.clock.handshake_timeout.as_millis();
                let message = format!(
                    "the {} did not finish the handshake within {ms} ms",
                    S::PEER
                );
                return S::fail(self, WireError::new(ErrorCode::TIMEOUT, message));
            }
        }
        if now >= self.core.clock.next_tick {
            self.core.clock.next_tick = now + self.core.clock.interval;
            if self.side.is_established() {
                let idle = self.core.clock.idle_limit();
                if now.duration_since(self.core.clock.last_received) >= idle {
                    let message = format!(
                        "nothing received from the {} for {} ms",
                        S::PEER,
                        idle.as_millis()
                    );
                    return S::fail(self, WireError::new(ErrorCode::TIMEOUT, message));
                }
                self.core.outbox.control(&Frame::Heartbeat {
                    stream: StreamId::CONNECTION,
                });
                S::on_tick(self, now);
            }
        }
        if self.side.is_established() && self.core.stream_check.is_some_and(|at| now >= at) {
            S::time_out_streams(self, now);
        }
        if self.side.is_established() {
            S::on_timers(self, now);
        }
    }

    /// The next segment to write. Segments must be written in the order given; a CHUNK comes
    /// as two segments, its header and then its data.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.core.outbox.poll()
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has nothing.
    pub fn is_transmit_empty(&self) -> bool {
        self.core.outbox.is_empty()
    }

    /// Bytes queued for sending, headers and data: at most the sum of the streams' windows
    /// plus control frames.
    pub fn queued_bytes(&self) -> usize {
        self.core.outbox.queued_bytes()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<S::Event> {
        self.core.events.pop_front()
    }

    /// Whether the connection is closed: flush what is queued, then close the socket.
    pub fn is_closed(&self) -> bool {
        self.side.is_closed()
    }

    /// Whether the handshake (and authentication) is done.
    pub fn is_established(&self) -> bool {
        self.side.is_established()
    }
}

/// The connection-level error frame for `err`.
pub(crate) fn error_frame(err: &WireError) -> Frame {
    Frame::Error {
        stream: StreamId::CONNECTION,
        code: err.code,
        message: err.message.clone(),
    }
}

/// The name a frame has in messages.
pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    frame
        .frame_type()
        .map_or("an extension frame", |t| t.name())
}
