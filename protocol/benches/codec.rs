//! Codec throughput: encode and decode of 1 MiB chunks, and the digest the client computes.
//! `cargo bench -p nexus-protocol --bench codec`; bytes/s are printed per benchmark.
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed assertion here.

use bytes::{Bytes, BytesMut};
use divan::counter::BytesCount;
use divan::Bencher;
use nexus_protocol::frame::{self, Chunk, Frame};
use nexus_protocol::StreamId;

const CHUNK: usize = 1 << 20;

fn main() {
    divan::main();
}

/// The data path's encode: a header segment in front of the data, which is not copied.
#[divan::bench]
fn encode_chunk_header(bencher: Bencher) {
    let mut arena = BytesMut::new();
    bencher.counter(BytesCount::new(CHUNK)).bench_local(|| {
        frame::chunk_header_in(
            &mut arena,
            divan::black_box(StreamId(1)),
            7,
            None,
            false,
            CHUNK,
        )
    });
}

/// A copying encode of the whole frame, for comparison.
#[divan::bench]
fn encode_chunk_copying(bencher: Bencher) {
    let frame = Frame::Chunk(Chunk {
        stream: StreamId(1),
        seq: 7,
        raw_len: None,
        window_empty: false,
        data: Bytes::from(vec![7u8; CHUNK]),
    });
    let mut buf = BytesMut::with_capacity(CHUNK + 64);
    bencher.counter(BytesCount::new(CHUNK)).bench_local(|| {
        buf.clear();
        frame.encode(&mut buf);
    });
}

/// Decode of a 1 MiB CHUNK from a receive buffer (zero-copy split).
#[divan::bench]
fn decode_chunk(bencher: Bencher) {
    let wire = Frame::Chunk(Chunk {
        stream: StreamId(1),
        seq: 7,
        raw_len: None,
        window_empty: false,
        data: Bytes::from(vec![7u8; CHUNK]),
    })
    .to_bytes();
    bencher
        .counter(BytesCount::new(CHUNK))
        .with_inputs(|| BytesMut::from(&wire[..]))
        .bench_local_values(|mut buf| frame::decode(&mut buf, u32::MAX));
}

/// xxh3-64 over 1 MiB with twox-hash (AVX2 picked at run time): what each side
/// pays per byte for the whole-stream digest.
#[divan::bench]
fn digest_xxh3(bencher: Bencher) {
    use std::hash::Hasher;
    let data = vec![7u8; CHUNK];
    bencher.counter(BytesCount::new(CHUNK)).bench(|| {
        let mut h = twox_hash::XxHash3_64::with_seed(0);
        h.write(divan::black_box(&data));
        h.finish()
    });
}

/// The same with xxhash-rust, held to SSE2 in a portable build: the baseline.
#[divan::bench]
fn digest_xxh3_sse2_reference(bencher: Bencher) {
    let data = vec![7u8; CHUNK];
    bencher.counter(BytesCount::new(CHUNK)).bench(|| {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(divan::black_box(&data));
        h.digest()
    });
}
