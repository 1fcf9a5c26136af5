//! `nexus pull`: arguments into entries for `nexus_client::transfer`, a progress display,
//! the report printed, and exit codes. The policy (retry, resume, split, manifests) is the
//! library's.
//!
//! Exit codes (also in the README): 0 complete and verified; 1 the server refused or failed a
//! stream; 2 bad usage or configuration; 3 the server unreachable, the connection lost, a
//! timeout (after the retries), or a peer that does not speak the protocol; 4 integrity failure; 5 the output could not be written;
//! 6 authentication failed; 130 interrupted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nexus_client::transfer::{
    parse_endpoint, parse_manifest, Entry, EntryState, Output, Report, Transfer, TransferOptions,
};
use nexus_client::{Client, ErrorCode, StreamOptions};
use nexus_protocol::text::Printable;

/// Exit codes.
pub(crate) const EXIT_STREAM: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_CONNECTION: u8 = 3;
pub(crate) const EXIT_INTEGRITY: u8 = 4;
pub(crate) const EXIT_OUTPUT: u8 = 5;
pub(crate) const EXIT_AUTH: u8 = 6;
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

#[derive(Args)]
pub(crate) struct PullArgs {
    /// Server: HOST[:PORT] (port 1270 when left out), e.g. node7:1270, 10.0.0.5, [::1]:1280.
    endpoint: Option<String>,
    /// What to stream, e.g. file:data/big.bin or synthetic:10GiB.
    paradata: Option<String>,
    /// Write the data to FILE ('-' for stdout, the default). A failed pull removes FILE
    /// unless --keep-partial or --continue.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Continue FILE from its length instead of starting over (file: streams), like
    /// `curl -C -` or `aria2c -c`; a failed pull keeps what it got.
    #[arg(short = 'c', long = "continue")]
    continue_output: bool,
    /// Keep what arrived of a failed pull.
    #[arg(long)]
    keep_partial: bool,
    /// Print the report as JSON on stdout (needs -o or --manifest).
    #[arg(long)]
    json: bool,
    /// Pull every line `ENDPOINT PARADATA OUTPUT` of FILE as one operation.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Manifest streams pulled at once (1 to 256).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Go on with the other manifest lines after one fails (default: the first failure
    /// stops the rest).
    #[arg(long)]
    keep_going: bool,
    /// Pull one file as N ranged streams in parallel (1 to 256), written in place (needs -o).
    #[arg(long, value_name = "N")]
    split: Option<usize>,
    /// Most retries of a stream after a failure that can clear (burst.nexus.client.retry.max).
    #[arg(long)]
    retries: Option<u32>,
    /// Ask the server for zstd-compressed chunks (it compresses a chunk when that makes it
    /// smaller); worth it for compressible data over a slow network.
    #[arg(long)]
    zstd: bool,
    #[command(flatten)]
    pub(crate) console: crate::ConsoleArgs,
}

impl PullArgs {
    /// The server's host name, when the endpoint names one: what its TLS certificate must hold.
    pub(crate) fn host_name(&self) -> Option<String> {
        let endpoint = self.endpoint.as_deref()?;
        nexus_client::transfer::endpoint_host_name(endpoint).map(str::to_string)
    }
}

pub(crate) fn run(client: &Client, args: PullArgs) -> ExitCode {
    let entries = match entries(&args) {
        Ok(entries) => entries,
        Err(e) => return usage(&e),
    };
    let to_stdout = entries.iter().any(|e| e.output == Output::Stdout);
    if args.json && to_stdout {
        return usage("--json prints the report on stdout, so the data needs -o FILE");
    }
    let mut retry = client.config().retry;
    if let Some(retries) = args.retries {
        retry.max_retries = retries;
    }
    let options = TransferOptions {
        stream: StreamOptions {
            accept_zstd: args.zstd,
            ..StreamOptions::default()
        },
        retry,
        parallel: args.parallel,
        keep_going: args.keep_going,
        resume_output: args.continue_output,
        keep_partial: args.keep_partial,
    };
    let transfer = match Transfer::new(client, options) {
        Ok(transfer) => transfer,
        Err(e) => return usage(&e.to_string()),
    };
    let cancelled = Arc::clone(&transfer);
    let interrupted = on_signal(move || cancelled.cancel());
    let show = !args.console.quiet && !args.console.no_progress;
    let polled = Arc::clone(&transfer);
    let (bar, ticker) = progress(show, move || {
        let p = polled.progress();
        (p.bytes, p.expected_bytes)
    });
    let report = match args.split {
        Some(n) => transfer.pull_split(&entries[0], n),
        None => Ok(transfer.pull(&entries)),
    };
    ticker.store(true, Ordering::Release);
    bar.finish_and_clear();
    let report = match report {
        Ok(report) => report,
        Err(e) => return usage(&e.to_string()),
    };
    let interrupted = interrupted.load(Ordering::Acquire);
    let code = exit_code(&report, interrupted);
    if args.json {
        let mut json = serde_json::to_value(&report).unwrap_or_default();
        json["exit_code"] = code.into();
        crate::emit(&format!("{json}\n"));
    }
    for e in report
        .entries
        .iter()
        .filter(|e| e.state == EntryState::Failed)
    {
        // Messages come from the server: escaped, so that none can drive the terminal.
        let error = e.error.as_ref().map_or(String::new(), |e| {
            format!("{}: {}", e.code, Printable(&e.message))
        });
        let retries = match e.retries {
            0 => String::new(),
            1 => ", 1 retry".to_string(),
            n => format!(", {n} retries"),
        };
        eprintln!(
            "nexus pull: {} {}: {error} (after {} bytes{retries})",
            e.endpoint,
            Printable(&e.paradata),
            e.bytes
        );
    }
    if interrupted {
        eprintln!("nexus pull: interrupted; every stream was cancelled");
    } else if code == 0 && !args.console.quiet && !args.json {
        eprintln!("nexus pull: {}", summary(&report));
    }
    ExitCode::from(code)
}

