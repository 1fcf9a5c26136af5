//! `nexus pull`: one stream to a file or stdout, a manifest of streams as one operation, or
//! one file as N ranged streams written in place.
//!
//! Exit codes (also in the README): 0 complete and verified; 1 the server refused or failed a
//! stream; 2 bad usage or configuration; 3 connection failed, lost or timed out (after the
//! retries); 4 integrity failure; 5 the output could not be written; 130 interrupted.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nexus_client::{
    resume_paradata, Client, Ended, ErrorCode, Item, Operation, OperationOptions, Outcome,
    StreamOptions,
};
use nexus_protocol::text::Printable;
use parking_lot::Mutex;

/// Exit codes.
pub(crate) const EXIT_STREAM: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_CONNECTION: u8 = 3;
pub(crate) const EXIT_INTEGRITY: u8 = 4;
pub(crate) const EXIT_OUTPUT: u8 = 5;
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// What to pull and how.
pub(crate) struct Job {
    pub(crate) endpoint: Option<String>,
    pub(crate) paradata: Option<String>,
    pub(crate) output: Option<PathBuf>,
    pub(crate) json: bool,
    pub(crate) manifest: Option<PathBuf>,
    pub(crate) parallel: usize,
    pub(crate) split: Option<usize>,
    pub(crate) retries: u32,
    /// Ask for zstd-compressed chunks.
    pub(crate) zstd: bool,
}

/// One stream of the job: where from, what, where to.
#[derive(Debug, Clone)]
struct Entry {
    endpoint: SocketAddr,
    paradata: String,
    output: Option<PathBuf>,
}

/// How one entry went.
#[derive(Debug, Clone)]
struct Report {
    entry: Entry,
    bytes: u64,
    retries: u32,
    end: Ended,
    /// Set when writing the output failed.
    output_error: Option<String>,
}

/// Shared by the workers: the operation, counters for the progress bar, Ctrl-C.
struct Run {
    op: Operation,
    options: StreamOptions,
    retries: u32,
    written: AtomicU64,
    expected: AtomicU64,
    interrupted: AtomicBool,
}

