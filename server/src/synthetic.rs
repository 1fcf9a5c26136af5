//! Deterministic pseudo-random bytes for `synthetic:SIZE[?seed=S]`: byte `i` of a stream
//! depends only on the seed and `i`, so any range (a resumed or split pull) can be generated
//! on its own, and a client can recompute the digest independently.
//!
//! Every stream is one pseudo-random sequence of [`PERIOD`] bytes, repeated, and entered at
//! an offset chosen by the seed: byte `i` of the stream with seed `s` is byte
//! `(i + rotation(s)) % PERIOD` of the sequence, whose aligned 8-byte word `w` is
//! `word(BASE, w)`, a SplitMix64 finaliser. So a shard keeps one tile of
//! `PERIOD + MAX_CHUNK` bytes for all seeds and sends slices of it: the source costs nothing
//! per chunk (iperf3 also resends one buffer), every chunk of at most [`MAX_CHUNK`] bytes is
//! a zero-copy slice, and a thousand streams of different seeds share 2 MiB that stays in
//! cache. Chunks are never compressible on their own, since one chunk never repeats within
//! itself. Different seeds give different streams (the same bytes at another offset; two
//! seeds in a million share one).

/// The period of every synthetic stream, in bytes.
pub const PERIOD: u64 = 1 << 20;

/// The longest chunk the synthetic source hands out: a slice of a tile of
/// `PERIOD + MAX_CHUNK` bytes.
pub const MAX_CHUNK: usize = 1 << 20;

/// The key of the one sequence every stream is a rotation of.
const BASE: u64 = 0x4E58_5321_5359_4E54;

/// Where in the sequence the stream with this seed starts.
pub fn rotation(seed: u64) -> u64 {
    word(seed, u64::MAX) % PERIOD
}

/// The 8 bytes (little-endian) of aligned word `index` of the generator with this key.
#[inline]
pub fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with bytes `offset..` of the stream with this seed.
pub fn stream_bytes(seed: u64, offset: u64, out: &mut [u8]) {
    let mut done = 0;
    let mut at = tile_offset(seed, offset) as u64;
    while done < out.len() {
        let n = ((PERIOD - at) as usize).min(out.len() - done);
        fill(BASE, at, &mut out[done..done + n]);
        done += n;
        at = 0;
    }
}

/// Where byte `offset` of the stream with this seed is in the [`tile`].
pub fn tile_offset(seed: u64, offset: u64) -> usize {
    ((offset % PERIOD + rotation(seed)) % PERIOD) as usize
}

/// The tile: bytes `0..PERIOD + MAX_CHUNK` of the sequence, so that any chunk of at most
/// `MAX_CHUNK` bytes of any stream is `tile[tile_offset(seed, offset)..][..len]`.
pub fn tile() -> Vec<u8> {
    let period = PERIOD as usize;
    let mut out = vec![0u8; period + MAX_CHUNK];
    fill(BASE, 0, &mut out[..period]);
    out.copy_within(..MAX_CHUNK, period);
    out
}

/// Fills `out` with the bytes of the generator with key `seed` from byte `offset` on (no
/// period): also a plain pseudo-random fill for test files.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let mut pos = 0usize;
    let mut at = offset;
    // Leading bytes up to the next word boundary.
    while pos < out.len() && at % 8 != 0 {
        out[pos] = word(seed, at / 8).to_le_bytes()[(at % 8) as usize];
        pos += 1;
        at += 1;
    }
    let mut words = out[pos..].chunks_exact_mut(8);
    let mut index = at / 8;
    for w in &mut words {
        w.copy_from_slice(&word(seed, index).to_le_bytes());
        index += 1;
    }
    let tail = words.into_remainder();
    let last = word(seed, index).to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_equals_the_same_slice_of_the_whole() {
        let mut whole = vec![0u8; 1000];
        fill(42, 0, &mut whole);
        for (start, len) in [
            (0, 1000),
            (1, 7),
            (3, 64),
            (8, 8),
            (13, 500),
            (999, 1),
            (500, 0),
        ] {
            let mut part = vec![0u8; len];
            fill(42, start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "range {start}+{len}");
        }
    }

    #[test]
    fn the_stream_repeats_with_its_period_and_tiles_match() {
        let mut a = vec![0u8; 300];
        let mut b = vec![0u8; 300];
        stream_bytes(9, PERIOD - 100, &mut a);
        stream_bytes(9, 5 * PERIOD - 100, &mut b);
        assert_eq!(a, b);
        let mut first = vec![0u8; 200];
        stream_bytes(9, 0, &mut first);
        assert_eq!(a[100..], first[..]);
        let t = tile();
        let at = tile_offset(9, PERIOD - 100);
        assert_eq!(t[at..][..300], a[..]);
        // Any chunk of any stream is one slice of the tile.
        for (seed, offset, len) in [
            (0, 0, MAX_CHUNK),
            (7, 12_345, 4096),
            (u64::MAX, 3 * PERIOD - 1, MAX_CHUNK),
        ] {
            let mut want = vec![0u8; len];
            stream_bytes(seed, offset, &mut want);
            let at = tile_offset(seed, offset);
            assert!(t[at..at + len] == want[..], "seed {seed} offset {offset}");
        }
    }

    #[test]
    fn seeds_differ_and_bytes_look_random() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        stream_bytes(1, 0, &mut a);
        stream_bytes(2, 0, &mut b);
        assert_ne!(a, b);
        let rotations: std::collections::HashSet<u64> = (0..1000).map(rotation).collect();
        assert!(
            rotations.len() >= 999,
            "seeds should start at distinct offsets"
        );
        // Every byte value shows up in 4 KiB of good noise; a constant or counter would not.
        let mut seen = [false; 256];
        a.iter().for_each(|x| seen[*x as usize] = true);
        assert!(seen.iter().filter(|s| **s).count() > 240);
    }
}
