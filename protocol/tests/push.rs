//! Push streams (PROTOCOL.md 6.8), both state machines back to back with a fake clock, and the
//! server alone against hand-made frames for each rule a hostile client could break.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{bound_server, server_frames, Pair};
use nexus_protocol::frame::{self, Chunk, Frame, Initiate};
use nexus_protocol::{
    CallError, ClientEvent, ClientSettings, Completion, ErrorCode, ItemCounts, OperationId,
    Outcome, ServerEvent, ServerSettings, StreamId, StreamRequest, UNKNOWN,
};

fn push_request(paradata: &str, size: u64) -> StreamRequest {
    StreamRequest {
        paradata: paradata.into(),
        push: Some(size),
        ..Default::default()
    }
}

fn small_window() -> ServerSettings {
    ServerSettings {
        push_window: 64 << 10,
        ..ServerSettings::default()
    }
}

/// Sends as much of `data` as the window allows; returns how much went.
fn send_what_fits(p: &mut Pair, stream: StreamId, data: &[u8], from: usize) -> usize {
    let mut at = from;
    loop {
        let room = p.client.push_capacity(stream).min(data.len() - at);
        if room == 0 {
            return at;
        }
        let piece = Bytes::copy_from_slice(&data[at..at + room.min(10_000)]);
        let len = piece.len();
        p.client.send_push_chunk(stream, piece, p.now).unwrap();
        at += len;
    }
}

fn server_data(p: &Pair, stream: StreamId) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &p.server_events {
        if let ServerEvent::PushChunk { stream: s, data } = e {
            if *s == stream {
                out.extend_from_slice(data);
            }
        }
    }
    out
}

fn accept_requested(p: &mut Pair) -> StreamId {
    let id = p
        .server_events
        .iter()
        .find_map(|e| match e {
            ServerEvent::StreamRequested(i) if i.push.is_some() => Some(i.stream),
            _ => None,
        })
        .expect("a push request");
    p.server.accept_push(id, false, p.now).unwrap();
    p.pump();
    id
}

#[test]
fn a_push_flows_within_the_granted_window_and_completes_only_at_the_commit() {
    let mut p = Pair::new(ClientSettings::default(), small_window());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let id = p.initiate_with(push_request("file:a", data.len() as u64));
    assert_eq!(
        p.client.push_capacity(id),
        0,
        "no data before INITIATED and CREDIT"
    );
    accept_requested(&mut p);
    let mut sent = 0;
    let mut released = 0;
    while sent < data.len() {
        let before = sent;
        sent = send_what_fits(&mut p, id, &data, sent);
        assert!(
            sent - released <= 64 << 10,
            "never more than the window in flight"
        );
        p.pump();
        // The sink takes what arrived.
        let arrived = server_data(&p, id).len();
        p.server.release(id, arrived - released, p.now);
        released = arrived;
        p.pump();
        assert!(
            sent > before || sent == data.len(),
            "credit reopened the window"
        );
    }
    p.client.finish_push(id, p.now).unwrap();
    p.pump();
    assert_eq!(server_data(&p, id), data);
    let ended = p.server_events.iter().find_map(|e| match e {
        ServerEvent::PushEnded { stream, completion } if *stream == id => Some(*completion),
        _ => None,
    });
    let completion = ended.expect("the server saw the client's COMPLETE");
    assert_eq!(completion.bytes, data.len() as u64);
    // Not complete before the sink commits.
    assert!(!p
        .client_events
        .iter()
        .any(|e| matches!(e, ClientEvent::StreamEnd { .. })));
    p.server.commit(id, None).unwrap();
    p.pump();
    let (outcome, _) = p.end_of(id);
    match outcome {
        Outcome::Complete(c) => {
            assert_eq!(c.bytes, data.len() as u64);
            assert_eq!(c.digest, completion.digest);
        }
        other => panic!("expected Complete, got {other:?}"),
    }
}

#[test]
fn an_empty_push_completes() {
    let mut p = Pair::default_pair();
    let id = p.initiate_with(push_request("file:empty", 0));
    accept_requested(&mut p);
    p.client.finish_push(id, p.now).unwrap();
    p.pump();
    p.server.commit(id, None).unwrap();
    p.pump();
    assert!(matches!(p.end_of(id).0, Outcome::Complete(c) if c.bytes == 0 && c.chunks == 0));
}

