//! A client and a server connection wired back to back, with a fake clock.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nexus_protocol::{
    ClientConnection, ClientEvent, ClientSettings, ServerConnection, ServerEvent, ServerSettings,
    StreamId, StreamRequest,
};

pub struct Pair {
    pub client: ClientConnection,
    pub server: ServerConnection,
    pub now: Instant,
    pub client_events: Vec<ClientEvent>,
    pub server_events: Vec<ServerEvent>,
}

impl Pair {
    /// Connected and handshaken.
    pub fn new(cs: ClientSettings, ss: ServerSettings) -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            client: ClientConnection::new(cs, [1; 32], now),
            server: ServerConnection::new(ss, [2; 32], now),
            now,
            client_events: Vec::new(),
            server_events: Vec::new(),
        };
        pair.pump();
        pair
    }

    pub fn default_pair() -> Pair {
        Pair::new(ClientSettings::default(), ServerSettings::default())
    }

    /// Moves bytes both ways until neither side has anything to send; collects events.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(seg) = self.client.poll_transmit() {
                self.server.handle_input(&seg, self.now);
                moved = true;
            }
            while let Some(seg) = self.server.poll_transmit() {
                self.client.handle_input(&seg, self.now);
                moved = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push(e);
            }
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    /// Advances the fake clock in steps of at most `step`, running both sides' timers.
    pub fn advance(&mut self, total: Duration, step: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.now = (self.now + step).min(end);
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
            self.pump();
        }
    }

    /// Initiates a stream and lets the server see the request (not yet accepted).
    pub fn initiate(&mut self, paradata: &str) -> StreamId {
        let request = StreamRequest {
            paradata: paradata.into(),
            ..Default::default()
        };
        self.initiate_with(request)
    }

    pub fn initiate_with(&mut self, request: StreamRequest) -> StreamId {
        let id = self.client.initiate(request, self.now).expect("initiate");
        self.pump();
        id
    }

    /// Client events for one stream that carry data, concatenated.
    pub fn received(&self, stream: StreamId) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.client_events {
            if let ClientEvent::Chunk { stream: s, data } = e {
                if *s == stream {
                    out.extend_from_slice(data);
                }
            }
        }
        out
    }

    /// The one StreamEnd of a stream; panics if there is not exactly one.
    pub fn end_of(&self, stream: StreamId) -> (nexus_protocol::Outcome, u64) {
        let ends: Vec<_> = self
            .client_events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::StreamEnd {
                    stream: s,
                    outcome,
                    bytes_received,
                } if *s == stream => Some((outcome.clone(), *bytes_received)),
                _ => None,
            })
            .collect();
        assert_eq!(
            ends.len(),
            1,
            "exactly one StreamEnd for {stream}: {:?}",
            self.client_events
        );
        ends[0].clone()
    }

    pub fn client_closed_with(&self) -> Option<Option<nexus_protocol::WireError>> {
        self.client_events.iter().find_map(|e| match e {
            ClientEvent::Closed(err) => Some(err.clone()),
            _ => None,
        })
    }

    pub fn server_closed_with(&self) -> Option<Option<nexus_protocol::WireError>> {
        self.server_events.iter().find_map(|e| match e {
            ServerEvent::Closed(err) => Some(err.clone()),
            _ => None,
        })
    }
}

/// A server connection after a valid client preface and BIND, and its transmit drained.
pub fn bound_server(ss: ServerSettings) -> (ServerConnection, Instant) {
    let now = Instant::now();
    let mut server = ServerConnection::new(ss, [2; 32], now);
    let mut client = ClientConnection::new(ClientSettings::default(), [1; 32], now);
    while let Some(seg) = client.poll_transmit() {
        server.handle_input(&seg, now);
    }
    while server.poll_transmit().is_some() {}
    while server.poll_event().is_some() {}
    (server, now)
}

/// Everything the server queued, as frames.
pub fn server_frames(server: &mut ServerConnection) -> Vec<nexus_protocol::Frame> {
    let mut buf = bytes::BytesMut::new();
    while let Some(seg) = server.poll_transmit() {
        buf.extend_from_slice(&seg);
    }
    if buf.starts_with(&nexus_protocol::frame::PREFACE) {
        let _ = buf.split_to(8);
    }
    let mut frames = Vec::new();
    while let Some(f) = nexus_protocol::frame::decode(&mut buf, u32::MAX).expect("valid frames") {
        frames.push(f);
    }
    frames
}
