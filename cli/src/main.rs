//! The `nexus` command: `serve`, `pull`, `push`, `verify`, `run`, `runs`, `config`, `version`.
//!
//! The binary parses arguments and properties, sets up logging and signals, then calls the
//! libraries.

// A command-line tool reports on stdout by design.
#![allow(clippy::print_stdout)]

mod forward;
mod logging;
mod pull;
mod push;
mod run;

/// mimalloc rather than glibc's malloc. Measured with callgrind (bench/RESULTS.md): a fifth
/// fewer instructions per small stream on the server, where a stream's few allocations
/// (its task, its frames, its hasher) took a quarter of the instructions, most of it in
/// glibc's slow paths. It also returns freed chunk buffers to the system by itself: with
/// glibc, a server that had held 1 GiB for hostile clients stayed at 890 MiB resident unless
/// M_MMAP_THRESHOLD was lowered (cli/tests/hostile.rs checks the memory comes back).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::{Args, Parser, Subcommand};
use nexus_client::ClientConfig;
use nexus_server::admin::{Admin, Phase};
use nexus_server::{
    DiscardSink, FileSink, FileSource, Registry, Server, ServerConfig, ServerStats, SyntheticSource,
};

use nexus_config::{BadValue, Sources, Values};

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
    /// Run the server with the built-in sources (file:, synthetic:) and sinks (file:, discard:).
    Serve(ServeArgs),
    /// Pull a stream (or a manifest of streams) from servers.
    Pull(PullCommand),
    /// Push a file (or stdin, or a manifest of files) into server sinks, optionally
    /// replicated along a chain of servers.
    Push(PushCommand),
    /// Compare the digests of a file across its replicas.
    Verify(VerifyCommand),
    /// Run a workflow: sensors raise events, rules move streams (RULES.toml); --check only
    /// checks the file.
    Run(run::RunArgs),
    /// List workflow runs from the state database.
    Runs(run::RunsArgs),
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
    /// Read properties from FILE (`name=value` lines; below the environment, above defaults).
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ConfigArgs {
    /// Print the table of every property (name, variable, type, default, unit, meaning) as
    /// Markdown instead.
    #[arg(long, conflicts_with = "env_file")]
    markdown: bool,
    /// Print an environment file listing every property at its default instead.
    #[arg(long)]
    env_file: bool,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Port (burst.nexus.server.port).
    #[arg(long)]
    port: Option<u16>,
    /// Bind address or host name (burst.nexus.server.bind), e.g. 0.0.0.0, ::, localhost.
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
    /// Admin HTTP endpoint for /metrics, /healthz and /readyz (burst.nexus.admin.address,
    /// default 127.0.0.1:1271; '' for none). Each server on a machine needs its own.
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<String>,
    /// Run the workflow of this rules file in the server process (as `nexus run` does);
    /// streams served here are events of its `streams` sensor.
    #[arg(long, value_name = "RULES.toml")]
    rules: Option<PathBuf>,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct PullCommand {
    #[command(flatten)]
    args: pull::PullArgs,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct PushCommand {
    #[command(flatten)]
    args: push::PushArgs,
    #[command(flatten)]
    properties: PropertyArgs,
}

#[derive(Args)]
struct VerifyCommand {
    #[command(flatten)]
    args: push::VerifyArgs,
    #[command(flatten)]
    properties: PropertyArgs,
}

/// What a client command prints, and its IO backend (`pull`, `push`).
#[derive(Args)]
pub(crate) struct ConsoleArgs {
    /// No progress bar and no summary line; errors only.
    #[arg(short, long, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    /// Say more: what is retried and why, connection events.
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// IO backend: auto, io_uring or epoll (burst.nexus.io.backend).
    #[arg(long)]
    pub(crate) backend: Option<String>,
}

impl ConsoleArgs {
    /// The log level the flags ask for.
    fn log_level(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "error",
            (_, true) => "debug",
            _ => "warn",
        }
    }
}

fn parse_define(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            emit(&format!(
                "nexus {} (protocol versions {}..={})\n",
                env!("CARGO_PKG_VERSION"),
                nexus_protocol::VERSION_MIN,
                nexus_protocol::VERSION_MAX
            ));
            ExitCode::SUCCESS
        }
        Command::Pull(args) => pull(args),
        Command::Push(PushCommand { args, properties }) => {
            let (backend, level) = (args.console.backend.clone(), args.console.log_level());
            match client(backend, &properties, level, args.host_name()) {
                Ok(client) => push::run(&client, args),
                Err(code) => code,
            }
        }
        Command::Verify(VerifyCommand { args, properties }) => {
            match client(args.backend.clone(), &properties, "warn", None) {
                Ok(client) => push::verify(&client, args),
                Err(code) => code,
            }
        }
        Command::Config(args) if args.markdown => {
            emit(&nexus_config::markdown_table());
            ExitCode::SUCCESS
        }
        Command::Config(args) if args.env_file => {
            emit(&nexus_config::env_file());
            ExitCode::SUCCESS
        }
        Command::Config(args) => show_config(&args.properties),
        Command::Serve(args) => serve(args),
        Command::Run(args) => run::run(args),
        Command::Runs(args) => run::runs(args),
    }
}

