//! The server's streams (PROTOCOL.md section 6): INITIATE into a request, the application's
//! answer, chunks within the window with sequence numbers and a running digest, CREDIT,
//! CANCEL, PROGRESS on a timer, stream heartbeats, the stream timeout, and the terminal frame.

use std::time::Instant;

use bytes::Bytes;

use super::{Phase, ServerConnection, ServerEvent, ServerSide, Stream};
use crate::conn::{self, earliest};
use crate::error::{CallError, WireError};
use crate::frame::{self, Frame, Initiate};
use crate::machine::{due_streams, frame_name, Side};
use crate::types::{Completion, ErrorCode, ItemCounts, Progress, StreamId, UNKNOWN};

/// A frame of an established connection.
pub(super) fn on_frame(
    conn: &mut ServerConnection,
    frame: Frame,
    now: Instant,
) -> Result<(), WireError> {
    match frame {
        Frame::Heartbeat { .. } => Ok(()),
        Frame::Initiate(initiate) => {
            on_initiate(conn, initiate, now);
            Ok(())
        }
        Frame::Credit { stream, increment } => on_credit(conn, stream, increment),
        Frame::Chunk(chunk) => {
            check_known(conn, chunk.stream)?;
            super::push::on_chunk(conn, chunk, now)
        }
        Frame::Complete {
            stream,
            completion,
            report,
        } => {
            check_known(conn, stream)?;
            if report.is_some() {
                return Err(WireError::protocol(format!(
                    "a client's COMPLETE on stream {stream} carries a report"
                )));
            }
            super::push::on_complete(conn, stream, completion, now)
        }
        Frame::Cancel {
            stream, operation, ..
        } => {
            match operation {
                Some(op) => {
                    let mut ids: Vec<StreamId> = conn
                        .side
                        .streams
                        .iter()
                        .filter(|(_, s)| s.operation == op)
                        .map(|(id, _)| *id)
                        .collect();
                    ids.sort();
                    for id in ids {
                        cancel_stream(conn, id);
                    }
                }
                None => {
                    check_known(conn, stream)?;
                    // A stream that already ended sent its terminal frame: nothing to do.
                    if conn.side.streams.contains_key(&stream) {
                        cancel_stream(conn, stream);
                    }
                }
            }
            Ok(())
        }
        other => Err(WireError::protocol(format!(
            "{} is not valid from a client here",
            frame_name(&other)
        ))),
    }
}

fn on_initiate(conn: &mut ServerConnection, initiate: Initiate, now: Instant) {
    let stream = initiate.stream;
    let side = &mut conn.side;
    if stream <= side.last_stream {
        let last = side.last_stream;
        return ServerSide::fail(
            conn,
            WireError::protocol(format!(
                "INITIATE for stream {stream}, not above the last stream {last}"
            )),
        );
    }
    side.last_stream = stream;
    let settings = &side.settings;
    let refuse = if side.draining {
        Some((
            ErrorCode::DRAINING,
            "server is draining; retry on another connection".to_string(),
        ))
    } else if side.streams.len() >= settings.max_streams as usize {
        Some((
            ErrorCode::RESOURCE_EXHAUSTED,
            format!(
                "connection already carries {} streams",
                settings.max_streams
            ),
        ))
    } else if initiate.paradata.len() > settings.max_paradata as usize {
        Some((
            ErrorCode::BAD_PARADATA,
            format!(
                "paradata of {} bytes exceeds the limit of {}",
                initiate.paradata.len(),
                settings.max_paradata
            ),
        ))
    } else if initiate.push.is_some() && side.version() < crate::types::VERSION_PUSH {
        // A flag of a later version that a version-1 connection does not define: a client
        // that sends it anyway gets a clear answer rather than a pull.
        Some((
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "push streams need protocol version {}; this connection speaks {}",
                crate::types::VERSION_PUSH,
                side.version()
            ),
        ))
    } else {
        None
    };
    if let Some((code, message)) = refuse {
        conn.core.outbox.control(&Frame::Error {
            stream,
            code,
            message,
        });
        conn.core
            .events
            .push_back(ServerEvent::StreamRefused { stream, code });
        return;
    }
    // A pull's window is the client's to grant (BIND); a push's is ours (`accept_push`).
    let window = match initiate.push {
        Some(_) => 0,
        None => side.handshake().map_or(0, |h| h.initial_window).into(),
    };
    let push = initiate.push.map(|declared| super::PushIn {
        declared,
        released: 0,
        client_done: false,
        last_heard: now,
    });
    side.streams.insert(
        stream,
        Stream {
            operation: initiate.operation,
            accepted: false,
            zstd: initiate.accept_zstd,
            window,
            seq: 0,
            bytes: 0,
            digest: conn::Digest::default(),
            sent_since_tick: false,
            starved_since: None,
            expected: UNKNOWN,
            items: ItemCounts::NOT_COUNTED,
            push,
        },
    );
    conn.core
        .events
        .push_back(ServerEvent::StreamRequested(initiate));
}

