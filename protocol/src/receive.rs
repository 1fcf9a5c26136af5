//! What the receiving end of a stream checks, the same in both directions (a client's pull,
//! a server's push): each CHUNK against the window, the sequence, the agreed compression and
//! the size limit; the sender's COMPLETE against what arrived (PROTOCOL.md 6.3, 6.8).

use bytes::Bytes;

use crate::compress::ChunkDecompressor;
use crate::error::WireError;
use crate::frame::Chunk;
use crate::types::{Completion, ErrorCode, UNKNOWN};

/// Why a COMPLETE does not state what this side has (`expected.bytes` data bytes in
/// `expected.seq` chunks hashing to `digest`), or None when it does. A stream short of its
/// limit fails first. `says` and `had` word the message ("COMPLETE says" ... "received").
pub(crate) fn completion_mismatch(
    c: &Completion,
    digest: u64,
    expected: &Expected<'_>,
    says: &str,
    had: &str,
) -> Option<String> {
    let (bytes, chunks) = (expected.bytes, expected.seq);
    if expected.limit != UNKNOWN && bytes != expected.limit {
        Some(format!(
            "the {} ended after {bytes} of the {} bytes {}",
            expected.kind, expected.limit, expected.limit_source
        ))
    } else if c.bytes != bytes {
        Some(format!("{says} {} bytes, {had} {bytes}", c.bytes))
    } else if c.chunks != chunks {
        Some(format!("{says} {} chunks, {had} {chunks}", c.chunks))
    } else if c.digest != digest {
        Some(format!(
            "digest mismatch: {says} {:016x}, {had} data hashes to {digest:016x}",
            c.digest
        ))
    } else {
        None
    }
}

/// Charges an arriving CHUNK (its uncompressed size) to the stream's window; one larger than
/// the window is a `flow_control_violation`, which closes the connection.
pub(crate) fn take_window(window: &mut u64, chunk: &Chunk) -> Result<(), WireError> {
    let raw_len = chunk.raw_len.map_or(chunk.data.len(), |n| n as usize) as u64;
    if raw_len > *window {
        return Err(WireError::new(
            ErrorCode::FLOW_CONTROL_VIOLATION,
            format!(
                "CHUNK of {raw_len} bytes on stream {} exceeds its window of {window}",
                chunk.stream
            ),
        ));
    }
    *window -= raw_len;
    Ok(())
}

/// What the receiver of a stream knows when a CHUNK arrives (either direction).
pub(crate) struct Expected<'a> {
    /// The sequence number the chunk must carry.
    pub(crate) seq: u64,
    /// Whether compressed chunks were agreed for the stream.
    pub(crate) zstd: bool,
    /// Data bytes so far, and the most the stream may carry (`UNKNOWN`: no limit).
    pub(crate) bytes: u64,
    pub(crate) limit: u64,
    /// "stream" or "push", for the messages.
    pub(crate) kind: &'a str,
    /// How the limit was set, for the message ("INITIATED announced", "it declared").
    pub(crate) limit_source: &'a str,
}

/// The data of a CHUNK that the stream may take (decompressed when it was compressed), or
/// why it fails the stream with `integrity_failure`: a sequence gap or duplicate, compression
/// not agreed, an empty chunk, data past the limit, a bad zstd frame. The window is the
/// caller's (it closes the connection, not the stream).
pub(crate) fn chunk_data(
    unpacker: &mut ChunkDecompressor,
    chunk: Chunk,
    expected: &Expected<'_>,
) -> Result<Bytes, String> {
    let raw_len = chunk.raw_len.map_or(chunk.data.len(), |n| n as usize) as u64;
    let kind = expected.kind;
    if chunk.seq != expected.seq {
        let what = if chunk.seq < expected.seq {
            "duplicate"
        } else {
            "gap"
        };
        return Err(format!(
            "sequence {what}: expected chunk {}, got {}",
            expected.seq, chunk.seq
        ));
    }
    if chunk.raw_len.is_some() && !expected.zstd {
        return Err(format!("compressed CHUNK on a {kind} without compression"));
    }
    if chunk.raw_len.is_none() && chunk.data.is_empty() {
        return Err("empty CHUNK".into());
    }
    if expected.limit != UNKNOWN && expected.bytes + raw_len > expected.limit {
        return Err(format!(
            "the {kind} goes past the {} bytes {}",
            expected.limit, expected.limit_source
        ));
    }
    match chunk.raw_len {
        None => Ok(chunk.data),
        Some(raw) => unpacker.decompress(&chunk.data, raw).map_err(|e| e.message),
    }
}
