//! `nexus serve` as a real process: it serves, and on SIGTERM drains (GOAWAY, running
//! streams go on until the deadline, the rest end with `draining`) and exits 0. Bad
//! configuration exits non-zero before anything starts.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_protocol::{ClientEvent, ErrorCode, Outcome};
use nexus_testkit::{spawn_nexus_serve, ChildGuard, Client, TempDir, PATIENCE};

/// Starts `nexus serve` serving `root`; returns the child and its address.
fn serve(root: &std::path::Path, env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    let root = root.to_str().unwrap();
    let mut all = vec![("BURST_NEXUS_SERVER_ROOT", root)];
    all.extend_from_slice(env);
    spawn_nexus_serve(std::path::Path::new(env!("CARGO_BIN_EXE_nexus")), &all)
}

fn wait_exit(ChildGuard(child): &mut ChildGuard) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "nexus serve did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_drains_running_streams_and_exits_zero() {
    let dir = TempDir::new("drain");
    // The drain deadline must outlast the short stream on a loaded machine (64 MiB in 1.5 s
    // failed under a CPU hog): 16 MiB, four windows, in 5 s, while the stuck stream can never
    // finish and ends at the deadline.
    let (mut child, address) = serve(
        dir.path(),
        &[("BURST_NEXUS_SERVER_DRAIN_TIMEOUT_MS", "5000")],
    );
    let mut client = Client::connect(address);
    // A stream the client stops reading (it cannot finish) and one it reads to the end.
    let stuck = client.initiate("synthetic:1TiB");
    let short = client.initiate("synthetic:16MiB");
    let deadline = Instant::now() + PATIENCE;
    // Wait until both run, then signal.
    let mut seen_short = false;
    while !seen_short {
        if let Some(ClientEvent::Chunk { stream, data }) = client.next_event(deadline) {
            if stream == short {
                seen_short = true;
                client.consume(stream, data.len());
            }
        }
    }
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let (mut go_away, mut short_outcome, mut stuck_outcome) = (false, None, None);
    while stuck_outcome.is_none() || short_outcome.is_none() {
        match client.next_event(deadline).expect("drain did not finish") {
            ClientEvent::GoAway { .. } => go_away = true,
            ClientEvent::Chunk { stream, data } if stream == short => {
                client.consume(stream, data.len())
            }
            ClientEvent::StreamEnd {
                stream, outcome, ..
            } if stream == short => short_outcome = Some(outcome),
            ClientEvent::StreamEnd {
                stream, outcome, ..
            } if stream == stuck => stuck_outcome = Some(outcome),
            _ => {}
        }
    }
    assert!(go_away, "no GOAWAY before the end");
    assert!(
        matches!(short_outcome, Some(Outcome::Complete(_))),
        "{short_outcome:?}"
    );
    match stuck_outcome {
        Some(Outcome::Error { code, .. }) => assert_eq!(code, ErrorCode::DRAINING),
        other => panic!("the unfinished stream ended with {other:?}"),
    }
    assert!(wait_exit(&mut child).success());
    assert!(
        std::net::TcpStream::connect(address).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn bad_configuration_exits_before_listening() {
    let dir = TempDir::new("badconf");
    for (var, value) in [
        ("BURST_NEXUS_SERVER_PORT", "abc"),
        ("BURST_NEXUS_STREAM_TIMEOUT_MS", "0"),
        ("BURST_NEXUS_IO_BACKEND", "kqueue"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
            .arg("serve")
            .env("BURST_NEXUS_SERVER_ROOT", dir.path())
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(stderr.contains(var) && stderr.contains(value), "{stderr}");
    }
}

#[test]
fn served_by_the_binary_on_the_backend_asked_for() {
    let dir = TempDir::new("binary");
    std::fs::write(dir.path().join("hello.txt"), b"hello, nexus\n").unwrap();
    for backend in ["io_uring", "epoll"] {
        let (mut child, address) = serve(dir.path(), &[("BURST_NEXUS_IO_BACKEND", backend)]);
        let mut client = Client::connect(address);
        assert_eq!(client.pull("file:hello.txt").data, b"hello, nexus\n");
        drop(client);
        Command::new("kill")
            .arg("-INT")
            .arg(child.0.id().to_string())
            .status()
            .unwrap();
        assert!(wait_exit(&mut child).success());
    }
}

/// A second `nexus serve` on a port the first holds refuses to start, naming the port, and
/// the first goes on serving every connection.
#[test]
fn a_second_server_on_a_taken_port_refuses_to_start() {
    let dir = TempDir::new("port-taken");
    std::fs::write(dir.path().join("mine"), b"first server").unwrap();
    let (_first, address) = serve(dir.path(), &[]);
    let port = address.port().to_string();
    let second = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["serve", "--port", &port])
        .env("BURST_NEXUS_ADMIN_ADDRESS", "")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A second server that started anyway is killed when the guard drops.
    let mut second = ChildGuard(second);
    assert_eq!(wait_exit(&mut second).code(), Some(2));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(&format!("127.0.0.1:{port} is already in use")),
        "{err}"
    );
    for _ in 0..20 {
        let mut client = Client::connect(address);
        assert_eq!(client.pull("file:mine").data, b"first server");
    }
}

/// A SIGTERM the moment the server says it listens (an orchestrator's stop right after a
/// start) still drains and exits 0: the handlers are in place before the server starts.
#[test]
fn a_signal_right_after_start_drains_instead_of_killing() {
    let dir = TempDir::new("early-signal");
    for _ in 0..5 {
        let (mut child, _) = serve(dir.path(), &[]);
        Command::new("kill")
            .arg("-TERM")
            .arg(child.0.id().to_string())
            .status()
            .unwrap();
        let status = wait_exit(&mut child);
        assert!(status.success(), "{status:?}");
    }
}
