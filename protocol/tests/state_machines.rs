//! Two peers stepped with a fake clock: every rule of PROTOCOL.md's state machines.
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed assertion here.

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{bound_server, server_frames, Pair};
use nexus_protocol::frame::{self, Frame, PREFACE};
use nexus_protocol::{
    CallError, ClientConnection, ClientEvent, ClientSettings, ErrorCode, ItemCounts, OperationId,
    Outcome, ServerConnection, ServerEvent, ServerSettings, StreamId, StreamRequest,
};

fn data(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

fn requested(pair: &Pair) -> Vec<StreamId> {
    pair.server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::StreamRequested(i) => Some(i.stream),
            _ => None,
        })
        .collect()
}

fn xxh3(bytes: &[u8]) -> u64 {
    // The digest PROTOCOL.md names, computed independently of the crate's streaming hasher.
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[test]
fn happy_path_delivers_every_byte_and_verifies_the_digest() {
    let mut p = Pair::default_pair();
    assert!(p.client.is_established() && p.server.is_established());
    let s = p.initiate("synthetic:3000");
    assert_eq!(requested(&p), vec![s]);
    p.server.accept(s, 3000, false).unwrap();
    let mut sent = Vec::new();
    for seed in 0..3 {
        let chunk = data(1000, seed);
        sent.extend_from_slice(&chunk);
        p.server.send_chunk(s, chunk, None, p.now).unwrap();
    }
    let items = ItemCounts {
        sent: 3,
        expected: 3,
        potential: 4,
        rejected: 1,
    };
    p.server.complete(s, items).unwrap();
    p.pump();
    assert_eq!(p.received(s), sent);
    let (outcome, bytes) = p.end_of(s);
    let Outcome::Complete(c) = outcome else {
        panic!("not complete: {outcome:?}")
    };
    assert_eq!(
        (c.bytes, c.chunks, c.digest, c.items),
        (3000, 3, xxh3(&sent), items)
    );
    assert_eq!(bytes, 3000);
    assert!(p.client_events.contains(&ClientEvent::Initiated {
        stream: s,
        expected_bytes: 3000
    }));
    assert_eq!(
        (p.client.active_streams(), p.server.active_streams()),
        (0, 0)
    );
}

#[test]
fn empty_stream_completes_with_zero_counts() {
    let mut p = Pair::default_pair();
    let s = p.initiate("file:empty");
    p.server.accept(s, 0, false).unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    let (outcome, bytes) = p.end_of(s);
    assert_eq!(bytes, 0);
    assert!(matches!(outcome, Outcome::Complete(c) if c.bytes == 0 && c.digest == xxh3(b"")));
}

#[test]
fn rejected_initiate_gets_an_immediate_error() {
    let mut p = Pair::default_pair();
    let s = p.initiate("nope:x");
    p.server
        .reject(s, ErrorCode::UNKNOWN_SOURCE, "no source for scheme nope")
        .unwrap();
    p.pump();
    let (outcome, _) = p.end_of(s);
    assert_eq!(
        outcome,
        Outcome::Error {
            code: ErrorCode::UNKNOWN_SOURCE,
            message: "no source for scheme nope".into()
        }
    );
}

#[test]
fn cancel_delivers_nothing_after_the_request_and_is_acknowledged() {
    let mut p = Pair::default_pair();
    let s = p.initiate("synthetic:1G");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.server.send_chunk(s, data(100, 1), None, p.now).unwrap();
    p.pump();
    assert_eq!(p.received(s).len(), 100);
    // Two more chunks are already on their way when the client cancels.
    p.server.send_chunk(s, data(100, 2), None, p.now).unwrap();
    p.server.send_chunk(s, data(100, 3), None, p.now).unwrap();
    let in_flight: Vec<Bytes> = std::iter::from_fn(|| p.server.poll_transmit()).collect();
    p.client.cancel(s, "user asked").unwrap();
    let before = p.client_events.len();
    for seg in in_flight {
        p.client.handle_input(&seg, p.now);
    }
    p.pump();
    let after = &p.client_events[before..];
    assert!(
        !after.iter().any(|e| matches!(e, ClientEvent::Chunk { .. })),
        "{after:?}"
    );
    assert!(p
        .server_events
        .contains(&ServerEvent::StreamCancelled { stream: s }));
    assert_eq!(p.end_of(s), (Outcome::Cancelled, 100));
    // The producer is stopped: the server refuses more data for the stream.
    assert_eq!(
        p.server.send_chunk(s, data(10, 4), None, p.now),
        Err(CallError::UnknownStream(s))
    );
    assert_eq!(
        (p.client.active_streams(), p.server.active_streams()),
        (0, 0)
    );
}

#[test]
fn cancel_drops_chunks_decoded_but_not_yet_polled() {
    let mut p = Pair::default_pair();
    let s = p.initiate("synthetic:1G");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.pump();
    p.server.send_chunk(s, data(100, 1), None, p.now).unwrap();
    p.server.send_chunk(s, data(100, 2), None, p.now).unwrap();
    while let Some(seg) = p.server.poll_transmit() {
        p.client.handle_input(&seg, p.now);
    }
    // Both chunks are decoded and waiting in the event queue; the application cancels first.
    p.client.cancel(s, "stop").unwrap();
    let pending: Vec<ClientEvent> = std::iter::from_fn(|| p.client.poll_event()).collect();
    assert!(
        !pending
            .iter()
            .any(|e| matches!(e, ClientEvent::Chunk { .. })),
        "{pending:?}"
    );
}

#[test]
fn cancel_drops_chunks_the_server_had_queued_but_not_sent() {
    let mut p = Pair::default_pair();
    let s = p.initiate("synthetic:1G");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.pump();
    for i in 0..3 {
        p.server.send_chunk(s, data(1000, i), None, p.now).unwrap();
    }
    let queued = p.server.queued_bytes();
    p.client.cancel(s, "stop").unwrap();
    while let Some(seg) = p.client.poll_transmit() {
        p.server.handle_input(&seg, p.now);
    }
    assert!(
        p.server.queued_bytes() < queued,
        "queued chunks are dropped, not sent"
    );
    // CANCELLED counts only what went out before it: the dropped chunks never did.
    let frames = server_frames(&mut p.server);
    assert_eq!(
        frames,
        vec![Frame::Cancelled {
            stream: s,
            bytes_sent: 0
        }]
    );
}

#[test]
fn cancel_operation_stops_all_its_streams_and_only_them() {
    let mut p = Pair::default_pair();
    let op = OperationId(42);
    let mut in_op = Vec::new();
    for i in 0..3 {
        let request = StreamRequest {
            paradata: format!("s{i}"),
            operation: op,
            ..Default::default()
        };
        in_op.push(p.initiate_with(request));
    }
    let other = p.initiate("other");
    for s in requested(&p) {
        p.server.accept(s, u64::MAX, false).unwrap();
    }
    p.pump();
    assert_eq!(p.client.cancel_operation(op, "operation cancelled"), 3);
    p.pump();
    for s in &in_op {
        assert_eq!(p.end_of(*s).0, Outcome::Cancelled);
        assert!(p
            .server_events
            .contains(&ServerEvent::StreamCancelled { stream: *s }));
    }
    assert!(!p
        .server_events
        .contains(&ServerEvent::StreamCancelled { stream: other }));
    p.server
        .send_chunk(other, data(10, 0), None, p.now)
        .unwrap();
    p.server.complete(other, ItemCounts::default()).unwrap();
    p.pump();
    assert!(matches!(p.end_of(other).0, Outcome::Complete(_)));
}

#[test]
fn server_error_mid_stream_ends_the_stream_with_its_code() {
    let mut p = Pair::default_pair();
    let s = p.initiate("file:x");
    p.server.accept(s, 10_000, false).unwrap();
    p.server.send_chunk(s, data(500, 0), None, p.now).unwrap();
    p.server
        .reject(s, ErrorCode::SOURCE_FAILED, "read failed: EIO")
        .unwrap();
    p.pump();
    let (outcome, bytes) = p.end_of(s);
    assert_eq!(bytes, 500);
    assert!(matches!(
        outcome,
        Outcome::Error {
            code: ErrorCode::SOURCE_FAILED,
            ..
        }
    ));
    // The connection lives on.
    assert!(p.client.is_established() && !p.server.is_closed());
}

#[test]
fn flow_control_exhaustion_and_refill() {
    let cs = ClientSettings {
        initial_window: 64 * 1024,
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("synthetic:1M");
    p.server.accept(s, u64::MAX, false).unwrap();
    let mut sent = 0;
    while p.server.send_capacity(s) > 0 {
        let n = p.server.send_capacity(s).min(10_000);
        p.server.send_chunk(s, data(n, 0), None, p.now).unwrap();
        sent += n;
    }
    assert_eq!(sent, 64 * 1024, "the window bounds what may be sent");
    assert!(matches!(
        p.server.send_chunk(s, data(1, 0), None, p.now),
        Err(CallError::NoCapacity { capacity: 0, .. })
    ));
    p.pump();
    assert_eq!(
        p.server.send_capacity(s),
        0,
        "no credit before the client consumes"
    );
    // Consuming less than a quarter of the window sends no CREDIT yet.
    p.client.consume(s, 1000, p.now);
    p.pump();
    assert_eq!(p.server.send_capacity(s), 0);
    p.client.consume(s, 20_000, p.now);
    p.pump();
    assert!(p.server_events.contains(&ServerEvent::Credit { stream: s }));
    assert_eq!(p.server.send_capacity(s), 21_000);
}

#[test]
fn one_slow_stream_does_not_block_another() {
    let cs = ClientSettings {
        initial_window: 8 * 1024,
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let slow = p.initiate("slow");
    let fast = p.initiate("fast");
    p.server.accept(slow, u64::MAX, false).unwrap();
    p.server.accept(fast, u64::MAX, false).unwrap();
    // Nobody consumes `slow`: its window runs dry.
    p.server
        .send_chunk(slow, data(8 * 1024, 0), None, p.now)
        .unwrap();
    let mut sent = 0;
    for round in 0..20 {
        let cap = p.server.send_capacity(fast);
        assert!(cap >= 8 * 1024, "fast stream starved in round {round}");
        p.server
            .send_chunk(fast, data(cap, 1), None, p.now)
            .unwrap();
        sent += cap;
        p.pump();
        p.client.consume(fast, cap, p.now);
        p.pump();
    }
    assert_eq!(p.server.send_capacity(slow), 0);
    assert_eq!(p.received(fast).len(), sent);
}

#[test]
fn round_robin_interleaves_streams_one_frame_at_a_time() {
    let mut p = Pair::default_pair();
    let big = p.initiate("big");
    let small = p.initiate("small");
    p.server.accept(big, u64::MAX, false).unwrap();
    p.server.accept(small, u64::MAX, false).unwrap();
    let _ = server_frames(&mut p.server);
    for i in 0..8 {
        p.server
            .send_chunk(big, data(1000, i), None, p.now)
            .unwrap();
    }
    p.server
        .send_chunk(small, data(10, 9), None, p.now)
        .unwrap();
    p.server.complete(small, ItemCounts::default()).unwrap();
    let order: Vec<StreamId> = server_frames(&mut p.server)
        .iter()
        .map(Frame::stream)
        .collect();
    let small_done = order.iter().rposition(|s| *s == small).unwrap();
    assert!(
        small_done <= 3,
        "small stream finished at frame {small_done} of {order:?}"
    );
}

#[test]
fn server_times_out_a_stream_that_gives_no_credit() {
    let cs = ClientSettings {
        initial_window: 4096,
        ..Default::default()
    };
    let ss = ServerSettings {
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_secs(20),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ss);
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.server.send_chunk(s, data(4096, 0), None, p.now).unwrap();
    p.pump();
    p.advance(Duration::from_secs(15), Duration::from_secs(1));
    assert!(!p
        .server_events
        .contains(&ServerEvent::StreamTimedOut { stream: s }));
    p.advance(Duration::from_secs(10), Duration::from_secs(1));
    assert!(p
        .server_events
        .contains(&ServerEvent::StreamTimedOut { stream: s }));
    assert!(matches!(
        p.end_of(s).0,
        Outcome::Error {
            code: ErrorCode::TIMEOUT,
            ..
        }
    ));
    assert!(
        !p.client.is_closed(),
        "heartbeats kept the connection alive"
    );
}

#[test]
fn slow_source_is_kept_alive_by_stream_heartbeats() {
    let cs = ClientSettings {
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_secs(8),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("slow-query");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.advance(Duration::from_secs(60), Duration::from_secs(1));
    assert!(!p
        .client_events
        .iter()
        .any(|e| matches!(e, ClientEvent::StreamEnd { .. })));
    p.server.send_chunk(s, data(5, 0), None, p.now).unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    assert!(matches!(p.end_of(s).0, Outcome::Complete(_)));
}

#[test]
fn client_times_out_a_silent_stream_and_cancels_it() {
    let cs = ClientSettings {
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("x");
    // The server is hung: only the client's clock moves.
    p.now += Duration::from_millis(2500);
    p.client.handle_timeout(p.now);
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    assert_eq!(p.end_of(s).0, Outcome::TimedOut);
    let sent: Vec<Bytes> = std::iter::from_fn(|| p.client.poll_transmit()).collect();
    let mut buf = BytesMut::from(&sent.concat()[..]);
    let mut saw_cancel = false;
    while let Some(f) = frame::decode(&mut buf, u32::MAX).unwrap() {
        saw_cancel |= matches!(f, Frame::Cancel { stream, .. } if stream == s);
    }
    assert!(saw_cancel, "a timed-out stream is cancelled at the server");
}

#[test]
fn idle_connection_is_closed_after_three_missed_heartbeats() {
    let cs = ClientSettings {
        timers: nexus_protocol::Timers {
            heartbeat_interval: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    for _ in 0..5 {
        p.now += Duration::from_secs(1);
        p.client.handle_timeout(p.now);
    }
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    let err = p
        .client_closed_with()
        .expect("closed")
        .expect("with an error");
    assert_eq!(err.code, ErrorCode::TIMEOUT);
}

/// Raw frames injected into a client that has stream 1 open.
fn client_with_open_stream(cs: ClientSettings) -> Pair {
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.pump();
    p
}

fn inject(p: &mut Pair, frame: &Frame) {
    let bytes = frame.to_bytes();
    p.client.handle_input(&bytes, p.now);
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
}

/// A plain INITIATE for `x`, as a raw client would send it.
fn initiate_frame(stream: StreamId) -> Frame {
    Frame::Initiate(frame::Initiate {
        stream,
        operation: OperationId(0),
        accept_zstd: false,
        paradata: "x".into(),
        traceparent: None,
        push: None,
    })
}

fn chunk(stream: StreamId, seq: u64, data: Bytes) -> Frame {
    Frame::Chunk(frame::Chunk {
        stream,
        seq,
        raw_len: None,
        window_empty: false,
        data,
    })
}

#[test]
fn a_server_violating_the_window_loses_the_connection() {
    let cs = ClientSettings {
        initial_window: 1024,
        ..Default::default()
    };
    let mut p = client_with_open_stream(cs);
    inject(&mut p, &chunk(StreamId(1), 0, data(1025, 0)));
    let err = p.client_closed_with().unwrap().unwrap();
    assert_eq!(err.code, ErrorCode::FLOW_CONTROL_VIOLATION);
    assert!(
        matches!(p.end_of(StreamId(1)).0, Outcome::Error { code, .. } if code == ErrorCode::FLOW_CONTROL_VIOLATION)
    );
}

#[test]
fn a_client_overflowing_the_window_with_credit_loses_the_connection() {
    let (mut server, now) = bound_server(ServerSettings::default());
    let init = initiate_frame(StreamId(1));
    server.handle_input(&init.to_bytes(), now);
    let credit = Frame::Credit {
        stream: StreamId(1),
        increment: u32::MAX,
    };
    server.handle_input(&credit.to_bytes(), now);
    assert_eq!(
        closed_error_event(&mut server).code,
        ErrorCode::FLOW_CONTROL_VIOLATION
    );
}

#[test]
fn credit_up_to_accept_max_window_is_taken_and_beyond_it_loses_the_connection() {
    let ss = ServerSettings {
        max_window: 8 << 20,
        ..Default::default()
    };
    let (mut server, now) = bound_server(ss);
    server.handle_input(&initiate_frame(StreamId(1)).to_bytes(), now);
    // The default client asked for 4 MiB: 4 MiB more reaches the maximum exactly.
    let credit = |increment| Frame::Credit {
        stream: StreamId(1),
        increment,
    };
    server.handle_input(&credit(4 << 20).to_bytes(), now);
    assert!(!server.is_closed());
    server.handle_input(&credit(1).to_bytes(), now);
    let err = closed_error_event(&mut server);
    assert_eq!(err.code, ErrorCode::FLOW_CONTROL_VIOLATION);
    assert!(err.message.contains("8388608 allowed"), "{err}");
}

#[test]
fn accept_with_max_window_below_initial_window_is_refused() {
    let now = std::time::Instant::now();
    let mut client = ClientConnection::new(ClientSettings::default(), [0; 32], now);
    let accept = Frame::Accept(frame::Accept {
        version: 1,
        auth_required: false,
        nonce: [0; 32],
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        max_streams: 10,
        max_paradata: 1000,
        heartbeat_interval_ms: 5000,
        name: "small".into(),
        max_window: 1 << 19,
    });
    client.handle_input(&PREFACE, now);
    client.handle_input(&accept.to_bytes(), now);
    let err = client_closed_error(&mut client);
    assert_eq!(err.code, ErrorCode::PROTOCOL_ERROR);
    assert!(err.message.contains("max_window"), "{err}");
}

/// Rounds of: the server sends all its window allows, the client reads, the application
/// consumes `share` of what it has not yet consumed. Returns the bytes sent in each round.
fn window_rounds(p: &mut Pair, s: StreamId, rounds: usize, share: f64) -> Vec<usize> {
    let mut per_round = Vec::new();
    let mut unread = 0usize;
    for _ in 0..rounds {
        let mut sent = 0;
        while p.server.send_capacity(s) > 0 {
            let n = p.server.send_capacity(s).min(16 << 10);
            p.server.send_chunk(s, data(n, 0), None, p.now).unwrap();
            sent += n;
        }
        p.pump();
        unread += sent;
        let consumed = (unread as f64 * share) as usize;
        p.client.consume(s, consumed, p.now);
        unread -= consumed;
        p.pump();
        per_round.push(sent);
    }
    per_round
}

fn growth_pair(max_window: u32) -> (Pair, StreamId) {
    let cs = ClientSettings {
        initial_window: 64 << 10,
        max_window,
        ..Default::default()
    };
    let ss = ServerSettings {
        max_window: 1 << 20,
        ..Default::default()
    };
    let mut p = Pair::new(cs, ss);
    let s = p.initiate("synthetic:1G");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.pump();
    (p, s)
}

#[test]
fn a_window_grows_to_its_maximum_while_the_application_keeps_up() {
    let (mut p, s) = growth_pair(256 << 10);
    let rounds = window_rounds(&mut p, s, 12, 1.0);
    assert_eq!(rounds[0], 64 << 10, "{rounds:?}");
    // Doubled, then doubled again, and never beyond the client's maximum.
    assert!(rounds.contains(&(128 << 10)), "{rounds:?}");
    assert_eq!(*rounds.last().unwrap(), 256 << 10, "{rounds:?}");
    assert_eq!(*rounds.iter().max().unwrap(), 256 << 10, "{rounds:?}");
}

#[test]
fn a_window_does_not_grow_while_the_application_lags() {
    let (mut p, s) = growth_pair(256 << 10);
    // The application reads a third of its backlog each round: the reader is the limit.
    let rounds = window_rounds(&mut p, s, 12, 0.34);
    assert!(rounds.iter().all(|&n| n <= 64 << 10), "{rounds:?}");
    assert!(
        rounds.iter().skip(1).all(|&n| n > 0),
        "it still flows: {rounds:?}"
    );
}

#[test]
fn a_window_does_not_grow_when_the_source_is_the_limit() {
    let (mut p, s) = growth_pair(256 << 10);
    for _ in 0..12 {
        // The source has half a window at a time: the window never runs out.
        let n = p.server.send_capacity(s) / 2;
        p.server.send_chunk(s, data(n, 0), None, p.now).unwrap();
        p.pump();
        p.client.consume(s, n, p.now);
        p.pump();
    }
    assert_eq!(p.server.send_capacity(s), 64 << 10);
}

#[test]
fn the_chunk_that_uses_up_the_window_says_so() {
    let cs = ClientSettings {
        initial_window: 3000,
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    let _ = server_frames(&mut p.server);
    for _ in 0..3 {
        p.server.send_chunk(s, data(1000, 0), None, p.now).unwrap();
    }
    let flags: Vec<bool> = server_frames(&mut p.server)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Chunk(c) => Some(c.window_empty),
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![false, false, true]);
}

#[test]
fn a_window_does_not_grow_past_what_the_server_allows() {
    // The client would go to 16 MiB; the server's ACCEPT said 1 MiB.
    let (mut p, s) = growth_pair(16 << 20);
    let rounds = window_rounds(&mut p, s, 20, 1.0);
    assert_eq!(*rounds.iter().max().unwrap(), 1 << 20, "{rounds:?}");
    assert!(!p.server.is_closed() && !p.client.is_closed());
}

#[test]
fn digest_mismatch_fails_the_stream() {
    let mut p = client_with_open_stream(ClientSettings::default());
    let s = StreamId(1);
    inject(&mut p, &chunk(s, 0, data(100, 0)));
    let completion = nexus_protocol::Completion {
        bytes: 100,
        chunks: 1,
        digest: 12345,
        ..Default::default()
    };
    inject(
        &mut p,
        &Frame::Complete {
            stream: s,
            completion,
            report: None,
        },
    );
    let (outcome, bytes) = p.end_of(s);
    assert_eq!(bytes, 100);
    assert!(
        matches!(&outcome, Outcome::Error { code: ErrorCode::INTEGRITY_FAILURE, message } if message.contains("digest")),
        "{outcome:?}"
    );
}

#[test]
fn count_mismatch_fails_the_stream() {
    let mut p = client_with_open_stream(ClientSettings::default());
    let s = StreamId(1);
    let d = data(100, 0);
    inject(&mut p, &chunk(s, 0, d.clone()));
    let completion = nexus_protocol::Completion {
        bytes: 200,
        chunks: 1,
        digest: xxh3(&d),
        ..Default::default()
    };
    inject(
        &mut p,
        &Frame::Complete {
            stream: s,
            completion,
            report: None,
        },
    );
    assert!(matches!(
        p.end_of(s).0,
        Outcome::Error {
            code: ErrorCode::INTEGRITY_FAILURE,
            ..
        }
    ));
}

#[test]
fn sequence_gap_and_duplicate_fail_the_stream_and_cancel_it() {
    for bad_seq in [2u64, 0] {
        let mut p = client_with_open_stream(ClientSettings::default());
        let s = StreamId(1);
        inject(&mut p, &chunk(s, 0, data(10, 0)));
        inject(&mut p, &chunk(s, bad_seq, data(10, 1)));
        let (outcome, bytes) = p.end_of(s);
        let want = if bad_seq == 0 { "duplicate" } else { "gap" };
        assert!(
            matches!(&outcome, Outcome::Error { code: ErrorCode::INTEGRITY_FAILURE, message } if message.contains(want)),
            "{outcome:?}"
        );
        assert_eq!(bytes, 10, "the bad chunk is not delivered");
        // The server is told to stop, then a late COMPLETE changes nothing.
        p.pump();
        assert!(p
            .server_events
            .contains(&ServerEvent::StreamCancelled { stream: s }));
        let _ = p.end_of(s);
    }
}

#[test]
fn compressed_chunks_are_inflated_and_verified() {
    let mut p = Pair::default_pair();
    let request = StreamRequest {
        paradata: "x".into(),
        accept_zstd: true,
        ..Default::default()
    };
    let s = p.initiate_with(request);
    p.server.accept(s, u64::MAX, true).unwrap();
    assert!(p.server.is_compressed(s));
    let raw = Bytes::from(vec![b'a'; 100_000]);
    let packed = nexus_protocol::compress::compress_chunk(&raw, 1).unwrap();
    p.server
        .send_chunk(s, raw.clone(), Some(packed), p.now)
        .unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    assert_eq!(p.received(s), raw.to_vec());
    assert!(matches!(p.end_of(s).0, Outcome::Complete(c) if c.bytes == 100_000));
}

#[test]
fn compression_is_off_unless_the_client_accepts_it() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, true).unwrap();
    assert!(!p.server.is_compressed(s));
}

#[test]
fn a_decompression_bomb_fails_the_stream() {
    let mut p = Pair::default_pair();
    let request = StreamRequest {
        paradata: "x".into(),
        accept_zstd: true,
        ..Default::default()
    };
    let s = p.initiate_with(request);
    p.server.accept(s, u64::MAX, true).unwrap();
    p.pump();
    // 1 MiB of zeros announced as 1 KiB.
    let bomb = nexus_protocol::compress::compress_chunk(&vec![0u8; 1 << 20], 19).unwrap();
    inject(
        &mut p,
        &Frame::Chunk(frame::Chunk {
            stream: s,
            seq: 0,
            raw_len: Some(1024),
            window_empty: false,
            data: bomb,
        }),
    );
    assert!(matches!(
        p.end_of(s),
        (
            Outcome::Error {
                code: ErrorCode::INTEGRITY_FAILURE,
                ..
            },
            0
        )
    ));
}

#[test]
fn server_death_mid_stream_is_an_error_with_the_byte_count() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.server.send_chunk(s, data(777, 0), None, p.now).unwrap();
    p.pump();
    p.client.handle_eof();
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    let (outcome, bytes) = p.end_of(s);
    assert_eq!(bytes, 777);
    assert!(
        matches!(&outcome, Outcome::Error { code: ErrorCode::CONNECTION_LOST, message } if message.contains("777"))
    );
}

#[test]
fn client_death_stops_every_producer() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.pump();
    p.server.handle_eof();
    assert_eq!(p.server.poll_event(), Some(ServerEvent::Closed(None)));
    assert_eq!(p.server.active_streams(), 0);
    assert_eq!(p.server.send_capacity(s), 0);
}

fn closed_error(server: &mut ServerConnection) -> nexus_protocol::WireError {
    let err = closed_error_event(server);
    let frames = server_frames(server);
    assert!(
        matches!(frames.last(), Some(Frame::Error { stream, code, .. }) if stream.is_connection() && *code == err.code),
        "the peer is told why, last: {frames:?}"
    );
    assert!(server.is_closed());
    err
}

#[test]
fn unknown_core_frame_type_is_a_protocol_error_and_extensions_are_ignored() {
    let (mut server, now) = bound_server(ServerSettings::default());
    // A stream with data queued: after the connection ERROR none of it may follow.
    let init = initiate_frame(StreamId(1));
    server.handle_input(&init.to_bytes(), now);
    server.accept(StreamId(1), u64::MAX, false).unwrap();
    server
        .send_chunk(StreamId(1), data(100, 0), None, now)
        .unwrap();
    let mut ext = frame::encode_header(3, 0x90, 0, StreamId(0)).to_vec();
    ext.extend_from_slice(b"abc");
    server.handle_input(&ext, now);
    assert!(!server.is_closed(), "extension types are skipped");
    server.handle_input(&frame::encode_header(0, 0x55, 0, StreamId(0)), now);
    let err = closed_error(&mut server);
    assert_eq!(err.code, ErrorCode::PROTOCOL_ERROR);
    assert!(err.message.contains("0x55"), "{err}");
}

#[test]
fn oversize_frame_is_refused_before_its_payload_is_buffered() {
    let (mut server, now) = bound_server(ServerSettings::default());
    let mut header = frame::encode_header(u32::MAX, 0x10, 0, StreamId(1)).to_vec();
    header.extend_from_slice(&[0u8; 100]);
    server.handle_input(&header, now);
    let err = closed_error(&mut server);
    assert_eq!(err.code, ErrorCode::FRAME_TOO_LARGE);
    assert!(
        server.input_buffer().capacity() < 64 * 1024,
        "nothing sized by the peer"
    );
}

#[test]
fn lying_inner_length_is_a_protocol_error() {
    let (mut server, now) = bound_server(ServerSettings::default());
    let mut payload = BytesMut::new();
    payload.put_u64(0); // operation
    payload.put_u32(1_000_000); // paradata length: far more than the frame holds
    payload.put_slice(b"file:x");
    let mut bytes = frame::encode_header(payload.len() as u32, 0x10, 0, StreamId(1)).to_vec();
    bytes.extend_from_slice(&payload);
    server.handle_input(&bytes, now);
    let err = closed_error(&mut server);
    assert_eq!(err.code, ErrorCode::PROTOCOL_ERROR);
    assert!(err.message.contains("truncated"), "{err}");
}

#[test]
fn http_and_tls_instead_of_the_preface_are_named() {
    for (input, expect) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "HTTP"),
        (&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01][..], "TLS"),
        (&b"\x89NXQ"[..], "corrupt"),
        (&b"\x00\x00"[..], "0x00"),
    ] {
        let now = std::time::Instant::now();
        let mut server = ServerConnection::new(ServerSettings::default(), [0; 32], now);
        server.handle_input(input, now);
        let err = closed_error(&mut server);
        assert_eq!(err.code, ErrorCode::PROTOCOL_ERROR);
        assert!(err.message.contains(expect), "{err}");
    }
}

