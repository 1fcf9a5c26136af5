//! Per-chunk zstd (PROTOCOL.md, "Compression"): compression for senders, and decompression
//! capped at the length the frame announces, which the receiver has already checked against
//! its window and frame limit. A chunk that inflates past that cap is rejected: no
//! decompression bombs.

use bytes::Bytes;

use crate::error::WireError;
use crate::types::ErrorCode;

/// Compresses one chunk at `level`; `None` when compression would not make it smaller
/// (send it raw then).
pub fn compress_chunk(raw: &[u8], level: i32) -> Option<Bytes> {
    let out = zstd::bulk::compress(raw, level).ok()?;
    (out.len() < raw.len()).then(|| Bytes::from(out))
}

/// Decompresses a chunk that announced `raw_len` uncompressed bytes. Fails unless the data
/// is one valid zstd frame of exactly `raw_len` bytes; never allocates more than `raw_len`.
pub fn decompress_chunk(data: &[u8], raw_len: u32) -> Result<Bytes, WireError> {
    let cap = raw_len as usize;
    let mut out = Vec::with_capacity(cap);
    let fail = |why: String| WireError::new(ErrorCode::INTEGRITY_FAILURE, why);
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|e| fail(format!("zstd init: {e}")))?;
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
    fn incompressible_data_is_left_raw() {
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()) as u8)
            .collect();
        assert!(compress_chunk(&noise, 1).is_none());
    }
}
