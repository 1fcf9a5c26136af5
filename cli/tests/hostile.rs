//! `nexus serve` as a real process against hostile clients over real sockets, on both IO
//! backends: what one client can make the server hold, and how much it can make it log.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nexus_protocol::frame::{Bind, Frame, Initiate, PREFACE};
use nexus_protocol::{OperationId, StreamId};
use nexus_testkit::{spawn_serve, Served, TempDir, PATIENCE};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

fn serve(backend: &str, root: &Path, env: &[(&str, &str)]) -> Served {
    let mut all = vec![
        ("BURST_NEXUS_IO_BACKEND", backend),
        ("BURST_NEXUS_SERVER_ROOT", root.to_str().unwrap()),
    ];
    all.extend_from_slice(env);
    spawn_serve(Path::new(NEXUS), &all)
}

fn hello() -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    let bind = Bind {
        min_version: 1,
        max_version: 1,
        nonce: [1; 32],
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        heartbeat_interval_ms: 0,
        name: "rapid-reset".into(),
    };
    bytes.extend_from_slice(&Frame::Bind(bind).to_bytes());
    bytes
}

/// `count` INITIATE and CANCEL pairs from stream `first` on: HTTP/2's "rapid reset".
fn rapid_reset(first: u32, count: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    for id in first..first + count {
        let stream = StreamId(id);
        let initiate = Initiate {
            stream,
            operation: OperationId(0),
            accept_zstd: false,
            paradata: "synthetic:1GiB".into(),
            traceparent: None,
            push: None,
        };
        bytes.extend_from_slice(&Frame::Initiate(initiate).to_bytes());
        let cancel = Frame::Cancel {
            stream,
            operation: None,
            reason: String::new(),
        };
        bytes.extend_from_slice(&cancel.to_bytes());
    }
    bytes
}

/// One client floods INITIATE/CANCEL pairs for 3 s and never reads a byte. The server must
/// hold a bounded amount of memory for it, log a bounded number of lines, and close it once
/// it has left frames unread past the deadline.
fn rapid_reset_flood(backend: &str) {
    let root = TempDir::new("rapid-reset");
    let server = serve(
        backend,
        root.path(),
        &[("BURST_NEXUS_SERVER_PENDING_CONTROL_TIMEOUT_MS", "1000")],
    );
    let before = server.rss();
    let lines_before = server.log_lines.load(Ordering::Relaxed);
    let mut socket = TcpStream::connect(server.address).unwrap();
    socket
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    socket.write_all(&hello()).unwrap();
    let mut next = 1u32;
    let mut peak = 0u64;
    let mut closed = false;
    let flood_until = Instant::now() + Duration::from_secs(3);
    let deadline = Instant::now() + PATIENCE;
    // Flood for 3 s; then keep trying until the server has closed the connection.
    while !closed || Instant::now() < flood_until {
        assert!(
            Instant::now() < deadline,
            "the server never closed the flood"
        );
        if !closed {
            let batch = rapid_reset(next, 1000);
            next += 1000;
            match socket.write_all(&batch) {
                Ok(()) => {}
                // The server stopped reading: the flood waits, as a real one would.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => closed = true,
            }
        }
        peak = peak.max(server.rss());
        if closed && Instant::now() >= flood_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "one non-reading client grew the server by {} MiB",
        growth >> 20
    );
    let lines = server.log_lines.load(Ordering::Relaxed) - lines_before;
    assert!(lines < 60, "one client made the server log {lines} lines");
    assert!(next > 1000, "the flood ran");
}

#[test]
fn rapid_reset_from_a_client_that_never_reads_is_bounded_io_uring() {
    rapid_reset_flood("io_uring");
}

#[test]
fn rapid_reset_from_a_client_that_never_reads_is_bounded_epoll() {
    rapid_reset_flood("epoll");
}

/// Paradata with terminal escapes and a forged line reaches the server's log escaped.
fn log_escape(backend: &str) {
    let root = TempDir::new("log-escape");
    let server = serve(backend, root.path(), &[]);
    let mut client = nexus_testkit::Client::connect(server.address);
    let hostile = "file:x\x1b[2J\r\nFAKE Stream refused.";
    let pulled = client.pull(hostile);
    assert_eq!(pulled.error().0, nexus_protocol::ErrorCode::NOT_FOUND);
    nexus_testkit::wait_until("the refusal in the log", || {
        server
            .log
            .lock()
            .iter()
            .any(|l| l.contains("Stream refused."))
    });
    let log = server.log.lock();
    let refused: Vec<&String> = log.iter().filter(|l| l.contains("refused")).collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("x\\x1b[2J\\r\\nFAKE"), "{}", refused[0]);
    assert!(
        !log.iter()
            .any(|l| l.starts_with("FAKE") || l.chars().any(|c| c == '\x1b')),
        "{log:?}"
    );
}

/// A raw client that opens `streams` streams of `paradata` at a 16 MiB window and never
/// reads a byte.
fn pin(address: std::net::SocketAddr, streams: u32, paradata: &str) -> TcpStream {
    let mut socket = TcpStream::connect(address).unwrap();
    let mut bytes = PREFACE.to_vec();
    let bind = Bind {
        min_version: 1,
        max_version: 1,
        nonce: [2; 32],
        initial_window: 16 << 20,
        max_frame_size: 4 << 20,
        heartbeat_interval_ms: 0,
        name: "pin".into(),
    };
    bytes.extend_from_slice(&Frame::Bind(bind).to_bytes());
    for id in 1..=streams {
        let initiate = Initiate {
            stream: StreamId(id),
            operation: OperationId(0),
            accept_zstd: false,
            paradata: paradata.into(),
            traceparent: None,
            push: None,
        };
        bytes.extend_from_slice(&Frame::Initiate(initiate).to_bytes());
    }
    socket.write_all(&bytes).unwrap();
    socket
}

