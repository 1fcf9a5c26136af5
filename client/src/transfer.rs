//! Transfers: streams pulled into outputs, with the policy an application wants around them,
//! so `nexus pull` and an embedding application share one implementation.
//!
//! - Retry: a stream that fails in a way that can clear (`unreachable`, `connection_lost`,
//!   `draining`, a timeout) is tried again after an exponential backoff, capped, within a
//!   count and a total time budget, so a server restart is survived; a `file:` stream goes on
//!   from the first byte not received, any other stream only if nothing was received yet.
//!   Failures a retry cannot clear (authentication, a refused or broken stream, integrity)
//!   are final at once.
//! - Outputs: a file (created, or with `resume_output` appended to from its current length,
//!   like `curl -C -`), or stdout. A failed output file is removed unless `keep_partial` or
//!   `resume_output` says to keep it; only regular files are ever removed.
//! - Many entries: pulled by `parallel` workers as one [`Operation`]; the first final
//!   failure cancels the rest unless `keep_going`. Every entry is in the report, with its
//!   state (complete, failed, cancelled or skipped).
//! - Split: one `file:` as N ranged streams written in place.
//!
//! The operation runs with `cancel_on_error` off: a failure that will be retried must not
//! cancel the other streams. The transfer cancels them itself at a final failure.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_protocol::file_range::FileRange;
use nexus_protocol::text::Printable;
use nexus_protocol::{ErrorCode, Outcome};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::client::{Client, StreamOptions};
use crate::operation::{Operation, OperationOptions};
use crate::stream::{Ended, Item};

/// The port an endpoint without one gets: the server's default.
pub const DEFAULT_PORT: u16 = 1270;

/// Most entries pulled at once.
pub const MAX_PARALLEL: usize = 256;
/// Most ranged streams one file is split into.
pub const MAX_SPLIT: usize = 256;

/// When and how often a failed stream is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most retries of one entry.
    pub max_retries: u32,
    /// The time from an entry's first try after which no retry starts
    /// (`burst.nexus.client.retry.budget.ms`).
    pub budget: Duration,
    /// The wait before the first retry; each later one doubles it.
    pub first_backoff: Duration,
    /// The longest wait between tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 8,
            budget: Duration::from_secs(60),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first).
    pub fn backoff(&self, retry: u32) -> Duration {
        let doubled = self
            .first_backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(20));
        doubled.min(self.max_backoff)
    }
}

/// Where an entry's data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A file.
    File(PathBuf),
    /// This process's standard output.
    Stdout,
}

/// One stream to pull: from where, what, into what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The server.
    pub endpoint: SocketAddr,
    /// What to stream.
    pub paradata: String,
    /// Where its bytes go.
    pub output: Output,
}

/// How a transfer behaves.
#[derive(Debug, Clone, Default)]
pub struct TransferOptions {
    /// Per-stream options (zstd, trace context).
    pub stream: StreamOptions,
    /// Retries of failures that can clear.
    pub retry: RetryPolicy,
    /// Entries pulled at once (1 to [`MAX_PARALLEL`]; 0 means 1).
    pub parallel: usize,
    /// Go on with the other entries after one failed for good.
    pub keep_going: bool,
    /// Continue into existing output files from their length (`file:` entries only).
    pub resume_output: bool,
    /// Keep a failed entry's output file instead of removing it.
    pub keep_partial: bool,
}

/// How an entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// Every byte arrived, counts and digest verified, and the output written.
    Complete,
    /// It failed for good: see its error.
    Failed,
    /// Cancelled (by the application, or because another entry failed).
    Cancelled,
    /// Never started: the transfer stopped first.
    Skipped,
}

/// Why an entry failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryError {
    /// The error code (PROTOCOL.md's names; `output` when the output could not be written,
    /// `timeout` for a stream that heard nothing for the stream timeout).
    pub code: String,
    /// What happened, as the server or this side said it.
    pub message: String,
}

