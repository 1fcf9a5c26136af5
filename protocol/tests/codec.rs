//! Property round trips of every message, whole and split at every byte boundary.
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed assertion here.

use bytes::{Bytes, BytesMut};
use nexus_protocol::frame::{self, Accept, Bind, Chunk, Frame, Initiate};
use nexus_protocol::{Completion, ErrorCode, ItemCounts, OperationId, Progress, StreamId};
use proptest::prelude::*;

fn stream() -> impl Strategy<Value = StreamId> {
    (1u32..).prop_map(StreamId)
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max)
        .prop_map(|cs| cs.into_iter().collect::<String>())
        .prop_map(move |s| frame::truncate_str(&s, max).to_string())
}

fn items() -> impl Strategy<Value = ItemCounts> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(sent, expected, potential, rejected)| ItemCounts {
            sent,
            expected,
            potential,
            rejected,
        },
    )
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            text(64)
        )
            .prop_map(
                |(
                    min_version,
                    max_version,
                    nonce,
                    initial_window,
                    max_frame_size,
                    heartbeat_interval_ms,
                    name,
                )| {
                    Frame::Bind(Bind {
                        min_version,
                        max_version,
                        nonce,
                        initial_window,
                        max_frame_size,
                        heartbeat_interval_ms,
                        name,
                    })
                }
            ),
        (
            any::<u16>(),
            any::<bool>(),
            any::<[u8; 32]>(),
            any::<[u32; 6]>(),
            text(64)
        )
            .prop_map(
                |(version, auth_required, nonce, n, name)| Frame::Accept(Accept {
                    version,
                    auth_required,
                    nonce,
                    initial_window: n[0],
                    max_frame_size: n[1],
                    max_streams: n[2],
                    max_paradata: n[3],
                    heartbeat_interval_ms: n[4],
                    name,
                    max_window: n[5],
                })
            ),
        any::<[u8; 32]>().prop_map(|proof| Frame::Auth { proof }),
        (
            stream(),
            any::<u64>(),
            any::<bool>(),
            text(300),
            proptest::option::of(text(100).prop_filter("non-empty", |s| !s.is_empty())),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(stream, op, accept_zstd, paradata, traceparent, push)| {
                Frame::Initiate(Initiate {
                    stream,
                    operation: OperationId(op),
                    accept_zstd,
                    paradata,
                    traceparent,
                    push,
                })
            }),
        (stream(), any::<bool>(), any::<u64>()).prop_map(|(stream, zstd, expected_bytes)| {
            Frame::Initiated {
                stream,
                zstd,
                expected_bytes,
            }
        }),
        (
            stream(),
            any::<u64>(),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(
                |(stream, seq, raw_len, window_empty, data)| Frame::Chunk(Chunk {
                    stream,
                    seq,
                    raw_len,
                    window_empty,
                    data: Bytes::from(data)
                })
            ),
        (stream(), any::<u64>(), items()).prop_map(|(stream, bytes_sent, items)| Frame::Progress {
            stream,
            progress: Progress { bytes_sent, items }
        }),
        (stream(), any::<u32>())
            .prop_map(|(stream, increment)| Frame::Credit { stream, increment }),
        (stream(), text(100)).prop_map(|(stream, reason)| Frame::Cancel {
            stream,
            operation: None,
            reason
        }),
        (any::<u64>(), text(100)).prop_map(|(op, reason)| Frame::Cancel {
            stream: StreamId(0),
            operation: Some(OperationId(op)),
            reason
        }),
        (stream(), any::<u64>())
            .prop_map(|(stream, bytes_sent)| Frame::Cancelled { stream, bytes_sent }),
        (
            stream(),
            any::<[u64; 3]>(),
            items(),
            proptest::option::of(text(200))
        )
            .prop_map(|(stream, n, items, report)| Frame::Complete {
                stream,
                completion: Completion {
                    bytes: n[0],
                    chunks: n[1],
                    digest: n[2],
                    items
                },
                report
            }),
        (any::<u32>(), any::<u16>(), text(200)).prop_map(|(s, code, message)| Frame::Error {
            stream: StreamId(s),
            code: ErrorCode(code),
            message
        }),
        any::<u32>().prop_map(|s| Frame::Heartbeat {
            stream: StreamId(s)
        }),
        (any::<u32>(), any::<u32>(), text(100)).prop_map(|(last, drain_ms, message)| {
            Frame::GoAway {
                last_stream: StreamId(last),
                drain_ms,
                message,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_of_encode_is_identity(frame in any_frame()) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        let decoded = frame::decode(&mut buf, u32::MAX).unwrap();
        prop_assert_eq!(decoded, Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn split_at_every_boundary_decodes_once_whole(frame in any_frame()) {
        let bytes = frame.to_bytes();
        // Cover every boundary of the header and the small fields, and a stride of the rest.
        let splits = (0..bytes.len()).filter(|i| *i < 64 || i % 61 == 0);
        for split in splits {
            let mut buf = BytesMut::from(&bytes[..split]);
            prop_assert_eq!(frame::decode(&mut buf, u32::MAX).unwrap(), None);
            prop_assert_eq!(buf.len(), split, "nothing consumed from a partial frame");
            buf.extend_from_slice(&bytes[split..]);
            prop_assert_eq!(frame::decode(&mut buf, u32::MAX).unwrap(), Some(frame.clone()));
        }
    }

    #[test]
    fn several_frames_back_to_back(frames in proptest::collection::vec(any_frame(), 1..8)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let mut out = Vec::new();
        while let Some(f) = frame::decode(&mut buf, u32::MAX).unwrap() {
            out.push(f);
        }
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn trailing_fields_from_a_newer_version_are_ignored(frame in any_frame(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        prop_assume!(!matches!(frame, Frame::Chunk(_)));
        let mut bytes = BytesMut::from(&frame.to_bytes()[..]);
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) + extra.len() as u32;
        bytes[0..4].copy_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(frame::decode(&mut bytes, u32::MAX).unwrap(), Some(frame));
    }

    #[test]
    fn the_length_limit_is_checked_from_the_header_alone(len in 1025u32..) {
        let mut buf = BytesMut::from(&frame::encode_header(len, 0x12, 0, StreamId(1))[..]);
        let err = frame::decode(&mut buf, 1024).unwrap_err();
        prop_assert_eq!(err.code, ErrorCode::FRAME_TOO_LARGE);
    }
}

#[test]
fn chunk_header_plus_data_is_a_chunk_frame() {
    let data = Bytes::from_static(b"hello world");
    // One arena for all, as on the data path.
    let mut arena = BytesMut::new();
    for (raw_len, window_empty) in [
        (None, false),
        (Some(99), false),
        (None, true),
        (Some(9), true),
    ] {
        let head = frame::chunk_header_in(
            &mut arena,
            StreamId(3),
            7,
            raw_len,
            window_empty,
            data.len(),
        );
        let mut buf = BytesMut::from(&head[..]);
        buf.extend_from_slice(&data);
        let want = Frame::Chunk(Chunk {
            stream: StreamId(3),
            seq: 7,
            raw_len,
            window_empty,
            data: data.clone(),
        });
        assert_eq!(frame::decode(&mut buf, u32::MAX).unwrap(), Some(want));
    }
}

#[test]
fn unknown_error_codes_are_preserved() {
    let f = Frame::Error {
        stream: StreamId(1),
        code: ErrorCode(0x7777),
        message: "new".into(),
    };
    let mut buf = BytesMut::from(&f.to_bytes()[..]);
    let back = frame::decode(&mut buf, u32::MAX).unwrap().unwrap();
    assert_eq!(back, f);
    assert_eq!(ErrorCode(0x7777).to_string(), "unknown_0x7777");
    assert_eq!(ErrorCode(0x7777).name(), None);
}

#[test]
fn error_code_names_round_trip() {
    for code in ErrorCode::ALL {
        let name = code.name().unwrap();
        assert_eq!(ErrorCode::from_name(name), Some(*code));
    }
}

#[test]
fn frames_on_the_wrong_stream_kind_are_refused() {
    // BIND on a stream, CHUNK on stream 0.
    let mut bind = BytesMut::from(&frame::encode_header(0, 0x01, 0, StreamId(3))[..]);
    assert!(frame::decode(&mut bind, u32::MAX).is_err());
    let mut chunk = BytesMut::from(&frame::encode_header(8, 0x12, 0, StreamId(0))[..]);
    chunk.extend_from_slice(&[0; 8]);
    assert!(frame::decode(&mut chunk, u32::MAX).is_err());
}
