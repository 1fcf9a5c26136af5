//! The server's push streams (PROTOCOL.md 6.8): the mirror of a pull. The server grants the
//! window (CREDIT, starting with the one sent with INITIATED), checks each CHUNK the client
//! sends against it, its sequence, its compression and the declared size, and at the client's
//! COMPLETE checks the counts and digest. Only then may the application make the data durable
//! and [`commit`](ServerConnection::commit): the server's COMPLETE is the promise that the
//! data is kept.

use crate::receive::{chunk_data, completion_mismatch, take_window, Expected};
use std::time::Instant;

use super::{ServerConnection, ServerEvent, Stream};
use crate::conn::earliest;
use crate::error::{CallError, WireError};
use crate::frame::{Chunk, Frame};
use crate::types::{Completion, ErrorCode, StreamId};

/// A CHUNK from the client: only on an accepted push stream, within the window it was granted.
pub(super) fn on_chunk(
    conn: &mut ServerConnection,
    chunk: Chunk,
    now: Instant,
) -> Result<(), WireError> {
    let id = chunk.stream;
    let timeout = conn.side.settings.timers.stream_timeout;
    let Some(s) = conn.side.streams.get_mut(&id) else {
        return Ok(()); // The stream ended while the chunk was in flight.
    };
    let Some(push) = s.push.as_mut() else {
        return Err(WireError::protocol(format!(
            "CHUNK from the client on pull stream {id}"
        )));
    };
    take_window(&mut s.window, &chunk)?;
    if push.client_done {
        return Err(WireError::protocol(format!(
            "CHUNK after the client's COMPLETE on stream {id}"
        )));
    }
    push.last_heard = now;
    let expected = expected(s.seq, s.zstd, s.bytes, push.declared);
    let data = chunk_data(&mut conn.side.unpacker, chunk, &expected);
    match data {
        Ok(data) => {
            let s = stream(conn, id);
            s.seq += 1;
            s.bytes += data.len() as u64;
            s.digest.update(&data);
            if s.window > 0 {
                conn.core.stream_check = earliest(conn.core.stream_check, now + timeout);
            }
            conn.core
                .events
                .push_back(ServerEvent::PushChunk { stream: id, data });
        }
        Err(why) => fail(conn, id, ErrorCode::INTEGRITY_FAILURE, why),
    }
    Ok(())
}

/// The client's COMPLETE on a push: it has sent everything; the counts and digest it states
/// must be what arrived, and the size what it declared.
pub(super) fn on_complete(
    conn: &mut ServerConnection,
    id: StreamId,
    completion: Completion,
    now: Instant,
) -> Result<(), WireError> {
    let Some(s) = conn.side.streams.get_mut(&id) else {
        return Ok(()); // Ended (cancelled, failed) while the COMPLETE was in flight.
    };
    let Some(push) = s.push.as_mut() else {
        return Err(WireError::protocol(format!(
            "COMPLETE from the client on pull stream {id}"
        )));
    };
    if !s.accepted || push.client_done {
        return Err(WireError::protocol(format!(
            "COMPLETE from the client on stream {id} {}",
            if push.client_done {
                "twice"
            } else {
                "before INITIATED"
            }
        )));
    }
    push.last_heard = now;
    let expected = expected(s.seq, s.zstd, s.bytes, push.declared);
    let digest = s.digest.value();
    let mismatch = completion_mismatch(&completion, digest, &expected, "COMPLETE says", "received");
    match mismatch {
        Some(why) => fail(conn, id, ErrorCode::INTEGRITY_FAILURE, why),
        None => {
            push.client_done = true;
            conn.core.events.push_back(ServerEvent::PushEnded {
                stream: id,
                completion,
            });
        }
    }
    Ok(())
}

fn stream(conn: &mut ServerConnection, id: StreamId) -> &mut Stream {
    conn.side
        .streams
        .get_mut(&id)
        .expect("the caller found the stream")
}

