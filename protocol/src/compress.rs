//! Per-chunk zstd (PROTOCOL.md, "Compression"): compression for senders, and decompression
//! capped at the length the frame announces, which the receiver has already checked against
//! its window and frame limit. A chunk that inflates past that cap is rejected: no
//! decompression bombs.

use bytes::Bytes;

use crate::error::WireError;
use crate::types::ErrorCode;

/// Compresses one chunk at `level`; `None` when compression would not make it smaller
/// (send it raw then). One-shot: a sender of many chunks keeps a [`ChunkCompressor`].
pub fn compress_chunk(raw: &[u8], level: i32) -> Option<Bytes> {
    ChunkCompressor::new(level).compress(raw)
}

/// Decompresses a chunk that announced `raw_len` uncompressed bytes. Fails unless the data
/// is one valid zstd frame of exactly `raw_len` bytes; never allocates more than `raw_len`.
/// One-shot: a receiver of many chunks keeps a [`ChunkDecompressor`].
pub fn decompress_chunk(data: &[u8], raw_len: u32) -> Result<Bytes, WireError> {
    ChunkDecompressor::default().decompress(data, raw_len)
}

/// A zstd compression context kept across chunks, so that compressing a chunk does not
/// allocate and free a context each time.
pub struct ChunkCompressor {
    level: i32,
    context: Option<zstd::bulk::Compressor<'static>>,
}

impl ChunkCompressor {
    /// A compressor at `level`; its context is made on first use.
    pub fn new(level: i32) -> Self {
        ChunkCompressor {
            level,
            context: None,
        }
    }

    /// As [`compress_chunk`].
    pub fn compress(&mut self, raw: &[u8]) -> Option<Bytes> {
        if self.context.is_none() {
            self.context = zstd::bulk::Compressor::new(self.level).ok();
        }
        let out = self.context.as_mut()?.compress(raw).ok()?;
        (out.len() < raw.len()).then(|| Bytes::from(out))
    }
}

/// A zstd decompression context kept across chunks (one per connection).
#[derive(Default)]
pub struct ChunkDecompressor {
    context: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for ChunkDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecompressor").finish_non_exhaustive()
    }
}

impl ChunkDecompressor {
    /// As [`decompress_chunk`].
    pub fn decompress(&mut self, data: &[u8], raw_len: u32) -> Result<Bytes, WireError> {
        let fail = |why: String| WireError::new(ErrorCode::INTEGRITY_FAILURE, why);
        if self.context.is_none() {
            let context =
                zstd::bulk::Decompressor::new().map_err(|e| fail(format!("zstd init: {e}")))?;
            self.context = Some(context);
        }
        let Some(decompressor) = self.context.as_mut() else {
            return Err(fail("zstd init failed".into()));
        };
        let cap = raw_len as usize;
        let mut out = Vec::with_capacity(cap);
        let written = decompressor
            .decompress_to_buffer(data, &mut out)
            .map_err(|e| {
                fail(format!(
                    "compressed chunk does not inflate to {raw_len} bytes: {e}"
                ))
            })?;
        if written != cap {
            return Err(fail(format!(
                "compressed chunk inflated to {written} bytes, announced {raw_len}"
            )));
        }
        Ok(Bytes::from(out))
    }
}

/// Charges an arriving CHUNK (its uncompressed size) to the stream's window; one larger than
/// the window is a `flow_control_violation`, which closes the connection.
pub(crate) fn take_window(window: &mut u64, chunk: &crate::frame::Chunk) -> Result<(), WireError> {
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
    chunk: crate::frame::Chunk,
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
    if expected.limit != crate::types::UNKNOWN && expected.bytes + raw_len > expected.limit {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bomb_cap() {
        let raw = vec![7u8; 1 << 20];
        let packed = compress_chunk(&raw, 1).expect("runs of one byte compress");
        assert_eq!(decompress_chunk(&packed, raw.len() as u32).unwrap(), raw);
        // A frame announcing fewer bytes than it really inflates to is refused.
        let err = decompress_chunk(&packed, 1024).unwrap_err();
        assert_eq!(err.code, ErrorCode::INTEGRITY_FAILURE);
        // And one announcing more.
        assert!(decompress_chunk(&packed, (1 << 20) + 1).is_err());
        assert!(decompress_chunk(b"not zstd at all", 100).is_err());
    }

    #[test]
    fn kept_contexts_serve_many_chunks_and_survive_a_bad_one() {
        let mut packer = ChunkCompressor::new(1);
        let mut unpacker = ChunkDecompressor::default();
        for seed in 0..4u8 {
            let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8 ^ seed).collect();
            let packed = packer.compress(&raw).expect("compressible");
            assert_eq!(unpacker.decompress(&packed, raw.len() as u32).unwrap(), raw);
            assert!(unpacker.decompress(b"garbage", 10).is_err());
        }
    }

    #[test]
    fn incompressible_data_is_left_raw() {
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()) as u8)
            .collect();
        assert!(compress_chunk(&noise, 1).is_none());
    }
}
