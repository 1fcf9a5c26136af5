//! `nexus pull` as a real process against `nexus serve` as a real process: byte-exact output,
//! `--json`, exit codes, `--split`, `--manifest`, automatic resume, Ctrl-C; and the client
//! library against a server killed mid-stream.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nexus_client::{Client, ClientConfig, ErrorCode, Item, StreamOptions};
use nexus_testkit::{
    entry_states as states, json_stdout as report, run_pull, spawn_nexus_serve,
    stderr_of as stderr, write_pattern_file, ChildGuard, Proxy, TempDir, PATIENCE,
};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

fn serve(root: &Path) -> (ChildGuard, SocketAddr) {
    let root = root.to_str().unwrap();
    spawn_nexus_serve(Path::new(NEXUS), &[("BURST_NEXUS_SERVER_ROOT", root)])
}

fn pull(args: &[&str]) -> Output {
    run_pull(Path::new(NEXUS), args, &[("RUST_LOG", "warn")])
}

#[test]
fn pulls_a_file_byte_exact_with_a_json_summary() {
    let dir = TempDir::new("pull-file");
    let data = write_pattern_file(&dir.path().join("data.bin"), 20 << 20, 1);
    let (_server, address) = serve(dir.path());
    let out_path = dir.path().join("out.bin");
    let out = pull(&[
        &address.to_string(),
        "file:data.bin",
        "-o",
        out_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(&out_path).unwrap() == data);
    let json = report(&out);
    assert_eq!(json["ok"], true);
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["bytes"], 20971520);
    assert!(json["bytes_per_second"].as_f64().unwrap() > 0.0, "{json}");
    assert_eq!(states(&json), ["complete"]);
    let entry = &json["entries"][0];
    assert_eq!(
        entry["digest"],
        format!("{:016x}", nexus_testkit::digest(&data))
    );
    assert!(entry["error"].is_null(), "{json}");

    // Without -o the data goes to stdout.
    let out = pull(&[&address.to_string(), "file:data.bin"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout == data);
}

#[test]
fn failures_exit_non_zero_with_the_servers_error() {
    let dir = TempDir::new("pull-fail");
    let (_server, address) = serve(dir.path());
    let out_path = dir.path().join("never.bin");
    let out = pull(&[
        &address.to_string(),
        "file:missing.bin",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("not_found") && err.contains("missing.bin"),
        "{err}"
    );
    assert!(!out_path.exists(), "no partial output is left");

    // An output that is no regular file is left alone: here a link to /dev/null stands in
    // for /dev/null itself, which a failed pull run as root would otherwise delete.
    let null_link = dir.path().join("null");
    std::os::unix::fs::symlink("/dev/null", &null_link).unwrap();
    let out = pull(&[
        &address.to_string(),
        "file:missing.bin",
        "-o",
        null_link.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(null_link.symlink_metadata().is_ok(), "the link was removed");

    let out = pull(&[&address.to_string(), "nope:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown_source"), "{}", stderr(&out));

    // Nothing listens: a connection failure.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = pull(&[&free.to_string(), "synthetic:1MiB", "--retries", "0"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));

    // Usage errors.
    assert_eq!(pull(&[&address.to_string()]).status.code(), Some(2));
    assert_eq!(
        pull(&[&address.to_string(), "synthetic:1", "--json"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        pull(&[
            &address.to_string(),
            "file:x?offset=1",
            "--split",
            "2",
            "-o",
            "/dev/null"
        ])
        .status
        .code(),
        Some(2)
    );
}

#[test]
fn split_pulls_ranges_in_parallel_into_place() {
    let dir = TempDir::new("pull-split");
    let data = write_pattern_file(&dir.path().join("data.bin"), (24 << 20) + 12345, 2);
    let (_server, address) = serve(dir.path());
    let out_path = dir.path().join("out.bin");
    let out = pull(&[
        &address.to_string(),
        "file:data.bin",
        "-o",
        out_path.to_str().unwrap(),
        "--split",
        "4",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(&out_path).unwrap() == data);
    let json = report(&out);
    assert_eq!(states(&json), ["complete"]);
    assert_eq!(json["entries"][0]["streams"], 4, "{json}");
    assert_eq!(json["bytes"], (24 << 20) + 12345);
}

#[test]
fn manifest_pulls_every_line_and_one_failure_fails_the_operation() {
    let dir = TempDir::new("pull-manifest");
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            write_pattern_file(
                &dir.path().join(format!("in{i}.bin")),
                (4 << 20) + i,
                i as u64,
            )
        })
        .collect();
    let (_server, address) = serve(dir.path());
    let manifest = dir.path().join("manifest.txt");
    let line = |i: usize| {
        format!(
            "{address} file:in{i}.bin {}\n",
            dir.path().join(format!("out{i}.bin")).display()
        )
    };
    std::fs::write(
        &manifest,
        format!("# three files\n{}{}{}", line(0), line(1), line(2)),
    )
    .unwrap();
    let out = pull(&[
        "--manifest",
        manifest.to_str().unwrap(),
        "--parallel",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for (i, data) in files.iter().enumerate() {
        assert!(
            std::fs::read(dir.path().join(format!("out{i}.bin"))).unwrap() == *data,
            "out{i}"
        );
    }
    assert_eq!(states(&report(&out)), ["complete"; 3]);

    // A missing file fails the whole operation: exit 1, and its output is not left behind.
    let bad = format!(
        "{address} file:missing.bin {}\n",
        dir.path().join("bad.bin").display()
    );
    std::fs::write(&manifest, format!("{}{bad}", line(0))).unwrap();
    let out = pull(&["--manifest", manifest.to_str().unwrap(), "--parallel", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not_found"), "{}", stderr(&out));
    assert!(!dir.path().join("bad.bin").exists());
}

#[test]
fn a_dropped_connection_is_resumed_up_to_the_retry_limit() {
    let dir = TempDir::new("pull-resume");
    let data = write_pattern_file(&dir.path().join("data.bin"), 24 << 20, 3);
    let (_server, address) = serve(dir.path());
    // Every connection through the proxy is cut after 10 MiB: three attempts are needed.
    let proxy = Proxy::start(address);
    proxy.cut_after(10 << 20);
    let out_path = dir.path().join("out.bin");
    let target = proxy.address().to_string();
    let out = pull(&[
        &target,
        "file:data.bin",
        "-o",
        out_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        std::fs::read(&out_path).unwrap() == data,
        "resumed output differs"
    );
    let json = report(&out);
    let retries = &json["entries"][0]["retries"];
    assert!(*retries == 2 || *retries == 3, "{json}");

    let out = pull(&[
        &target,
        "file:data.bin",
        "-o",
        out_path.to_str().unwrap(),
        "--retries",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("connection_lost") && err.contains(", 1 retry)"),
        "{err}"
    );
    assert!(!out_path.exists());
}

#[test]
fn ctrl_c_cancels_every_stream_and_removes_partial_outputs() {
    let dir = TempDir::new("pull-interrupt");
    let (_server, address) = serve(dir.path());
    let manifest = dir.path().join("manifest.txt");
    let outputs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("big{i}.bin")))
        .collect();
    let text: String = outputs
        .iter()
        .map(|o| format!("{address} synthetic:1TiB {}\n", o.display()))
        .collect();
    std::fs::write(&manifest, text).unwrap();
    let err_path = dir.path().join("stderr.txt");
    let child = Command::new(NEXUS)
        .args([
            "pull",
            "--manifest",
            manifest.to_str().unwrap(),
            "--parallel",
            "3",
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + PATIENCE;
    while !outputs
        .iter()
        .all(|o| std::fs::metadata(o).is_ok_and(|m| m.len() > 0))
    {
        assert!(Instant::now() < deadline, "the pulls never started writing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .arg("-INT")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.0.wait().unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    for o in &outputs {
        assert!(!o.exists(), "{o:?} left behind");
    }
}

#[test]
fn a_server_killed_mid_stream_is_an_error_with_the_byte_count() {
    let dir = TempDir::new("pull-killed");
    let (mut server, address) = serve(dir.path());
    let client = Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .unwrap();
    let mut stream = client.initiate(address, "synthetic:1TiB", StreamOptions::default());
    let mut received = 0u64;
    while received < 8 << 20 {
        match stream.recv() {
            Some(Item::Chunk(data)) => received += data.len() as u64,
            other => panic!("expected data, got {other:?}"),
        }
    }
    server.0.kill().unwrap();
    let end = loop {
        match stream.recv() {
            Some(Item::Chunk(data)) => received += data.len() as u64,
            Some(Item::End(end)) => break end,
            None => panic!("no end marker"),
        }
    };
    assert_eq!(
        end.error_code(),
        Some(ErrorCode::CONNECTION_LOST),
        "{end:?}"
    );
    assert_eq!(end.bytes_received, received);
}

#[test]
fn zstd_pulls_compressible_data_byte_exact_and_compressed() {
    let dir = TempDir::new("pull-zstd");
    let text = nexus_testkit::log_text_bytes(8 << 20);
    std::fs::write(dir.path().join("app.log"), &text).unwrap();
    let root = dir.path().to_str().unwrap();
    let served = nexus_testkit::spawn_serve(Path::new(NEXUS), &[("BURST_NEXUS_SERVER_ROOT", root)]);
    let compressed = || {
        let (_, scrape) = nexus_testkit::http_get(served.admin.unwrap(), "/metrics").unwrap();
        nexus_testkit::prometheus_sample(&scrape, "nexus_server_chunks_compressed_total")
            .unwrap_or(0.0)
    };
    let address = served.address.to_string();
    let out_path = dir.path().join("out.log");
    let out_arg = out_path.to_str().unwrap();

    let out = pull(&[&address, "file:app.log", "-o", out_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(compressed(), 0.0, "not asked for, not compressed");

    let out = pull(&[&address, "file:app.log", "-o", out_arg, "--zstd"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(&out_path).unwrap() == text);
    // 8 MiB in 1 MiB chunks, every one of them text.
    assert_eq!(compressed(), 8.0);
}

/// A server that announces 3 MB, sends 1.5 MB and then a COMPLETE whose counts and digest
/// match the 1.5 MB: `nexus pull` must not call that copy verified.
#[test]
fn a_short_stream_with_a_matching_complete_is_an_integrity_failure() {
    use nexus_protocol::frame::{Chunk, Frame};
    use nexus_protocol::{Completion, ItemCounts};
    let half = bytes::Bytes::from(vec![42u8; 1_500_000]);
    let server = nexus_testkit::FakeServer::start(move |initiate| {
        let stream = initiate.stream;
        let mut frames = vec![Frame::Initiated {
            stream,
            zstd: false,
            expected_bytes: 3_000_000,
        }];
        for (seq, piece) in half.chunks(500_000).enumerate() {
            frames.push(Frame::Chunk(Chunk {
                stream,
                seq: seq as u64,
                raw_len: None,
                window_empty: false,
                data: bytes::Bytes::copy_from_slice(piece),
            }));
        }
        let completion = Completion {
            bytes: 1_500_000,
            chunks: 3,
            digest: nexus_testkit::digest(&half),
            items: ItemCounts::default(),
        };
        frames.push(Frame::Complete {
            stream,
            completion,
            report: None,
        });
        frames
    });
    let dir = TempDir::new("pull-short");
    let out_path = dir.path().join("short.bin");
    let out = pull(&[
        &server.address().to_string(),
        "file:x",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("integrity_failure") && err.contains("1500000 of the 3000000"),
        "{err}"
    );
    assert!(!out_path.exists(), "no copy is left that looks complete");
}

/// A server's ERROR message with a window-title sequence, a clear-screen sequence, a carriage
/// return and a forged line: `nexus pull` shows it escaped, never raw.
#[test]
fn a_servers_message_cannot_drive_the_terminal() {
    use nexus_protocol::frame::Frame;
    use nexus_protocol::ErrorCode;
    let hostile = "\x1b]0;owned\x07\x1b[2J\rnexus pull: all good\n\u{9b}31m";
    let server = nexus_testkit::FakeServer::start(move |initiate| {
        vec![Frame::Error {
            stream: initiate.stream,
            code: ErrorCode::NOT_FOUND,
            message: hostile.to_string(),
        }]
    });
    let out = pull(&[&server.address().to_string(), "file:x", "-o", "/dev/null"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        !err.trim_end().chars().any(|c| c.is_control()),
        "raw control characters reached the terminal: {err:?}"
    );
    assert!(
        err.contains("\\x1b]0;owned") && err.contains("\\rnexus pull"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "no forged line: {err}");
}
