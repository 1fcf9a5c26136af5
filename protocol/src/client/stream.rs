//! The client's streams (PROTOCOL.md section 6): INITIATE, chunks checked in order and
//! within the window, against the announced size and (at COMPLETE) the counts and digest,
//! CREDIT as the application consumes (with window growth), CANCEL, GOAWAY, the stream
//! timeout, and exactly one end reported per stream.

use crate::receive::{chunk_data, completion_mismatch, take_window, Expected};
use std::time::Instant;

use super::{ClientConnection, ClientEvent, Outcome, Phase, Stream, StreamRequest, StreamState};
use crate::conn::{self, earliest};
use crate::error::{CallError, WireError};
use crate::frame::{Chunk, Frame, Initiate};
use crate::machine::{due_streams, frame_name};
use crate::types::{Completion, ErrorCode, OperationId, StreamId, UNKNOWN};

/// What the application does with streams.
impl ClientConnection {
    /// Starts a stream: queues INITIATE.
    pub fn initiate(
        &mut self,
        request: StreamRequest,
        now: Instant,
    ) -> Result<StreamId, CallError> {
        let accept = match &self.side.phase {
            Phase::Closed => return Err(CallError::Closed),
            Phase::Established(accept) => accept,
            _ => return Err(CallError::NotReady),
        };
        if self.side.draining {
            return Err(CallError::Draining);
        }
        if self.side.streams.len() >= accept.max_streams as usize {
            return Err(CallError::TooManyStreams(accept.max_streams));
        }
        if request.paradata.len() > accept.max_paradata as usize {
            return Err(CallError::ParadataTooLong {
                len: request.paradata.len(),
                max: accept.max_paradata,
            });
        }
        if self.side.next_stream == u32::MAX {
            return Err(CallError::StreamIdsExhausted);
        }
        if request.push.is_some() && accept.version < crate::types::VERSION_PUSH {
            return Err(CallError::PushUnsupported(accept.version));
        }
        let stream = StreamId(self.side.next_stream);
        self.side.next_stream += 1;
        // A push's window is the server's to grant (CREDIT after INITIATED).
        let window = match request.push {
            Some(_) => 0,
            None => accept.initial_window.into(),
        };
        // A traceparent is a value, never truncated: one too long is left out (PROTOCOL.md 3).
        let traceparent = request
            .traceparent
            .filter(|t| t.len() <= crate::frame::MAX_TRACEPARENT_LEN);
        self.core.outbox.control(&Frame::Initiate(Initiate {
            stream,
            operation: request.operation,
            accept_zstd: request.accept_zstd,
            paradata: request.paradata,
            traceparent,
            push: request.push,
        }));
        self.side.streams.insert(
            stream,
            Stream {
                state: StreamState::Initiating,
                operation: request.operation,
                accept_zstd: request.accept_zstd,
                zstd: false,
                window,
                limit: window,
                unacknowledged: 0,
                window_emptied: false,
                next_seq: 0,
                bytes: 0,
                digest: conn::Digest::default(),
                last_heard: now,
                expected: UNKNOWN,
                push: request.push.map(|declared| super::PushOut {
                    declared,
                    finished: false,
                }),
            },
        );
        self.core.stream_check = earliest(
            self.core.stream_check,
            now + self.side.settings.timers.stream_timeout,
        );
        Ok(stream)
    }