#[test]
fn client_detects_a_server_that_is_not_nexus() {
    let now = std::time::Instant::now();
    let mut client = ClientConnection::new(ClientSettings::default(), [0; 32], now);
    client.handle_input(b"HTTP/1.1 400 Bad Request\r\n", now);
    assert!(client_closed_error(&mut client).message.contains("HTTP"));
}

#[test]
fn truncated_frame_then_eof_is_reported() {
    let (mut server, now) = bound_server(ServerSettings::default());
    let bytes = Frame::Heartbeat {
        stream: StreamId(0),
    }
    .to_bytes();
    server.handle_input(&bytes[..5], now);
    server.handle_eof();
    let err = closed_error_event(&mut server);
    assert!(err.message.contains("middle of a frame"), "{err}");
    // The peer may have closed only its sending side: it is told why, too.
    assert_eq!(
        server_frames(&mut server),
        vec![Frame::Error {
            stream: StreamId(0),
            code: ErrorCode::PROTOCOL_ERROR,
            message: err.message.clone()
        }]
    );
}

#[test]
fn pending_frame_len_tells_a_reader_how_big_the_next_frame_is() {
    let mut p = Pair::default_pair();
    let s = p.initiate("synthetic:5000");
    p.server.accept(s, 5000, false).unwrap();
    p.pump();
    assert_eq!(p.client.pending_frame_len(), None);
    p.server.send_chunk(s, data(5000, 7), None, p.now).unwrap();
    let mut wire = BytesMut::new();
    while let Some(seg) = p.server.poll_transmit() {
        wire.extend_from_slice(&seg);
    }
    let total =
        frame::HEADER_LEN + u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
    assert!(total > 5000 && total <= wire.len());
    // Not yet a whole header: unknown.
    p.client.handle_input(&wire[..frame::HEADER_LEN - 1], p.now);
    assert_eq!(p.client.pending_frame_len(), None);
    // The header is in: the whole frame's length, while its payload is still missing.
    p.client
        .handle_input(&wire[frame::HEADER_LEN - 1..total - 1], p.now);
    assert_eq!(p.client.pending_frame_len(), Some(total));
    p.client.handle_input(&wire[total - 1..total], p.now);
    assert_eq!(p.client.pending_frame_len(), None);
    p.pump();
    assert_eq!(p.received(s), data(5000, 7).to_vec());
    // A header beyond the frame limit gives no length to make room for; the decoder refuses it.
    let mut huge = BytesMut::new();
    huge.put_u32(u32::MAX);
    huge.put_bytes(0, frame::HEADER_LEN - 4);
    p.client.input_buffer().extend_from_slice(&huge);
    assert_eq!(p.client.pending_frame_len(), None);
}