/// `nexus config`: checks every value as `serve` and `pull` would (exit 2 naming the first
/// bad one), then prints each property with its origin, in the format `--config` reads back:
/// values not set and secrets are comments.
fn show_config(properties: &PropertyArgs) -> ExitCode {
    let values = match resolve(Vec::new(), properties, "info") {
        Ok(values) => values,
        Err(e) => return fail(&e.to_string()),
    };
    let checked = ServerConfig::from_values(&values)
        .map(drop)
        .and_then(|()| ClientConfig::from_values(&values).map(drop))
        .and_then(|()| nexus_workflow::WorkflowConfig::from_values(&values).map(drop))
        .and_then(|()| admin_address(&values).map(drop));
    if let Err(e) = checked {
        return fail(&e.to_string());
    }
    let mut text = String::new();
    for (property, value, origin) in values.describe() {
        let name = property.name;
        let variable = nexus_config::env_name(name);
        text.push_str(&format!(
            "# {} ({origin}; {variable})\n",
            property.description
        ));
        text.push_str(&match origin {
            "unset" => format!("#{name}=\n"),
            _ if property.secret => format!("#{name}={value} (set; not printed)\n"),
            _ => format!("{name}={value}\n"),
        });
    }
    emit(&text);
    ExitCode::SUCCESS
}

/// Writes `text` to stdout. A reader that went away (`nexus config | head`) ends the
/// output quietly, as it does for any Unix tool; `println!` would panic.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Resolves the properties from flags, `-D`, the environment and `--config`, then starts
/// logging in the format they ask for (at `level` unless `RUST_LOG` says otherwise) and warns
/// of unknown `BURST_NEXUS_*` variables.
fn resolve(
    flags: Vec<(&'static str, String)>,
    args: &PropertyArgs,
    level: &str,
) -> Result<Values, BadValue> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BadValue(format!("--config {}: {e}", path.display())))?;
            Some((path.clone(), text))
        }
        None => None,
    };
    let env = |name: &str| std::env::var(name).ok();
    let values = Values::resolve(&Sources {
        flags,
        defines: args.define.clone(),
        env: Some(&env),
        file,
    })?;
    logging::init(&values, level)?;
    for (var, closest) in Values::unknown_env(std::env::vars().map(|(k, _)| k)) {
        tracing::warn!("Unknown variable {var}; did you mean {closest}?");
    }
    Ok(values)
}

/// `burst.nexus.admin.address`, or `None` when it is empty (no admin endpoint).
fn admin_address(values: &Values) -> Result<Option<SocketAddr>, BadValue> {
    match values.raw("burst.nexus.admin.address") {
        Some((text, _)) if text.trim().is_empty() => Ok(None),
        Some(_) => values.parse::<SocketAddr>("burst.nexus.admin.address"),
        None => Ok(None),
    }
}

