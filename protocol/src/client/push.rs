//! The client's push streams (PROTOCOL.md 6.8): data goes to the server within the window it
//! grants with CREDIT, each CHUNK numbered and hashed; the client's COMPLETE states the counts
//! and digest, and the push succeeds only at the server's COMPLETE, which must state the same:
//! the server's promise that the data is kept.

use std::time::Instant;

use bytes::Bytes;

use super::{ClientConnection, ClientEvent, Outcome, Phase, Stream, StreamState};
use crate::conn::{earliest, MAX_WINDOW};
use crate::error::{CallError, WireError};
use crate::frame::{self, Frame, CHUNK_OVERHEAD_MAX};
use crate::machine::frame_name;
use crate::receive::{completion_mismatch, Expected};
use crate::types::{Completion, ErrorCode, ItemCounts, StreamId, StreamMap, UNKNOWN};

/// A frame from the server on a push stream, besides those a pull takes alike (INITIATED,
/// PROGRESS, HEARTBEAT, CANCELLED, ERROR: `stream::on_frame`).
pub(super) fn on_frame(
    conn: &mut ClientConnection,
    frame: Frame,
    now: Instant,
) -> Result<(), WireError> {
    let id = frame.stream();
    let timeout = conn.side.settings.timers.stream_timeout;
    let s = conn
        .side
        .streams
        .get_mut(&id)
        .expect("the caller found the stream");
    let live = matches!(s.state, StreamState::Open | StreamState::Initiating);
    match frame {
        Frame::Credit { increment, .. } => {
            if increment == 0 {
                return Err(WireError::protocol(format!("CREDIT of 0 on stream {id}")));
            }
            if s.state == StreamState::Initiating {
                return Err(WireError::protocol(format!(
                    "CREDIT before INITIATED on push {id}"
                )));
            }
            let window = s.window + u64::from(increment);
            if window > MAX_WINDOW {
                return Err(WireError::new(
                    ErrorCode::FLOW_CONTROL_VIOLATION,
                    format!("CREDIT takes push {id}'s window to {window}, above 2^31-1"),
                ));
            }
            if s.window == 0 {
                conn.core.stream_check = earliest(conn.core.stream_check, now + timeout);
            }
            s.window = window;
            if live {
                conn.core.events.push_back(ClientEvent::Credit {
                    stream: id,
                    increment,
                });
            }
            Ok(())
        }
        Frame::Complete {
            completion, report, ..
        } => {
            let finished = s.push.as_ref().is_some_and(|p| p.finished);
            let outcome = if !finished {
                Outcome::Error {
                    code: ErrorCode::PROTOCOL_ERROR,
                    message: "the server committed a push before the client's COMPLETE".into(),
                }
            } else {
                verify_commit(s, &completion)
            };
            if let (Some(text), Outcome::Complete(_)) = (report, &outcome) {
                conn.core
                    .events
                    .push_back(ClientEvent::Report { stream: id, text });
            }
            // A push cancelled after its COMPLETE may still be committed: then it is in place,
            // and saying "cancelled" would be wrong (PROTOCOL.md 6.8).
            if s.state == StreamState::Cancelling && finished {
                super::stream::report_now(conn, id, outcome);
            } else {
                super::stream::finish(conn, id, outcome);
            }
            Ok(())
        }
        other => Err(WireError::protocol(format!(
            "{} is not valid from a server on a push",
            frame_name(&other)
        ))),
    }
}

/// The server's COMPLETE must state what was sent.
fn verify_commit(s: &Stream, c: &Completion) -> Outcome {
    let expected = Expected {
        seq: s.next_seq,
        zstd: s.zstd,
        bytes: s.bytes,
        // The client held itself to its declared size when it sent.
        limit: UNKNOWN,
        kind: "push",
        limit_source: "",
    };
    let says = "the server committed";
    match completion_mismatch(c, s.digest.value(), &expected, says, "sent") {
        None => Outcome::Complete(*c),
        Some(message) => Outcome::Error {
            code: ErrorCode::INTEGRITY_FAILURE,
            message,
        },
    }
}