fn client_closed_error(client: &mut ClientConnection) -> nexus_protocol::WireError {
    std::iter::from_fn(|| client.poll_event())
        .find_map(|e| match e {
            ClientEvent::Closed(err) => err,
            _ => None,
        })
        .expect("the client closed the connection with an error")
}

fn closed_error_event(server: &mut ServerConnection) -> nexus_protocol::WireError {
    std::iter::from_fn(|| server.poll_event())
        .find_map(|e| match e {
            ServerEvent::Closed(err) => err,
            _ => None,
        })
        .expect("closed with an error")
}

#[test]
fn slowloris_handshake_is_closed_at_the_deadline() {
    let now = std::time::Instant::now();
    let ss = ServerSettings {
        timers: nexus_protocol::Timers {
            handshake_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut server = ServerConnection::new(ss, [0; 32], now);
    let mut client = ClientConnection::new(ClientSettings::default(), [1; 32], now);
    let hello: Vec<u8> = std::iter::from_fn(|| client.poll_transmit())
        .flat_map(|b| b.to_vec())
        .collect();
    let mut t = now;
    for byte in hello.iter().take(5) {
        server.handle_input(&[*byte], t);
        t += Duration::from_secs(3);
        server.handle_timeout(t);
        if server.is_closed() {
            break;
        }
    }
    assert!(server.is_closed());
    assert!(t <= now + Duration::from_secs(12));
    assert_eq!(closed_error(&mut server).code, ErrorCode::TIMEOUT);
}

#[test]
fn unsupported_version_is_refused_with_its_code() {
    let now = std::time::Instant::now();
    let mut server = ServerConnection::new(ServerSettings::default(), [0; 32], now);
    let bind = Frame::Bind(frame::Bind {
        min_version: 7,
        max_version: 9,
        nonce: [0; 32],
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        heartbeat_interval_ms: 5000,
        name: "future".into(),
    });
    server.handle_input(&PREFACE, now);
    server.handle_input(&bind.to_bytes(), now);
    assert_eq!(
        closed_error(&mut server).code,
        ErrorCode::UNSUPPORTED_VERSION
    );
}

#[test]
fn stream_ids_must_increase() {
    let (mut server, now) = bound_server(ServerSettings::default());
    for id in [5, 5] {
        let init = initiate_frame(StreamId(id));
        server.handle_input(&init.to_bytes(), now);
    }
    assert!(closed_error(&mut server).message.contains("not above"));
}

#[test]
fn stream_limit_refuses_the_extra_stream_only() {
    let ss = ServerSettings {
        max_streams: 2,
        ..Default::default()
    };
    let (mut server, now) = bound_server(ss);
    for id in 1..=3 {
        let init = Frame::Initiate(frame::Initiate {
            stream: StreamId(id),
            operation: OperationId(0),
            accept_zstd: false,
            paradata: "x".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            push: None,
        });
        server.handle_input(&init.to_bytes(), now);
    }
    let frames = server_frames(&mut server);
    assert!(frames.iter().any(|f| matches!(
        f,
        Frame::Error {
            stream: StreamId(3),
            code: ErrorCode::RESOURCE_EXHAUSTED,
            ..
        }
    )));
    assert!(!server.is_closed());
    assert_eq!(server.active_streams(), 2);
}

#[test]
fn goaway_refuses_new_streams_and_lets_running_ones_finish() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.server.go_away(Duration::from_secs(30), "shutting down");
    p.pump();
    assert!(p.client.is_draining());
    assert_eq!(
        p.client.initiate(StreamRequest::default(), p.now),
        Err(CallError::Draining)
    );
    // A client that raced the GOAWAY gets an explicit `draining` error.
    let raced = initiate_frame(StreamId(9));
    p.server.handle_input(&raced.to_bytes(), p.now);
    let frames = server_frames(&mut p.server);
    assert!(frames.iter().any(|f| matches!(
        f,
        Frame::Error {
            stream: StreamId(9),
            code: ErrorCode::DRAINING,
            ..
        }
    )));
    p.server.send_chunk(s, data(10, 0), None, p.now).unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    assert!(matches!(p.end_of(s).0, Outcome::Complete(_)));
}

#[test]
fn a_draining_connection_closes_cleanly_when_its_last_stream_ends() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, u64::MAX, false).unwrap();
    p.server.go_away(Duration::from_secs(30), "shutting down");
    p.pump();
    assert!(!p.server.is_closed(), "a stream still runs");
    assert_eq!(p.server_closed_with(), None);
    p.server.send_chunk(s, data(10, 0), None, p.now).unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    // The close comes with the last stream's end, and its COMPLETE is still sent.
    assert!(p.server.is_closed());
    p.pump();
    assert!(matches!(p.end_of(s).0, Outcome::Complete(_)));
    assert_eq!(p.server_closed_with(), Some(None));
    assert!(p.server.is_transmit_empty());
    // The server's FIN: the client closes without failing anything.
    p.client.handle_eof();
    p.pump();
    assert_eq!(p.client_closed_with(), Some(None));
    assert_eq!(
        p.client_events
            .iter()
            .filter(|e| matches!(e, ClientEvent::StreamEnd { .. }))
            .count(),
        1
    );
}

