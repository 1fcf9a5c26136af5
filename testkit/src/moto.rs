//! A real S3 server for the tests: moto in server mode (from PyPI, installed by
//! `scripts/test` into `target/tools-venv`), on 127.0.0.1 and a free port, killed when the
//! test ends.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::process::ChildGuard;
use crate::{free_port, http_get, http_request, wait_until, TempDir};

/// The credentials the tests give both moto's clients and Nexus (moto takes any).
pub const S3_KEY_ID: &str = "nexus-test";
/// The secret that goes with [`S3_KEY_ID`].
pub const S3_SECRET: &str = "nexus-test-secret";

/// A running moto S3 server.
pub struct Moto {
    _child: ChildGuard,
    /// Where moto spools objects bigger than a few MiB (its TMPDIR), in memory when there is
    /// room: a multipart GiB is there twice, as parts and as the completed object.
    _spool: TempDir,
    /// Where it listens.
    pub address: SocketAddr,
}

impl Moto {
    /// Starts moto's server (`NEXUS_MOTO_SERVER`, the `moto_server` program) and waits until
    /// it answers. Panics, saying why, when it is not installed: an S3 test never passes
    /// without its server.
    pub fn start() -> Moto {
        let program = std::env::var_os("NEXUS_MOTO_SERVER").unwrap_or_else(|| {
            panic!(
                "NEXUS_MOTO_SERVER is not set: the S3 tests need moto's server \
                 (scripts/test installs moto[server] into target/tools-venv and sets it)"
            )
        });
        let port = free_port();
        let spool = TempDir::in_memory("moto-spool", 2 << 30);
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("TMPDIR", spool.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.to_string_lossy()));
        let moto = Moto {
            _child: ChildGuard(child),
            _spool: spool,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_until("moto to answer", || {
            http_get(moto.address, "/moto-api/").is_ok_and(|(status, _)| status == 200)
        });
        moto
    }

    /// Its endpoint URL, for `burst.nexus.s3.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = http_request(self.address, "PUT", &format!("/{name}"), &[], b"")
            .unwrap_or_else(|e| panic!("create bucket {name}: {e}"));
        assert_eq!(status, 200, "create bucket {name}: {body}");
    }

    /// The environment a `nexus` process needs to use this server.
    pub fn env(&self, buckets: &str) -> Vec<(&'static str, String)> {
        vec![
            ("BURST_NEXUS_S3_ENDPOINT", self.endpoint()),
            ("BURST_NEXUS_S3_BUCKETS", buckets.to_string()),
            ("AWS_ACCESS_KEY_ID", S3_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
        ]
    }
}