/// One entry of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryReport {
    /// The server.
    pub endpoint: String,
    /// What was asked for.
    pub paradata: String,
    /// The output file; `None` for stdout.
    pub output: Option<PathBuf>,
    /// How it ended.
    pub state: EntryState,
    /// Bytes written to the output by this transfer.
    pub bytes: u64,
    /// Bytes the output already held when the transfer continued it.
    pub continued_from_bytes: u64,
    /// Times the stream was tried again (summed over the ranges of a split).
    pub retries: u32,
    /// Streams it took: 1, or the ranges of a split.
    pub streams: usize,
    /// The xxh3-64 digest of the stream, when it completed in one piece.
    pub digest: Option<String>,
    /// Why it failed, when it did.
    pub error: Option<EntryError>,
    /// The error code as a value, for exit codes: `None` unless failed.
    #[serde(skip)]
    pub code: Option<ErrorCode>,
}

/// What a transfer did: every entry, in the order given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Whether every entry completed.
    pub ok: bool,
    /// Bytes written in all.
    pub bytes: u64,
    /// Wall time.
    pub duration_seconds: f64,
    /// `bytes / duration_seconds`.
    pub bytes_per_second: f64,
    /// One per entry.
    pub entries: Vec<EntryReport>,
}

/// Counters of a running transfer, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferProgress {
    /// Bytes written so far.
    pub bytes: u64,
    /// Bytes announced by the streams started so far; `None` until one announced its size.
    pub expected_bytes: Option<u64>,
    /// Entries started.
    pub started: usize,
    /// Entries finished.
    pub finished: usize,
}

/// A transfer: its operation, counters and cancellation. Cheap to share between threads
/// (`Arc`): [`cancel`](Self::cancel) from a signal handler's thread while another pulls.
pub struct Transfer {
    op: Operation,
    options: TransferOptions,
    written: AtomicU64,
    expected: AtomicU64,
    announced: AtomicBool,
    started: AtomicUsize,
    finished: AtomicUsize,
    stopped: Mutex<bool>,
    wake: Condvar,
}

/// Why a transfer could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// More parallel entries or split ranges than allowed.
    #[error("{what} must be between 1 and {max}, got {got}")]
    OutOfRange {
        /// The option.
        what: &'static str,
        /// Its limit.
        max: usize,
        /// The value given.
        got: usize,
    },
    /// A split needs `file:` paradata without parameters and a file output.
    #[error("{0}")]
    BadSplit(String),
}

impl Transfer {
    /// A transfer on `client` under one new operation.
    pub fn new(client: &Client, options: TransferOptions) -> Result<Arc<Transfer>, TransferError> {
        let parallel = options.parallel.max(1);
        if parallel > MAX_PARALLEL {
            return Err(TransferError::OutOfRange {
                what: "parallel",
                max: MAX_PARALLEL,
                got: parallel,
            });
        }
        let op = client.operation(OperationOptions {
            cancel_on_error: false,
            id: None,
        });
        Ok(Arc::new(Transfer {
            op,
            options: TransferOptions {
                parallel,
                ..options
            },
            written: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            announced: AtomicBool::new(false),
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
        }))
    }

    /// Stops everything: running streams are cancelled, entries not started are skipped, a
    /// backoff wait ends at once.
    pub fn cancel(&self) {
        *self.stopped.lock() = true;
        self.wake.notify_all();
        self.op.cancel_all();
    }

    /// Whether [`cancel`](Self::cancel) was called (or a final failure stopped it).
    pub fn is_cancelled(&self) -> bool {
        *self.stopped.lock()
    }