#[test]
fn a_draining_connection_with_no_stream_closes_at_once_after_goaway() {
    let mut p = Pair::default_pair();
    p.server.go_away(Duration::from_secs(30), "shutting down");
    assert!(p.server.is_closed());
    p.pump();
    assert_eq!(p.server_closed_with(), Some(None));
    assert!(
        p.client.is_draining(),
        "GOAWAY was flushed before the close"
    );
}

#[test]
fn a_connection_in_its_handshake_is_closed_with_draining() {
    // Awaiting AUTH (BIND seen, ACCEPT sent), and awaiting BIND.
    let (mut server, now) = bound_server(ServerSettings {
        secret: secret("s3cret"),
        ..Default::default()
    });
    assert!(!server.is_established());
    let mut fresh = ServerConnection::new(ServerSettings::default(), [3; 32], now);
    for conn in [&mut server, &mut fresh] {
        conn.go_away(Duration::from_secs(30), "shutting down");
        assert!(conn.is_closed());
        assert_eq!(closed_error_event(conn).code, ErrorCode::DRAINING);
    }
    let frames = server_frames(&mut server);
    assert!(!frames.iter().any(|f| matches!(f, Frame::GoAway { .. })));
    assert!(matches!(
        frames.last(),
        Some(Frame::Error {
            code: ErrorCode::DRAINING,
            ..
        })
    ));
}

