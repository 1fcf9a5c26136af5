//! The connection driver: moves bytes between a socket and a protocol state machine
//! (`nexus_protocol::Connection`), for the server's engine and the client's connections
//! alike. It owns no protocol decision; its [`Host`] handles the events.
//!
//! Three tasks on the connection's thread (one thread, `Rc`, no `RefCell` borrow across an
//! `.await`):
//! - the reader reads into the protocol's receive buffer (no copy) and processes it; while
//!   the protocol does not want input (a server whose client leaves too much unread) it reads
//!   nothing and waits for the writer;
//! - the writer gathers queued segments into one vectored write, at most a [`WriteBatch`];
//! - the timer runs the protocol's timers at its deadline.
//!
//! When the protocol closes, the writer flushes and half-closes, and the socket is read and
//! dropped until the peer's FIN ([`Connection::linger`]), so the close never resets.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nexus_protocol::{Connection as Protocol, Side};
use tokio::sync::Notify;

use crate::Connection;

/// How much one write gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBatch {
    /// Most segments per vectored write.
    pub max_segments: usize,
    /// Most bytes per write.
    pub max_bytes: usize,
}

impl Default for WriteBatch {
    /// 256 segments (a CHUNK is two) and 1 MiB: one 1 MiB chunk, or many smaller frames, per
    /// write. Larger writes made the kernel reorder segments on loopback: an 8 GiB pull saw
    /// 2,800-3,100 retransmitted segments with 8 MiB writes (2,200-2,500 with 2 and 4 MiB)
    /// against 210-240 with 1 MiB, and moved 3.2-3.4 GB/s instead of 3.7-3.9 with 15% more
    /// system time on the sender (bench/RESULTS.md, issue 20).
    fn default() -> Self {
        WriteBatch {
            max_segments: 256,
            max_bytes: 1 << 20,
        }
    }
}

/// How long a closing connection may take to flush and to see the peer's FIN.
pub const LINGER: Duration = Duration::from_secs(2);

/// What wakes the driver's tasks (see [`changed`]).
#[derive(Debug, Default)]
pub struct Wakers {
    writer: Notify,
    timer: Notify,
    reader: Notify,
}

impl Wakers {
    /// The protocol may have something to send, a new deadline, or has closed.
    fn changed(&self, closed: bool) {
        self.writer.notify_one();
        self.timer.notify_one();
        if closed {
            self.reader.notify_one();
        }
    }
}

/// The owner of a driven connection: the server's engine, the client's connection actor.
pub trait Host: 'static {
    /// The protocol side.
    type Side: Side;

    /// The protocol state machine.
    fn protocol(&self) -> &RefCell<Protocol<Self::Side>>;

    /// The socket.
    fn socket(&self) -> &Connection;

    /// The driver's wakers.
    fn wakers(&self) -> &Wakers;

    /// The peer, for log lines.
    fn peer(&self) -> SocketAddr;

    /// Handles one protocol event.
    fn on_event(self: &Rc<Self>, event: <Self::Side as Side>::Event);

    /// Before the pending events are handled (see [`changed`]).
    fn before_events(self: &Rc<Self>) {}

    /// After the pending events were handled, before the driver's tasks are woken.
    fn after_events(&self) {}

    /// Makes `buf` ready for the next read and returns the most it may take. `pending` is
    /// the length of the frame the buffer starts with, when known. By default: room for
    /// 64 KiB more, any amount.
    fn prepare_read(&self, buf: &mut BytesMut, _pending: Option<usize>) -> usize {
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        usize::MAX
    }

    /// After input was processed.
    fn after_read(&self) {}

    /// The writer is about to write `bytes`.
    fn writing(&self, _bytes: usize) {}

    /// The socket is done with `segments` (take what may be reused; the vector is reused).
    fn written(&self, segments: &mut Vec<Bytes>) {
        segments.clear();
    }

    /// Whether to close once everything is flushed although the protocol is open (a client's
    /// idle connection closed by its pool).
    fn close_when_flushed(&self) -> bool {
        false
    }
}

