//! Fuzz entry points: whatever bytes they get, they must not panic, and must not buffer more
//! than the limits allow. Driven by a property test and a committed seed corpus in CI
//! (`tests/fuzz.rs`), and by cargo-fuzz for long runs (`protocol/fuzz`).

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::frame::{self, HEADER_LEN};
use crate::{ClientConnection, ClientSettings, ServerConnection, ServerSettings};

/// Decodes `data` as a sequence of frames with a small limit, re-encodes every frame that
/// decodes, and checks that the re-encoding decodes to the same frame.
pub fn decode_frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = frame::decode(&mut buf, 64 * 1024) {
        let mut again = BytesMut::new();
        frame.encode(&mut again);
        let round = frame::decode(&mut again, 64 * 1024);
        if !matches!(frame, frame::Frame::Extension { .. }) {
            assert_eq!(
                round,
                Ok(Some(frame)),
                "re-encoded frame must decode to itself"
            );
        }
    }
}

/// Feeds `data` to a server connection (after a valid preface and BIND when `handshake` is
/// set, so the fuzzer reaches the stream states), in pieces, accepting every stream and
/// moving the clock, and drains everything it produces.
pub fn server(data: &[u8], handshake: bool) {
    let now = Instant::now();
    let settings = ServerSettings {
        max_frame_size: 64 * 1024,
        ..ServerSettings::default()
    };
    let mut conn = ServerConnection::new(settings, [7; 32], now);
    if handshake {
        let client = ClientConnection::new(ClientSettings::default(), [9; 32], now);
        let mut client = client;
        while let Some(seg) = client.poll_transmit() {
            conn.handle_input(&seg, now);
        }
    }
    let mut t = now;
    for piece in data.chunks(97) {
        conn.handle_input(piece, t);
        t += Duration::from_millis(700);
        conn.handle_timeout(t);
        while let Some(event) = conn.poll_event() {
            match event {
                crate::ServerEvent::StreamRequested(init) if init.push.is_some() => {
                    let _ = conn.accept_push(init.stream, true, t);
                }
                crate::ServerEvent::StreamRequested(init) => {
                    let _ = conn.accept(init.stream, u64::MAX, true);
                    let cap = conn.send_capacity(init.stream).min(3000);
                    if cap > 0 {
                        let data = bytes::Bytes::from(vec![1u8; cap]);
                        let _ = conn.send_chunk(init.stream, data, None, t);
                    }
                }
                // The sink takes everything at once, and commits every push that ends well.
                crate::ServerEvent::PushChunk { stream, data } => {
                    conn.release(stream, data.len(), t)
                }
                crate::ServerEvent::PushEnded { stream, .. } => {
                    let _ = conn.commit(stream, None);
                }
                _ => {}
            }
        }
        assert!(
            conn.queued_bytes() < 64 << 20,
            "server queue must stay bounded"
        );
        while conn.poll_transmit().is_some() {}
    }
    conn.handle_eof();
    while conn.poll_event().is_some() {}
}

/// Feeds `data` to a client connection that has initiated two streams, as if it came from
/// the server after a valid preface and ACCEPT.
pub fn client(data: &[u8]) {
    let now = Instant::now();
    let mut conn = ClientConnection::new(ClientSettings::default(), [3; 32], now);
    let mut server = ServerConnection::new(ServerSettings::default(), [4; 32], now);
    while let Some(seg) = conn.poll_transmit() {
        server.handle_input(&seg, now);
    }
    while let Some(seg) = server.poll_transmit() {
        conn.handle_input(&seg, now);
    }
    for paradata in ["a", "b"] {
        let request = crate::StreamRequest {
            paradata: paradata.into(),
            ..Default::default()
        };
        let _ = conn.initiate(request, now);
    }
    let mut t = now;
    for piece in data.chunks(HEADER_LEN * 9) {
        conn.handle_input(piece, t);
        t += Duration::from_millis(900);
        conn.handle_timeout(t);
        while let Some(event) = conn.poll_event() {
            if let crate::ClientEvent::Chunk { stream, data } = event {
                conn.consume(stream, data.len(), t);
            }
        }
        while conn.poll_transmit().is_some() {}
    }
    conn.handle_eof();
    while conn.poll_event().is_some() {}
}
