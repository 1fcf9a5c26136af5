//! What the client and server state machines share: input buffering and the preface check,
//! the outgoing queues with fair scheduling between streams, the heartbeat tick, and closing.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::WireError;
use crate::frame::{self, Frame, HANDSHAKE_MAX_PAYLOAD, HEADER_LEN, PREFACE};
use crate::types::{ErrorCode, StreamId, StreamMap};

/// The timers both sides keep (PROTOCOL.md 4.1, 4.3, 6.6). Defaults are PROTOCOL.md's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Heartbeat interval: the longest the server grants (ACCEPT gives the smaller of both
    /// sides'), or the one the client asks for. The connection is dead after three of them
    /// without anything received.
    pub heartbeat_interval: Duration,
    /// Time from connect until the handshake (and authentication) must be done.
    pub handshake_timeout: Duration,
    /// Stream timeout. On the client: a stream that may receive (window above 0) but hears
    /// nothing this long ends timed out and is cancelled. On the server: a stream whose window
    /// stays at 0 without CREDIT this long ends with ERROR `timeout`.
    pub stream_timeout: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            heartbeat_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(60),
        }
    }
}

/// Largest flow-control window a stream may reach, in bytes (2^31 - 1). CREDIT that would
/// take a window past it is a `flow_control_violation`.
pub const MAX_WINDOW: u64 = (1 << 31) - 1;

/// Smallest heartbeat interval either side accepts.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// A connection is dead when nothing at all arrived for this many heartbeat intervals.
pub const IDLE_HEARTBEATS: u32 = 3;

/// What one queued frame costs besides its bytes (its allocation and queue slot), counted
/// in [`Outbox::control_bytes`] so that many tiny frames cannot hide under a byte limit.
pub(crate) const FRAME_COST: usize = 64;

/// One queued stream frame: its header segment, its data segment (empty but for CHUNK), and
/// the uncompressed data bytes it carries (0 but for CHUNK).
#[derive(Debug)]
struct Queued {
    head: Bytes,
    body: Bytes,
    data_len: u64,
}

/// Emptied per-stream queues an [`Outbox`] keeps for reuse.
const SPARE_QUEUES: usize = 64;

/// Bytes waiting to go out, in order, split so that frame data never has to be copied:
/// a CHUNK is its header segment followed by its data segment.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Connection frames and small stream frames that jump the data queues.
    control: VecDeque<Bytes>,
    /// Per-stream frames (INITIATED, CHUNK, PROGRESS, terminal) in stream order.
    streams: StreamMap<VecDeque<Queued>>,
    /// Streams with something queued, served round-robin one frame at a time.
    ready: VecDeque<StreamId>,
    /// Emptied stream queues, kept for the next stream that queues a frame: a queue empties
    /// and refills once per chunk on a busy connection, and once per small stream.
    spare: Vec<VecDeque<Queued>>,
    /// The data segment of the frame whose header went out last.
    body: Option<Bytes>,
    /// Bytes queued in `streams` (headers and data) and in `control`.
    queued_bytes: usize,
    /// Bytes of every queued frame that is not a CHUNK, plus [`FRAME_COST`] each: what a peer
    /// makes us queue without any window bounding it.
    control_bytes: usize,
}

impl Outbox {
    pub(crate) fn control(&mut self, frame: &Frame) {
        self.raw_control(frame.to_bytes());
    }

    pub(crate) fn raw_control(&mut self, bytes: Bytes) {
        self.control_bytes += bytes.len() + FRAME_COST;
        self.queued_bytes += bytes.len();
        self.control.push_back(bytes);
    }

    /// Bytes (and per-frame costs) of the queued frames that are not CHUNKs: bounded by the
    /// server only by refusing to read while it is above a limit.
    pub(crate) fn control_bytes(&self) -> usize {
        self.control_bytes
    }

    pub(crate) fn stream_frame(&mut self, stream: StreamId, frame: &Frame) {
        self.stream_segments(stream, frame.to_bytes(), Bytes::new(), 0);
    }

    /// Queues a frame of `stream` as a header and a body segment; `data_len` is the
    /// uncompressed data it carries (for a CHUNK).
    pub(crate) fn stream_segments(
        &mut self,
        stream: StreamId,
        head: Bytes,
        body: Bytes,
        data_len: u64,
    ) {
        self.queued_bytes += head.len() + body.len();
        if data_len == 0 {
            self.control_bytes += head.len() + body.len() + FRAME_COST;
        }
        let spare = &mut self.spare;
        let queue = self
            .streams
            .entry(stream)
            .or_insert_with(|| spare.pop().unwrap_or_default());
        if queue.is_empty() {
            self.ready.push_back(stream);
        }
        queue.push_back(Queued {
            head,
            body,
            data_len,
        });
    }