    /// The application is done with `bytes` bytes of the stream's data: they count as window
    /// again. CREDIT goes out once a quarter of the initial window has been consumed.
    ///
    /// The window also grows here, doubling up to `max_window` (and ACCEPT's): when the
    /// server said a chunk used up the window (WINDOW_EMPTY) and the application, consuming,
    /// has read all but at most a quarter of the window, the window, not the reader, is what
    /// held the stream back. A stream whose reader lags keeps its window.
    ///
    /// CREDIT that reopens a window that was at 0 restarts the stream timeout at `now`: the
    /// server could not send while the window was closed.
    pub fn consume(&mut self, stream: StreamId, bytes: usize, now: Instant) {
        let (threshold, allowed) = self.side.accept().map_or((1, 0), |a| {
            (u64::from(a.initial_window / 4).max(1), a.max_window)
        });
        let max = u64::from(self.side.settings.max_window.min(allowed));
        let Some(s) = self.side.streams.get_mut(&stream) else {
            return;
        };
        if !matches!(s.state, StreamState::Open | StreamState::Initiating) || s.push.is_some() {
            return;
        }
        s.unacknowledged += bytes as u64;
        // Received and not yet consumed: the window's full size less what the server may
        // still send and what was consumed but not yet credited.
        let backlog = s.limit.saturating_sub(s.window + s.unacknowledged);
        let emptied = std::mem::take(&mut s.window_emptied);
        let mut growth = 0;
        if emptied && s.limit < max && backlog <= s.limit / 4 {
            let grown = (s.limit * 2).min(max);
            growth = grown - s.limit;
            s.limit = grown;
        }
        if s.unacknowledged >= threshold || growth > 0 {
            let increment = (s.unacknowledged + growth).min(u64::from(u32::MAX));
            s.unacknowledged -= increment - growth;
            if s.window == 0 {
                s.last_heard = now;
                self.core.stream_check = earliest(
                    self.core.stream_check,
                    now + self.side.settings.timers.stream_timeout,
                );
            }
            s.window += increment;
            self.core.outbox.control(&Frame::Credit {
                stream,
                increment: increment as u32,
            });
        }
    }

    /// Cancels one stream: queues CANCEL; no chunk of it is delivered from now on, and its
    /// `StreamEnd { outcome: Cancelled }` comes with the server's acknowledgement.
    pub fn cancel(&mut self, stream: StreamId, reason: &str) -> Result<(), CallError> {
        if self.is_closed() {
            return Err(CallError::Closed);
        }
        let s = self
            .side
            .streams
            .get_mut(&stream)
            .ok_or(CallError::UnknownStream(stream))?;
        if !matches!(s.state, StreamState::Open | StreamState::Initiating) {
            return Err(CallError::WrongState(stream));
        }
        s.state = StreamState::Cancelling;
        if s.push.is_some() {
            // Push data not yet written never goes out: the server drops the push anyway.
            self.core.outbox.discard(stream);
        }
        // Chunks decoded before the call but not yet polled are dropped too.
        self.core
            .events
            .retain(|e| !matches!(e, ClientEvent::Chunk { stream: s, .. } if *s == stream));
        let reason = reason.to_string();
        self.core.outbox.control(&Frame::Cancel {
            stream,
            operation: None,
            reason,
        });
        Ok(())
    }

    /// Cancels every stream of `operation` on this connection with one CANCEL frame.
    /// Returns how many streams it covered.
    pub fn cancel_operation(&mut self, operation: OperationId, reason: &str) -> usize {
        if !self.is_established() {
            return 0;
        }
        let mut covered = 0;
        for (&id, s) in self.side.streams.iter_mut() {
            if s.operation == operation
                && matches!(s.state, StreamState::Open | StreamState::Initiating)
            {
                s.state = StreamState::Cancelling;
                covered += 1;
                if s.push.is_some() {
                    self.core.outbox.discard(id);
                }
            }
        }
        if covered > 0 {
            let streams = &self.side.streams;
            self.core.events.retain(|e| match e {
                ClientEvent::Chunk { stream, .. } => streams
                    .get(stream)
                    .is_none_or(|s| s.state != StreamState::Cancelling),
                _ => true,
            });
            self.core.outbox.control(&Frame::Cancel {
                stream: StreamId::CONNECTION,
                operation: Some(operation),
                reason: reason.to_string(),
            });
        }
        covered
    }
}

/// Ends the streams that could receive (window above 0) and heard nothing for the stream
/// timeout, and schedules the next check for the earliest of the others.
pub(super) fn time_out_silent_streams(conn: &mut ClientConnection, now: Instant) {
    let timeout = conn.side.settings.timers.stream_timeout;
    let silent = conn.side.streams.iter().filter_map(|(&id, s)| {
        let live = matches!(s.state, StreamState::Initiating | StreamState::Open);
        // A pull waits while the server may send; a push while the server holds the window
        // closed or has its COMPLETE to answer.
        let waiting = match &s.push {
            None => s.window > 0,
            Some(p) => s.state == StreamState::Initiating || s.window == 0 || p.finished,
        };
        (live && waiting).then_some((id, s.last_heard + timeout))
    });
    let (timed_out, next) = due_streams(silent, now);
    conn.core.stream_check = next;
    for stream in timed_out {
        let ms = conn.side.settings.timers.stream_timeout.as_millis();
        send_cancel(conn, stream, format!("nothing received for {ms} ms"));
        report(conn, stream, Outcome::TimedOut);
    }
}