/// What the application does with push streams.
impl ClientConnection {
    /// How many data bytes the push may send now: its window, capped by the largest chunk the
    /// server accepts. 0 until INITIATED and CREDIT, while the window is closed, after
    /// [`finish_push`](Self::finish_push), or for a stream that is not a live push.
    pub fn push_capacity(&self, stream: StreamId) -> usize {
        let max_chunk = match &self.side.phase {
            Phase::Established(a) => a.max_frame_size as usize - CHUNK_OVERHEAD_MAX,
            _ => return 0,
        };
        match self.side.streams.get(&stream) {
            Some(s) if s.state == StreamState::Open => match &s.push {
                Some(p) if !p.finished => (s.window as usize).min(max_chunk),
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Queues one CHUNK of a push: `data` is at most [`push_capacity`](Self::push_capacity)
    /// bytes, never empty. It goes out behind the push's earlier chunks, round-robin with
    /// the other streams' frames; no data is copied.
    pub fn send_push_chunk(
        &mut self,
        stream: StreamId,
        data: Bytes,
        now: Instant,
    ) -> Result<(), CallError> {
        let capacity = self.push_capacity(stream);
        let timeout = self.side.settings.timers.stream_timeout;
        let (s, declared) = sending(&mut self.side.streams, stream)?;
        if data.is_empty() || data.len() > capacity {
            return Err(CallError::NoCapacity {
                len: data.len(),
                capacity,
            });
        }
        if declared != UNKNOWN && s.bytes + data.len() as u64 > declared {
            return Err(CallError::BeyondDeclared { declared });
        }
        s.digest.update(&data);
        s.window -= data.len() as u64;
        s.bytes += data.len() as u64;
        let seq = s.next_seq;
        s.next_seq += 1;
        let empty = s.window == 0;
        if empty {
            // Waiting for the server's CREDIT from now on: the stream timeout counts.
            s.last_heard = now;
            self.core.stream_check = earliest(self.core.stream_check, now + timeout);
        }
        let len = data.len();
        let head =
            frame::chunk_header_in(&mut self.side.header_arena, stream, seq, None, empty, len);
        self.core
            .outbox
            .stream_segments(stream, head, data, len as u64);
        Ok(())
    }

    /// Ends a push: queues the client's COMPLETE (counts and digest of all data sent) behind
    /// its last chunk. The push's `StreamEnd` comes with the server's answer: `Complete` once
    /// the server has made the data durable and stated the same counts and digest.
    pub fn finish_push(&mut self, stream: StreamId, now: Instant) -> Result<(), CallError> {
        let timeout = self.side.settings.timers.stream_timeout;
        let (s, declared) = sending(&mut self.side.streams, stream)?;
        if declared != UNKNOWN && s.bytes != declared {
            return Err(CallError::ShortOfDeclared {
                declared,
                sent: s.bytes,
            });
        }
        if let Some(push) = s.push.as_mut() {
            push.finished = true;
        }
        s.last_heard = now;
        let completion = Completion {
            bytes: s.bytes,
            chunks: s.next_seq,
            digest: s.digest.value(),
            items: ItemCounts::NOT_COUNTED,
        };
        self.core.outbox.stream_frame(
            stream,
            &Frame::Complete {
                stream,
                completion,
                report: None,
            },
        );
        self.core.stream_check = earliest(self.core.stream_check, now + timeout);
        Ok(())
    }

    /// Fails a live stream on this side's own finding (a push whose local source broke, say):
    /// its unsent data is dropped, CANCEL goes to the server, and its `StreamEnd` is this
    /// error, now.
    pub fn abort(
        &mut self,
        stream: StreamId,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), CallError> {
        let s = self
            .side
            .streams
            .get(&stream)
            .ok_or(CallError::UnknownStream(stream))?;
        if !matches!(s.state, StreamState::Open | StreamState::Initiating) {
            return Err(CallError::WrongState(stream));
        }
        if s.push.is_some() {
            self.core.outbox.discard(stream);
        }
        super::stream::send_cancel(self, stream, message.to_string());
        let message = message.to_string();
        super::stream::report(self, stream, Outcome::Error { code, message });
        Ok(())
    }
}

/// A push the client may still send on: open, its COMPLETE not yet sent. Returns the stream and
/// the size it declared.
fn sending(
    streams: &mut StreamMap<Stream>,
    stream: StreamId,
) -> Result<(&mut Stream, u64), CallError> {
    let s = streams
        .get_mut(&stream)
        .ok_or(CallError::UnknownStream(stream))?;
    match &s.push {
        Some(push) if s.state == StreamState::Open && !push.finished => {
            let declared = push.declared;
            Ok((s, declared))
        }
        _ => Err(CallError::WrongState(stream)),
    }
}