#[test]
fn the_client_refuses_to_end_short_of_or_go_past_the_declared_size() {
    let mut p = Pair::default_pair();
    let id = p.initiate_with(push_request("file:a", 10));
    accept_requested(&mut p);
    let too_much = p
        .client
        .send_push_chunk(id, Bytes::from_static(&[1; 11]), p.now);
    assert_eq!(too_much, Err(CallError::BeyondDeclared { declared: 10 }));
    p.client
        .send_push_chunk(id, Bytes::from_static(&[1; 4]), p.now)
        .unwrap();
    assert_eq!(
        p.client.finish_push(id, p.now),
        Err(CallError::ShortOfDeclared {
            declared: 10,
            sent: 4
        })
    );
}

#[test]
fn a_version_1_server_gets_no_push_and_still_serves_pulls() {
    let v1 = ServerSettings {
        max_version: 1,
        ..ServerSettings::default()
    };
    let mut p = Pair::new(ClientSettings::default(), v1);
    assert!(p
        .client_events
        .iter()
        .any(|e| matches!(e, ClientEvent::Established { version: 1, .. })));
    let refused = p.client.initiate(push_request("file:a", 1), p.now);
    assert_eq!(refused, Err(CallError::PushUnsupported(1)));
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("upgrade the server"), "{message}");
    // A pull on the same connection works.
    let id = p.initiate("synthetic:10");
    p.server.accept(id, 10, false).unwrap();
    p.server
        .send_chunk(id, Bytes::from_static(&[0; 10]), None, p.now)
        .unwrap();
    p.server.complete(id, ItemCounts::NOT_COUNTED).unwrap();
    p.pump();
    assert!(matches!(p.end_of(id).0, Outcome::Complete(_)));
}

#[test]
fn a_version_1_client_pulls_from_a_version_2_server() {
    let v1 = ClientSettings {
        max_version: 1,
        ..ClientSettings::default()
    };
    let mut p = Pair::new(v1, ServerSettings::default());
    assert!(p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::Established { version: 1, .. })));
    let id = p.initiate("synthetic:3");
    p.server.accept(id, 3, false).unwrap();
    p.server
        .send_chunk(id, Bytes::from_static(b"abc"), None, p.now)
        .unwrap();
    p.server.complete(id, ItemCounts::NOT_COUNTED).unwrap();
    p.pump();
    assert_eq!(p.received(id), b"abc");
    assert!(matches!(p.end_of(id).0, Outcome::Complete(_)));
}

// The server against hand-made frames.

fn initiate_push(stream: u32, size: u64) -> Bytes {
    Frame::Initiate(Initiate {
        stream: StreamId(stream),
        operation: OperationId(0),
        accept_zstd: false,
        paradata: "file:x".into(),
        traceparent: None,
        push: Some(size),
    })
    .to_bytes()
}

fn chunk(stream: u32, seq: u64, data: &[u8]) -> Bytes {
    Frame::Chunk(Chunk {
        stream: StreamId(stream),
        seq,
        raw_len: None,
        window_empty: false,
        data: Bytes::copy_from_slice(data),
    })
    .to_bytes()
}

fn complete(stream: u32, bytes: u64, chunks: u64, digest: u64) -> Bytes {
    Frame::Complete {
        stream: StreamId(stream),
        completion: Completion {
            bytes,
            chunks,
            digest,
            items: ItemCounts::NOT_COUNTED,
        },
        report: None,
    }
    .to_bytes()
}

/// A server with push 1 accepted (window 64 KiB), its frames drained.
fn accepted_push(size: u64) -> (nexus_protocol::ServerConnection, std::time::Instant) {
    let (mut server, now) = bound_server(small_window());
    server.handle_input(&initiate_push(1, size), now);
    while server.poll_event().is_some() {}
    server.accept_push(StreamId(1), false, now).unwrap();
    let frames = server_frames(&mut server);
    assert!(matches!(frames[0], Frame::Initiated { .. }), "{frames:?}");
    assert!(
        matches!(frames[1], Frame::Credit { increment, .. } if increment == 64 << 10),
        "{frames:?}"
    );
    (server, now)
}