fn on_credit(
    conn: &mut ServerConnection,
    stream: StreamId,
    increment: u32,
) -> Result<(), WireError> {
    check_known(conn, stream)?;
    if increment == 0 {
        return Err(WireError::protocol(format!(
            "CREDIT of 0 on stream {stream}"
        )));
    }
    let max = u64::from(conn.side.max_window());
    let Some(s) = conn.side.streams.get_mut(&stream) else {
        return Ok(()); // The stream ended while the credit was in flight.
    };
    if s.push.is_some() {
        return Err(WireError::protocol(format!(
            "CREDIT from the client on push stream {stream}: the server grants a push's window"
        )));
    }
    // A client may grow a stream's window (PROTOCOL.md 6.3), up to what ACCEPT allowed: the
    // window bounds what a stream buffers here.
    let window = s.window + u64::from(increment);
    if window > max {
        return Err(WireError::new(
            ErrorCode::FLOW_CONTROL_VIOLATION,
            format!("CREDIT takes stream {stream}'s window to {window}, above the {max} allowed"),
        ));
    }
    s.window = window;
    s.starved_since = None;
    conn.core.events.push_back(ServerEvent::Credit { stream });
    Ok(())
}

fn cancel_stream(conn: &mut ServerConnection, stream: StreamId) {
    let Some(s) = conn.side.streams.get(&stream) else {
        return;
    };
    if s.push.as_ref().is_some_and(|p| p.client_done) {
        // The push is committing: its COMPLETE or ERROR answers the CANCEL (PROTOCOL.md 6.8).
        return;
    }
    let produced = s.bytes;
    // Unsent chunks are dropped: the acknowledgement is the last thing on the stream, and it
    // counts only the data that went out before it.
    let bytes_sent = produced - conn.core.outbox.discard(stream);
    end_stream(conn, stream, &Frame::Cancelled { stream, bytes_sent });
    conn.core
        .events
        .push_back(ServerEvent::StreamCancelled { stream });
}

/// A frame for a stream id the client never opened is a protocol error.
pub(super) fn check_known(conn: &ServerConnection, stream: StreamId) -> Result<(), WireError> {
    if stream > conn.side.last_stream {
        return Err(WireError::protocol(format!(
            "frame for stream {stream}, never initiated"
        )));
    }
    Ok(())
}

/// Queues the stream's last frame and forgets the stream.
pub(super) fn end_stream(conn: &mut ServerConnection, stream: StreamId, last: &Frame) {
    conn.side.streams.remove(&stream);
    conn.core.outbox.stream_frame(stream, last);
    conn.close_if_drained();
}

/// At a heartbeat tick: a stream whose producer is alive but had nothing to send gets a
/// stream HEARTBEAT, so that its client's stream timeout does not fire on a slow source.
pub(super) fn heartbeat_idle_streams(conn: &mut ServerConnection) {
    let (side, outbox) = (&mut conn.side, &mut conn.core.outbox);
    for (&id, stream) in &mut side.streams {
        if !stream.accepted || stream.push.is_some() {
            continue;
        }
        if !stream.sent_since_tick && stream.window > 0 && outbox.is_stream_empty(id) {
            outbox.stream_frame(id, &Frame::Heartbeat { stream: id });
        }
        stream.sent_since_tick = false;
    }
}