/// The admin endpoint's https identity (`burst.nexus.admin.tls.cert`, `.key` and
/// `.reload.ms`), or `None` when neither file is set (plain http).
pub(crate) fn admin_tls(values: &Values) -> Result<Option<nexus_server::admin::AdminTls>, String> {
    let path = |name: &str| -> Result<Option<PathBuf>, String> {
        let path = values.parse::<PathBuf>(name).map_err(|e| e.to_string())?;
        Ok(path.filter(|p| !p.as_os_str().is_empty()))
    };
    let reload = values
        .millis("burst.nexus.admin.tls.reload.ms")
        .map_err(|e| e.to_string())?
        .unwrap_or(std::time::Duration::from_secs(10));
    match (
        path("burst.nexus.admin.tls.cert")?,
        path("burst.nexus.admin.tls.key")?,
    ) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            nexus_server::admin::AdminTls::load(&cert, &key, reload).map(Some)
        }
        _ => Err("burst.nexus.admin.tls.cert and burst.nexus.admin.tls.key go together".into()),
    }
}

/// A fatal error before or while starting: exit 2 with one line on stderr, as JSON when JSON
/// logs were asked for (a container's log pipeline parses every line).
fn fail(message: &str) -> ExitCode {
    if logging::wants_json() {
        logging::init_json();
        tracing::error!(target: "nexus", "{message}");
    } else {
        eprintln!("nexus: {message}");
    }
    ExitCode::from(2)
}

