//! A TLS identity, of the data port or of the admin endpoint: loaded at start, handed to each
//! new connection, and reloaded when its files change or when asked
//! ([`Server::reload_tls`](crate::Server::reload_tls), SIGHUP in `nexus serve`). A connection
//! keeps the configuration it started with, so a reload never touches running streams; a
//! reload that fails keeps the old identity.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::io::tls::{self, ServerFiles};

/// Which listener an identity serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The data port: ALPN `nexus/2`, records sealed by nexus-io.
    Data,
    /// The admin endpoint: ALPN `http/1.1` through tokio-rustls, files named by the
    /// `burst.nexus.admin.tls.*` properties.
    Admin,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Data => "data port",
            Endpoint::Admin => "admin endpoint",
        }
    }

    /// The configuration for this endpoint from `files`; errors name its properties.
    fn configure(self, files: &ServerFiles) -> Result<tls::ServerIdentity, String> {
        let identity = tls::server_config(files);
        match self {
            Endpoint::Data => identity.map_err(|e| e.to_string()),
            Endpoint::Admin => {
                let identity = identity.map_err(|e| {
                    e.to_string()
                        .replace("burst.nexus.server.tls.", "burst.nexus.admin.tls.")
                })?;
                let mut config = (*identity.config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                // tokio-rustls keeps the records: nothing to extract.
                config.enable_secret_extraction = false;
                Ok(tls::ServerIdentity {
                    config: Arc::new(config),
                    not_after: identity.not_after,
                })
            }
        }
    }
}

/// What the listener reads at each accept, and what the reloads replace.
pub(crate) struct Identity {
    endpoint: Endpoint,
    files: ServerFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// Modification time and length of each file as last loaded.
    stamps: parking_lot::Mutex<Vec<Option<(SystemTime, u64)>>>,
    /// The leaf certificate's expiry, seconds since the Unix epoch (0: unknown).
    pub(crate) not_after: AtomicU64,
    pub(crate) reloads: AtomicU64,
    pub(crate) reload_failures: AtomicU64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("endpoint", &self.endpoint)
            .field("files", &self.files)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub(crate) fn load(endpoint: Endpoint, files: ServerFiles) -> Result<Identity, String> {
        let stamps = stamps(&files);
        let identity = endpoint.configure(&files)?;
        Ok(Identity {
            endpoint,
            not_after: AtomicU64::new(unix_seconds(identity.not_after)),
            files,
            current: RwLock::new(identity.config),
            stamps: parking_lot::Mutex::new(stamps),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// The configuration for a new connection.
    pub(crate) fn current(&self) -> Arc<rustls::ServerConfig> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&current)
    }

    /// Loads the files again and, when they make a valid identity, uses it for new
    /// connections. Logs the outcome either way.
    pub(crate) fn reload(&self, why: &str) -> Result<(), String> {
        let stamps = stamps(&self.files);
        *self.stamps.lock() = stamps;
        let endpoint = self.endpoint.name();
        match self.endpoint.configure(&self.files) {
            Ok(identity) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = identity.config;
                self.not_after
                    .store(unix_seconds(identity.not_after), Relaxed);
                self.reloads.fetch_add(1, Relaxed);
                tracing::info!(endpoint, why, cert = %self.files.cert.display(), "TLS certificate reloaded.");
                Ok(())
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                tracing::warn!(endpoint, why, error = %e, "TLS reload failed; keeping the previous certificate.");
                Err(e)
            }
        }
    }

    /// Reloads when a file's modification time or length changed since the last load.
    pub(crate) fn reload_if_changed(&self) {
        if *self.stamps.lock() != stamps(&self.files) {
            let _ = self.reload("the files changed");
        }
    }

    /// Seconds until the leaf certificate expires (negative once it has), when known.
    pub(crate) fn expires_in(&self) -> Option<f64> {
        let not_after = self.not_after.load(Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        (not_after != 0).then_some(not_after as f64 - now as f64)
    }
}

fn stamps(files: &ServerFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        // The target's, through symlinks: a Kubernetes Secret volume swaps a link.
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
    .collect()
}

fn unix_seconds(time: Option<SystemTime>) -> u64 {
    time.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Checks the files every `interval` until `stop` is dropped or sent to.
pub(crate) fn watch(
    identity: Arc<Identity>,
    interval: Duration,
    stop: crossbeam_channel::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nexus-tls-reload".into())
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stop.recv_timeout(interval)
            {
                identity.reload_if_changed();
            }
        })
}