/// Ends the streams whose window has been at 0 without CREDIT for the stream timeout, and
/// schedules the next check for the earliest of the others.
pub(super) fn time_out_starved_streams(conn: &mut ServerConnection, now: Instant) {
    let timeout = conn.side.settings.timers.stream_timeout;
    let starved = conn.side.streams.iter().filter_map(|(&id, s)| {
        if let Some(push) = &s.push {
            // A push waits for the client's data only while the client may send.
            let waiting = s.accepted && !push.client_done && s.window > 0;
            return waiting.then_some((id, push.last_heard + timeout));
        }
        let since = s.starved_since.filter(|_| s.accepted)?;
        Some((id, since + timeout))
    });
    let (timed_out, next) = due_streams(starved, now);
    conn.core.stream_check = next;
    for id in timed_out {
        let ms = timeout.as_millis();
        let message = match conn.side.streams.get(&id).is_some_and(|s| s.push.is_some()) {
            true => format!("no data from the client for {ms} ms"),
            false => format!("no credit from the client for {ms} ms"),
        };
        let last = Frame::Error {
            stream: id,
            code: ErrorCode::TIMEOUT,
            message,
        };
        end_stream(conn, id, &last);
        conn.core
            .events
            .push_back(ServerEvent::StreamTimedOut { stream: id });
    }
}

/// Queues PROGRESS for every running stream, sending or waiting for credit.
pub(super) fn send_progress(conn: &mut ServerConnection, now: Instant) {
    conn.side.next_progress = Some(now + conn.side.settings.progress_interval);
    let (side, outbox) = (&mut conn.side, &mut conn.core.outbox);
    for (&stream, s) in &mut side.streams {
        if !s.accepted {
            continue;
        }
        s.sent_since_tick = true;
        let progress = Progress {
            bytes_sent: s.bytes,
            items: s.items,
        };
        outbox.stream_frame(stream, &Frame::Progress { stream, progress });
    }
}

/// What the application does with streams.
impl ServerConnection {
    /// Accepts a requested stream: queues INITIATED. `expected_bytes` is the total when known
    /// (`u64::MAX` otherwise); `zstd` is honoured only if the client accepts compression.
    pub fn accept(
        &mut self,
        stream: StreamId,
        expected_bytes: u64,
        zstd: bool,
    ) -> Result<(), CallError> {
        let s = self.stream_mut(stream)?;
        if s.accepted || s.push.is_some() {
            return Err(CallError::WrongState(stream));
        }
        s.accepted = true;
        s.zstd &= zstd;
        s.expected = expected_bytes;
        let zstd = s.zstd;
        self.core.outbox.stream_frame(
            stream,
            &Frame::Initiated {
                stream,
                zstd,
                expected_bytes,
            },
        );
        Ok(())
    }

    /// Refuses a requested stream, or fails an accepted one: queues ERROR and forgets it.
    pub fn reject(
        &mut self,
        stream: StreamId,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), CallError> {
        self.stream_mut(stream)?;
        let message = message.to_string();
        end_stream(
            self,
            stream,
            &Frame::Error {
                stream,
                code,
                message,
            },
        );
        Ok(())
    }

    /// How many data bytes the stream may send now: its window, capped by the largest chunk
    /// the client accepts. 0 when it must wait for credit (or does not exist).
    pub fn send_capacity(&self, stream: StreamId) -> usize {
        let max_chunk = self.side.handshake().map_or(0, |h| h.max_chunk);
        match self.side.streams.get(&stream) {
            Some(s) if s.accepted && s.push.is_none() => (s.window as usize).min(max_chunk),
            _ => 0,
        }
    }

    /// Whether the stream negotiated compression.
    pub fn is_compressed(&self, stream: StreamId) -> bool {
        self.side.streams.get(&stream).is_some_and(|s| s.zstd)
    }