fn serve(args: ServeArgs) -> ExitCode {
    // Before anything starts: a SIGTERM during startup must drain, not kill.
    let signals = Signals::install();
    let mut flags = Vec::new();
    if let Some(v) = args.port {
        flags.push(("burst.nexus.server.port", v.to_string()));
    }
    if let Some(v) = args.bind {
        match bind_address(&v) {
            Ok(ip) => flags.push(("burst.nexus.server.bind", ip)),
            Err(e) => return fail(&e),
        }
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
    if let Some(v) = args.admin {
        flags.push(("burst.nexus.admin.address", v));
    }
    let values = match resolve(flags, &args.properties, "info") {
        Ok(values) => values,
        Err(e) => return fail(&e.to_string()),
    };
    let (config, admin_address) =
        match ServerConfig::from_values(&values).and_then(|c| Ok((c, admin_address(&values)?))) {
            Ok(pair) => pair,
            Err(e) => return fail(&e.to_string()),
        };
    let mut registry = Registry::new();
    match FileSource::with_symlinks(&config.root, config.follow_symlinks) {
        Ok(files) => registry.register(files),
        Err(e) => return fail(&format!("burst.nexus.server.root {:?}: {e}", config.root)),
    };
    registry.register(SyntheticSource);
    registry.register_sink(DiscardSink);
    #[cfg(feature = "s3")]
    match nexus_workflow::WorkflowConfig::from_values(&values) {
        Ok(workflow) => {
            registry.register(nexus_workflow::s3::S3Source::new(workflow.s3.clone()));
            registry.register_sink(nexus_workflow::s3::S3Sink::new(workflow.s3));
        }
        Err(e) => return fail(&e.to_string()),
    }
    match &config.upload_root {
        None => registry.register_sink(FileSink::disabled()),
        Some(root) => match FileSink::new(root, config.upload_max_size, config.pipe_size) {
            Ok(files) => {
                // Replicated pushes go on to the next server with a client of this config
                // (its secret included).
                let forwarder = ClientConfig::from_values(&values)
                    .map_err(|e| e.to_string())
                    .and_then(|c| nexus_client::Client::new(c).map_err(|e| e.to_string()));
                match forwarder {
                    Ok(client) => registry.register_sink(
                        files.with_forwarder(Arc::new(forward::ClientForwarder { client })),
                    ),
                    Err(e) => return fail(&e),
                }
            }
            Err(e) => return fail(&format!("burst.nexus.server.upload.root {root:?}: {e}")),
        },
    };
    // The recorder first: what the workflow records as it starts (resumed runs) is kept.
    let stats: Arc<OnceLock<Arc<ServerStats>>> = Arc::new(OnceLock::new());
    let render = match admin_address.map(|_| run::recorder(Arc::clone(&stats))) {
        Some(Ok(render)) => Some(render),
        Some(Err(e)) => return fail(&e),
        None => None,
    };
    let workflow = match &args.rules {
        Some(rules) => match run::start(&values, rules) {
            Ok(workflow) => Some(workflow),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    if let Some(workflow) = &workflow {
        registry.register(nexus_workflow::serve::EventsSource::new(Arc::clone(
            workflow,
        )));
        if workflow.wants_stream_ends() {
            registry.watch_streams(nexus_workflow::serve::stream_watcher(workflow));
        }
    }
    let routes = match &workflow {
        Some(w) => match run::routes(&values, w) {
            Ok(routes) => Some(routes),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    // The admin endpoint comes up before the server, so /readyz says "starting" until the
    // server listens.
    let admin_tls = match admin_tls(&values) {
        Ok(tls) => tls,
        Err(e) => return fail(&e),
    };
    let admin = match admin_address.zip(render) {
        Some((address, render)) => {
            let started = Admin::start_with_tls(address, render, routes, admin_tls.clone());
            match started {
                Ok(admin) => Some(admin),
                Err(e) => return fail(&e.to_string()),
            }
        }
        None => None,
    };
    let drain = config.drain_timeout;
    let server = match Server::start(config, registry) {
        Ok(server) => server,
        Err(e) => return fail(&e.to_string()),
    };
    let _ = stats.set(server.stats_handle());
    if let Some(admin) = &admin {
        admin.set_phase(Phase::Ready);
    }
    // SIGHUP reloads the TLS files of the data port and of the admin endpoint (they are also
    // watched); without TLS it only says so.
    let reload = || {
        // Each identity logs its own outcome.
        let admin_reloaded = admin_tls.as_ref().map(|tls| tls.reload());
        if let (Err(e), None) = (server.reload_tls(), admin_reloaded) {
            tracing::warn!(error = %e, "SIGHUP: nothing reloaded.");
        }
        true
    };
    let signal = Signals::wait_or_park_reloading(signals, reload);
    tracing::info!(
        signal,
        drain_ms = drain.as_millis() as u64,
        "Shutting down: draining."
    );
    if let Some(admin) = &admin {
        admin.set_phase(Phase::Draining);
    }
    server.shutdown(drain);
    if let Some(workflow) = workflow {
        workflow.stop();
    }
    tracing::info!("Stopped.");
    ExitCode::SUCCESS
}

/// A client from the properties (and `--backend`), or the exit code of why not. With TLS,
/// `host_name` (the server as the user named it) is what the server's certificate must
/// hold, unless burst.nexus.client.tls.server.name says otherwise.
fn client(
    backend: Option<String>,
    properties: &PropertyArgs,
    level: &str,
    host_name: Option<String>,
) -> Result<nexus_client::Client, ExitCode> {
    let flags = backend
        .map(|v| vec![("burst.nexus.io.backend", v)])
        .unwrap_or_default();
    resolve(flags, properties, level)
        .and_then(|v| ClientConfig::from_values(&v))
        .map(|mut config| {
            if config.tls.server_name.is_none() {
                config.tls.server_name = host_name;
            }
            config
        })
        .map_err(|e| e.to_string())
        .and_then(|config| nexus_client::Client::new(config).map_err(|e| e.to_string()))
        .map_err(|e| fail(&e))
}

fn pull(command: PullCommand) -> ExitCode {
    let PullCommand { args, properties } = command;
    let (backend, level) = (args.console.backend.clone(), args.console.log_level());
    match client(backend, &properties, level, args.host_name()) {
        Ok(client) => pull::run(&client, args),
        Err(code) => code,
    }
}

/// `--bind`: an IP address as it is, or a host name resolved to its first address.
fn bind_address(text: &str) -> Result<String, String> {
    if text.parse::<std::net::IpAddr>().is_ok() {
        return Ok(text.to_string());
    }
    use std::net::ToSocketAddrs;
    (text, 0)
        .to_socket_addrs()
        .map_err(|e| format!("--bind {text:?}: {e}"))?
        .next()
        .map(|a| a.ip().to_string())
        .ok_or_else(|| format!("--bind {text:?} resolves to no address"))
}

/// SIGTERM and SIGINT (and SIGHUP), caught from the moment [`Signals::install`] returns: one
/// that arrives before anyone waits is kept, not fatal (a SIGTERM just after start still
/// drains).
pub(crate) struct Signals {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; `None` (logged) if the system refuses.
    pub(crate) fn install() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| tracing::error!(error = %e, "Cannot watch for signals."))
            .ok()?;
        let _entered = runtime.enter();
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some(Signals {
                runtime,
                term,
                int,
                hup,
            }),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::error!(error = %e, "Cannot watch for signals.");
                None
            }
        }
    }

    /// Blocks until SIGTERM, SIGINT or SIGHUP and returns its name; without handlers
    /// (`None`), until the process is killed.
    pub(crate) fn wait_or_park(signals: Option<Signals>) -> &'static str {
        Signals::wait_or_park_reloading(signals, || false)
    }

    /// As [`wait_or_park`](Self::wait_or_park), but a SIGHUP calls `on_hangup`, and the
    /// wait goes on when it returns true.
    pub(crate) fn wait_or_park_reloading(
        signals: Option<Signals>,
        on_hangup: impl FnMut() -> bool,
    ) -> &'static str {
        match signals {
            Some(signals) => signals.wait(on_hangup),
            None => loop {
                std::thread::park();
            },
        }
    }

    /// Blocks until SIGTERM or SIGINT, or a SIGHUP whose `on_hangup` returns false; returns
    /// the name of the signal that ended the wait.
    pub(crate) fn wait(self, mut on_hangup: impl FnMut() -> bool) -> &'static str {
        let Signals {
            runtime,
            mut term,
            mut int,
            mut hup,
        } = self;
        runtime.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => return "SIGTERM",
                    _ = int.recv() => return "SIGINT",
                    _ = hup.recv() => if !on_hangup() {
                        return "SIGHUP";
                    },
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use nexus_client::ClientConfig;
    use nexus_server::ServerConfig;

    /// Every property is read by someone: the server's or the client's binding table, or
    /// this binary (admin address and TLS, log format) or the secret reader (two properties, one
    /// value). A property nobody reads would be a setting that silently does nothing.
    #[test]
    fn every_property_is_bound_exactly_where_it_is_read() {
        let mut bound: Vec<&str> = ServerConfig::PROPERTIES
            .iter()
            .map(|b| b.name)
            .chain(ClientConfig::PROPERTIES.iter().map(|b| b.name))
            .chain(
                nexus_workflow::WorkflowConfig::PROPERTIES
                    .iter()
                    .map(|b| b.name),
            )
            .chain([
                "burst.nexus.admin.address",
                "burst.nexus.admin.tls.cert",
                "burst.nexus.admin.tls.key",
                "burst.nexus.admin.tls.reload.ms",
                "burst.nexus.log.format",
                "burst.nexus.auth.secret",
                "burst.nexus.auth.secret.file",
            ])
            .collect();
        bound.sort_unstable();
        bound.dedup();
        let mut all: Vec<&str> = nexus_config::PROPERTIES.iter().map(|p| p.name).collect();
        all.sort_unstable();
        assert_eq!(bound, all);
    }
}
