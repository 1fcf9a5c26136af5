//! A blocking protocol driver over a real socket, and raw-frame helpers for tests that
//! speak to a server without a well-behaved client.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nexus_protocol::frame::{Frame, NONCE_LEN, PREFACE};
use nexus_protocol::{
    ClientConnection, ClientEvent, ClientSettings, Completion, ErrorCode, Outcome, StreamId,
    StreamRequest, WireError,
};

use crate::PATIENCE;

/// What a pulled stream delivered.
#[derive(Debug)]
pub struct Pulled {
    /// How it ended.
    pub outcome: Outcome,
    /// The data, in order.
    pub data: Vec<u8>,
    /// Number of chunks received.
    pub chunks: usize,
    /// Expected bytes from INITIATED, if it got that far.
    pub expected_bytes: Option<u64>,
}

impl Pulled {
    /// The completion, panicking with the outcome if the stream did not complete.
    pub fn completion(&self) -> &Completion {
        match &self.outcome {
            Outcome::Complete(c) => c,
            other => panic!("stream did not complete: {other:?}"),
        }
    }

    /// The error code and message, panicking if the stream did not fail.
    pub fn error(&self) -> (ErrorCode, &str) {
        match &self.outcome {
            Outcome::Error { code, message } => (*code, message),
            other => panic!("stream did not fail: {other:?}"),
        }
    }
}

/// A blocking single-connection client for tests and benches.
pub struct Client {
    socket: TcpStream,
    proto: ClientConnection,
    events: VecDeque<ClientEvent>,
    closed: Option<Option<WireError>>,
}

impl Client {
    /// Connects with default settings and finishes the handshake.
    pub fn connect(address: SocketAddr) -> Client {
        Client::connect_with(address, ClientSettings::default()).unwrap()
    }

    /// Connects and finishes the handshake; the connection error if it fails.
    pub fn connect_with(
        address: SocketAddr,
        settings: ClientSettings,
    ) -> Result<Client, WireError> {
        let socket = TcpStream::connect(address).unwrap();
        socket.set_nodelay(true).unwrap();
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).unwrap();
        let mut client = Client {
            socket,
            proto: ClientConnection::new(settings, nonce, Instant::now()),
            events: VecDeque::new(),
            closed: None,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            match client.next_event(deadline) {
                Some(ClientEvent::Established { .. }) => return Ok(client),
                Some(ClientEvent::Closed(error)) => {
                    return Err(error.unwrap_or_else(|| WireError::protocol("closed without error")))
                }
                Some(_) => {}
                None => panic!("handshake did not finish in time"),
            }
        }
    }

    /// The protocol state, for calls the helpers do not wrap.
    pub fn proto(&mut self) -> &mut ClientConnection {
        &mut self.proto
    }

    /// The socket, for tests that misbehave on purpose.
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Asks for a stream.
    pub fn initiate(&mut self, paradata: &str) -> StreamId {
        self.initiate_request(StreamRequest {
            paradata: paradata.into(),
            ..StreamRequest::default()
        })
    }

    /// Asks for a stream with every option.
    pub fn initiate_request(&mut self, request: StreamRequest) -> StreamId {
        let stream = self.proto.initiate(request, Instant::now()).unwrap();
        self.flush();
        stream
    }

    /// Gives `bytes` of window back for `stream`.
    pub fn consume(&mut self, stream: StreamId, bytes: usize) {
        self.proto.consume(stream, bytes, Instant::now());
    }

    /// Cancels a stream.
    pub fn cancel(&mut self, stream: StreamId) {
        self.proto.cancel(stream, "test").unwrap();
        self.flush();
    }

    /// Pulls one stream to its end, consuming everything at once.
    pub fn pull(&mut self, paradata: &str) -> Pulled {
        let stream = self.initiate(paradata);
        self.finish(&[stream]).remove(&stream).unwrap()
    }

    /// Pulls several streams concurrently on this connection; results in request order.
    pub fn pull_all(&mut self, paradata: &[String]) -> Vec<Pulled> {
        let streams: Vec<StreamId> = paradata.iter().map(|p| self.initiate(p)).collect();
        let mut results = self.finish(&streams);
        streams.iter().map(|s| results.remove(s).unwrap()).collect()
    }

    /// Runs until every stream in `streams` has ended, consuming data as it arrives.
    pub fn finish(&mut self, streams: &[StreamId]) -> HashMap<StreamId, Pulled> {
        self.finish_keeping(streams, true)
    }

    /// As [`finish`](Self::finish); with `keep` false the data is counted, not stored (for
    /// transfers larger than memory): `data` stays empty.
    pub fn finish_keeping(
        &mut self,
        streams: &[StreamId],
        keep: bool,
    ) -> HashMap<StreamId, Pulled> {
        let mut open: HashMap<StreamId, Pulled> = streams
            .iter()
            .map(|s| {
                let p = Pulled {
                    outcome: Outcome::Cancelled,
                    data: Vec::new(),
                    chunks: 0,
                    expected_bytes: None,
                };
                (*s, p)
            })
            .collect();
        let mut done = HashMap::new();
        let deadline = Instant::now() + PATIENCE;
        while !open.is_empty() {
            let event = self
                .next_event(deadline)
                .unwrap_or_else(|| panic!("streams {:?} did not end in time", open.keys()));
            match event {
                ClientEvent::Initiated {
                    stream,
                    expected_bytes,
                } => {
                    if let Some(p) = open.get_mut(&stream) {
                        p.expected_bytes = Some(expected_bytes);
                    }
                }
                ClientEvent::Chunk { stream, data } => {
                    self.consume(stream, data.len());
                    if let Some(p) = open.get_mut(&stream) {
                        if keep {
                            p.data.extend_from_slice(&data);
                        }
                        p.chunks += 1;
                    }
                }
                ClientEvent::StreamEnd {
                    stream, outcome, ..
                } => {
                    if let Some(mut p) = open.remove(&stream) {
                        p.outcome = outcome;
                        done.insert(stream, p);
                    }
                }
                ClientEvent::Closed(error) => {
                    panic!("connection closed with streams open: {error:?}")
                }
                _ => {}
            }
        }
        done
    }

    /// The next event, doing IO until one arrives or `deadline` passes (`None`). After the
    /// connection closed, `None` at once.
    pub fn next_event(&mut self, deadline: Instant) -> Option<ClientEvent> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if let Some(event) = self.proto.poll_event() {
                if let ClientEvent::Closed(error) = &event {
                    self.closed = Some(error.clone());
                }
                return Some(event);
            }
            if self.closed.is_some() {
                return None;
            }
            self.flush();
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = self
                .proto
                .poll_timeout()
                .map_or(deadline, |t| t.min(deadline));
            if wake <= now {
                self.proto.handle_timeout(now);
                continue;
            }
            self.read_once(wake - now);
        }
    }

    /// Reads once (up to `wait`), feeding the protocol.
    fn read_once(&mut self, wait: Duration) {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        let buf = self.proto.input_buffer();
        if buf.capacity() - buf.len() < (1 << 20) {
            buf.reserve(4 << 20);
        }
        let result = socket2::SockRef::from(&self.socket).recv(buf.spare_capacity_mut());
        if let Ok(n) = result {
            // SAFETY: recv initialised the first `n` bytes of the spare capacity, and
            // `n` is at most its length.
            unsafe { buf.set_len(buf.len() + n) };
        }
        match result {
            Ok(0) => self.proto.handle_eof(),
            Ok(_) => self.proto.process_input(Instant::now()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                self.proto.handle_timeout(Instant::now())
            }
            Err(_) => self.proto.handle_eof(),
        }
    }

    /// Writes everything the protocol has queued.
    pub fn flush(&mut self) {
        while let Some(segment) = self.proto.poll_transmit() {
            if self.socket.write_all(&segment).is_err() {
                self.proto.handle_eof();
                return;
            }
        }
    }
}