/// Fails a push on the protocol's own finding: ERROR to the client, `StreamFailed` to the
/// application.
fn fail(conn: &mut ServerConnection, stream: StreamId, code: ErrorCode, message: String) {
    let last = Frame::Error {
        stream,
        code,
        message: message.clone(),
    };
    super::stream::end_stream(conn, stream, &last);
    conn.core.events.push_back(ServerEvent::StreamFailed {
        stream,
        code,
        message,
    });
}

/// What the application does with push streams.
impl ServerConnection {
    /// Accepts a requested push: queues INITIATED (echoing the declared size) and CREDIT for
    /// the push window. `zstd`: whether compressed chunks are welcome (honoured only if the
    /// client asked for it).
    pub fn accept_push(
        &mut self,
        stream: StreamId,
        zstd: bool,
        now: Instant,
    ) -> Result<(), CallError> {
        let window = self.side.settings.push_window.max(1);
        let timeout = self.side.settings.timers.stream_timeout;
        let s = self.stream_mut(stream)?;
        let Some(push) = s.push.as_mut() else {
            return Err(CallError::WrongState(stream));
        };
        if s.accepted {
            return Err(CallError::WrongState(stream));
        }
        s.accepted = true;
        s.zstd &= zstd;
        s.window = u64::from(window);
        push.last_heard = now;
        let (zstd, expected_bytes) = (s.zstd, push.declared);
        let outbox = &mut self.core.outbox;
        outbox.stream_frame(
            stream,
            &Frame::Initiated {
                stream,
                zstd,
                expected_bytes,
            },
        );
        outbox.stream_frame(
            stream,
            &Frame::Credit {
                stream,
                increment: window,
            },
        );
        self.core.stream_check = earliest(self.core.stream_check, now + timeout);
        Ok(())
    }

    /// The sink is done with `bytes` more bytes of the push: they count as window again.
    /// CREDIT goes out once a quarter of the push window has been released.
    pub fn release(&mut self, stream: StreamId, bytes: usize, now: Instant) {
        let batch = u64::from(self.side.settings.push_window / 4).max(1);
        let timeout = self.side.settings.timers.stream_timeout;
        let Some(s) = self.side.streams.get_mut(&stream) else {
            return;
        };
        let Some(push) = s.push.as_mut() else {
            return;
        };
        push.released += bytes as u64;
        if push.released < batch || push.client_done {
            return;
        }
        let increment = push.released.min(u64::from(u32::MAX));
        push.released -= increment;
        if s.window == 0 {
            // The client could not send while the window was closed.
            push.last_heard = now;
            self.core.stream_check = earliest(self.core.stream_check, now + timeout);
        }
        s.window += increment;
        self.core.outbox.stream_frame(
            stream,
            &Frame::Credit {
                stream,
                increment: increment as u32,
            },
        );
    }

    /// Ends a push successfully: the sink holds all of it durably. Queues COMPLETE with the
    /// counts and digest of what arrived. Only after the client's COMPLETE
    /// ([`ServerEvent::PushEnded`]). `report`, when given, goes with it (flag REPORT): what
    /// the sink has to say, e.g. how each replica ended. Returns the digest committed.
    pub fn commit(&mut self, stream: StreamId, report: Option<String>) -> Result<u64, CallError> {
        let s = self.stream_mut(stream)?;
        if !s.push.as_ref().is_some_and(|p| p.client_done) {
            return Err(CallError::WrongState(stream));
        }
        let completion = Completion {
            bytes: s.bytes,
            chunks: s.seq,
            digest: s.digest.value(),
            items: s.items,
        };
        let digest = completion.digest;
        let complete = Frame::Complete {
            stream,
            completion,
            report,
        };
        super::stream::end_stream(self, stream, &complete);
        Ok(digest)
    }
}

/// What a push's next CHUNK (or the client's COMPLETE) is checked against.
fn expected(seq: u64, zstd: bool, bytes: u64, declared: u64) -> Expected<'static> {
    Expected {
        seq,
        zstd,
        bytes,
        limit: declared,
        kind: "push",
        limit_source: "it declared",
    }
}