#[test]
fn streams_that_crossed_the_goaway_end_with_draining_on_the_client() {
    let mut p = Pair::default_pair();
    let running = p.initiate("running");
    p.server.accept(running, u64::MAX, false).unwrap();
    p.pump();
    // Two INITIATEs leave the client; the server's GOAWAY is already on its way.
    let crossed = p.client.initiate(StreamRequest::default(), p.now).unwrap();
    let cancelled = p.client.initiate(StreamRequest::default(), p.now).unwrap();
    p.client.cancel(cancelled, "changed my mind").unwrap();
    p.server.go_away(Duration::from_secs(30), "shutting down");
    while let Some(segment) = p.server.poll_transmit() {
        p.client.handle_input(&segment, p.now);
    }
    while let Some(e) = p.client.poll_event() {
        p.client_events.push(e);
    }
    let (outcome, _) = p.end_of(crossed);
    assert!(
        matches!(&outcome, Outcome::Error { code: ErrorCode::DRAINING, message } if message.contains("retry")),
        "{outcome:?}"
    );
    assert_eq!(p.end_of(cancelled).0, Outcome::Cancelled);
    assert_eq!(
        p.client.active_streams(),
        1,
        "only the running stream is left"
    );
    // The INITIATEs reach the server, which refuses them; the client drops the late answers.
    p.pump();
    assert_eq!(p.client_closed_with(), None);
    p.server.complete(running, ItemCounts::default()).unwrap();
    p.pump();
    assert!(matches!(p.end_of(running).0, Outcome::Complete(_)));
    assert_eq!(p.server_closed_with(), Some(None));
}

