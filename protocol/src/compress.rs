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
