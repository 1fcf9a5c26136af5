//! Test fixtures shared by Nexus's tests and benches (not published):
//! - [`Client`]: a blocking, single-connection driver of `nexus-protocol`'s
//!   `ClientConnection` over a real `std::net::TcpStream`, with the application's side
//!   (consume, cancel) left to the test so it can be slow, stop reading, or misbehave;
//! - [`start_server`]: a real server on 127.0.0.1 with a free port, on a given backend;
//! - [`TempDir`]: a directory removed on drop;
//! - [`Proxy`]: a TCP proxy that cuts connections when told, for fault injection;
//! - [`FakeServer`]: a scripted server that answers INITIATE with any frames, true or not;
//! - [`read_frames_until_close`]: for raw-socket tests, the frames a server sent before
//!   closing.
//!
//! Every wait has a deadline and panics with what it was waiting for, so a hung server fails
//! a test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fake;
mod proxy;
pub use fake::{default_accept, FakeServer};
pub use proxy::Proxy;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nexus_protocol::frame::{Frame, NONCE_LEN, PREFACE};
use nexus_protocol::{
    ClientConnection, ClientEvent, ClientSettings, Completion, ErrorCode, Outcome, StreamId,
    StreamRequest, WireError,
};
use nexus_server::{Backend, BackendChoice, Registry, Server, ServerConfig};

/// How long a test waits for anything before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Runs a test body once per IO backend: `both_backends!(name, body_fn)` defines
/// `name::io_uring` and `name::epoll`, each calling `body_fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn io_uring() {
                super::$body(nexus_server::Backend::IoUring)
            }
            #[test]
            fn epoll() {
                super::$body(nexus_server::Backend::Epoll)
            }
        }
    };
}

/// The config of a test server: port 0 on 127.0.0.1, two shards, this backend, `root`.
pub fn test_config(backend: Backend, root: &Path) -> ServerConfig {
    ServerConfig {
        port: 0,
        threads: 2,
        backend: match backend {
            Backend::IoUring => BackendChoice::IoUring,
            Backend::Epoll => BackendChoice::Epoll,
        },
        root: root.to_path_buf(),
        ..ServerConfig::default()
    }
}

/// The built-in sources for `root`.
pub fn builtin_registry(root: &Path) -> Registry {
    let mut registry = Registry::new();
    registry
        .register(nexus_server::FileSource::new(root).unwrap())
        .register(nexus_server::SyntheticSource);
    registry
}

/// Starts a server with the built-in sources serving `root`.
pub fn start_server(backend: Backend, root: &Path) -> Server {
    start_with(test_config(backend, root), builtin_registry(root))
}

/// Starts a server with this config and registry; panics with the reason if it cannot.
pub fn start_with(config: ServerConfig, registry: Registry) -> Server {
    let server = Server::start(config, registry).unwrap_or_else(|e| panic!("server start: {e}"));
    server
}

