//! Streams pulled through a real server on 127.0.0.1, on both IO backends: files whole and in
//! ranges, synthetic data with its digest, many streams and many connections.
#![allow(clippy::unwrap_used)]

use nexus_protocol::{ErrorCode, Outcome};
use nexus_server::synthetic;
use nexus_testkit::{
    both_backends, digest, start_server, synthetic_bytes, write_pattern_file, Client, TempDir,
};

fn file_pulled_byte_exact(backend: nexus_server::Backend) {
    let dir = TempDir::new("file");
    let data = write_pattern_file(&dir.path().join("big.bin"), 256 << 20, 7);
    let server = start_server(backend, dir.path());
    let mut client = Client::connect(server.local_addr());
    let pulled = client.pull("file:big.bin");
    let completion = pulled.completion();
    assert_eq!(completion.bytes, data.len() as u64);
    assert_eq!(pulled.expected_bytes, Some(data.len() as u64));
    assert_eq!(completion.digest, digest(&data));
    assert!(pulled.data == data, "256 MiB differ");
}
both_backends!(file_256_mib_byte_exact, file_pulled_byte_exact);

fn range_and_empty(backend: nexus_server::Backend) {
    let dir = TempDir::new("range");
    let data = write_pattern_file(&dir.path().join("f.bin"), 3_000_001, 3);
    std::fs::write(dir.path().join("empty.bin"), b"").unwrap();
    let server = start_server(backend, dir.path());
    let mut client = Client::connect(server.local_addr());
    let range = client.pull("file:f.bin?offset=1000003&length=1500000");
    assert_eq!(range.completion().bytes, 1_500_000);
    assert!(range.data == data[1_000_003..2_500_003]);
    let tail = client.pull("file:f.bin?offset=2999999");
    assert_eq!(tail.data, data[2_999_999..]);
    let empty = client.pull("file:empty.bin");
    assert_eq!(empty.completion().bytes, 0);
    assert_eq!(empty.completion().chunks, 0);
    assert_eq!(empty.chunks, 0);
    let beyond = client.pull("file:f.bin?offset=10&length=3000000");
    assert_eq!(beyond.error().0, ErrorCode::BAD_PARADATA);
}
both_backends!(range_and_empty_files, range_and_empty);

fn synthetic_with_digest(backend: nexus_server::Backend) {
    let dir = TempDir::new("synthetic");
    let server = start_server(backend, dir.path());
    let mut client = Client::connect(server.local_addr());
    let size = 5 * synthetic::PERIOD as usize + 12_345;
    let pulled = client.pull(&format!("synthetic:{size}?seed=99"));
    let expected = synthetic_bytes(99, size);
    assert!(
        pulled.data == expected,
        "synthetic bytes differ from the generator"
    );
    assert_eq!(pulled.completion().digest, digest(&expected));
    let other_seed = client.pull("synthetic:1KiB?seed=100");
    assert_ne!(other_seed.data[..], expected[..1024]);
    let zero = client.pull("synthetic:0");
    assert_eq!(zero.completion().bytes, 0);
}
both_backends!(
    synthetic_matches_generator_and_digest,
    synthetic_with_digest
);

fn many_streams_one_connection(backend: nexus_server::Backend) {
    let dir = TempDir::new("mux");
    let server = start_server(backend, dir.path());
    let mut client = Client::connect(server.local_addr());
    let paradata: Vec<String> = (0..64)
        .map(|i| format!("synthetic:{}?seed={i}", 100_000 + i * 37_000))
        .collect();
    let pulled = client.pull_all(&paradata);
    for (i, p) in pulled.iter().enumerate() {
        let size = 100_000 + i * 37_000;
        let expected = synthetic_bytes(i as u64, size);
        assert!(p.data == expected, "stream {i} differs");
        assert_eq!(p.completion().digest, digest(&expected));
    }
    nexus_testkit::wait_until("all streams closed on the server", || {
        server.stats().streams_open == 0
    });
    let stats = server.stats();
    assert_eq!(stats.streams_complete, 64);
    assert_eq!(stats.producers_dropped, 64);
}
both_backends!(
    sixty_four_streams_on_one_connection,
    many_streams_one_connection
);

fn many_connections(backend: nexus_server::Backend) {
    let dir = TempDir::new("conns");
    let server = start_server(backend, dir.path());
    let address = server.local_addr();
    let mut clients: Vec<Client> = (0..200).map(|_| Client::connect(address)).collect();
    let streams: Vec<_> = clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.initiate(&format!("synthetic:{}?seed={i}", 64 << 10)))
        .collect();
    assert_eq!(server.stats().connections_total, 200);
    for (i, (client, stream)) in clients.iter_mut().zip(streams).enumerate() {
        let pulled = client.finish(&[stream]).remove(&stream).unwrap();
        let expected = synthetic_bytes(i as u64, 64 << 10);
        assert!(pulled.data == expected, "connection {i} got wrong bytes");
        assert!(matches!(pulled.outcome, Outcome::Complete(_)));
    }
    drop(clients);
    nexus_testkit::wait_until("all connections closed on the server", || {
        server.stats().connections_open == 0
    });
}
both_backends!(two_hundred_connections, many_connections);

/// A zstd stream is compressed ahead on the packer's workers, at most
/// `packer_concurrency` chunks at once, and arrives byte-exact and in order.
fn compressed_with_packer(backend: nexus_server::Backend, concurrency: usize) {
    let dir = TempDir::new("zstd");
    let data = nexus_testkit::log_text_bytes(16 << 20);
    std::fs::write(dir.path().join("text.log"), &data).unwrap();
    let mut config = nexus_testkit::test_config(backend, dir.path());
    // A 4 MiB window holds 16 of these chunks: the queue, not the window, is the limit.
    config.chunk_size = 256 << 10;
    config.packer_concurrency = concurrency;
    let server = nexus_testkit::start_with(config, nexus_testkit::builtin_registry(dir.path()));
    let mut client = Client::connect(server.local_addr());

    let stream = client.initiate_request(nexus_protocol::StreamRequest {
        paradata: "file:text.log".into(),
        accept_zstd: true,
        ..Default::default()
    });
    let pulled = client.finish(&[stream]).remove(&stream).unwrap();
    assert_eq!(pulled.completion().digest, digest(&data));
    assert!(pulled.data == data, "decompressed bytes differ");
    let stats = server.stats();
    assert_eq!(stats.chunks_sent, 64);
    assert_eq!(stats.chunks_compressed, 64, "every text chunk compresses");
    assert_eq!(stats.packer_peak, concurrency as u64);

    // Without zstd the same file goes raw, one chunk prepared at a time.
    let raw = client.pull("file:text.log");
    assert!(raw.data == data);
    assert_eq!(server.stats().chunks_compressed, 64);
}

fn packer_one(backend: nexus_server::Backend) {
    compressed_with_packer(backend, 1);
}
both_backends!(zstd_stream_packer_concurrency_one, packer_one);

fn packer_three(backend: nexus_server::Backend) {
    compressed_with_packer(backend, 3);
}
both_backends!(zstd_stream_packer_concurrency_three, packer_three);