    /// Queues one CHUNK: `raw` is the data (at most [`send_capacity`](Self::send_capacity)
    /// bytes, never empty); `compressed`, when the stream negotiated compression, is `raw` as
    /// one zstd frame. No data is copied.
    ///
    /// Data beyond what INITIATED announced is refused with [`CallError::BeyondAnnounced`],
    /// and nothing is queued: the caller fails the stream (`source_failed`).
    pub fn send_chunk(
        &mut self,
        stream: StreamId,
        raw: Bytes,
        compressed: Option<Bytes>,
        now: Instant,
    ) -> Result<(), CallError> {
        let capacity = self.send_capacity(stream);
        let max_chunk = self.side.handshake().map_or(0, |h| h.max_chunk);
        let stream_timeout = self.side.settings.timers.stream_timeout;
        let s = self.stream_mut(stream)?;
        if !s.accepted || s.push.is_some() {
            return Err(CallError::WrongState(stream));
        }
        if raw.is_empty() || raw.len() > capacity {
            return Err(CallError::NoCapacity {
                len: raw.len(),
                capacity,
            });
        }
        if s.expected != UNKNOWN && s.bytes + raw.len() as u64 > s.expected {
            return Err(CallError::BeyondAnnounced {
                announced: s.expected,
            });
        }
        let compressed = compressed.filter(|c| s.zstd && c.len() <= max_chunk);
        s.digest.update(&raw);
        s.window -= raw.len() as u64;
        s.bytes += raw.len() as u64;
        s.sent_since_tick = true;
        // Tells the client its window, not its reader, stopped the stream (PROTOCOL.md 6.3).
        let starved = s.window == 0;
        if starved {
            s.starved_since = Some(now);
        }
        let seq = s.seq;
        s.seq += 1;
        let data_len = raw.len() as u64;
        if starved {
            self.core.stream_check = earliest(self.core.stream_check, now + stream_timeout);
        }
        let arena = &mut self.side.header_arena;
        let (head, body) = match compressed {
            Some(c) => {
                let raw_len = Some(raw.len() as u32);
                (
                    frame::chunk_header_in(arena, stream, seq, raw_len, starved, c.len()),
                    c,
                )
            }
            None => (
                frame::chunk_header_in(arena, stream, seq, None, starved, raw.len()),
                raw,
            ),
        };
        self.core
            .outbox
            .stream_segments(stream, head, body, data_len);
        Ok(())
    }

    /// The source's item counters now: sent in the next PROGRESS (which goes out every
    /// `progress_interval` on its own).
    pub fn set_items(&mut self, stream: StreamId, items: ItemCounts) {
        if let Some(s) = self.side.streams.get_mut(&stream) {
            s.items = items;
        }
    }

    /// Queues a PROGRESS report with the stream's byte count and these item counters.
    pub fn progress(&mut self, stream: StreamId, items: ItemCounts) -> Result<(), CallError> {
        let s = self.stream_mut(stream)?;
        if !s.accepted {
            return Err(CallError::WrongState(stream));
        }
        s.sent_since_tick = true;
        let progress = Progress {
            bytes_sent: s.bytes,
            items,
        };
        self.core
            .outbox
            .stream_frame(stream, &Frame::Progress { stream, progress });
        Ok(())
    }

    /// Ends the stream successfully: queues COMPLETE with the byte and chunk counts and the
    /// digest of all data sent, plus the source's item counters. COMPLETE carries no data and
    /// never waits for window. Returns the digest sent.
    ///
    /// A stream that sent fewer bytes than INITIATED announced is refused with
    /// [`CallError::ShortOfAnnounced`] and nothing is queued: the caller fails it
    /// (`source_failed`), since a short copy must never look complete.
    pub fn complete(&mut self, stream: StreamId, items: ItemCounts) -> Result<u64, CallError> {
        let s = self.stream_mut(stream)?;
        if !s.accepted || s.push.is_some() {
            return Err(CallError::WrongState(stream));
        }
        if s.expected != UNKNOWN && s.bytes != s.expected {
            return Err(CallError::ShortOfAnnounced {
                announced: s.expected,
                produced: s.bytes,
            });
        }
        let completion = Completion {
            bytes: s.bytes,
            chunks: s.seq,
            digest: s.digest.value(),
            items,
        };
        let digest = completion.digest;
        let complete = Frame::Complete {
            stream,
            completion,
            report: None,
        };
        end_stream(self, stream, &complete);
        Ok(digest)
    }

    pub(super) fn stream_mut(&mut self, stream: StreamId) -> Result<&mut Stream, CallError> {
        if matches!(self.side.phase, Phase::Closed) {
            return Err(CallError::Closed);
        }
        self.side
            .streams
            .get_mut(&stream)
            .ok_or(CallError::UnknownStream(stream))
    }
}