    /// Drops whatever is still queued for `stream`; returns the uncompressed data bytes of
    /// the CHUNKs dropped, which therefore never reach the peer.
    pub(crate) fn discard(&mut self, stream: StreamId) -> u64 {
        let Some(queue) = self.streams.remove(&stream) else {
            return 0;
        };
        let mut dropped = 0;
        for frame in queue {
            self.queued_bytes -= frame.head.len() + frame.body.len();
            if frame.data_len == 0 {
                self.control_bytes -= frame.head.len() + frame.body.len() + FRAME_COST;
            }
            dropped += frame.data_len;
        }
        self.ready.retain(|s| *s != stream);
        dropped
    }

    /// Drops every stream's queue: after a connection ERROR nothing but control goes out.
    pub(crate) fn discard_streams(&mut self) {
        self.streams.clear();
        self.ready.clear();
        self.body = None;
        self.queued_bytes = self.control.iter().map(Bytes::len).sum();
        self.control_bytes = self.queued_bytes + self.control.len() * FRAME_COST;
    }

    pub(crate) fn is_stream_empty(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_none_or(|q| q.is_empty())
    }

    pub(crate) fn poll(&mut self) -> Option<Bytes> {
        if let Some(body) = self.body.take() {
            return Some(body);
        }
        if let Some(bytes) = self.control.pop_front() {
            self.control_bytes -= bytes.len() + FRAME_COST;
            self.queued_bytes -= bytes.len();
            return Some(bytes);
        }
        let stream = self.ready.pop_front()?;
        let queue = self
            .streams
            .get_mut(&stream)
            .expect("a ready stream has a queue");
        let Queued {
            head,
            body,
            data_len,
        } = queue.pop_front().expect("a ready stream has a frame");
        if queue.is_empty() {
            if let Some(queue) = self.streams.remove(&stream) {
                if self.spare.len() < SPARE_QUEUES {
                    self.spare.push(queue);
                }
            }
        } else {
            // Round-robin: one frame per stream per turn, so a big stream never starves
            // the small ones.
            self.ready.push_back(stream);
        }
        self.queued_bytes -= head.len() + body.len();
        if data_len == 0 {
            self.control_bytes -= head.len() + body.len() + FRAME_COST;
        }
        if !body.is_empty() {
            self.body = Some(body);
        }
        Some(head)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.body.is_none() && self.control.is_empty() && self.ready.is_empty()
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

/// Input side: the receive buffer, the preface check and the current payload limit.
#[derive(Debug)]
pub(crate) struct Inbox {
    pub(crate) buf: BytesMut,
    preface_matched: usize,
    pub(crate) max_payload: u32,
}

impl Inbox {
    pub(crate) fn new() -> Self {
        Inbox {
            buf: BytesMut::new(),
            preface_matched: 0,
            max_payload: HANDSHAKE_MAX_PAYLOAD,
        }
    }

    /// The next whole frame, once the peer's preface has been checked.
    pub(crate) fn next_frame(&mut self, peer: &str) -> Result<Option<Frame>, WireError> {
        while self.preface_matched < PREFACE.len() {
            let Some(&byte) = self.buf.first() else {
                return Ok(None);
            };
            if byte != PREFACE[self.preface_matched] {
                return Err(preface_error(peer, self.preface_matched, &self.buf));
            }
            self.preface_matched += 1;
            let _ = self.buf.split_to(1);
        }
        frame::decode(&mut self.buf, self.max_payload)
    }

    /// The whole length (header included) of the frame at the front of the buffer, once its
    /// header is in and its length within the limit: how much a reader should make room for.
    pub(crate) fn pending_frame_len(&self) -> Option<usize> {
        if self.preface_matched < PREFACE.len() {
            return None;
        }
        let header = self.buf.get(..HEADER_LEN)?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        (len <= self.max_payload).then_some(HEADER_LEN + len as usize)
    }

    pub(crate) fn is_mid_frame(&self) -> bool {
        !self.buf.is_empty() || (self.preface_matched > 0 && self.preface_matched < PREFACE.len())
    }
}

/// A clear error for a peer that did not open with the Nexus preface.
fn preface_error(peer: &str, matched: usize, rest: &[u8]) -> WireError {
    let what = if matched > 0 {
        "a corrupt Nexus preface".to_string()
    } else if rest.first() == Some(&0x16) {
        "a TLS handshake record (is the peer using TLS?)".to_string()
    } else if rest.first().is_some_and(u8::is_ascii_uppercase)
        && [
            &b"GET "[..],
            b"POST",
            b"PUT ",
            b"HEAD",
            b"HTTP",
            b"OPTI",
            b"DELE",
            b"PRI ",
        ]
        .iter()
        .any(|m| rest.len() < 4 && m.starts_with(rest) || rest.starts_with(m))
    {
        "what looks like HTTP (is the peer an HTTP client or server?)".to_string()
    } else {
        format!("byte 0x{:02x}", rest.first().copied().unwrap_or(0))
    };
    WireError::protocol(format!(
        "expected the Nexus preface from the {peer}, got {what}"
    ))
}

/// The heartbeat tick and the idle check.
#[derive(Debug)]
pub(crate) struct Clock {
    pub(crate) interval: Duration,
    pub(crate) next_tick: Instant,
    pub(crate) last_received: Instant,
    pub(crate) handshake_deadline: Option<Instant>,
    pub(crate) handshake_timeout: Duration,
}

impl Clock {
    pub(crate) fn new(now: Instant, interval: Duration, handshake_timeout: Duration) -> Self {
        Clock {
            interval,
            next_tick: now + interval,
            last_received: now,
            handshake_deadline: Some(now + handshake_timeout),
            handshake_timeout,
        }
    }

    pub(crate) fn next_deadline(&self) -> Instant {
        match self.handshake_deadline {
            Some(d) => d.min(self.next_tick),
            None => self.next_tick,
        }
    }

    /// The handshake fixed the interval: it applies from `now`, not from the next tick of the
    /// default (which could be many intervals away).
    pub(crate) fn negotiated(&mut self, interval: Duration, now: Instant) {
        self.interval = interval;
        self.next_tick = self.next_tick.min(now + interval);
    }

    pub(crate) fn idle_limit(&self) -> Duration {
        self.interval * IDLE_HEARTBEATS
    }
}

/// `current` moved earlier to `candidate` if that is sooner: for deadlines kept as "the
/// earliest time anything of a kind may be due".
pub(crate) fn earliest(current: Option<Instant>, candidate: Instant) -> Option<Instant> {
    Some(current.map_or(candidate, |c| c.min(candidate)))
}

/// The error that ends every stream when the transport closes under them.
pub(crate) fn lost(received: u64) -> WireError {
    WireError::new(
        ErrorCode::CONNECTION_LOST,
        format!("connection closed before the stream ended, after {received} bytes"),
    )
}

/// The running whole-stream digest: xxh3-64 with seed 0 over the uncompressed data.
///
/// twox-hash picks AVX2 at run time when the CPU has it (SSE2 otherwise); the
/// portable build of xxhash-rust is held to SSE2, which cost a tenth of a core
/// at 4 GB/s. The tests check the values against xxhash-rust.
#[derive(Clone)]
pub(crate) struct Digest(twox_hash::XxHash3_64);

impl Default for Digest {
    fn default() -> Self {
        Digest(twox_hash::XxHash3_64::with_seed(0))
    }
}

impl Digest {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    pub(crate) fn value(&self) -> u64 {
        self.0.finish()
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({:016x})", self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::Digest;
    use proptest::prelude::*;

    proptest! {
        /// The running digest, fed in arbitrary pieces, equals xxhash-rust's
        /// one-shot xxh3-64: the value PROTOCOL.md fixes, from another implementation.
        #[test]
        fn digest_matches_reference_xxh3(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            points.sort_unstable();
            let mut digest = Digest::default();
            let mut at = 0;
            for p in points {
                digest.update(&data[at..p]);
                at = p;
            }
            digest.update(&data[at..]);
            prop_assert_eq!(digest.value(), xxhash_rust::xxh3::xxh3_64(&data));
        }
    }

    /// Large inputs take the SIMD path (AVX2 where the CPU has it).
    #[test]
    fn digest_matches_reference_on_large_inputs() {
        let data: Vec<u8> = (0..3_000_017u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut digest = Digest::default();
        for piece in data.chunks(1 << 20) {
            digest.update(piece);
        }
        assert_eq!(digest.value(), xxhash_rust::xxh3::xxh3_64(&data));
    }
}