    /// The counters so far.
    pub fn progress(&self) -> TransferProgress {
        TransferProgress {
            bytes: self.written.load(Ordering::Relaxed),
            expected_bytes: self
                .announced
                .load(Ordering::Relaxed)
                .then(|| self.expected.load(Ordering::Relaxed)),
            started: self.started.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }

    /// Pulls every entry, `parallel` at once; the report lists them in the order given.
    pub fn pull(self: &Arc<Self>, entries: &[Entry]) -> Report {
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let slots: Arc<Mutex<Vec<Option<EntryReport>>>> =
            Arc::new(Mutex::new(vec![None; entries.len()]));
        let entries: Arc<[Entry]> = entries.into();
        let workers: Vec<_> = (0..self.options.parallel.min(entries.len()))
            .map(|_| {
                let (this, next, slots, entries) = (
                    Arc::clone(self),
                    Arc::clone(&next),
                    Arc::clone(&slots),
                    Arc::clone(&entries),
                );
                std::thread::spawn(move || loop {
                    if this.is_cancelled() {
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(entry) = entries.get(index) else {
                        return;
                    };
                    let report = this.pull_to_output(entry);
                    let failed = report.state == EntryState::Failed;
                    slots.lock()[index] = Some(report);
                    if failed && !this.options.keep_going {
                        this.cancel();
                    }
                })
            })
            .collect();
        for worker in workers {
            let _ = worker.join();
        }
        let reports = std::mem::take(&mut *slots.lock())
            .into_iter()
            .zip(entries.iter())
            .map(|(report, entry)| report.unwrap_or_else(|| skipped(entry)))
            .collect();
        finish_report(reports, started)
    }

    /// Pulls one whole `file:` entry as `parts` ranged streams written in place: a first
    /// stream learns the size from INITIATED and is cancelled (it costs at most a window).
    pub fn pull_split(
        self: &Arc<Self>,
        entry: &Entry,
        parts: usize,
    ) -> Result<Report, TransferError> {
        if parts == 0 || parts > MAX_SPLIT {
            return Err(TransferError::OutOfRange {
                what: "split",
                max: MAX_SPLIT,
                got: parts,
            });
        }
        let range = match FileRange::parse(&entry.paradata) {
            Ok(range) if range.offset == 0 && range.length.is_none() => range,
            _ => {
                return Err(TransferError::BadSplit(
                    "--split pulls a whole file: paradata file:PATH without parameters".into(),
                ))
            }
        };
        let Output::File(path) = &entry.output else {
            return Err(TransferError::BadSplit(
                "--split writes in place, so it needs an output file".into(),
            ));
        };
        let started = Instant::now();
        let report = self.split_into(entry, &range, path, parts);
        Ok(finish_report(vec![report], started))
    }

    fn split_into(
        self: &Arc<Self>,
        entry: &Entry,
        range: &FileRange,
        path: &PathBuf,
        parts: usize,
    ) -> EntryReport {
        self.started.fetch_add(1, Ordering::Relaxed);
        let mut report = blank(entry);
        let file = match File::create(path) {
            Ok(file) => Arc::new(file),
            Err(e) => return self.output_failed(report, format!("cannot create {path:?}: {e}")),
        };
        let mut probe =
            self.op
                .initiate(entry.endpoint, &entry.paradata, self.options.stream.clone());
        let first = probe.recv();
        let Some(total) = probe.progress().expected_bytes else {
            let end = match first {
                Some(Item::End(end)) => end,
                _ => Ended::error(
                    ErrorCode::SOURCE_FAILED,
                    "the server did not announce the file size",
                    0,
                ),
            };
            report.state = EntryState::Failed;
            report.error = Some(error_of(&end));
            report.code = end.error_code();
            return self.finished(report, path);
        };
        drop(probe); // cancels it
        if let Err(e) = file.set_len(total) {
            return self.output_failed(report, format!("cannot size {path:?}: {e}"));
        }
        self.announce(total);
        let workers: Vec<_> = range
            .split(total, parts)
            .into_iter()
            .map(|piece| {
                let (this, file, endpoint) = (Arc::clone(self), Arc::clone(&file), entry.endpoint);
                std::thread::spawn(move || {
                    let start = piece.offset;
                    let piece_entry = Entry {
                        endpoint,
                        paradata: piece.to_string(),
                        output: Output::Stdout,
                    };
                    let outcome = this.pull_with_retries(&piece_entry, &mut |offset, data| {
                        file.write_all_at(data, start + offset)
                    });
                    if outcome.state == EntryState::Failed {
                        this.op.cancel_all();
                    }
                    outcome
                })
            })
            .collect();
        let pieces: Vec<EntryReport> = workers.into_iter().filter_map(|w| w.join().ok()).collect();
        report.bytes = pieces.iter().map(|p| p.bytes).sum();
        report.streams = pieces.len();
        report.retries = pieces.iter().map(|p| p.retries).sum();
        let failure = pieces
            .iter()
            .find(|p| p.state == EntryState::Failed)
            .or_else(|| pieces.iter().find(|p| p.state != EntryState::Complete));
        match failure {
            Some(p) => {
                report.state = p.state;
                report.error = p.error.clone();
                report.code = p.code;
            }
            None => report.state = EntryState::Complete,
        }
        if report.state == EntryState::Complete {
            if let Err(e) = file.sync_data() {
                return self.output_failed(report, format!("cannot write {path:?}: {e}"));
            }
        }
        self.finished(report, path)
    }

    /// One entry into its output, resumed and retried as the options say.
    fn pull_to_output(&self, entry: &Entry) -> EntryReport {
        self.started.fetch_add(1, Ordering::Relaxed);
        match &entry.output {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                let mut report = self.pull_with_retries(entry, &mut |_, data| out.write_all(data));
                if let Err(e) = out.flush() {
                    report = self.output_failed(report, format!("cannot write to stdout: {e}"));
                }
                self.finished.fetch_add(1, Ordering::Relaxed);
                report
            }
            Output::File(path) => self.pull_to_file(entry, path),
        }
    }

    fn pull_to_file(&self, entry: &Entry, path: &PathBuf) -> EntryReport {
        let mut report = blank(entry);
        let mut paradata = entry.paradata.clone();
        let opened = if self.options.resume_output {
            match continue_from(path, &paradata) {
                Ok((file, have, rest)) => {
                    report.continued_from_bytes = have;
                    paradata = rest;
                    Ok(file)
                }
                Err(e) => Err(e),
            }
        } else {
            File::create(path).map_err(|e| format!("cannot create {path:?}: {e}"))
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                report = self.output_failed(report, e);
                self.finished.fetch_add(1, Ordering::Relaxed);
                return report;
            }
        };
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let resumed = Entry {
            paradata,
            ..entry.clone()
        };
        let mut pulled = self.pull_with_retries(&resumed, &mut |_, data| out.write_all(data));
        pulled.paradata = entry.paradata.clone();
        pulled.continued_from_bytes = report.continued_from_bytes;
        if pulled.state == EntryState::Complete {
            // Data on disk before the pull says complete; only files can be synced
            // (`-o /dev/null` cannot).
            let sync = |file: &File| match file.metadata() {
                Ok(m) if m.is_file() => file.sync_data(),
                _ => Ok(()),
            };
            if let Err(e) = out.flush().and_then(|()| sync(out.get_ref())) {
                pulled = self.output_failed(pulled, format!("cannot write {path:?}: {e}"));
            }
        }
        self.finished(pulled, path)
    }

