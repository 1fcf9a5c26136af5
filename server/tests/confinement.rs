//! `file:` paths stay inside the root while someone who can write inside it races the
//! server: a directory swapped with a symlink to outside the root, a regular file swapped with
//! a FIFO. Real server, real sockets, both IO backends.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nexus_protocol::{ErrorCode, Outcome};
use nexus_server::Backend;
use nexus_testkit::{both_backends, start_server, Client, TempDir};
use rustix::fs::{RenameFlags, CWD};

/// Exchanges two names atomically, `times` times.
fn swapper(a: &Path, b: &Path, times: usize, done: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (a, b) = (a.to_path_buf(), b.to_path_buf());
    std::thread::spawn(move || {
        for _ in 0..times {
            rustix::fs::renameat_with(CWD, &a, CWD, &b, RenameFlags::EXCHANGE).unwrap();
        }
        done.store(true, Ordering::Release);
    })
}

/// Pulls `paradata` over three connections until `done`; hands each outcome and its data to
/// `check`; returns how many pulls ran.
fn pull_until(
    address: std::net::SocketAddr,
    paradata: &'static str,
    done: &Arc<AtomicBool>,
    check: impl Fn(&Outcome, &[u8]) + Send + Sync + Copy + 'static,
) -> usize {
    let pullers: Vec<_> = (0..3)
        .map(|_| {
            let done = Arc::clone(done);
            std::thread::spawn(move || {
                let mut client = Client::connect(address);
                let mut pulls = 0;
                while !done.load(Ordering::Acquire) {
                    let pulled = client.pull(paradata);
                    check(&pulled.outcome, &pulled.data);
                    pulls += 1;
                }
                pulls
            })
        })
        .collect();
    pullers.into_iter().map(|p| p.join().unwrap()).sum()
}

fn symlink_race(backend: Backend) {
    let base = TempDir::new("race");
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("swap")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("swap/data.bin"), b"inside ".repeat(1000)).unwrap();
    std::fs::write(outside.join("data.bin"), b"SECRET ".repeat(1000)).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("other")).unwrap();
    let server = start_server(backend, &root);
    let done = Arc::new(AtomicBool::new(false));
    let swaps = swapper(
        &root.join("swap"),
        &root.join("other"),
        100_000,
        Arc::clone(&done),
    );
    let pulls = pull_until(
        server.local_addr(),
        "file:swap/data.bin",
        &done,
        |outcome, data| {
            assert!(
                !data.windows(6).any(|w| w == b"SECRET"),
                "a byte from outside the root was served"
            );
            match outcome {
                Outcome::Complete(_) => assert_eq!(data, b"inside ".repeat(1000)),
                // Refused, or swapped away while it was read.
                Outcome::Error { code, .. } => assert!(
                    [
                        ErrorCode::PERMISSION_DENIED,
                        ErrorCode::NOT_FOUND,
                        ErrorCode::SOURCE_CHANGED
                    ]
                    .contains(code),
                    "{outcome:?}"
                ),
                other => panic!("{other:?}"),
            }
        },
    );
    swaps.join().unwrap();
    assert!(pulls > 0);
}
both_backends!(
    a_symlink_swapped_in_never_serves_a_byte_from_outside,
    symlink_race
);

fn fifo_race(backend: Backend) {
    let base = TempDir::new("fifo-race");
    let root = base.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("f"), b"regular").unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(root.join("g"))
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let server = start_server(backend, &root);
    let done = Arc::new(AtomicBool::new(false));
    let swaps = swapper(&root.join("f"), &root.join("g"), 100_000, Arc::clone(&done));
    // Every pull ends (a FIFO opened would block the shard forever): complete with the
    // file's bytes, refused as not a regular file, or renamed away while it was read.
    let pulls = pull_until(
        server.local_addr(),
        "file:f",
        &done,
        |outcome, data| match outcome {
            Outcome::Complete(_) => assert_eq!(data, b"regular"),
            Outcome::Error { code, .. } => assert!(
                *code == ErrorCode::BAD_PARADATA || *code == ErrorCode::SOURCE_CHANGED,
                "{outcome:?}"
            ),
            other => panic!("{other:?}"),
        },
    );
    swaps.join().unwrap();
    assert!(pulls > 0);
    // And the server still serves.
    let mut client = Client::connect(server.local_addr());
    std::fs::write(root.join("after"), b"still serving").unwrap();
    assert_eq!(client.pull("file:after").data, b"still serving");
}
both_backends!(a_fifo_swapped_in_never_blocks_the_server, fifo_race);
