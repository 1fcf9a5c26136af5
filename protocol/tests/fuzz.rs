//! The fuzz entry points, driven by arbitrary bytes and by the committed seed corpus.
//! `cargo fuzz` runs the same entry points for longer (see protocol/fuzz/README.md).
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed assertion here.

use std::path::PathBuf;

use nexus_protocol::fuzz;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzz::decode_frames(&data);
    }

    #[test]
    fn a_server_fed_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096), handshake in any::<bool>()) {
        fuzz::server(&data, handshake);
    }

    #[test]
    fn a_client_fed_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzz::client(&data);
    }
}

/// Every file of the seed corpus goes through every entry point. The corpus holds valid
/// conversations and the malformed inputs that once mattered.
#[test]
fn seed_corpus_replays_cleanly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("seed corpus directory") {
        let data = std::fs::read(entry.expect("entry").path()).expect("seed file");
        fuzz::decode_frames(&data);
        fuzz::server(&data, false);
        fuzz::server(&data, true);
        fuzz::client(&data);
        count += 1;
    }
    assert!(count >= 5, "the seed corpus has only {count} files");
}

/// Writes the valid part of the seed corpus from the real encoder. Run by hand:
/// `cargo test -p nexus-protocol --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand to refresh the corpus"]
fn write_seed_corpus() {
    use nexus_protocol::frame::{self, Frame, PREFACE};
    use nexus_protocol::{Completion, ErrorCode, OperationId, StreamId};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    std::fs::create_dir_all(&dir).unwrap();
    let bind = Frame::Bind(frame::Bind {
        min_version: 1,
        max_version: 1,
        nonce: [5; 32],
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        heartbeat_interval_ms: 5000,
        name: "seed".into(),
    });
    let initiate = |id, op| {
        Frame::Initiate(frame::Initiate {
            stream: StreamId(id),
            operation: OperationId(op),
            accept_zstd: true,
            paradata: "file:data.bin?offset=0&length=100".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            push: None,
        })
    };
    let seeds: Vec<(&str, Vec<Frame>)> = vec![
        (
            "client-happy",
            vec![
                bind.clone(),
                initiate(1, 9),
                Frame::Credit {
                    stream: StreamId(1),
                    increment: 4096,
                },
                Frame::Heartbeat {
                    stream: StreamId(0),
                },
                Frame::Cancel {
                    stream: StreamId(1),
                    operation: None,
                    reason: "done".into(),
                },
                Frame::Cancel {
                    stream: StreamId(0),
                    operation: Some(OperationId(9)),
                    reason: "all".into(),
                },
            ],
        ),
        (
            "server-happy",
            vec![
                Frame::Accept(frame::Accept {
                    version: 1,
                    auth_required: false,
                    nonce: [6; 32],
                    initial_window: 1 << 20,
                    max_frame_size: 1 << 20,
                    max_streams: 10,
                    max_paradata: 1000,
                    heartbeat_interval_ms: 5000,
                    name: "seed".into(),
                    max_window: 4 << 20,
                }),
                Frame::Initiated {
                    stream: StreamId(1),
                    zstd: false,
                    expected_bytes: 5,
                },
                Frame::Chunk(frame::Chunk {
                    stream: StreamId(1),
                    seq: 0,
                    raw_len: None,
                    window_empty: false,
                    data: "hello".into(),
                }),
                Frame::Complete {
                    stream: StreamId(1),
                    completion: Completion {
                        bytes: 5,
                        chunks: 1,
                        ..Default::default()
                    },
                    report: None,
                },
                Frame::Error {
                    stream: StreamId(2),
                    code: ErrorCode::NOT_FOUND,
                    message: "nope".into(),
                },
                Frame::GoAway {
                    last_stream: StreamId(2),
                    drain_ms: 1000,
                    message: "bye".into(),
                },
            ],
        ),
        (
            "bad-order",
            vec![initiate(1, 0), bind.clone(), initiate(1, 0)],
        ),
        ("auth", vec![bind.clone(), Frame::Auth { proof: [1; 32] }]),
    ];
    for (name, frames) in seeds {
        let mut bytes = PREFACE.to_vec();
        for f in frames {
            bytes.extend_from_slice(&f.to_bytes());
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(
        dir.join("http"),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tls"),
        [
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ],
    )
    .unwrap();
    let mut huge = PREFACE.to_vec();
    huge.extend_from_slice(&frame::encode_header(u32::MAX, 0x10, 0, StreamId(1)));
    std::fs::write(dir.join("huge-length"), huge).unwrap();
    let mut lying = PREFACE.to_vec();
    lying.extend_from_slice(&bind.to_bytes());
    lying.extend_from_slice(&frame::encode_header(12, 0x10, 0, StreamId(1)));
    lying.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    std::fs::write(dir.join("lying-length"), lying).unwrap();
}