    /// Counts the entry finished, and removes a failed output file unless told to keep it.
    fn finished(&self, report: EntryReport, path: &PathBuf) -> EntryReport {
        self.finished.fetch_add(1, Ordering::Relaxed);
        let keep = self.options.keep_partial || self.options.resume_output;
        if report.state != EntryState::Complete && !keep {
            // Only a regular file: `-o /dev/null` (or a link to it) must survive a failure,
            // even as root.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(path);
            }
        }
        report
    }

    fn output_failed(&self, mut report: EntryReport, message: String) -> EntryReport {
        report.state = EntryState::Failed;
        report.code = None;
        report.error = Some(EntryError {
            code: "output".into(),
            message,
        });
        if !self.options.keep_going {
            self.cancel();
        }
        report
    }

    fn announce(&self, bytes: u64) {
        self.expected.fetch_add(bytes, Ordering::Relaxed);
        self.announced.store(true, Ordering::Relaxed);
    }

    /// Pulls `entry`, handing each chunk to `write` with its offset in the entry; retries
    /// what can clear.
    fn pull_with_retries(
        &self,
        entry: &Entry,
        write: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> EntryReport {
        let first_try = Instant::now();
        let mut report = blank(entry);
        let mut paradata = entry.paradata.clone();
        let mut announced = false;
        loop {
            let mut handle =
                self.op
                    .initiate(entry.endpoint, &paradata, self.options.stream.clone());
            let mut output_error = None;
            let end = loop {
                match handle.recv() {
                    Some(Item::Chunk(data)) => {
                        if !announced {
                            if let Some(total) = handle.progress().expected_bytes {
                                self.announce(total);
                                announced = true;
                            }
                        }
                        if output_error.is_none() {
                            if let Err(e) = write(report.bytes, &data) {
                                output_error = Some(format!("cannot write the output: {e}"));
                                handle.cancel();
                            }
                        }
                        report.bytes += data.len() as u64;
                        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Some(Item::End(end)) => break end,
                    None => {
                        break handle.ended().unwrap_or(Ended {
                            outcome: Outcome::Cancelled,
                            bytes_received: 0,
                            report: None,
                        })
                    }
                }
            };
            if let Some(message) = output_error {
                return self.output_failed(report, message);
            }
            match &end.outcome {
                Outcome::Complete(c) => {
                    report.state = EntryState::Complete;
                    if report.retries == 0 {
                        report.digest = Some(format!("{:016x}", c.digest));
                    }
                    return report;
                }
                Outcome::Cancelled => {
                    report.state = EntryState::Cancelled;
                    return report;
                }
                _ => {}
            }
            let retryable = is_transient(&end) && !self.is_cancelled();
            let within = report.retries < self.options.retry.max_retries
                && first_try.elapsed() < self.options.retry.budget;
            let next = match FileRange::parse(&entry.paradata) {
                Ok(range) => range.after(report.bytes).map(|r| r.to_string()),
                // Only a stream that delivered nothing can start over.
                Err(_) => (report.bytes == 0).then(|| entry.paradata.clone()),
            };
            match (retryable && within, next) {
                (true, Some(next)) => {
                    report.retries += 1;
                    let wait = self.options.retry.backoff(report.retries);
                    tracing::warn!(paradata = %entry.paradata, received = report.bytes, retry = report.retries, wait_ms = wait.as_millis() as u64, reason = %Printable(&error_of(&end).message), "Stream failed; trying again.");
                    if self.wait(wait) {
                        report.state = EntryState::Cancelled;
                        return report;
                    }
                    paradata = next;
                }
                _ => {
                    report.state = EntryState::Failed;
                    report.error = Some(error_of(&end));
                    report.code = Some(end.error_code().unwrap_or(ErrorCode::TIMEOUT));
                    return report;
                }
            }
        }
    }

    /// Waits `wait`, or less if the transfer is cancelled; returns whether it was.
    fn wait(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut stopped = self.stopped.lock();
        while !*stopped {
            if self.wake.wait_until(&mut stopped, deadline).timed_out() {
                break;
            }
        }
        *stopped
    }
}

/// `HOST[:PORT]` (`node7:1270`, `10.0.0.5`, `[::1]:1280`, `::1`) to an address; a name is
/// resolved, and the port defaults to [`DEFAULT_PORT`].
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if let Ok(ip) = text.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = match text.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => text.to_string(),
        _ => format!("{text}:{DEFAULT_PORT}"),
    };
    std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// The host name of an endpoint as [`parse_endpoint`] takes it (`node7:1270` gives `node7`),
