//! `nexus push` and `nexus verify` as real processes against `nexus serve` processes: byte-exact
//! pushes from files and stdin, a killed client, a killed server, a full disk, auth, and
//! replication along a chain of three servers with one of them killed mid-push.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use nexus_server::Backend;
use nexus_testkit::{
    json_stdout as report, partial_uploads as partial_files, scrape_sample, spawn_serve,
    stderr_of as stderr, wait_until, write_pattern_file, Served, TempDir,
};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// A server whose root and upload root are `root` (so what is pushed can be pulled back).
fn serve(root: &Path, backend: Backend, extra: &[(&str, &str)]) -> Served {
    let root = root.to_str().unwrap();
    let backend = backend.to_string();
    let mut env = vec![
        ("BURST_NEXUS_SERVER_ROOT", root),
        ("BURST_NEXUS_SERVER_UPLOAD_ROOT", root),
        ("BURST_NEXUS_IO_BACKEND", backend.as_str()),
    ];
    env.extend_from_slice(extra);
    spawn_serve(Path::new(NEXUS), &env)
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(NEXUS);
    command.args(args).env_remove("RUST_LOG");
    command
}

fn push(args: &[&str]) -> Output {
    push_env(args, &[])
}

fn push_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = command(&[&["push"], args].concat());
    command.envs(env.iter().copied()).stdin(Stdio::null());
    command.output().unwrap()
}

/// `nexus push - ...` with stdin a pipe the test writes to.
fn push_from_pipe(args: &[&str]) -> Child {
    command(&[&["push", "-"], args].concat())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn received(served: &Served) -> f64 {
    scrape_sample(served.admin.unwrap(), "nexus_server_push_bytes_total")
}

fn active(served: &Served) -> f64 {
    scrape_sample(served.admin.unwrap(), "nexus_server_pushes_active")
}

#[test]
fn pushes_are_byte_exact_from_files_and_stdin() {
    for backend in [Backend::IoUring, Backend::Epoll] {
        let dir = TempDir::new("push-exact");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let server = serve(&root, backend, &[]);
        let endpoint = server.address.to_string();
        // 0 bytes, 1 byte, one chunk and one byte more (the default chunk is 1 MiB).
        for (name, len) in [("zero", 0), ("one", 1), ("chunk", (1 << 20) + 1)] {
            let local = dir.path().join(name);
            let data = write_pattern_file(&local, len, 7);
            let sink = format!("file:in/{name}.bin");
            let out = push(&[local.to_str().unwrap(), &endpoint, &sink, "--json"]);
            assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
            let json = report(&out);
            assert_eq!(json["entries"][0]["state"], "complete");
            assert_eq!(json["bytes"], len);
            assert_eq!(
                json["entries"][0]["digest"],
                format!("{:016x}", nexus_testkit::digest(&data))
            );
            assert!(std::fs::read(root.join("in").join(format!("{name}.bin"))).unwrap() == data);
        }
        // Stdin, of a size nobody declared.
        let data = nexus_testkit::synthetic_bytes(3, 3 << 20);
        let mut child = push_from_pipe(&[&endpoint, "file:in/stdin.bin"]);
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&data).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stderr(&out).contains("verified"), "{}", stderr(&out));
        assert!(std::fs::read(root.join("in/stdin.bin")).unwrap() == data);
        assert_eq!(partial_files(&root), 0);
    }
}