fn memory_held(server: &Served) -> f64 {
    let (_, scrape) = nexus_testkit::http_get(server.admin.unwrap(), "/metrics").unwrap();
    nexus_testkit::prometheus_sample(&scrape, "nexus_server_stream_memory_bytes").unwrap_or(0.0)
}

/// Five clients pin 16 streams each at a 16 MiB window (20 GiB of windows) and never read.
/// The server holds at most its budget (64 MiB here) plus a fixed overhead, refuses new
/// streams meanwhile, and gives the memory back once they leave.
fn memory_budget(backend: &str) {
    let root = TempDir::new("budget");
    let big = std::fs::File::create(root.path().join("big.bin")).unwrap();
    big.set_len(256 << 20).unwrap();
    const BUDGET: u64 = 64 << 20;
    let server = serve(
        backend,
        root.path(),
        &[
            ("BURST_NEXUS_SERVER_THREADS", "1"),
            ("BURST_NEXUS_SERVER_MEMORY_MAX", "67108864"),
            ("BURST_NEXUS_SERVER_CONNECTION_MEMORY_MAX", "16777216"),
        ],
    );
    let before = server.rss();
    let pins: Vec<TcpStream> = (0..5)
        .map(|_| pin(server.address, 16, "file:big.bin"))
        .collect();
    // Full: not one more 1 MiB chunk fits.
    nexus_testkit::wait_until("the hostile clients to fill the budget", || {
        memory_held(&server) > (BUDGET - (1 << 20)) as f64
    });
    let mut fresh = nexus_testkit::Client::connect(server.address);
    let refused = fresh.pull("file:big.bin?length=1MiB");
    assert_eq!(
        refused.error().0,
        nexus_protocol::ErrorCode::RESOURCE_EXHAUSTED
    );
    let pinned = server.rss();
    assert!(memory_held(&server) <= BUDGET as f64);
    assert!(
        pinned.saturating_sub(before) < BUDGET + (32 << 20),
        "pinned at {} MiB over {} MiB idle",
        pinned >> 20,
        before >> 20
    );
    drop(pins);
    let deadline = Instant::now() + PATIENCE;
    while memory_held(&server) != 0.0 || server.rss() >= before + (16 << 20) {
        assert!(
            Instant::now() < deadline,
            "still held: {} bytes, RSS {} MiB over {} MiB idle",
            memory_held(&server),
            server.rss() >> 20,
            before >> 20
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        fresh.pull("file:big.bin?length=3MiB").completion().bytes,
        3 << 20
    );
}

#[test]
fn hostile_clients_pinning_streams_stay_within_the_memory_budget_io_uring() {
    memory_budget("io_uring");
}

#[test]
fn hostile_clients_pinning_streams_stay_within_the_memory_budget_epoll() {
    memory_budget("epoll");
}

fn connect_with_secret(
    address: std::net::SocketAddr,
    secret: &str,
) -> Result<nexus_testkit::Client, nexus_protocol::WireError> {
    let settings = nexus_protocol::ClientSettings {
        secret: Some(secret.as_bytes().to_vec()),
        ..nexus_protocol::ClientSettings::default()
    };
    nexus_testkit::Client::connect_with(address, settings)
}

/// Wrong secrets from one address as fast as it can for 2 s: after its budget the server
/// refuses it before the handshake, so it gets few guesses (thousands a second before), the
/// refusals are counted by reason, and the right secret works again once the backoff passed.
fn auth_throttle(backend: &str) {
    let root = TempDir::new("auth-throttle");
    let server = serve(
        backend,
        root.path(),
        &[
            ("BURST_NEXUS_AUTH_SECRET", "correct horse"),
            ("BURST_NEXUS_SERVER_AUTH_FAILURES_MAX", "5"),
        ],
    );
    let started = Instant::now();
    let (mut attempts, mut throttled) = (0, 0);
    while started.elapsed() < Duration::from_secs(2) {
        let err = connect_with_secret(server.address, "wrong").err().unwrap();
        assert_eq!(err.code, nexus_protocol::ErrorCode::AUTH_FAILED, "{err}");
        if err.message.contains("too many failed authentications") {
            throttled += 1;
        }
        attempts += 1;
    }
    let (_, scrape) = nexus_testkit::http_get(server.admin.unwrap(), "/metrics").unwrap();
    let sample = |series| nexus_testkit::prometheus_sample(&scrape, series).unwrap_or(0.0);
    let guesses = sample("nexus_protocol_errors_total{reason=\"auth_failed\"}");
    let refused = sample("nexus_server_connections_refused_total{reason=\"auth_throttled\"}");
    assert!(throttled > 0 && attempts > 100, "{throttled} of {attempts}");
    // 5 guesses, a 1 s backoff, 5 more, a 2 s backoff: at most 10 in 2 s.
    assert!(guesses <= 10.0, "{guesses} guesses got through in 2 s");
    assert_eq!(refused, throttled as f64);
    // The backoff passes; the right secret is let in.
    nexus_testkit::wait_until("the backoff to pass", || {
        connect_with_secret(server.address, "correct horse").is_ok()
    });
}

#[test]
fn a_clients_paradata_cannot_forge_server_log_lines_io_uring() {
    log_escape("io_uring");
}

#[test]
fn a_clients_paradata_cannot_forge_server_log_lines_epoll() {
    log_escape("epoll");
}

#[test]
fn wrong_secrets_from_one_address_are_throttled_io_uring() {
    auth_throttle("io_uring");
}

#[test]
fn wrong_secrets_from_one_address_are_throttled_epoll() {
    auth_throttle("epoll");
}