/// or `None` when it is an IP address: the name a TLS client checks the server's
/// certificate against when `burst.nexus.client.tls.server.name` does not say.
pub fn endpoint_host_name(text: &str) -> Option<&str> {
    if text.parse::<SocketAddr>().is_ok()
        || text
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
    {
        return None;
    }
    let host = match text.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => text,
    };
    (!host.is_empty() && host.parse::<std::net::IpAddr>().is_err()).then_some(host)
}

/// A manifest: one `ENDPOINT PARADATA OUTPUT` per line (`-` for stdout), blank lines and
/// `#` comments skipped. Errors name the line.
pub fn parse_manifest(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [server, paradata, out] = fields[..] else {
            return Err(format!("line {}: expected ENDPOINT PARADATA OUTPUT", n + 1));
        };
        entries.push(Entry {
            endpoint: parse_endpoint(server).map_err(|e| format!("line {}: {e}", n + 1))?,
            paradata: paradata.to_string(),
            output: match out {
                "-" => Output::Stdout,
                path => Output::File(PathBuf::from(path)),
            },
        });
    }
    if entries.is_empty() {
        return Err("it lists no stream".into());
    }
    Ok(entries)
}

/// Opens `path` to continue it: its length says how much of `paradata` it holds already.
/// Returns the file, that length, and the paradata of the rest.
fn continue_from(path: &PathBuf, paradata: &str) -> Result<(File, u64, String), String> {
    let range = FileRange::parse(paradata)
        .map_err(|_| format!("only file: streams can be continued, not {paradata:?}"))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {path:?}: {e}"))?;
    let have = file
        .metadata()
        .map_err(|e| format!("cannot read {path:?}: {e}"))?
        .len();
    let rest = range
        .after(have)
        .ok_or_else(|| format!("{path:?} holds {have} bytes, more than the range {paradata:?}"))?;
    Ok((file, have, rest.to_string()))
}

