//! Rules PROTOCOL.md states and an independent implementer relies on, each stepped with a fake
//! clock: terminal frames need no window, CANCELLED counts what went out, PROGRESS on a timer,
//! announced sizes are promises, timers follow the negotiated values, and the handshake's
//! error codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{bound_server, server_frames, Pair};
use nexus_protocol::frame::{self, Bind, Frame, PREFACE};
use nexus_protocol::{
    CallError, ClientConnection, ClientEvent, ClientSettings, ErrorCode, ItemCounts, Outcome,
    ServerConnection, ServerEvent, ServerSettings, StreamId, StreamRequest, UNKNOWN,
};

fn data(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>())
}

fn pair_with_window(window: u32) -> Pair {
    let cs = ClientSettings {
        initial_window: window,
        max_window: window,
        ..Default::default()
    };
    Pair::new(cs, ServerSettings::default())
}

#[test]
fn complete_needs_no_window_after_the_last_chunk_used_it_up() {
    let mut p = pair_with_window(4096);
    let s = p.initiate("x");
    p.server.accept(s, 4096, false).unwrap();
    p.server.send_chunk(s, data(4096), None, p.now).unwrap();
    p.pump();
    // The client has read nothing: the window is 0, and stays so.
    assert_eq!(p.server.send_capacity(s), 0);
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    let (outcome, bytes) = p.end_of(s);
    assert!(
        matches!(outcome, Outcome::Complete(c) if c.bytes == 4096),
        "{outcome:?}"
    );
    assert_eq!(bytes, 4096);
}

/// The data of every CHUNK on `stream` in what the server queued, delivered or not.
fn chunk_bytes_on_the_wire(frames: &[Frame], stream: StreamId) -> u64 {
    frames
        .iter()
        .map(|f| match f {
            Frame::Chunk(c) if c.stream == stream => c.data.len() as u64,
            _ => 0,
        })
        .sum()
}

#[test]
fn cancelled_counts_the_chunks_that_went_out_not_those_dropped() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, UNKNOWN, false).unwrap();
    for _ in 0..4 {
        p.server.send_chunk(s, data(1000), None, p.now).unwrap();
    }
    // Two chunks reach the socket (INITIATED, then header and data of each); two stay queued.
    let mut wire = BytesMut::new();
    for _ in 0..5 {
        wire.extend_from_slice(&p.server.poll_transmit().unwrap());
    }
    p.client.cancel(s, "enough").unwrap();
    while let Some(seg) = p.client.poll_transmit() {
        p.server.handle_input(&seg, p.now);
    }
    while let Some(seg) = p.server.poll_transmit() {
        wire.extend_from_slice(&seg);
    }
    let _ = wire.split_to(PREFACE.len().min(wire.len()) * usize::from(wire.starts_with(&PREFACE)));
    let mut frames = Vec::new();
    while let Some(f) = frame::decode(&mut wire, u32::MAX).unwrap() {
        frames.push(f);
    }
    let acknowledged = frames.iter().find_map(|f| match f {
        Frame::Cancelled { bytes_sent, .. } => Some(*bytes_sent),
        _ => None,
    });
    assert_eq!(acknowledged, Some(2000));
    assert_eq!(chunk_bytes_on_the_wire(&frames, s), 2000);
}

#[test]
fn progress_goes_out_every_interval_also_while_waiting_for_credit() {
    let cs = ClientSettings {
        initial_window: 4096,
        max_window: 4096,
        ..Default::default()
    };
    let ss = ServerSettings {
        progress_interval: Duration::from_millis(250),
        ..Default::default()
    };
    let mut p = Pair::new(cs, ss);
    let s = p.initiate("x");
    p.server.accept(s, 1 << 20, false).unwrap();
    p.server.send_chunk(s, data(4096), None, p.now).unwrap();
    p.pump();
    assert_eq!(p.server.send_capacity(s), 0, "waiting for credit");
    // Timers run when the state machine asks for them.
    let end = p.now + Duration::from_millis(1100);
    while let Some(at) = p.server.poll_timeout().filter(|at| *at <= end) {
        p.now = at;
        p.server.handle_timeout(p.now);
        p.client.handle_timeout(p.now);
        p.pump();
    }
    let progress: Vec<_> = p
        .client_events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Progress { stream, progress } if *stream == s => Some(*progress),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 4, "one per 250 ms in 1.1 s");
    for pr in progress {
        assert_eq!(pr.bytes_sent, 4096);
        assert_eq!(pr.items, ItemCounts::NOT_COUNTED);
        assert_eq!(pr.items.expected, UNKNOWN);
    }
}