pub(super) fn send_cancel(conn: &mut ClientConnection, stream: StreamId, reason: String) {
    conn.core.outbox.control(&Frame::Cancel {
        stream,
        operation: None,
        reason,
    });
}

/// After GOAWAY: streams above the server's `last_stream` crossed it and will never run
/// here. They end now with `draining` (a cancelled one as `Cancelled`), so the application
/// can retry them elsewhere without waiting; a late answer for them is dropped.
fn end_unanswered(conn: &mut ClientConnection, last_stream: StreamId) {
    let mut ids: Vec<StreamId> = conn
        .side
        .streams
        .keys()
        .copied()
        .filter(|id| *id > last_stream)
        .collect();
    ids.sort();
    for id in ids {
        let outcome = if conn.side.streams[&id].state == StreamState::Cancelling {
            Outcome::Cancelled
        } else {
            Outcome::Error {
                code: ErrorCode::DRAINING,
                message: format!(
                    "the server is draining and did not take stream {id}; retry on another \
                     connection"
                ),
            }
        };
        report(conn, id, outcome);
        conn.side.streams.remove(&id);
    }
}

/// Tells the application how the stream ended, once; the entry stays until the server's
/// terminal frame if one is still due.
pub(super) fn report(conn: &mut ClientConnection, stream: StreamId, outcome: Outcome) {
    let Some(s) = conn.side.streams.get_mut(&stream) else {
        return;
    };
    if s.state == StreamState::Reported {
        return;
    }
    s.state = StreamState::Reported;
    let bytes_received = s.bytes;
    conn.core.events.push_back(ClientEvent::StreamEnd {
        stream,
        outcome,
        bytes_received,
    });
}

/// The server's terminal frame for a stream: report `outcome` as it is, even for a stream
/// being cancelled, and forget the stream.
pub(super) fn report_now(conn: &mut ClientConnection, stream: StreamId, outcome: Outcome) {
    report(conn, stream, outcome);
    conn.side.streams.remove(&stream);
}

/// The server's terminal frame for a stream: report `outcome` unless already reported
/// (a cancelled stream reports `Cancelled` whatever the server's last word was).
pub(super) fn finish(conn: &mut ClientConnection, stream: StreamId, outcome: Outcome) {
    let Some(s) = conn.side.streams.get(&stream) else {
        return;
    };
    let outcome = if s.state == StreamState::Cancelling {
        Outcome::Cancelled
    } else {
        outcome
    };
    report(conn, stream, outcome);
    conn.side.streams.remove(&stream);
}

