//! The `nexus` command: `serve`, `pull`, `config`, `version`.
//!
//! The binary parses arguments and properties, sets up logging and signals, then calls the
//! libraries.

// A command-line tool reports on stdout by design.
#![allow(clippy::print_stdout)]

mod props;
mod pull;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nexus_server::{FileSource, Registry, Server, SyntheticSource};

use props::Values;

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Nexus: high-throughput streaming transfer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server with the built-in sources (file:, synthetic:).
    Serve(ServeArgs),
    /// Pull a stream (or a manifest of streams) from servers.
    Pull(PullArgs),
    /// Print the effective configuration and where each value comes from.
    Config(ConfigArgs),
    /// Print the version and the protocol versions spoken.
    Version,
}

#[derive(Args)]
struct PropertyArgs {
    /// Set a property: -D burst.nexus.server.port=1280 (below flags, above the environment).
    #[arg(short = 'D', value_name = "NAME=VALUE", value_parser = parse_define)]
    define: Vec<(String, String)>,
}

#[derive(Args)]
struct ConfigArgs {
    /// Print the table of every property (name, default, meaning) as Markdown instead.
    #[arg(long)]
    markdown: bool,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Port (burst.nexus.server.port).
    #[arg(long)]
    port: Option<u16>,
    /// Bind address (burst.nexus.server.bind).
    #[arg(long)]
    bind: Option<String>,
    /// Root directory of file: streams (burst.nexus.server.root).
    #[arg(long)]
    root: Option<String>,
    /// Shards (burst.nexus.server.threads).
    #[arg(long)]
    threads: Option<usize>,
    /// IO backend: auto, io_uring or epoll (burst.nexus.io.backend).
    #[arg(long)]
    backend: Option<String>,
    /// Allow a non-loopback address without a secret (burst.nexus.server.insecure).
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct PullArgs {
    /// Server address, host:port.
    endpoint: Option<String>,
    /// What to stream, e.g. file:data/big.bin or synthetic:10GiB.
    paradata: Option<String>,
    /// Write the data to FILE instead of stdout (removed if the pull fails).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print a JSON summary on stdout (needs -o or --manifest).
    #[arg(long)]
    json: bool,
    /// Pull every line `ENDPOINT PARADATA OUTPUT` of FILE as one operation.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Streams of a manifest pulled at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Pull one file as N ranged streams in parallel, written in place (needs -o).
    #[arg(long, value_name = "N")]
    split: Option<usize>,
    /// Times a file: stream is resumed after a lost connection or a timeout.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// IO backend: auto, io_uring or epoll (burst.nexus.io.backend).
    #[arg(long)]
    backend: Option<String>,
    #[command(flatten)]
    properties: PropertyArgs,
}

fn parse_define(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Version => {
            println!(
                "nexus {} (protocol versions {}..={})",
                env!("CARGO_PKG_VERSION"),
                nexus_protocol::VERSION_MIN,
                nexus_protocol::VERSION_MAX
            );
            ExitCode::SUCCESS
        }
        Command::Pull(args) => pull(args),
        Command::Config(args) if args.markdown => {
            print!("{}", props::markdown_table());
            ExitCode::SUCCESS
        }
        Command::Config(args) => match resolve(&[], &args.properties.define) {
            Ok(values) => {
                for (property, value, origin) in values.describe() {
                    let name = property.name;
                    println!(
                        "# {} ({origin}; {})",
                        property.description,
                        props::env_name(name)
                    );
                    println!("{name}={value}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Serve(args) => serve(args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn resolve(
    flags: &[(&'static str, String)],
    defines: &[(String, String)],
) -> Result<Values, String> {
    for (var, closest) in Values::unknown_env(std::env::vars().map(|(k, _)| k)) {
        tracing::warn!("Unknown variable {var}; did you mean {closest}?");
    }
    Values::resolve(flags, defines, &|name| std::env::var(name).ok()).map_err(|e| e.to_string())
}

fn fail(message: &str) -> ExitCode {
    eprintln!("nexus: {message}");
    ExitCode::from(2)
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut flags = Vec::new();
    if let Some(v) = args.port {
        flags.push(("burst.nexus.server.port", v.to_string()));
    }
    if let Some(v) = args.bind {
        flags.push(("burst.nexus.server.bind", v));
    }
    if let Some(v) = args.root {
        flags.push(("burst.nexus.server.root", v));
    }
    if let Some(v) = args.threads {
        flags.push(("burst.nexus.server.threads", v.to_string()));
    }
    if let Some(v) = args.backend {
        flags.push(("burst.nexus.io.backend", v));
    }
    if args.insecure {
        flags.push(("burst.nexus.server.insecure", "true".to_string()));
    }
    let config = match resolve(&flags, &args.properties.define)
        .and_then(|v| v.server_config().map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let mut registry = Registry::new();
    match FileSource::new(&config.root) {
        Ok(files) => registry.register(files),
        Err(e) => return fail(&format!("burst.nexus.server.root {:?}: {e}", config.root)),
    };
    registry.register(SyntheticSource);
    let drain = config.drain_timeout;
    let server = match Server::start(config, registry) {
        Ok(server) => server,
        Err(e) => return fail(&e.to_string()),
    };
    let signal = wait_for_signal();
    tracing::info!(
        signal,
        drain_ms = drain.as_millis() as u64,
        "Shutting down: draining."
    );
    server.shutdown(drain);
    tracing::info!("Stopped.");
    ExitCode::SUCCESS
}

fn pull(args: PullArgs) -> ExitCode {
    let mut flags = Vec::new();
    if let Some(v) = args.backend {
        flags.push(("burst.nexus.io.backend", v));
    }
    let config = match resolve(&flags, &args.properties.define)
        .and_then(|v| v.client_config().map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let client = match nexus_client::Client::new(config) {
        Ok(client) => client,
        Err(e) => return fail(&e.to_string()),
    };
    pull::run(
        client,
        pull::Job {
            endpoint: args.endpoint,
            paradata: args.paradata,
            output: args.output,
            json: args.json,
            manifest: args.manifest,
            parallel: args.parallel,
            split: args.split,
            retries: args.retries,
        },
    )
}

/// Blocks until SIGTERM or SIGINT; returns its name.
pub(crate) fn wait_for_signal() -> &'static str {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "Cannot watch for signals; stopping on stdin close instead.");
            std::thread::sleep(Duration::MAX);
            return "none";
        }
    };
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            return "none";
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