fn stream_error(frames: &[Frame]) -> Option<(ErrorCode, String)> {
    frames.iter().find_map(|f| match f {
        Frame::Error {
            stream,
            code,
            message,
        } if !stream.is_connection() => Some((*code, message.clone())),
        _ => None,
    })
}

fn connection_error(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error { stream, code, .. } if stream.is_connection() => Some(*code),
        _ => None,
    })
}

#[test]
fn a_chunk_beyond_the_push_window_closes_the_connection() {
    let (mut server, now) = accepted_push(UNKNOWN);
    server.handle_input(&chunk(1, 0, &vec![0; (64 << 10) + 1]), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        Some(ErrorCode::FLOW_CONTROL_VIOLATION)
    );
    assert!(server.is_closed());
}

#[test]
fn a_chunk_before_the_window_is_granted_closes_the_connection() {
    let (mut server, now) = bound_server(small_window());
    server.handle_input(&initiate_push(1, UNKNOWN), now);
    server.handle_input(&chunk(1, 0, b"early"), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        Some(ErrorCode::FLOW_CONTROL_VIOLATION)
    );
}

#[test]
fn a_sequence_gap_fails_the_push_and_keeps_the_connection() {
    let (mut server, now) = accepted_push(UNKNOWN);
    server.handle_input(&chunk(1, 0, b"aa"), now);
    server.handle_input(&chunk(1, 2, b"bb"), now);
    let (code, message) = stream_error(&server_frames(&mut server)).expect("a stream ERROR");
    assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
    assert!(message.contains("gap"), "{message}");
    let failed = std::iter::from_fn(|| server.poll_event())
        .any(|e| matches!(e, ServerEvent::StreamFailed { code, .. } if code == ErrorCode::INTEGRITY_FAILURE));
    assert!(failed);
    assert!(!server.is_closed());
}

#[test]
fn a_digest_mismatch_at_the_clients_complete_fails_the_push() {
    let (mut server, now) = accepted_push(UNKNOWN);
    server.handle_input(&chunk(1, 0, b"hello"), now);
    server.handle_input(&complete(1, 5, 1, 12345), now);
    let (code, message) = stream_error(&server_frames(&mut server)).expect("a stream ERROR");
    assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
    assert!(message.contains("digest"), "{message}");
    assert!(!std::iter::from_fn(|| server.poll_event())
        .any(|e| matches!(e, ServerEvent::PushEnded { .. })));
    assert_eq!(
        server.commit(StreamId(1), None),
        Err(CallError::UnknownStream(StreamId(1)))
    );
}

#[test]
fn a_push_short_of_or_past_its_declared_size_fails() {
    let (mut server, now) = accepted_push(10);
    server.handle_input(&chunk(1, 0, &[0; 11]), now);
    let (code, message) = stream_error(&server_frames(&mut server)).expect("past the size");
    assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
    assert!(message.contains("declared"), "{message}");

    let (mut server, now) = accepted_push(10);
    let data = [7u8; 4];
    let digest = twox_hash::XxHash3_64::oneshot(&data);
    server.handle_input(&chunk(1, 0, &data), now);
    server.handle_input(&complete(1, 4, 1, digest), now);
    let (code, message) = stream_error(&server_frames(&mut server)).expect("short");
    assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
    assert!(message.contains("4 of the 10"), "{message}");
}

#[test]
fn a_decompression_bomb_fails_the_push_without_inflating_it() {
    let (mut server, now) = bound_server(small_window());
    let init = Frame::Initiate(Initiate {
        stream: StreamId(1),
        operation: OperationId(0),
        accept_zstd: true,
        paradata: "file:x".into(),
        traceparent: None,
        push: Some(UNKNOWN),
    });
    server.handle_input(&init.to_bytes(), now);
    while server.poll_event().is_some() {}
    server.accept_push(StreamId(1), true, now).unwrap();
    server_frames(&mut server);
    // 16 MiB of zeros says it is 100 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).unwrap();
    let frame = Frame::Chunk(Chunk {
        stream: StreamId(1),
        seq: 0,
        raw_len: Some(100),
        window_empty: false,
        data: Bytes::from(bomb),
    });
    server.handle_input(&frame.to_bytes(), now);
    let (code, _) = stream_error(&server_frames(&mut server)).expect("a stream ERROR");
    assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
    assert!(!std::iter::from_fn(|| server.poll_event())
        .any(|e| matches!(e, ServerEvent::PushChunk { .. })));
}