/// Call after every change to `host`'s protocol (a command, a chunk queued, input, a timer):
/// handles every pending event, then wakes the writer and the timer (and the reader when the
/// protocol closed).
pub fn changed<H: Host>(host: &Rc<H>) {
    host.before_events();
    loop {
        // Not `while let`: the borrow would last through the handler, which may call the
        // protocol again.
        let event = host.protocol().borrow_mut().poll_event();
        let Some(event) = event else { break };
        host.on_event(event);
    }
    host.after_events();
    let closed = host.protocol().borrow().is_closed();
    host.wakers().changed(closed);
}

/// Drives `host`'s connection until its protocol has closed and the socket has been closed
/// the way TCP expects (bounded by [`LINGER`]). Call on the connection's thread.
pub async fn drive<H: Host>(host: Rc<H>, batch: WriteBatch) {
    let mut writer = tokio::task::spawn_local(write_loop(Rc::clone(&host), batch));
    let timer = tokio::task::spawn_local(timer_loop(Rc::clone(&host)));
    changed(&host);
    read_loop(&host).await;
    // The protocol is closed: the writer flushes what is queued (the last COMPLETE, a final
    // ERROR) and half-closes, while the peer's last frames are read and dropped until its
    // FIN. Closing with unread input would make the kernel reset the connection.
    let deadline = Instant::now() + LINGER;
    if !host.socket().linger(&mut writer, deadline).await {
        tracing::debug!(peer = %host.peer(), "The peer did not close in time; closing anyway.");
    }
    writer.abort();
    timer.abort();
}

async fn read_loop<H: Host>(host: &Rc<H>) {
    let mut lowat = LowWater::default();
    loop {
        if !host.protocol().borrow().wants_input() {
            if host.protocol().borrow().is_closed() {
                return;
            }
            // The peer leaves too much unread: read nothing more until some of it went out,
            // then process what is already buffered (the protocol closes if this lasts).
            host.wakers().reader.notified().await;
            host.protocol().borrow_mut().process_input(Instant::now());
            changed(host);
            continue;
        }
        let (mut buf, pending) = {
            let mut protocol = host.protocol().borrow_mut();
            let pending = protocol.pending_frame_len();
            (std::mem::take(protocol.input_buffer()), pending)
        };
        let max = host.prepare_read(&mut buf, pending);
        lowat.set(&**host, pending, buf.len());
        let (result, buf) = host.socket().read_up_to(buf, max).await;
        {
            let mut protocol = host.protocol().borrow_mut();
            *protocol.input_buffer() = buf;
            match result {
                Ok(0) => protocol.handle_eof(),
                Ok(_) => protocol.process_input(Instant::now()),
                Err(e) => {
                    tracing::debug!(peer = %host.peer(), error = %e, "Read failed.");
                    protocol.handle_eof();
                }
            }
        }
        host.after_read();
        changed(host);
        if host.protocol().borrow().is_closed() {
            return;
        }
    }
}

/// The most a read waits to have queued before it wakes: a read of at least this much (or
/// of the rest of the frame it is in) replaces several small ones, each a wake-up.
const LOW_WATER_MAX: usize = 1 << 20;
/// Below this, waking for the rest of a frame is cheap enough: the socket's low-water mark
/// goes back to 1 byte.
const LOW_WATER_MIN: usize = 128 << 10;

/// The socket's low-water mark (`SO_RCVLOWAT`) as last set (0: never set, i.e. 1 byte).
///
/// Without it a bulk receiver wakes for whatever a few segments brought: `nexus pull` of
/// 2 GiB made 9,700 reads and 2,700 waits on the epoll backend, about five reads per 1 MiB
/// chunk. A read may wait for the rest of the frame whose header is in, since the peer has
/// committed to sending all of it; it must not wait for anything beyond.
#[derive(Default)]
struct LowWater {
    current: usize,
    failed: bool,
}

impl LowWater {
    fn set<H: Host>(&mut self, host: &H, pending: Option<usize>, have: usize) {
        if self.failed {
            return;
        }
        let Some(mark) = next_low_water(self.current, pending, have) else {
            return;
        };
        match host.socket().set_recv_lowat(mark) {
            Ok(()) => self.current = mark,
            Err(e) => {
                // Only an optimisation: reads work the same without it.
                tracing::debug!(peer = %host.peer(), error = %e, "Cannot set SO_RCVLOWAT.");
                self.failed = true;
            }
        }
    }
}