#[test]
fn a_gibibyte_arrives_byte_exact() {
    // Two GiB of files: in memory when there is room, as free disk varies between machines.
    let dir = TempDir::in_memory("push-gib", 2 << 30);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let local = dir.path().join("big.bin");
    let data = write_pattern_file(&local, 1 << 30, 11);
    let want = nexus_testkit::digest(&data);
    drop(data);
    let server = serve(&root, Backend::IoUring, &[]);
    let out = push(&[
        local.to_str().unwrap(),
        &server.address.to_string(),
        "file:big.bin",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(report(&out)["entries"][0]["digest"], format!("{want:016x}"));
    let got = std::fs::read(root.join("big.bin")).unwrap();
    assert_eq!(got.len(), 1 << 30);
    assert_eq!(nexus_testkit::digest(&got), want);
}

#[test]
fn uploads_are_off_by_default_and_paths_stay_confined() {
    let dir = TempDir::new("push-refused");
    let local = dir.path().join("f");
    write_pattern_file(&local, 10, 1);
    let root = dir.path().to_str().unwrap();
    // No upload root: refused, saying how to enable uploads.
    let off = spawn_serve(Path::new(NEXUS), &[("BURST_NEXUS_SERVER_ROOT", root)]);
    let out = push(&[local.to_str().unwrap(), &off.address.to_string(), "file:x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("permission_denied") && err.contains("BURST_NEXUS_SERVER_UPLOAD_ROOT"),
        "{err}"
    );
    let uploads = dir.path().join("up");
    std::fs::create_dir(&uploads).unwrap();
    std::os::unix::fs::symlink(dir.path(), uploads.join("link")).unwrap();
    let on = serve(&uploads, Backend::Epoll, &[]);
    for (paradata, code) in [
        ("file:../escape", "permission_denied"),
        ("file:/etc/passwd", "permission_denied"),
        ("file:link/f2", "permission_denied"),
    ] {
        let out = push(&[local.to_str().unwrap(), &on.address.to_string(), paradata]);
        assert_eq!(out.status.code(), Some(1), "{paradata}");
        assert!(stderr(&out).contains(code), "{paradata}: {}", stderr(&out));
    }
    assert!(!dir.path().join("escape").exists() && !dir.path().join("f2").exists());
}

#[test]
fn a_secret_is_required_when_set() {
    let dir = TempDir::new("push-auth");
    let local = dir.path().join("f");
    let data = write_pattern_file(&local, 1000, 1);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let server = serve(
        &root,
        Backend::Epoll,
        &[("BURST_NEXUS_AUTH_SECRET", "s3cret")],
    );
    let args = [
        local.to_str().unwrap(),
        &server.address.to_string(),
        "file:f",
    ];
    let out = push_env(&args, &[("BURST_NEXUS_AUTH_SECRET", "wrong")]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let out = push(&args);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(!root.join("f").exists());
    let out = push_env(&args, &[("BURST_NEXUS_AUTH_SECRET", "s3cret")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(root.join("f")).unwrap() == data);
}

#[test]
fn a_killed_client_leaves_nothing() {
    let dir = TempDir::new("push-client-killed");
    let server = serve(dir.path(), Backend::IoUring, &[]);
    let mut child = push_from_pipe(&[&server.address.to_string(), "file:half.bin"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 4 << 20]).unwrap();
    wait_until("the server to receive data", || received(&server) > 0.0);
    assert_eq!(partial_files(dir.path()), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the push to end", || active(&server) == 0.0);
    assert!(!dir.path().join("half.bin").exists());
    // The sink's thread removes the partial file as the push ends, on its own time.
    wait_until("the partial file to go", || partial_files(dir.path()) == 0);
}

#[test]
fn a_killed_server_leaves_nothing_after_its_restart() {
    let dir = TempDir::new("push-server-killed");
    let mut server = serve(dir.path(), Backend::Epoll, &[]);
    let mut child = push_from_pipe(&[&server.address.to_string(), "file:half.bin"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 4 << 20]).unwrap();
    wait_until("the server to receive data", || received(&server) > 0.0);
    server.child.0.kill().unwrap();
    server.child.0.wait().unwrap();
    // The client learns the connection is gone (a write or its end).
    let _ = stdin.write_all(&vec![7u8; 4 << 20]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(!dir.path().join("half.bin").exists());
    assert_eq!(
        partial_files(dir.path()),
        1,
        "the crash left its partial file"
    );
    let restarted = serve(dir.path(), Backend::Epoll, &[]);
    assert_eq!(partial_files(dir.path()), 0, "cleaned at the next start");
    assert!(!dir.path().join("half.bin").exists());
    drop(restarted);
}

#[test]
fn a_full_disk_fails_cleanly() {
    let dir = TempDir::new("push-full");
    let uploads = dir.path().join("up");
    std::fs::create_dir(&uploads).unwrap();
    // The server runs in a mount namespace of its own with a 2 MiB tmpfs on its upload root.
    let wrapper = dir.path().join("nexus-on-tmpfs");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare -m --propagation private sh -c \
             'mount -t tmpfs -o size=2m tmpfs \"$0\" && exec \"$1\" \"$2\"' {} {NEXUS} \"$1\"\n",
            uploads.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let up = uploads.to_str().unwrap();
    let server = spawn_serve(
        &wrapper,
        &[
            ("BURST_NEXUS_SERVER_ROOT", up),
            ("BURST_NEXUS_SERVER_UPLOAD_ROOT", up),
        ],
    );
    let local = dir.path().join("big");
    write_pattern_file(&local, 8 << 20, 5);
    let out = push(&[
        local.to_str().unwrap(),
        &server.address.to_string(),
        "file:big",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("sink_failed") && err.contains("no space left"),
        "{err}"
    );
    // What the server sees, through its own mount namespace.
    let inside = PathBuf::from(format!("/proc/{}/root{}", server.child.0.id(), up));
    wait_until("the push to end", || active(&server) == 0.0);
    let listing = |p: &Path| std::fs::read_dir(p).unwrap().count();
    // The sink's thread removes the partial file as the push ends, on its own time.
    wait_until("no partial file kept", || {
        listing(&inside.join(".nexus-partial")) == 0
    });
    assert!(!inside.join("big").exists());
    // Space is back: a small push still works.
    let small = dir.path().join("small");
    write_pattern_file(&small, 1000, 5);
    let out = push(&[
        small.to_str().unwrap(),
        &server.address.to_string(),
        "file:small",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(inside.join("small").exists());
}

/// Three servers A, B, C, each with its own root.
struct Chain {
    _dir: TempDir,
    roots: Vec<PathBuf>,
    servers: Vec<Served>,
    local: PathBuf,
    data: Vec<u8>,
}

impl Chain {
    fn start(label: &str, len: usize) -> Chain {
        let dir = TempDir::new(label);
        let local = dir.path().join("blob");
        let data = write_pattern_file(&local, len, 9);
        let mut roots = Vec::new();
        let mut servers = Vec::new();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let root = dir.path().join(name);
            std::fs::create_dir(&root).unwrap();
            let backend = [Backend::IoUring, Backend::Epoll][i % 2];
            servers.push(serve(&root, backend, &[]));
            roots.push(root);
        }
        Chain {
            _dir: dir,
            roots,
            servers,
            local,
            data,
        }
    }

    fn replicas(&self) -> String {
        let all: Vec<String> = self.servers.iter().map(|s| s.address.to_string()).collect();
        all.join(",")
    }

    fn verify(&self, path: &str) -> Output {
        command(&["verify", path, "--replicas", &self.replicas()])
            .output()
            .unwrap()
    }
}

#[test]
fn a_chain_of_three_is_byte_exact_and_verify_catches_a_change() {
    let chain = Chain::start("push-chain", (5 << 20) + 3);
    let out = push(&[
        chain.local.to_str().unwrap(),
        "file:d/blob",
        "--replicas",
        &chain.replicas(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = report(&out);
    let replicas = json["entries"][0]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    assert!(replicas.iter().all(|r| r["state"] == "committed"), "{json}");
    for root in &chain.roots {
        assert!(std::fs::read(root.join("d/blob")).unwrap() == chain.data);
        assert_eq!(partial_files(root), 0);
    }
    // Each link carried the data once: every server received it exactly once.
    for server in &chain.servers {
        assert_eq!(received(server), chain.data.len() as f64);
    }
    let out = chain.verify("d/blob");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // One byte of one replica changes: verify says so and exits 4.
    let mut altered = chain.data.clone();
    altered[1000] ^= 1;
    std::fs::write(chain.roots[1].join("d/blob"), &altered).unwrap();
    let out = chain.verify("d/blob");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("differ"), "{}", stderr(&out));
}

/// Pushes through the chain from a pipe, kills C once it has data, then ends the data.
fn kill_the_tail_mid_push(chain: &mut Chain, extra: &[&str]) -> Output {
    kill_mid_push(chain, 2, extra)
}

/// Pushes through the chain from a pipe, kills replica `victim` once the tail has data, then
/// ends the data.
fn kill_mid_push(chain: &mut Chain, victim: usize, extra: &[&str]) -> Output {
    let replicas = chain.replicas();
    let mut args = vec!["file:blob", "--replicas", &replicas, "--json"];
    args.extend_from_slice(extra);
    let mut child = push_from_pipe(&args);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&chain.data[..4 << 20]).unwrap();
    let tail = &chain.servers[2];
    wait_until("the tail to receive data", || received(tail) > 0.0);
    chain.servers[victim].child.0.kill().unwrap();
    chain.servers[victim].child.0.wait().unwrap();
    // The push may have failed already (without a quorum), its stdin closed.
    let _ = stdin.write_all(&chain.data[4 << 20..]);
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn a_replica_killed_mid_push_fails_an_all_push_and_nothing_stays() {
    let mut chain = Chain::start("push-chain-all", 8 << 20);
    let out = kill_the_tail_mid_push(&mut chain, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json = report(&out);
    let replicas = &json["entries"][0]["replicas"];
    assert_eq!(replicas[2]["state"], "connection_lost", "{json}");
    assert_eq!(replicas[0]["state"], "aborted", "{json}");
    for root in &chain.roots[..2] {
        assert!(!root.join("blob").exists(), "{root:?}");
        wait_until("the replica to drop its partial file", || {
            partial_files(root) == 0
        });
    }
}

#[test]
fn a_replica_killed_mid_push_is_reported_under_a_quorum() {
    let mut chain = Chain::start("push-chain-quorum", 8 << 20);
    let out = kill_the_tail_mid_push(&mut chain, &["--quorum", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = report(&out);
    let replicas = &json["entries"][0]["replicas"];
    assert_eq!(replicas[0]["state"], "committed", "{json}");
    assert_eq!(replicas[1]["state"], "committed", "{json}");
    assert_eq!(replicas[2]["state"], "connection_lost", "{json}");
    for root in &chain.roots[..2] {
        assert!(std::fs::read(root.join("blob")).unwrap() == chain.data);
        assert_eq!(partial_files(root), 0);
    }
    // Not enough replicas left for a quorum of 3... of 2 left: a push needing all fails.
    let out = push(&[
        chain.local.to_str().unwrap(),
        "file:again",
        "--replicas",
        &chain.replicas(),
        "--quorum",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn ctrl_c_cancels_and_nothing_is_kept() {
    let dir = TempDir::new("push-interrupt");
    let server = serve(dir.path(), Backend::Epoll, &[]);
    // Stdin stays open and quiet after the first data: the push is blocked reading it.
    let mut child = push_from_pipe(&[&server.address.to_string(), "file:half.bin"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 4 << 20]).unwrap();
    wait_until("the server to receive data", || received(&server) > 0.0);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    wait_until("the push to end", || active(&server) == 0.0);
    assert!(!dir.path().join("half.bin").exists());
    // The sink's thread removes the partial file as the push ends, on its own time.
    wait_until("the partial file to go", || partial_files(dir.path()) == 0);
    drop(stdin);
}

#[test]
fn a_manifest_pushes_every_line_and_reports_each() {
    let dir = TempDir::new("push-manifest");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let server = serve(&root, Backend::IoUring, &[]);
    let mut lines = String::from("# files to upload\n\n");
    let mut files = Vec::new();
    for i in 0..3 {
        let local = dir.path().join(format!("f{i}"));
        files.push(write_pattern_file(&local, 100_000 * (i + 1), i as u64));
        lines.push_str(&format!(
            "{} {} file:m/f{i}\n",
            local.display(),
            server.address
        ));
    }
    let manifest = dir.path().join("manifest");
    std::fs::write(&manifest, &lines).unwrap();
    let out = push(&["--manifest", manifest.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = report(&out);
    assert_eq!(json["entries"].as_array().unwrap().len(), 3);
    for (i, data) in files.iter().enumerate() {
        assert_eq!(json["entries"][i]["state"], "complete");
        assert!(std::fs::read(root.join(format!("m/f{i}"))).unwrap() == *data);
    }
    // A line that fails (the file exists now) fails the run, with that line's error.
    let out = push(&["--manifest", manifest.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json = report(&out);
    assert_eq!(json["ok"], false);
    assert_eq!(json["entries"][0]["error"]["code"], "already_exists");
    // A malformed line is a usage error naming it.
    std::fs::write(&manifest, "just-one-field\n").unwrap();
    let out = push(&["--manifest", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
}

#[test]
fn a_middle_replica_killed_under_a_quorum_is_routed_around() {
    let mut chain = Chain::start("push-chain-middle", 8 << 20);
    let out = kill_mid_push(&mut chain, 1, &["--quorum", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json = report(&out);
    let replicas = &json["entries"][0]["replicas"];
    assert_eq!(replicas[0]["state"], "committed", "{json}");
    assert_eq!(replicas[1]["state"], "connection_lost", "{json}");
    // A replayed what it held to C, then went on: C has all of it.
    assert_eq!(replicas[2]["state"], "committed", "{json}");
    for i in [0, 2] {
        let root = &chain.roots[i];
        assert!(
            std::fs::read(root.join("blob")).unwrap() == chain.data,
            "{root:?}"
        );
        assert_eq!(partial_files(root), 0);
    }
}

#[test]
fn without_a_secret_a_server_forwards_to_loopback_only() {
    let dir = TempDir::new("push-forward-guard");
    let local = dir.path().join("f");
    write_pattern_file(&local, 1000, 1);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let server = serve(&root, Backend::Epoll, &[]);
    // 192.0.2.1 is TEST-NET-1: refused before any connection is tried.
    let replicas = format!("{},192.0.2.1:1270", server.address);
    let out = push(&[
        local.to_str().unwrap(),
        "file:f",
        "--replicas",
        &replicas,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let json = report(&out);
    let replicas = &json["entries"][0]["replicas"];
    assert_eq!(replicas[1]["state"], "permission_denied", "{json}");
    assert!(
        replicas[1]["message"]
            .as_str()
            .unwrap()
            .contains("BURST_NEXUS_AUTH_SECRET"),
        "{json}"
    );
    assert!(!root.join("f").exists());
}
