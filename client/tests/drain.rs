//! A server drained under running pulls that credit as they read (PROTOCOL.md 6.3's advice):
//! every stream completes byte-exact. The server must close as TCP expects (flush, FIN, read
//! until the client's FIN); closing with the client's last CREDIT unread would reset the
//! connection and drop the tail of the streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::time::Duration;

use nexus_client::{Client, ClientConfig, ClientSettings, Item, Outcome, StreamOptions};
use nexus_server::{Backend, ServerConfig};
use nexus_testkit::{
    both_backends, builtin_registry, digest, start_with, synthetic_bytes, test_config, wait_until,
    TempDir,
};

const STREAMS: usize = 8;
const SIZE: usize = 3 << 20;
const ROUNDS: usize = 20;

fn drain_under_crediting_pulls(backend: Backend) {
    let root = TempDir::new("drain");
    let expected: Vec<u64> = (0..STREAMS)
        .map(|seed| digest(&synthetic_bytes(seed as u64, SIZE)))
        .collect();
    for round in 0..ROUNDS {
        let config = ServerConfig {
            chunk_size: 256 << 10,
            ..test_config(backend, root.path())
        };
        let server = start_with(config, builtin_registry(root.path()));
        let address = server.local_addr();
        let client = Client::new(ClientConfig {
            threads: 1,
            backend: backend.into(),
            protocol: ClientSettings {
                initial_window: 1 << 20,
                max_window: 1 << 20,
                ..ClientSettings::default()
            },
            ..ClientConfig::default()
        })
        .unwrap();
        let mut handles: Vec<_> = (0..STREAMS)
            .map(|seed| {
                let paradata = format!("synthetic:{SIZE}?seed={seed}");
                client.initiate(address, &paradata, StreamOptions::default())
            })
            .collect();
        // Every stream runs: its first chunk is here, and it waits at its window.
        let firsts: Vec<Vec<u8>> = handles
            .iter_mut()
            .map(|h| match h.recv() {
                Some(Item::Chunk(data)) => data.to_vec(),
                other => panic!("round {round}: expected a chunk, got {other:?}"),
            })
            .collect();
        let draining = std::thread::spawn(move || server.shutdown(Duration::from_secs(60)));
        wait_until("the server to stop accepting", || {
            TcpStream::connect(address).is_err()
        });
        // Read on, crediting as we go, while the server drains.
        let readers: Vec<_> = handles
            .into_iter()
            .zip(firsts)
            .map(|(mut handle, mut data)| {
                std::thread::spawn(move || {
                    let end = handle.for_each_chunk(|chunk| data.extend_from_slice(chunk));
                    (data, end)
                })
            })
            .collect();
        for (seed, reader) in readers.into_iter().enumerate() {
            let (data, end) = reader.join().unwrap();
            assert!(
                matches!(end.outcome, Outcome::Complete(_)),
                "round {round}, stream {seed}: {:?} after {} bytes",
                end.outcome,
                data.len()
            );
            assert_eq!(data.len(), SIZE, "round {round}, stream {seed}");
            assert_eq!(
                digest(&data),
                expected[seed],
                "round {round}, stream {seed}"
            );
        }
        draining.join().unwrap();
    }
}
both_backends!(
    a_drain_under_pulls_that_credit_as_they_read_loses_nothing,
    drain_under_crediting_pulls
);