pub(super) fn on_frame(
    conn: &mut ClientConnection,
    frame: Frame,
    now: Instant,
) -> Result<(), WireError> {
    let id = frame.stream();
    if !id.is_connection() && id.0 >= conn.side.next_stream {
        return Err(WireError::protocol(format!(
            "{} for stream {id}, which was never initiated",
            frame_name(&frame)
        )));
    }
    let Some(s) = conn.side.streams.get_mut(&id) else {
        return match frame {
            Frame::Heartbeat { .. } => Ok(()),
            Frame::GoAway {
                message,
                last_stream,
                ..
            } => {
                conn.side.draining = true;
                conn.core.events.push_back(ClientEvent::GoAway { message });
                end_unanswered(conn, last_stream);
                Ok(())
            }
            // Frames for a stream that ended (in flight when it ended) are dropped.
            _ if !id.is_connection() => Ok(()),
            other => Err(WireError::protocol(format!(
                "{} is not valid from a server here",
                frame_name(&other)
            ))),
        };
    };
    s.last_heard = now;
    let live = matches!(s.state, StreamState::Open | StreamState::Initiating);
    // What a pull and a push take alike.
    let frame = match frame {
        Frame::Progress { progress, .. } => {
            if live {
                conn.core.events.push_back(ClientEvent::Progress {
                    stream: id,
                    progress,
                });
            }
            return Ok(());
        }
        Frame::Initiated {
            zstd,
            expected_bytes,
            ..
        } => {
            if s.state == StreamState::Initiating {
                if zstd && !s.accept_zstd {
                    return Err(WireError::protocol(format!(
                        "INITIATED with compression on stream {id}, which did not accept it"
                    )));
                }
                s.state = StreamState::Open;
                s.zstd = zstd;
                // A push's size is the one the client declared.
                let expected_bytes = s.push.as_ref().map_or(expected_bytes, |p| p.declared);
                s.expected = expected_bytes;
                conn.core.events.push_back(ClientEvent::Initiated {
                    stream: id,
                    expected_bytes,
                });
            } else if live {
                return Err(WireError::protocol(format!(
                    "second INITIATED on stream {id}"
                )));
            }
            return Ok(());
        }
        Frame::Heartbeat { .. } => return Ok(()),
        Frame::Cancelled { .. } => {
            finish(conn, id, Outcome::Cancelled);
            return Ok(());
        }
        Frame::Error { code, message, .. } => {
            finish(conn, id, Outcome::Error { code, message });
            return Ok(());
        }
        other => other,
    };
    if s.push.is_some() {
        return super::push::on_frame(conn, frame, now);
    }
    match frame {
        Frame::Chunk(chunk) => on_chunk(conn, chunk),
        Frame::Complete {
            completion, report, ..
        } => {
            if report.is_some() {
                return Err(WireError::protocol(format!(
                    "COMPLETE with a report on pull stream {id}"
                )));
            }
            let outcome = if s.state == StreamState::Initiating {
                Outcome::Error {
                    code: ErrorCode::PROTOCOL_ERROR,
                    message: "COMPLETE before INITIATED".into(),
                }
            } else {
                verify_completion(s, &completion)
            };
            finish(conn, id, outcome);
            Ok(())
        }
        other => Err(WireError::protocol(format!(
            "{} is not valid from a server",
            frame_name(&other)
        ))),
    }
}

fn on_chunk(conn: &mut ClientConnection, chunk: Chunk) -> Result<(), WireError> {
    let id = chunk.stream;
    let s = conn
        .side
        .streams
        .get_mut(&id)
        .expect("caller checked the stream exists");
    take_window(&mut s.window, &chunk)?;
    s.window_emptied |= chunk.window_empty;
    match s.state {
        StreamState::Open => {}
        StreamState::Initiating => {
            return Err(WireError::protocol(format!(
                "CHUNK before INITIATED on stream {id}"
            )))
        }
        // Cancelled or already failed: dropped, never delivered.
        StreamState::Cancelling | StreamState::Reported => return Ok(()),
    }
    let expected = pull_expected(s);
    let data = chunk_data(&mut conn.side.unpacker, chunk, &expected);
    match data {
        Ok(data) => {
            s.next_seq += 1;
            s.bytes += data.len() as u64;
            s.digest.update(&data);
            conn.core
                .events
                .push_back(ClientEvent::Chunk { stream: id, data });
        }
        Err(why) => {
            // The stream is unusable: stop the producer and report the failure now.
            send_cancel(conn, id, why.clone());
            let code = ErrorCode::INTEGRITY_FAILURE;
            report(conn, id, Outcome::Error { code, message: why });
        }
    }
    Ok(())
}

fn verify_completion(s: &Stream, c: &Completion) -> Outcome {
    let expected = pull_expected(s);
    match completion_mismatch(c, s.digest.value(), &expected, "COMPLETE says", "received") {
        None => Outcome::Complete(*c),
        Some(message) => Outcome::Error {
            code: ErrorCode::INTEGRITY_FAILURE,
            message,
        },
    }
}

/// What a pull's next CHUNK (or its COMPLETE) is checked against.
fn pull_expected(s: &Stream) -> Expected<'static> {
    Expected {
        seq: s.next_seq,
        zstd: s.zstd,
        bytes: s.bytes,
        limit: s.expected,
        kind: "stream",
        limit_source: "INITIATED announced",
    }
}
