//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info` for `serve`, `warn`
//! for `pull`, which `-q` and `-v` change), as text or as one
//! JSON object per line (`burst.nexus.log.format=json`, for containers).

use std::sync::atomic::{AtomicBool, Ordering};

use nexus_config::{BadValue, Values};

/// Set once the properties say `burst.nexus.log.format=json`.
static JSON: AtomicBool = AtomicBool::new(false);

/// Whether logs are JSON: as the properties said, or, when they could not be read (a bad
/// value), as the environment says.
pub(crate) fn wants_json() -> bool {
    JSON.load(Ordering::Relaxed)
        || std::env::var("BURST_NEXUS_LOG_FORMAT").is_ok_and(|v| v.trim() == "json")
}

/// JSON logging on stderr, if no logging is set up yet (for a fatal error).
pub(crate) fn init_json() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .json()
        .try_init();
}

/// Starts logging in the format `values` ask for, at `level` unless `RUST_LOG` is set. Text
/// is coloured only on a terminal and without `NO_COLOR` (https://no-color.org).
pub(crate) fn init(values: &Values, level: &str) -> Result<(), BadValue> {
    let format = values
        .raw("burst.nexus.log.format")
        .map_or("text", |(v, _)| v)
        .trim();
    JSON.store(format == "json", Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (never in the binary) is not worth failing for.
    let _ = match format {
        "text" => builder
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .try_init(),
        "json" => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        other => {
            return Err(BadValue(format!(
                "burst.nexus.log.format (BURST_NEXUS_LOG_FORMAT): bad value {other:?}: expected text or json"
            )))
        }
    };
    Ok(())
}