/// Whether a stream that ended so may work on another try.
fn is_transient(end: &Ended) -> bool {
    matches!(end.outcome, Outcome::TimedOut)
        || matches!(
            end.error_code(),
            Some(
                ErrorCode::CONNECTION_LOST
                    | ErrorCode::DRAINING
                    | ErrorCode::TIMEOUT
                    | ErrorCode::UNREACHABLE
            )
        )
}

fn error_of(end: &Ended) -> EntryError {
    match &end.outcome {
        Outcome::Error { code, message } => EntryError {
            code: code.to_string(),
            message: message.clone(),
        },
        Outcome::TimedOut => EntryError {
            code: "timeout".into(),
            message: "nothing arrived within the stream timeout".into(),
        },
        Outcome::Cancelled => EntryError {
            code: "cancelled".into(),
            message: "cancelled".into(),
        },
        Outcome::Complete(_) => EntryError {
            code: String::new(),
            message: String::new(),
        },
    }
}

fn blank(entry: &Entry) -> EntryReport {
    EntryReport {
        endpoint: entry.endpoint.to_string(),
        paradata: entry.paradata.clone(),
        output: match &entry.output {
            Output::File(path) => Some(path.clone()),
            Output::Stdout => None,
        },
        state: EntryState::Skipped,
        bytes: 0,
        continued_from_bytes: 0,
        retries: 0,
        streams: 1,
        digest: None,
        error: None,
        code: None,
    }
}

fn skipped(entry: &Entry) -> EntryReport {
    blank(entry)
}

fn finish_report(entries: Vec<EntryReport>, started: Instant) -> Report {
    let bytes = entries.iter().map(|e| e.bytes).sum();
    let duration_seconds = started.elapsed().as_secs_f64();
    Report {
        ok: entries.iter().all(|e| e.state == EntryState::Complete),
        bytes,
        duration_seconds,
        bytes_per_second: if duration_seconds > 0.0 {
            bytes as f64 / duration_seconds
        } else {
            0.0
        },
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_a_default_port_and_host_names() {
        let text = |s: &str| parse_endpoint(s).unwrap().to_string();
        assert_eq!(text("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(text("127.0.0.1"), "127.0.0.1:1270");
        assert_eq!(text("[::1]"), "[::1]:1270");
        assert_eq!(text("::1"), "[::1]:1270");
        assert_eq!(text("[::1]:9"), "[::1]:9");
        assert_eq!(parse_endpoint("localhost:7").unwrap().port(), 7);
        assert!(parse_endpoint("localhost").unwrap().ip().is_loopback());
        assert!(parse_endpoint("no-such-host.invalid").is_err());
    }

    #[test]
    fn host_names_are_told_from_addresses() {
        assert_eq!(endpoint_host_name("node7:1270"), Some("node7"));
        assert_eq!(endpoint_host_name("node7"), Some("node7"));
        assert_eq!(endpoint_host_name("a.example.org:9"), Some("a.example.org"));
        for address in ["10.0.0.5", "10.0.0.5:1270", "[::1]", "[::1]:9", "::1", ""] {
            assert_eq!(endpoint_host_name(address), None, "{address}");
        }
    }

    #[test]
    fn manifests_list_entries_and_name_bad_lines() {
        let entries =
            parse_manifest("# two\n127.0.0.1 file:a out/a\n\n[::1]:9 synthetic:1 -\n").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].output, Output::File("out/a".into()));
        assert_eq!(entries[1].output, Output::Stdout);
        assert_eq!(entries[1].endpoint.port(), 9);
        assert!(parse_manifest("127.0.0.1 file:a\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(parse_manifest("# nothing\n").is_err());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RetryPolicy::default();
        let waits: Vec<u128> = (1..=8).map(|r| policy.backoff(r).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(policy.backoff(u32::MAX), policy.max_backoff);
    }
}