#[test]
fn push_frames_on_the_wrong_stream_kind_are_protocol_errors() {
    // A CHUNK from the client on a pull.
    let (mut server, now) = bound_server(ServerSettings::default());
    let pull = Frame::Initiate(Initiate {
        stream: StreamId(1),
        operation: OperationId(0),
        accept_zstd: false,
        paradata: "synthetic:1".into(),
        traceparent: None,
        push: None,
    });
    server.handle_input(&pull.to_bytes(), now);
    server.handle_input(&chunk(1, 0, b"x"), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
    // CREDIT from the client on a push.
    let (mut server, now) = accepted_push(UNKNOWN);
    let credit = Frame::Credit {
        stream: StreamId(1),
        increment: 10,
    };
    server.handle_input(&credit.to_bytes(), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
}

#[test]
fn push_on_a_version_1_connection_is_refused_on_the_stream() {
    let v1 = ServerSettings {
        max_version: 1,
        ..ServerSettings::default()
    };
    let (mut server, now) = bound_server(v1);
    server.handle_input(&initiate_push(1, 5), now);
    let (code, message) = stream_error(&server_frames(&mut server)).expect("a stream ERROR");
    assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(message.contains("version 2"), "{message}");
    assert!(!std::iter::from_fn(|| server.poll_event())
        .any(|e| matches!(e, ServerEvent::StreamRequested(_))));
}

#[test]
fn cancelling_a_push_acknowledges_the_bytes_received() {
    let mut p = Pair::new(ClientSettings::default(), small_window());
    let id = p.initiate_with(push_request("file:a", UNKNOWN));
    accept_requested(&mut p);
    p.client
        .send_push_chunk(id, Bytes::from_static(&[5; 1000]), p.now)
        .unwrap();
    p.pump();
    p.client
        .send_push_chunk(id, Bytes::from_static(&[5; 500]), p.now)
        .unwrap();
    // Cancelled before the second chunk went out: it never does.
    p.client.cancel(id, "changed my mind").unwrap();
    p.pump();
    assert_eq!(server_data(&p, id).len(), 1000);
    assert!(p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::StreamCancelled { stream } if *stream == id)));
    assert_eq!(p.end_of(id).0, Outcome::Cancelled);
}

#[test]
fn a_silent_pusher_times_out_at_the_server_but_a_slow_sink_does_not_count() {
    let timers = nexus_protocol::Timers {
        stream_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let ss = ServerSettings {
        push_window: 1000,
        timers,
        ..ServerSettings::default()
    };
    let cs = ClientSettings {
        timers,
        ..ClientSettings::default()
    };
    // The window is full and the sink holds it: neither side times out on the other.
    let mut p = Pair::new(cs.clone(), ss.clone());
    let id = p.initiate_with(push_request("file:a", UNKNOWN));
    accept_requested(&mut p);
    p.client
        .send_push_chunk(id, Bytes::from_static(&[1; 1000]), p.now)
        .unwrap();
    p.pump();
    assert_eq!(p.client.push_capacity(id), 0);
    // The server keeps the client's timer alive with PROGRESS.
    p.advance(Duration::from_secs(10), Duration::from_millis(100));
    assert!(!p
        .client_events
        .iter()
        .any(|e| matches!(e, ClientEvent::StreamEnd { .. })));
    assert!(!p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::StreamTimedOut { .. })));
    // Window open, client silent: the server ends the push at its timeout.
    p.server.release(id, 1000, p.now);
    p.pump();
    p.advance(Duration::from_secs(4), Duration::from_millis(100));
    assert!(p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::StreamTimedOut { stream } if *stream == id)));
    match p.end_of(id).0 {
        Outcome::Error { code, message } => {
            assert_eq!(code, ErrorCode::TIMEOUT);
            assert!(message.contains("no data"), "{message}");
        }
        other => panic!("expected a timeout ERROR, got {other:?}"),
    }
}