/// One line after success: what, how much, how fast, verified how.
fn summary(report: &Report) -> String {
    let rate = HumanBytes(report.bytes_per_second as u64);
    let what = match &report.entries[..] {
        [one] => match &one.digest {
            Some(digest) => format!("{}, xxh3 {digest} verified", Printable(&one.paradata)),
            None => format!("{}, verified", Printable(&one.paradata)),
        },
        all => format!("{} streams, each verified", all.len()),
    };
    format!(
        "{} in {:.2} s ({rate}/s): {what}",
        HumanBytes(report.bytes),
        report.duration_seconds
    )
}

fn usage(message: &str) -> ExitCode {
    eprintln!("nexus pull: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn output(path: Option<&PathBuf>) -> Output {
    match path {
        Some(path) if path.as_os_str() != "-" => Output::File(path.clone()),
        _ => Output::Stdout,
    }
}

fn entries(args: &PullArgs) -> Result<Vec<Entry>, String> {
    if let Some(manifest) = &args.manifest {
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| format!("cannot read manifest {manifest:?}: {e}"))?;
        return parse_manifest(&text).map_err(|e| format!("manifest {manifest:?}: {e}"));
    }
    let (Some(server), Some(paradata)) = (&args.endpoint, &args.paradata) else {
        return Err("give ENDPOINT and PARADATA, or --manifest FILE".into());
    };
    Ok(vec![Entry {
        endpoint: parse_endpoint(server)?,
        paradata: paradata.clone(),
        output: output(args.output.as_ref()),
    }])
}

/// The exit code of a report: the first real failure decides; entries cancelled because
/// of it do not.
pub(crate) fn exit_code(report: &Report, interrupted: bool) -> u8 {
    if interrupted {
        return EXIT_INTERRUPTED;
    }
    let first = report
        .entries
        .iter()
        .find(|e| e.state == EntryState::Failed);
    match first {
        None if report.ok => 0,
        // Cancelled without a failure or a signal: nothing should do that, but it is not ok.
        None => EXIT_STREAM,
        Some(e) => match e.code {
            None => EXIT_OUTPUT,
            Some(code) => exit_code_of(code),
        },
    }
}

/// The exit code of a stream that failed with `code` (pull and push alike).
pub(crate) fn exit_code_of(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::AUTH_FAILED => EXIT_AUTH,
        ErrorCode::INTEGRITY_FAILURE => EXIT_INTEGRITY,
        // The connection failed: lost, never made, or the peer not a Nexus server.
        ErrorCode::CONNECTION_LOST
        | ErrorCode::TIMEOUT
        | ErrorCode::UNREACHABLE
        | ErrorCode::DRAINING
        | ErrorCode::PROTOCOL_ERROR
        | ErrorCode::FRAME_TOO_LARGE
        | ErrorCode::UNSUPPORTED_VERSION => EXIT_CONNECTION,
        _ => EXIT_STREAM,
    }
}

/// A progress bar on stderr when it is a terminal (and `show`), kept up to date from `poll`
/// (bytes so far, and the total once known) until the returned flag is set. Until a size is
/// known it counts bytes and rate only, never "0 B/0 B". For pulls and pushes alike.
pub(crate) fn progress(
    show: bool,
    poll: impl Fn() -> (u64, Option<u64>) + Send + 'static,
) -> (ProgressBar, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return (ProgressBar::hidden(), stop);
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {bytes} {binary_bytes_per_sec}") {
        bar.set_style(style);
    }
    let (flag, shown) = (Arc::clone(&stop), bar.clone());
    std::thread::spawn(move || {
        let mut sized = false;
        while !flag.load(Ordering::Acquire) {
            let (bytes, total) = poll();
            if let (Some(total), false) = (total, sized) {
                sized = true;
                shown.set_length(total);
                let template = "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}";
                if let Ok(style) = ProgressStyle::with_template(template) {
                    shown.set_style(style);
                }
            }
            if let Some(total) = total {
                shown.set_length(total);
            }
            shown.set_position(bytes);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (bar, stop)
}

/// Ctrl-C, SIGTERM or SIGHUP runs `cancel` (on another thread) and sets the returned flag. Installed
/// by the caller before its transfer starts.
pub(crate) fn on_signal(cancel: impl FnOnce() + Send + 'static) -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    if let Some(signals) = crate::Signals::install() {
        std::thread::spawn(move || {
            signals.wait(|| false);
            flag.store(true, Ordering::Release);
            cancel();
        });
    }
    interrupted
}
