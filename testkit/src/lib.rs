//! Test fixtures shared by Nexus's tests and benches (not published), by module:
//! - `driver`: [`Client`], a blocking, single-connection driver of `nexus-protocol`'s
//!   `ClientConnection` over a real `std::net::TcpStream`, with the application's side
//!   (consume, cancel) left to the test so it can be slow, stop reading, or misbehave; and
//!   raw-frame helpers ([`exchange_raw`], [`read_frames_until_close`]);
//! - `server`: [`start_server`], a real server in this process on 127.0.0.1 and a free port;
//! - `process`: the `nexus` binary as a real process ([`spawn_serve`], [`run_pull`]);
//! - `http`: the admin endpoint over plain sockets ([`http_get`], [`scrape_sample`]);
//! - `proxy`: [`Proxy`], a TCP proxy that cuts connections when told, for fault injection;
//! - `fake`: [`FakeServer`], a scripted server that answers INITIATE with any frames;
//! - `tls`: [`Pki`], a test CA and the certificates it issues, as PEM files;
//! - `moto`: [`Moto`], a real S3 server (moto) on a free port;
//! - `mariadb`: [`MariaDb`], a private MariaDB server with its binary log on;
//! - `rabbitmq`: [`RabbitMq`], a private RabbitMQ node that can be stopped and started;
//! - here: [`TempDir`], [`wait_until`], test data ([`write_pattern_file`], [`log_text`]).
//!
//! Every wait has a deadline and panics with what it was waiting for, so a hung server fails
//! a test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod driver;
mod fake;
mod http;
mod mariadb;
mod moto;
mod process;
mod proxy;
mod rabbitmq;
mod server;
mod tls;
pub use driver::{
    connection_error, exchange_raw, exchange_raw_tls, read_frames_until_close,
    read_frames_until_eof, tls_stream, tls_stream_to, Client, Pulled,
};
pub use fake::{default_accept, FakeServer};
pub use http::{
    http_get, http_request, https_get, prometheus_sample, scrape_sample, try_https_get,
};
pub use mariadb::MariaDb;
pub use moto::{Moto, S3_KEY_ID, S3_SECRET};
pub use process::{
    entry_states, json_stdout, rss_of, run_pull, spawn_nexus_serve, spawn_run, spawn_serve,
    spawn_serve_with, stderr_of, ChildGuard, Running, Served,
};
pub use proxy::Proxy;
pub use rabbitmq::RabbitMq;
pub use server::{builtin_registry, push_registry, start_server, start_with, test_config};
pub use tls::{CertFiles, Pki, Validity};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;

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

/// Waits until `condition` holds, polling every few milliseconds, failing after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A directory under the system temp dir (or in memory), removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory whose name contains `label`.
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(label));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path.canonicalize().unwrap())
    }

    /// Creates a fresh directory for `need` bytes of files, in memory (`/dev/shm`) when the
    /// machine has a tmpfs there with room for them and a GiB to spare, else as [`TempDir::new`].
    ///
    /// For the tests that write GiBs: machines of this kind all have 24 GiB of memory, but
    /// their free disk varies from tens of GiB to almost none, and the build takes most of it.
    pub fn in_memory(label: &str, need: u64) -> TempDir {
        let shm = Path::new("/dev/shm");
        let room = rustix::fs::statvfs(shm)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        if room < need.saturating_add(1 << 30) {
            return TempDir::new(label);
        }
        let path = shm.join(unique_name(label));
        match std::fs::create_dir(&path) {
            Ok(()) => TempDir(path),
            Err(_) => TempDir::new(label),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// `nexus-LABEL-PID-RANDOM`: unique across tests and processes.
fn unique_name(label: &str) -> String {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).unwrap();
    format!(
        "nexus-{label}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(random)
    )
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

/// The xxh3 digest PROTOCOL.md specifies, for checking COMPLETE independently.
pub fn digest(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Bytes as a `Bytes`, for frames built by hand.
pub fn bytes(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

/// Files in an upload root's partial directory (`.nexus-partial/`): pushes being written, or
/// left by a crash.
pub fn partial_uploads(upload_root: &Path) -> usize {
    std::fs::read_dir(upload_root.join(".nexus-partial")).map_or(0, |d| d.count())
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