/// Waits until `condition` holds, polling every few milliseconds, failing after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory whose name contains `label`.
    pub fn new(label: &str) -> TempDir {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).unwrap();
        let name = format!(
            "nexus-{label}-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(random)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path.canonicalize().unwrap())
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `len` bytes of a deterministic pattern (different per `seed`) to `path`.
pub fn write_pattern_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    nexus_server::synthetic::fill(seed, 0, &mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Bytes `offset..offset + out.len()` of an endless log-like text: 64-byte lines numbered by
/// position, so every line differs (a chunk sent twice or out of order changes the bytes)
/// and zstd level 1 shrinks it several times. For compression tests and the zstd bench.
pub fn log_text(offset: u64, out: &mut [u8]) {
    const LINE: u64 = 64;
    let mut at = offset;
    let mut written = 0;
    while written < out.len() {
        let n = at / LINE;
        let line = format!(
            "{:<63}\n",
            format!(
                "{n:012} INFO request served path=/data/{:04} status=200",
                n % 977
            )
        );
        let from = (at % LINE) as usize;
        let take = (line.len() - from).min(out.len() - written);
        out[written..written + take].copy_from_slice(&line.as_bytes()[from..from + take]);
        written += take;
        at += take as u64;
    }
}

/// The first `len` bytes of [`log_text`].
pub fn log_text_bytes(len: usize) -> Vec<u8> {
    let mut text = vec![0u8; len];
    log_text(0, &mut text);
    text
}

/// The first `len` bytes of the `synthetic:` stream with this seed, as the server sends them.
pub fn synthetic_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    nexus_server::synthetic::stream_bytes(seed, 0, &mut out);
    out
}

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
    assert!(buf.is_empty(), "trailing partial frame from the server");
    frames
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

/// The xxh3 digest PROTOCOL.md specifies, for checking COMPLETE independently.
pub fn digest(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Bytes as a `Bytes`, for frames built by hand.
pub fn bytes(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

/// A child process killed (and reaped) when dropped, so a failing test or bench leaves no
/// server behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `nexus` binary at `binary` as `nexus serve` on a free port with these extra
/// environment variables; returns it and the address it reports in its "Listening." log
/// line. Its log goes on to this process's stderr, prefixed with `[nexus]`.
pub fn spawn_nexus_serve(binary: &Path, env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    let served = spawn_serve(binary, env);
    (served.child, served.address)
}

/// A `nexus serve` process started by [`spawn_serve`].
pub struct Served {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// Where it serves the protocol.
    pub address: SocketAddr,
    /// Where its admin endpoint listens, if it has one.
    pub admin: Option<SocketAddr>,
    /// Lines it has written to stderr so far.
    pub log_lines: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The first 10,000 of them.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Served {
    /// Its resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.child.0.id())
    }
}

/// The resident memory of process `pid` (VmRSS), in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Starts `nexus serve` on free ports (the protocol and the admin endpoint, unless `env`
/// says otherwise) and waits until it listens.
pub fn spawn_serve(binary: &Path, env: &[(&str, &str)]) -> Served {
    use std::io::BufRead;
    let mut child = std::process::Command::new(binary)
        .arg("serve")
        .env("BURST_NEXUS_SERVER_PORT", "0")
        .env("BURST_NEXUS_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let log_lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&log_lines);
    let log = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let kept = std::sync::Arc::clone(&log);
    // Keep reading for the child's whole life, so its log writes never hit a closed pipe.
    std::thread::spawn(move || {
        let field = |line: &str, name: &str| {
            line.split(name)
                .nth(1)
                .and_then(|rest| {
                    rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                        .next()
                })
                .map(str::to_string)
        };
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("[nexus] {}", line.escape_debug());
            let mut kept = kept.lock();
            if kept.len() < 10_000 {
                kept.push(line.clone());
            }
            drop(kept);
            if let Some(admin) = field(&line, "admin=") {
                let _ = tx.send((true, admin));
            } else if let Some(address) = field(&line, "address=") {
                let _ = tx.send((false, address));
            }
        }
    });
    let mut admin = None;
    let address = loop {
        let (is_admin, text) = rx
            .recv_timeout(PATIENCE)
            .expect("nexus serve never said where it listens");
        let parsed: SocketAddr = text.parse().expect("a socket address in the log");
        if is_admin {
            admin = Some(parsed);
        } else {
            break parsed;
        }
    };
    Served {
        child: guard,
        address,
        admin,
        log_lines,
        log,
    }
}

/// A plain HTTP/1.1 GET on loopback: the status code and the body.
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_read_timeout(Some(PATIENCE))?;
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    socket.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Ok((status, body))
}

/// The value of the sample `series` (a metric name with its labels, as printed) in a
/// Prometheus text scrape.
pub fn prometheus_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A port free on 127.0.0.1 a moment ago, for a program that must be told one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The chunk counts of the *spray* scenario: 10 streams of a random 0-99 chunks each (fresh
/// randomness per run), the first one empty so the empty case is always covered.
pub fn spray_counts() -> Vec<u64> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).unwrap();
    let mut x = u64::from_le_bytes(seed) | 1;
    (0..10)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i == 0 {
                0
            } else {
                x % 100
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_text_at_any_offset_is_the_same_text() {
        let whole = super::log_text_bytes(10_000);
        assert_eq!(
            &whole[..64],
            b"000000000000 INFO request served path=/data/0000 status=200    \n"
        );
        for (offset, len) in [(1usize, 63usize), (63, 2), (100, 5000), (9_999, 1)] {
            let mut piece = vec![0u8; len];
            super::log_text(offset as u64, &mut piece);
            assert_eq!(piece, whole[offset..offset + len], "at {offset}");
        }
    }
}