/// The low-water mark to set before the next read, or `None` to leave `current` as it is.
/// `pending` is the length of the frame the receive buffer starts with (when its header is
/// in), `have` the bytes of it already there. The mark never exceeds the frame's rest; it
/// goes back to 1 byte when that rest is small or unknown; it is raised only when it can
/// grow by half. (A mark of a fixed 128 KiB, changed less often, measured worse: the reads
/// that matter are the ones that wait, and they should wait for the whole frame.)
fn next_low_water(current: usize, pending: Option<usize>, have: usize) -> Option<usize> {
    let current = current.max(1);
    let need = pending.map_or(0, |total| total.saturating_sub(have));
    let wanted = if need >= LOW_WATER_MIN {
        need.min(LOW_WATER_MAX)
    } else {
        1
    };
    // A mark above 1 that still fits the frame's rest stays, unless it can grow by half.
    let fits = current > 1 && current <= need && wanted < current.saturating_mul(3) / 2;
    (wanted != current && !fits).then_some(wanted)
}

async fn write_loop<H: Host>(host: Rc<H>, batch: WriteBatch) {
    let mut segments: Vec<Bytes> = Vec::with_capacity(batch.max_segments);
    loop {
        let mut total = 0;
        {
            let mut protocol = host.protocol().borrow_mut();
            while segments.len() < batch.max_segments && total < batch.max_bytes {
                let Some(segment) = protocol.poll_transmit() else {
                    break;
                };
                total += segment.len();
                segments.push(segment);
            }
        }
        if segments.is_empty() {
            if host.protocol().borrow().is_closed() || host.close_when_flushed() {
                // Everything is out: FIN. The peer's FIN ends the connection (see `drive`).
                host.socket().shutdown_write().await;
                return;
            }
            host.wakers().writer.notified().await;
            continue;
        }
        host.writing(total);
        let (result, mut written) = host.socket().write_all(segments).await;
        host.written(&mut written);
        written.clear();
        segments = written;
        host.wakers().reader.notify_one();
        if let Err(e) = result {
            tracing::debug!(peer = %host.peer(), error = %e, "Write failed.");
            host.protocol().borrow_mut().handle_eof();
            changed(&host);
            host.socket().shutdown();
            return;
        }
    }
}

async fn timer_loop<H: Host>(host: Rc<H>) {
    loop {
        let deadline = host.protocol().borrow().poll_timeout();
        let Some(deadline) = deadline else { return };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                host.protocol().borrow_mut().handle_timeout(Instant::now());
                changed(&host);
            }
            _ = host.wakers().timer.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_mark_never_exceeds_the_rest_of_the_frame() {
        for current in [0, 1, 200 << 10, MIB] {
            for have in [0, 1000, 300 << 10, MIB - 10, MIB + 24] {
                let pending = Some(MIB + 24);
                let rest = (MIB + 24).saturating_sub(have);
                let mark = next_low_water(current, pending, have).unwrap_or(current.max(1));
                assert!(
                    mark == 1 || mark <= rest,
                    "{current} {have}: {mark} > {rest}"
                );
            }
        }
    }

    #[test]
    fn no_frame_or_a_small_rest_means_any_byte() {
        assert_eq!(next_low_water(MIB, None, 0), Some(1));
        assert_eq!(next_low_water(MIB, Some(4096 + 24), 24), Some(1));
        assert_eq!(
            next_low_water(0, None, 0),
            None,
            "already 1: no system call"
        );
        assert_eq!(next_low_water(1, Some(64), 12), None);
    }

    #[test]
    fn a_large_frame_waits_for_its_rest_capped() {
        assert_eq!(next_low_water(1, Some(MIB + 24), 100), Some(MIB + 24 - 100));
        assert_eq!(next_low_water(1, Some(8 * MIB), 0), Some(LOW_WATER_MAX));
    }

    #[test]
    fn a_mark_that_still_fits_stays_unless_it_can_grow_by_half() {
        // The next frame's rest is a little larger than the mark: no system call.
        assert_eq!(next_low_water(MIB - 5000, Some(MIB + 24), 1000), None);
        // Much larger (the mark had come down near the end of the last frame): raised.
        assert_eq!(next_low_water(200 << 10, Some(MIB + 24), 24), Some(MIB));
        // Smaller than the mark: lowered to the rest, never left above it.
        assert_eq!(next_low_water(MIB, Some(MIB + 24), 524), Some(MIB - 500));
    }
}
