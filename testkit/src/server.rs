//! A real server in this process, on 127.0.0.1 and a free port.

use std::path::Path;

use nexus_server::{Backend, Registry, Server, ServerConfig};

/// The config of a test server: port 0 on 127.0.0.1, two shards, this backend, `root`.
pub fn test_config(backend: Backend, root: &Path) -> ServerConfig {
    ServerConfig {
        port: 0,
        threads: 2,
        backend: backend.into(),
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

/// The built-in sources for `root`, and the built-in sinks: `discard:`, and `file:` taking
/// uploads into `upload` (at most `max_size` bytes each).
pub fn push_registry(root: &Path, upload: &Path, max_size: u64) -> Registry {
    let mut registry = builtin_registry(root);
    registry
        .register_sink(nexus_server::DiscardSink)
        .register_sink(nexus_server::FileSink::new(upload, max_size, 16).unwrap());
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