pub(crate) fn run(client: Client, job: Job) -> ExitCode {
    let entries = match entries(&job) {
        Ok(entries) => entries,
        Err(e) => return usage(&e),
    };
    if job.json && entries.iter().any(|e| e.output.is_none()) {
        return usage("--json prints the summary on stdout, so the data needs -o FILE");
    }
    let run = Arc::new(Run {
        op: client.operation(OperationOptions {
            cancel_on_error: false,
            id: None,
        }),
        options: StreamOptions {
            accept_zstd: job.zstd,
            ..StreamOptions::default()
        },
        retries: job.retries,
        written: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        interrupted: AtomicBool::new(false),
    });
    watch_signals(Arc::clone(&run));
    let bar = progress_bar();
    let ticker = start_ticker(Arc::clone(&run), bar.clone());
    let started = Instant::now();
    let reports = match job.split {
        Some(n) => split(&run, &entries[0], n),
        None => pull_all(&run, &entries, job.parallel.max(1)),
    };
    let seconds = started.elapsed().as_secs_f64();
    ticker.store(true, Ordering::Release);
    bar.finish_and_clear();
    let interrupted = run.interrupted.load(Ordering::Acquire);
    let code = exit_code(&reports, interrupted);
    if code != 0 {
        for r in &reports {
            if let Some(path) = &r.entry.output {
                // Only a regular file is removed: `-o /dev/null` (or a link to it) must survive
                // a failed pull, even as root.
                let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
                if regular && (!r.end.is_complete() || code == EXIT_INTERRUPTED) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    if job.json {
        println!("{}", json_summary(&reports, seconds, code));
    }
    for r in reports
        .iter()
        .filter(|r| !r.end.is_complete() || r.output_error.is_some())
    {
        // Messages come from the server: escaped, so that none can drive the terminal.
        eprintln!("nexus pull: {}", Printable(&describe_failure(r)));
    }
    if interrupted {
        eprintln!(
            "nexus pull: interrupted; every stream was cancelled and partial outputs removed"
        );
    }
    ExitCode::from(code)
}

fn usage(message: &str) -> ExitCode {
    eprintln!("nexus pull: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("endpoint {endpoint:?} resolves to no address"))
}

fn entries(job: &Job) -> Result<Vec<Entry>, String> {
    if let Some(manifest) = &job.manifest {
        if job.endpoint.is_some() || job.output.is_some() || job.split.is_some() {
            return Err(
                "--manifest takes the streams from the file: no ENDPOINT, -o or --split".into(),
            );
        }
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| format!("cannot read manifest {manifest:?}: {e}"))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [endpoint, paradata, output] = fields[..] else {
                return Err(format!(
                    "manifest {manifest:?} line {}: expected ENDPOINT PARADATA OUTPUT",
                    n + 1
                ));
            };
            entries.push(Entry {
                endpoint: resolve(endpoint)?,
                paradata: paradata.to_string(),
                output: Some(PathBuf::from(output)),
            });
        }
        if entries.is_empty() {
            return Err(format!("manifest {manifest:?} lists no stream"));
        }
        return Ok(entries);
    }
    let (Some(endpoint), Some(paradata)) = (&job.endpoint, &job.paradata) else {
        return Err("give ENDPOINT and PARADATA, or --manifest FILE".into());
    };
    if let Some(n) = job.split {
        if n == 0 {
            return Err("--split needs at least 1 stream".into());
        }
        if job.output.is_none() {
            return Err("--split writes in place, so it needs -o FILE".into());
        }
        if !paradata.starts_with("file:") || paradata.contains('?') {
            return Err("--split pulls a whole file: paradata file:PATH without parameters".into());
        }
    }
    Ok(vec![Entry {
        endpoint: resolve(endpoint)?,
        paradata: paradata.clone(),
        output: job.output.clone(),
    }])
}

/// Pulls the entries, at most `parallel` at once.
fn pull_all(run: &Arc<Run>, entries: &[Entry], parallel: usize) -> Vec<Report> {
    let queue = Arc::new(Mutex::new(
        entries.iter().cloned().enumerate().collect::<Vec<_>>(),
    ));
    queue.lock().reverse();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..parallel.min(entries.len()))
        .map(|_| {
            let (run, queue, reports) = (Arc::clone(run), Arc::clone(&queue), Arc::clone(&reports));
            std::thread::spawn(move || loop {
                let Some((index, entry)) = queue.lock().pop() else {
                    return;
                };
                let report = pull_to_output(&run, entry);
                let failed = !report.end.is_complete() || report.output_error.is_some();
                reports.lock().push((index, report));
                if failed {
                    // One failed stream fails the operation: stop the others.
                    run.op.cancel_all();
                    queue.lock().clear();
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut reports = std::mem::take(&mut *reports.lock());
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

fn pull_to_output(run: &Run, entry: Entry) -> Report {
    let mut sink: Box<dyn Write> = match &entry.output {
        Some(path) => match File::create(path) {
            Ok(file) => Box::new(std::io::BufWriter::with_capacity(1 << 20, file)),
            Err(e) => {
                let message = format!("cannot create {path:?}: {e}");
                return Report {
                    end: Ended {
                        outcome: Outcome::Cancelled,
                        bytes_received: 0,
                    },
                    entry,
                    bytes: 0,
                    retries: 0,
                    output_error: Some(message),
                };
            }
        },
        None => Box::new(std::io::stdout().lock()),
    };
    let mut report = pull(run, entry, &mut |_, data| sink.write_all(data));
    if report.output_error.is_none() {
        if let Err(e) = sink.flush() {
            report.output_error = Some(format!("cannot write the output: {e}"));
        }
    }
    report
}

/// Pulls one entry, resuming `file:` streams after connection failures up to the retry limit.
/// `write` gets each chunk with its offset in the entry.
fn pull(
    run: &Run,
    entry: Entry,
    write: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Report {
    let mut received = 0u64;
    let mut retries = 0;
    let mut paradata = entry.paradata.clone();
    let mut counted_expected = false;
    loop {
        let mut handle = run
            .op
            .initiate(entry.endpoint, &paradata, run.options.clone());
        let mut output_error = None;
        let end = loop {
            match handle.recv() {
                Some(Item::Chunk(data)) => {
                    if !counted_expected {
                        if let Some(total) = handle.progress().expected_bytes {
                            run.expected.fetch_add(total, Ordering::Relaxed);
                            counted_expected = true;
                        }
                    }
                    if let Err(e) = write(received, &data) {
                        output_error = Some(format!("cannot write the output: {e}"));
                        handle.cancel();
                    }
                    received += data.len() as u64;
                    run.written.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Some(Item::End(end)) => break end,
                None => {
                    break handle.ended().unwrap_or(Ended {
                        outcome: Outcome::Cancelled,
                        bytes_received: 0,
                    })
                }
            }
        };
        let transient = matches!(
            end.error_code(),
            Some(ErrorCode::CONNECTION_LOST) | Some(ErrorCode::DRAINING) | Some(ErrorCode::TIMEOUT)
        ) || end.outcome == Outcome::TimedOut;
        let interrupted = run.interrupted.load(Ordering::Acquire);
        if transient && retries < run.retries && output_error.is_none() && !interrupted {
            if let Some(next) = resume_paradata(&entry.paradata, received) {
                retries += 1;
                tracing::warn!(paradata = %entry.paradata, received, retry = retries, "Stream failed; resuming.");
                paradata = next;
                continue;
            }
        }
        return Report {
            entry,
            bytes: received,
            retries,
            end,
            output_error,
        };
    }
}

/// One file as `n` ranged streams written in place. A first stream of the whole file learns
/// its size from INITIATED and is cancelled (it costs at most one window).
fn split(run: &Arc<Run>, entry: &Entry, n: usize) -> Vec<Report> {
    let path = entry.output.clone().unwrap_or_default();
    let file = match File::create(&path) {
        Ok(file) => Arc::new(file),
        Err(e) => {
            return vec![output_failure(
                entry,
                format!("cannot create {path:?}: {e}"),
            )];
        }
    };
    // Learn the size from the first stripe's INITIATED.
    let mut probe = run
        .op
        .initiate(entry.endpoint, &entry.paradata, run.options.clone());
    let first = probe.recv();
    let Some(total) = probe.progress().expected_bytes else {
        let end = match first {
            Some(Item::End(end)) => end,
            _ => Ended {
                outcome: Outcome::Error {
                    code: ErrorCode::INTERNAL,
                    message: "the server did not announce the file size".into(),
                },
                bytes_received: 0,
            },
        };
        return vec![Report {
            entry: entry.clone(),
            bytes: 0,
            retries: 0,
            end,
            output_error: None,
        }];
    };
    drop(probe); // cancels it
    if let Err(e) = file.set_len(total) {
        return vec![output_failure(entry, format!("cannot size {path:?}: {e}"))];
    }
    let stripe = total.div_ceil(n as u64).max(1);
    let workers: Vec<_> = (0..n as u64)
        .map(|i| (i * stripe, ((i + 1) * stripe).min(total)))
        .filter(|(start, end)| start < end || total == 0)
        .map(|(start, end)| {
            let (run, file) = (Arc::clone(run), Arc::clone(&file));
            let body = entry.paradata.clone();
            let entry = Entry {
                paradata: format!("{body}?offset={start}&length={}", end - start),
                ..entry.clone()
            };
            std::thread::spawn(move || {
                let report = pull(&run, entry, &mut |offset, data| {
                    file.write_all_at(data, start + offset)
                });
                if !report.end.is_complete() || report.output_error.is_some() {
                    run.op.cancel_all();
                }
                report
            })
        })
        .collect();
    let reports: Vec<Report> = workers.into_iter().filter_map(|w| w.join().ok()).collect();
    if let Err(e) = file.sync_data() {
        return vec![output_failure(entry, format!("cannot write {path:?}: {e}"))];
    }
    reports
}

fn output_failure(entry: &Entry, message: String) -> Report {
    Report {
        entry: entry.clone(),
        bytes: 0,
        retries: 0,
        end: Ended {
            outcome: Outcome::Cancelled,
            bytes_received: 0,
        },
        output_error: Some(message),
    }
}

fn exit_code(reports: &[Report], interrupted: bool) -> u8 {
    if interrupted {
        return EXIT_INTERRUPTED;
    }
    // The first real failure decides; streams cancelled because of it do not.
    let mut code = 0;
    for r in reports {
        let this = if r.output_error.is_some() {
            EXIT_OUTPUT
        } else {
            match &r.end.outcome {
                Outcome::Complete(_) => 0,
                Outcome::Cancelled => continue,
                Outcome::TimedOut => EXIT_CONNECTION,
                Outcome::Error { code, .. } => match *code {
                    ErrorCode::CONNECTION_LOST | ErrorCode::TIMEOUT => EXIT_CONNECTION,
                    ErrorCode::INTEGRITY_FAILURE => EXIT_INTEGRITY,
                    _ => EXIT_STREAM,
                },
            }
        };
        if code == 0 {
            code = this;
        }
    }
    if code == 0 && reports.iter().any(|r| !r.end.is_complete()) {
        // Cancelled without a failure or a signal: nothing should do that, but it is not success.
        code = EXIT_STREAM;
    }
    code
}

fn describe_failure(r: &Report) -> String {
    let what = format!("{} {}", r.entry.endpoint, r.entry.paradata);
    if let Some(e) = &r.output_error {
        return format!("{what}: {e}");
    }
    let retries = if r.retries > 0 {
        format!(", {} resumes", r.retries)
    } else {
        String::new()
    };
    match &r.end.outcome {
        Outcome::Error { code, message } => {
            format!(
                "{what}: {code}: {message} (after {} bytes{retries})",
                r.bytes
            )
        }
        Outcome::TimedOut => format!(
            "{what}: timeout: nothing arrived in time (after {} bytes{retries})",
            r.bytes
        ),
        Outcome::Cancelled => format!("{what}: cancelled (after {} bytes)", r.bytes),
        Outcome::Complete(_) => format!("{what}: complete"),
    }
}

fn outcome_name(end: &Ended) -> String {
    match &end.outcome {
        Outcome::Complete(_) => "complete".into(),
        Outcome::Cancelled => "cancelled".into(),
        Outcome::TimedOut => "timeout".into(),
        Outcome::Error { code, .. } => code.to_string(),
    }
}

fn json_summary(reports: &[Report], seconds: f64, code: u8) -> String {
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let streams: Vec<String> = reports
        .iter()
        .map(|r| {
            let message = match (&r.output_error, &r.end.outcome) {
                (Some(e), _) => e.clone(),
                (None, Outcome::Error { message, .. }) => message.clone(),
                _ => String::new(),
            };
            let digest = match &r.end.outcome {
                Outcome::Complete(c) if c.chunks > 0 || c.digest != 0 => format!("\"{:016x}\"", c.digest),
                _ => "null".into(),
            };
            format!(
                "{{\"endpoint\":{},\"paradata\":{},\"output\":{},\"bytes\":{},\"outcome\":{},\"message\":{},\"digest\":{digest},\"resumes\":{}}}",
                json_string(&r.entry.endpoint.to_string()),
                json_string(&r.entry.paradata),
                r.entry.output.as_deref().map_or("null".into(), |p| json_string(&p.to_string_lossy())),
                r.bytes,
                json_string(&outcome_name(&r.end)),
                json_string(&message),
                r.retries,
            )
        })
        .collect();
    format!(
        "{{\"ok\":{},\"exit_code\":{code},\"bytes\":{bytes},\"seconds\":{seconds:.3},\"gbps\":{:.3},\"streams\":[{}]}}",
        code == 0,
        if seconds > 0.0 { bytes as f64 / seconds / 1e9 } else { 0.0 },
        streams.join(",")
    )
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn progress_bar() -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Updates the bar from the shared counters until the returned flag is set.
fn start_ticker(run: Arc<Run>, bar: ProgressBar) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if !bar.is_hidden() {
        std::thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                bar.set_length(run.expected.load(Ordering::Relaxed));
                bar.set_position(run.written.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    stop
}

/// Ctrl-C or SIGTERM cancels every stream of the run.
fn watch_signals(run: Arc<Run>) {
    std::thread::spawn(move || {
        let signal = crate::wait_for_signal();
        if signal != "none" {
            run.interrupted.store(true, Ordering::Release);
            run.op.cancel_all();
        }
    });
}