fn secret(s: &str) -> Option<Vec<u8>> {
    Some(s.as_bytes().to_vec())
}

#[test]
fn authentication_succeeds_with_the_same_secret() {
    let cs = ClientSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let ss = ServerSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let mut p = Pair::new(cs, ss);
    assert!(p.client.is_established() && p.server.is_established());
    let s = p.initiate("x");
    assert_eq!(requested(&p), vec![s]);
}

#[test]
fn authentication_fails_with_a_wrong_secret() {
    let cs = ClientSettings {
        secret: secret("wrong"),
        ..Default::default()
    };
    let ss = ServerSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let p = Pair::new(cs, ss);
    assert_eq!(
        p.server_closed_with().unwrap().unwrap().code,
        ErrorCode::AUTH_FAILED
    );
    let client_err = p.client_closed_with().unwrap().unwrap();
    assert_eq!(client_err.code, ErrorCode::AUTH_FAILED);
    assert!(!p.client.is_established());
}

#[test]
fn authentication_missing_on_either_side_fails() {
    let ss = ServerSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let p = Pair::new(ClientSettings::default(), ss);
    let err = p.client_closed_with().unwrap().unwrap();
    assert!(
        err.code == ErrorCode::AUTH_FAILED && err.message.contains("requires"),
        "{err}"
    );

    let cs = ClientSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let p = Pair::new(cs, ServerSettings::default());
    let err = p.client_closed_with().unwrap().unwrap();
    assert!(
        err.code == ErrorCode::AUTH_FAILED && err.message.contains("does not"),
        "{err}"
    );
}