/// Connects a raw socket, sends `bytes`, half-closes if `fin`, and returns every frame the
/// server sent (after its preface) until it closed the connection, or the connection's
/// parse error. Panics if the server keeps the connection open past [`PATIENCE`].
pub fn exchange_raw(address: SocketAddr, bytes: &[u8], fin: bool) -> Vec<Frame> {
    let mut socket = TcpStream::connect(address).unwrap();
    // The server may close before reading everything; a failed write is not the point here.
    let _ = socket.write_all(bytes);
    if fin {
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
    read_frames_until_close(&mut socket)
}

/// Reads the server's preface (if not read already) and frames until it closes the
/// connection.
pub fn read_frames_until_close(socket: &mut TcpStream) -> Vec<Frame> {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    read_frames_until_eof(socket)
}

/// As [`read_frames_until_close`], from any stream (a TLS session, say) whose reads time out.
pub fn read_frames_until_eof(socket: &mut impl Read) -> Vec<Frame> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match socket.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
    // The preface, unless the caller read it already (no frame can start with its bytes).
    let start = if received.starts_with(&PREFACE) {
        PREFACE.len()
    } else {
        0
    };
    let mut buf = BytesMut::from(&received[start..]);
    let mut frames = Vec::new();
    while let Some(frame) = nexus_protocol::frame::decode(&mut buf, 16 << 20).unwrap() {
        frames.push(frame);
    }
    assert!(
        buf.is_empty(),
        "trailing partial frame from the server: {frames:?} then {:02x?}",
        &buf[..buf.len().min(64)]
    );
    frames
}

/// [`exchange_raw`] inside TLS: a TLS 1.3 session (ALPN nexus/2) trusting the PEM CA `ca`,
/// then `bytes`, then close_notify and FIN if `fin`; the frames the server sent until it
/// closed.
pub fn exchange_raw_tls(
    address: SocketAddr,
    ca: &std::path::Path,
    bytes: &[u8],
    fin: bool,
) -> Vec<Frame> {
    let mut stream = tls_stream(address, ca);
    // The server may close before reading everything; a failed write is not the point here.
    let _ = stream.write_all(bytes).and_then(|()| stream.flush());
    if fin {
        stream.conn.send_close_notify();
        let _ = stream.flush();
        let _ = stream.sock.shutdown(std::net::Shutdown::Write);
    }
    read_frames_until_eof(&mut stream)
}

/// A blocking TLS 1.3 client session to `address`, trusting the PEM CA `ca`, with ALPN
/// nexus/2 and the server checked against 127.0.0.1 (its address); reads time out after
/// [`PATIENCE`].
pub fn tls_stream(
    address: SocketAddr,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
    tls_stream_to(address, ca, name, b"nexus/2")
}

/// [`tls_stream`] checking the server against `name`, offering the ALPN protocol `alpn`.
pub fn tls_stream_to(
    address: SocketAddr,
    ca: &std::path::Path,
    name: rustls::pki_types::ServerName<'static>,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(address).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// The connection-level ERROR among `frames`, panicking if there is none.
pub fn connection_error(frames: &[Frame]) -> (ErrorCode, String) {
    frames
        .iter()
        .find_map(|f| match f {
            Frame::Error {
                stream,
                code,
                message,
            } if stream.is_connection() => Some((*code, message.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no connection ERROR in {frames:?}"))
}