#[test]
fn a_server_refuses_to_send_more_or_less_than_it_announced() {
    let mut p = Pair::default_pair();
    let s = p.initiate("x");
    p.server.accept(s, 1500, false).unwrap();
    p.server.send_chunk(s, data(1000), None, p.now).unwrap();
    assert_eq!(
        p.server.complete(s, ItemCounts::default()),
        Err(CallError::ShortOfAnnounced {
            announced: 1500,
            produced: 1000
        })
    );
    assert_eq!(
        p.server.send_chunk(s, data(1000), None, p.now),
        Err(CallError::BeyondAnnounced { announced: 1500 })
    );
    p.server.send_chunk(s, data(500), None, p.now).unwrap();
    p.server.complete(s, ItemCounts::default()).unwrap();
    p.pump();
    assert!(matches!(p.end_of(s).0, Outcome::Complete(_)));
}

/// A client with stream 1 open that the server announced as `expected` bytes.
fn client_expecting(expected: u64) -> (ClientConnection, StreamId, Instant) {
    let now = Instant::now();
    let mut client = ClientConnection::new(ClientSettings::default(), [1; 32], now);
    let mut server = ServerConnection::new(ServerSettings::default(), [2; 32], now);
    while let Some(seg) = client.poll_transmit() {
        server.handle_input(&seg, now);
    }
    while let Some(seg) = server.poll_transmit() {
        client.handle_input(&seg, now);
    }
    let s = client
        .initiate(
            StreamRequest {
                paradata: "x".into(),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    let initiated = Frame::Initiated {
        stream: s,
        zstd: false,
        expected_bytes: expected,
    };
    client.handle_input(&initiated.to_bytes(), now);
    (client, s, now)
}

fn feed(client: &mut ClientConnection, frame: &Frame, now: Instant) -> Vec<ClientEvent> {
    client.handle_input(&frame.to_bytes(), now);
    std::iter::from_fn(|| client.poll_event()).collect()
}

fn end(events: &[ClientEvent]) -> Option<Outcome> {
    events.iter().find_map(|e| match e {
        ClientEvent::StreamEnd { outcome, .. } => Some(outcome.clone()),
        _ => None,
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
fn a_client_refuses_a_short_stream_whose_complete_matches_what_arrived() {
    let (mut client, s, now) = client_expecting(3000);
    let half = data(1500);
    feed(&mut client, &chunk(s, 0, half.clone()), now);
    // A lying server: COMPLETE counts and digest match the 1500 bytes it did send.
    let completion = nexus_protocol::Completion {
        bytes: 1500,
        chunks: 1,
        digest: xxhash_rust::xxh3::xxh3_64(&half),
        items: ItemCounts::default(),
    };
    let events = feed(
        &mut client,
        &Frame::Complete {
            stream: s,
            completion,
            report: None,
        },
        now,
    );
    match end(&events) {
        Some(Outcome::Error { code, message }) => {
            assert_eq!(code, ErrorCode::INTEGRITY_FAILURE);
            assert!(message.contains("1500 of the 3000"), "{message}");
        }
        other => panic!("a short stream must fail, got {other:?}"),
    }
}

#[test]
fn a_client_fails_a_stream_at_the_first_chunk_past_its_announced_size() {
    let (mut client, s, now) = client_expecting(1000);
    let events = feed(&mut client, &chunk(s, 0, data(1001)), now);
    assert!(
        matches!(end(&events), Some(Outcome::Error { code, .. }) if code == ErrorCode::INTEGRITY_FAILURE)
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ClientEvent::Chunk { .. })),
        "the excess is never delivered"
    );
}

/// Runs the client's timers exactly when it asks, with a silent server, until `stop` says so
/// or `limit` passes; returns the time it took.
fn run_client_timers(
    client: &mut ClientConnection,
    start: Instant,
    limit: Duration,
    mut stop: impl FnMut(&ClientEvent) -> bool,
) -> Option<Duration> {
    while let Some(at) = client.poll_timeout() {
        if at > start + limit {
            return None;
        }
        client.handle_timeout(at);
        while client.poll_transmit().is_some() {}
        while let Some(event) = client.poll_event() {
            if stop(&event) {
                return Some(at - start);
            }
        }
    }
    None
}

#[test]
fn a_client_follows_the_negotiated_heartbeat_not_its_own_default() {
    // The client asks for 5 s; the server settles on 100 ms. A server that then falls silent
    // is detected after 3 to 4 of the negotiated intervals, not after 5 s.
    let ss = ServerSettings {
        timers: nexus_protocol::Timers {
            heartbeat_interval: Duration::from_millis(100),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(ClientSettings::default(), ss);
    let took = run_client_timers(
        &mut p.client,
        p.now,
        Duration::from_secs(10),
        |e| matches!(e, ClientEvent::Closed(Some(err)) if err.code == ErrorCode::TIMEOUT),
    )
    .expect("the silent server is detected");
    assert!(
        took >= Duration::from_millis(300) && took <= Duration::from_millis(400),
        "{took:?}"
    );
}

#[test]
fn a_stream_times_out_at_its_timeout_not_at_the_next_heartbeat() {
    // A 3 s stream timeout with a 5 s heartbeat fires at 3 s.
    let cs = ClientSettings {
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("x");
    let took = run_client_timers(&mut p.client, p.now, Duration::from_secs(10), |e| {
        matches!(e, ClientEvent::StreamEnd { stream, outcome: Outcome::TimedOut, .. } if *stream == s)
    })
    .expect("the stream times out");
    assert_eq!(took, Duration::from_secs(3));
}

#[test]
fn the_stream_timeout_restarts_when_credit_reopens_a_closed_window() {
    let cs = ClientSettings {
        initial_window: 4096,
        max_window: 4096,
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut p = Pair::new(cs, ServerSettings::default());
    let s = p.initiate("x");
    p.server.accept(s, UNKNOWN, false).unwrap();
    p.server.send_chunk(s, data(4096), None, p.now).unwrap();
    p.pump();
    // The application reads only 10 s later: no timeout meanwhile (the window was 0), and
    // the 3 s start again from the credit.
    p.now += Duration::from_secs(10);
    p.client.handle_timeout(p.now);
    p.client.consume(s, 4096, p.now);
    let reopened = p.now;
    let took = run_client_timers(&mut p.client, reopened, Duration::from_secs(10), |e| {
        matches!(e, ClientEvent::StreamEnd { stream, outcome: Outcome::TimedOut, .. } if *stream == s)
    })
    .expect("the stream times out");
    assert_eq!(took, Duration::from_secs(3));
}

#[test]
fn a_server_stream_starved_of_credit_times_out_at_its_timeout() {
    let cs = ClientSettings {
        initial_window: 4096,
        max_window: 4096,
        ..Default::default()
    };
    let ss = ServerSettings {
        timers: nexus_protocol::Timers {
            stream_timeout: Duration::from_millis(2500),
            ..Default::default()
        },
        progress_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut p = Pair::new(cs, ss);
    let s = p.initiate("x");
    p.server.accept(s, UNKNOWN, false).unwrap();
    p.server.send_chunk(s, data(4096), None, p.now).unwrap();
    let start = p.now;
    let mut fired = None;
    while let Some(at) = p.server.poll_timeout() {
        if at > start + Duration::from_secs(10) {
            break;
        }
        p.server.handle_timeout(at);
        while p.server.poll_transmit().is_some() {}
        if std::iter::from_fn(|| p.server.poll_event())
            .any(|e| matches!(e, ServerEvent::StreamTimedOut { stream } if stream == s))
        {
            fired = Some(at - start);
            break;
        }
    }
    assert_eq!(fired, Some(Duration::from_millis(2500)));
}

/// A BIND as a raw client would send it, after the preface.
fn bind_bytes(bind: Bind) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&Frame::Bind(bind).to_bytes());
    bytes
}

fn bind(heartbeat_ms: u32) -> Bind {
    Bind {
        min_version: 1,
        max_version: 1,
        nonce: [5; 32],
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        heartbeat_interval_ms: heartbeat_ms,
        name: "raw".into(),
    }
}

/// What a server answers to `input`: its frames (preface removed).
fn answer(settings: ServerSettings, input: &[u8]) -> Vec<Frame> {
    let now = Instant::now();
    let mut server = ServerConnection::new(settings, [2; 32], now);
    server.handle_input(input, now);
    server_frames(&mut server)
}

fn accepted_heartbeat(frames: &[Frame]) -> u32 {
    frames
        .iter()
        .find_map(|f| match f {
            Frame::Accept(a) => Some(a.heartbeat_interval_ms),
            _ => None,
        })
        .expect("ACCEPT")
}

fn connection_error(frames: &[Frame]) -> ErrorCode {
    frames
        .iter()
        .find_map(|f| match f {
            Frame::Error { stream, code, .. } if stream.is_connection() => Some(*code),
            _ => None,
        })
        .expect("a connection ERROR")
}

#[test]
fn bind_heartbeat_zero_means_the_servers_and_small_values_become_100_ms() {
    let ss = || ServerSettings {
        timers: nexus_protocol::Timers {
            heartbeat_interval: Duration::from_millis(2000),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(
        accepted_heartbeat(&answer(ss(), &bind_bytes(bind(0)))),
        2000
    );
    assert_eq!(accepted_heartbeat(&answer(ss(), &bind_bytes(bind(1)))), 100);
    assert_eq!(
        accepted_heartbeat(&answer(ss(), &bind_bytes(bind(99)))),
        100
    );
    assert_eq!(
        accepted_heartbeat(&answer(ss(), &bind_bytes(bind(700)))),
        700
    );
    assert_eq!(
        accepted_heartbeat(&answer(ss(), &bind_bytes(bind(9000)))),
        2000
    );
}

#[test]
fn bad_bind_values_are_protocol_errors() {
    let zero_window = Bind {
        initial_window: 0,
        ..bind(1000)
    };
    let small_frames = Bind {
        max_frame_size: 1035,
        ..bind(1000)
    };
    for bad in [zero_window, small_frames] {
        let frames = answer(ServerSettings::default(), &bind_bytes(bad.clone()));
        assert_eq!(
            connection_error(&frames),
            ErrorCode::PROTOCOL_ERROR,
            "{bad:?}"
        );
    }
    let smallest = Bind {
        max_frame_size: 1036,
        ..bind(1000)
    };
    let frames = answer(ServerSettings::default(), &bind_bytes(smallest));
    assert!(frames.iter().any(|f| matches!(f, Frame::Accept(_))));
}

#[test]
fn an_oversize_handshake_frame_is_frame_too_large() {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&frame::encode_header(16 * 1024 + 1, 0x01, 0, StreamId(0)));
    let frames = answer(ServerSettings::default(), &input);
    assert_eq!(connection_error(&frames), ErrorCode::FRAME_TOO_LARGE);
}

#[test]
fn a_short_auth_is_malformed_and_a_wrong_one_fails_authentication() {
    let ss = || ServerSettings {
        secret: Some(b"s".to_vec()),
        ..Default::default()
    };
    let mut short = bind_bytes(bind(1000));
    short.extend_from_slice(&frame::encode_header(31, 0x03, 0, StreamId(0)));
    short.extend_from_slice(&[0u8; 31]);
    assert_eq!(
        connection_error(&answer(ss(), &short)),
        ErrorCode::PROTOCOL_ERROR
    );
    let mut wrong = bind_bytes(bind(1000));
    wrong.extend_from_slice(&Frame::Auth { proof: [0; 32] }.to_bytes());
    assert_eq!(
        connection_error(&answer(ss(), &wrong)),
        ErrorCode::AUTH_FAILED
    );
}

#[test]
fn credit_of_zero_is_a_protocol_error() {
    let (mut server, now) = bound_server(ServerSettings::default());
    let initiate = Frame::Initiate(frame::Initiate {
        stream: StreamId(1),
        operation: nexus_protocol::OperationId(0),
        accept_zstd: false,
        paradata: "x".into(),
        traceparent: None,
        push: None,
    });
    server.handle_input(&initiate.to_bytes(), now);
    let credit = Frame::Credit {
        stream: StreamId(1),
        increment: 0,
    };
    server.handle_input(&credit.to_bytes(), now);
    assert_eq!(
        connection_error(&server_frames(&mut server)),
        ErrorCode::PROTOCOL_ERROR
    );
}

#[test]
fn a_client_refuses_an_accept_with_frames_below_1036_bytes() {
    let now = Instant::now();
    let mut client = ClientConnection::new(ClientSettings::default(), [1; 32], now);
    let accept = Frame::Accept(frame::Accept {
        version: 1,
        auth_required: false,
        nonce: [2; 32],
        initial_window: 1 << 20,
        max_frame_size: 1035,
        max_streams: 10,
        max_paradata: 1000,
        heartbeat_interval_ms: 1000,
        name: "s".into(),
        max_window: 1 << 20,
    });
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&accept.to_bytes());
    client.handle_input(&input, now);
    let closed = std::iter::from_fn(|| client.poll_event()).find_map(|e| match e {
        ClientEvent::Closed(err) => err,
        _ => None,
    });
    assert_eq!(closed.map(|e| e.code), Some(ErrorCode::PROTOCOL_ERROR));
}

#[test]
fn free_text_is_truncated_and_values_never_are() {
    let mut p = Pair::default_pair();
    // A paradata longer than the server takes is not sent at all.
    let long = "x".repeat(64 * 1024 + 1);
    let refused = p.client.initiate(
        StreamRequest {
            paradata: long,
            ..Default::default()
        },
        p.now,
    );
    assert!(matches!(refused, Err(CallError::ParadataTooLong { .. })));
    // A traceparent too long is left out, not cut.
    let s = p.initiate_with(StreamRequest {
        paradata: "x".into(),
        traceparent: Some("0".repeat(300)),
        ..Default::default()
    });
    let initiate = p.server_events.iter().find_map(|e| match e {
        ServerEvent::StreamRequested(i) if i.stream == s => Some(i.clone()),
        _ => None,
    });
    assert_eq!(initiate.unwrap().traceparent, None);
    // A message is cut at a character boundary to 4096 bytes.
    p.server
        .reject(s, ErrorCode::NOT_FOUND, &"é".repeat(3000))
        .unwrap();
    p.pump();
    match p.end_of(s).0 {
        Outcome::Error { message, .. } => {
            assert_eq!(message.len(), 4096);
            assert!(message.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}