#[test]
fn a_client_waiting_for_a_commit_that_never_comes_times_out() {
    let timers = nexus_protocol::Timers {
        stream_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let cs = ClientSettings {
        timers,
        ..ClientSettings::default()
    };
    let ss = ServerSettings {
        timers,
        // No PROGRESS within the test's horizon: the server is as good as gone.
        progress_interval: Duration::from_secs(3600),
        ..ServerSettings::default()
    };
    let mut p = Pair::new(cs, ss);
    let id = p.initiate_with(push_request("file:a", 0));
    accept_requested(&mut p);
    p.client.finish_push(id, p.now).unwrap();
    p.pump();
    // Drop what the server says from now on: it never commits, nor speaks.
    p.advance(Duration::from_secs(2), Duration::from_millis(100));
    assert!(!p
        .client_events
        .iter()
        .any(|e| matches!(e, ClientEvent::StreamEnd { .. })));
    p.advance(Duration::from_secs(2), Duration::from_millis(100));
    assert_eq!(p.end_of(id).0, Outcome::TimedOut);
}

#[test]
fn a_commit_that_states_other_counts_than_were_sent_is_an_integrity_failure() {
    let mut p = Pair::default_pair();
    let id = p.initiate_with(push_request("file:a", 3));
    accept_requested(&mut p);
    p.client
        .send_push_chunk(id, Bytes::from_static(b"abc"), p.now)
        .unwrap();
    p.client.finish_push(id, p.now).unwrap();
    // A lying server commits other data than it was sent.
    let lie = Frame::Complete {
        stream: id,
        completion: Completion {
            bytes: 3,
            chunks: 1,
            digest: 1,
            items: ItemCounts::NOT_COUNTED,
        },
        report: None,
    };
    p.client.handle_input(&lie.to_bytes(), p.now);
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    match p.end_of(id).0 {
        Outcome::Error { code, message } => {
            assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
            assert!(message.contains("digest"), "{message}");
        }
        other => panic!("expected integrity_failure, got {other:?}"),
    }
}

#[test]
fn the_frame_codec_round_trips_a_push_initiate() {
    let init = Frame::Initiate(Initiate {
        stream: StreamId(3),
        operation: OperationId(9),
        accept_zstd: true,
        paradata: "file:up/a.bin?replace=true".into(),
        traceparent: None,
        push: Some(1 << 40),
    });
    let mut buf = bytes::BytesMut::from(&init.to_bytes()[..]);
    assert_eq!(buf[5], frame::FLAG_ACCEPT_ZSTD | frame::FLAG_PUSH);
    assert_eq!(frame::decode(&mut buf, u32::MAX).unwrap(), Some(init));
}

#[test]
fn the_sinks_report_reaches_the_client_with_the_commit() {
    let mut p = Pair::default_pair();
    let id = p.initiate_with(push_request("file:r", 3));
    accept_requested(&mut p);
    p.client
        .send_push_chunk(id, Bytes::from_static(b"abc"), p.now)
        .unwrap();
    p.client.finish_push(id, p.now).unwrap();
    p.pump();
    p.server
        .commit(id, Some("b:1271 ok\nc:1272 connection_lost gone\n".into()))
        .unwrap();
    p.pump();
    let report = p.client_events.iter().find_map(|e| match e {
        ClientEvent::Report { stream, text } if *stream == id => Some(text.clone()),
        _ => None,
    });
    assert_eq!(
        report.as_deref(),
        Some("b:1271 ok\nc:1272 connection_lost gone\n")
    );
    assert!(matches!(p.end_of(id).0, Outcome::Complete(_)));
}

#[test]
fn a_report_anywhere_but_a_servers_push_commit_is_a_protocol_error() {
    // From a client.
    let (mut server, now) = accepted_push(3);
    server.handle_input(&chunk(1, 0, b"abc"), now);
    let with_report = Frame::Complete {
        stream: StreamId(1),
        completion: Completion {
            bytes: 3,
            chunks: 1,
            digest: xxhash_rust::xxh3::xxh3_64(b"abc"),
            items: ItemCounts::NOT_COUNTED,
        },
        report: Some("mine".into()),
    };
    server.handle_input(&with_report.to_bytes(), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
    // From a server, on a pull.
    let mut p = Pair::default_pair();
    let id = p.initiate("synthetic:0");
    p.pump();
    let pull_report = Frame::Complete {
        stream: id,
        completion: Completion {
            items: ItemCounts::NOT_COUNTED,
            ..Completion::default()
        },
        report: Some("nope".into()),
    };
    p.client.handle_input(&pull_report.to_bytes(), p.now);
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    assert!(p.client.is_closed(), "{:?}", p.client_events);
}
