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
#[test]
fn a_clients_paradata_cannot_forge_server_log_lines() {
    let root = TempDir::new("log-escape");
    let server = serve("epoll", root.path(), &[]);
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