#[test]
fn initiate_before_authentication_is_refused() {
    let now = std::time::Instant::now();
    let ss = ServerSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let mut server = ServerConnection::new(ss, [2; 32], now);
    let mut client = ClientConnection::new(ClientSettings::default(), [1; 32], now);
    while let Some(seg) = client.poll_transmit() {
        server.handle_input(&seg, now);
    }
    let init = Frame::Initiate(frame::Initiate {
        stream: StreamId(1),
        operation: OperationId(0),
        accept_zstd: false,
        paradata: "file:secret".into(),
        traceparent: None,
        push: None,
    });
    server.handle_input(&init.to_bytes(), now);
    let events: Vec<ServerEvent> = std::iter::from_fn(|| server.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ServerEvent::StreamRequested(_))),
        "{events:?}"
    );
    let closed = events.iter().find_map(|e| match e {
        ServerEvent::Closed(Some(err)) => Some(err.clone()),
        _ => None,
    });
    assert_eq!(closed.expect("closed").code, ErrorCode::AUTH_FAILED);
}

#[test]
fn a_replayed_proof_is_refused() {
    let now = std::time::Instant::now();
    let ss = ServerSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let cs = ClientSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    // Record what an honest client sends on a first connection.
    let mut server1 = ServerConnection::new(ss.clone(), [10; 32], now);
    let mut client = ClientConnection::new(cs, [1; 32], now);
    let mut recorded = Vec::new();
    for _ in 0..3 {
        while let Some(seg) = client.poll_transmit() {
            recorded.extend_from_slice(&seg);
            server1.handle_input(&seg, now);
        }
        while let Some(seg) = server1.poll_transmit() {
            client.handle_input(&seg, now);
        }
    }
    assert!(server1.is_established());
    // Replay it byte for byte to a second connection, which has a fresh nonce.
    let mut server2 = ServerConnection::new(ss, [11; 32], now);
    server2.handle_input(&recorded, now);
    assert!(!server2.is_established());
    assert_eq!(closed_error(&mut server2).code, ErrorCode::AUTH_FAILED);
}

#[test]
fn a_fake_server_without_the_secret_is_detected() {
    // The server requires auth but answers with a proof made from another secret.
    let now = std::time::Instant::now();
    let cs = ClientSettings {
        secret: secret("hunter2"),
        ..Default::default()
    };
    let ss = ServerSettings {
        secret: secret("other"),
        ..Default::default()
    };
    let mut client = ClientConnection::new(cs, [1; 32], now);
    let mut server = ServerConnection::new(ss, [2; 32], now);
    while let Some(seg) = client.poll_transmit() {
        server.handle_input(&seg, now);
    }
    while let Some(seg) = server.poll_transmit() {
        client.handle_input(&seg, now);
    }
    // The client's proof went out; the real server would refuse it. Forge the server's reply
    // with the proof computed from the wrong secret.
    let forged = nexus_protocol::auth::proof(
        b"other",
        1,
        nexus_protocol::auth::Role::Server,
        &[1; 32],
        &[2; 32],
    );
    client.handle_input(&Frame::Auth { proof: forged }.to_bytes(), now);
    assert_eq!(
        client_closed_error(&mut client).code,
        ErrorCode::AUTH_FAILED
    );
}
