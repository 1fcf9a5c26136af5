//! `nexus push` and `nexus verify`: local files (or stdin) into server sinks, optionally
//! replicated along a chain of servers; and the digests of one file across replicas compared.
//!
//! Exit codes are pull's (README): 0 committed and verified (for a replicated push: by every
//! replica, or by `--quorum` of them); 1 the server refused or failed the push, or too few
//! replicas committed; 2 bad usage; 3 connection lost, unreachable or timed out; 4 integrity
//! failure (for `verify`: the replicas differ); 5 the local file could not be read; 6
//! authentication failed; 130 interrupted.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use indicatif::HumanBytes;
use nexus_client::transfer::parse_endpoint;
use nexus_client::{
    Client, ErrorCode, Operation, OperationOptions, Outcome, PushOptions, StreamOptions,
};
use nexus_protocol::text::Printable;
use serde_json::{json, Value};

use crate::pull::{
    EXIT_CONNECTION, EXIT_INTEGRITY, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_STREAM, EXIT_USAGE,
};

/// After Ctrl-C, how long the pushes have to end before the process exits anyway.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from the file per write to the push.
const READ_SIZE: usize = 1 << 20;
/// The read buffer's allocation: several reads, so that one still held by the connection
/// does not force a new allocation.
const ARENA: usize = 16 << 20;

#[derive(Args)]
pub(crate) struct PushArgs {
    /// The file to push ('-' for stdin).
    file: Option<String>,
    /// ENDPOINT SINK_PARADATA, e.g. node7:1270 file:inbox/big.bin; with --replicas, only
    /// SINK_PARADATA.
    #[arg(num_args = 0..=2)]
    target: Vec<String>,
    /// Write the file to every server of this list as a pipeline, first to last
    /// (HOST:PORT,...): each server forwards to the next, so each link carries it once.
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    replicas: Vec<String>,
    /// With --replicas: success when N replicas committed (default: all of them).
    #[arg(long, value_name = "N", requires = "replicas")]
    quorum: Option<usize>,
    /// Push every line `FILE ENDPOINT SINK_PARADATA` of FILE as one operation.
    #[arg(long, value_name = "FILE", conflicts_with = "replicas")]
    manifest: Option<String>,
    /// Manifest pushes run at once (1 to 256).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub(crate) console: crate::ConsoleArgs,
}

impl PushArgs {
    /// The server's host name, when the endpoint names one: what its TLS certificate must hold.
    pub(crate) fn host_name(&self) -> Option<String> {
        let endpoint = self.target.first()?;
        nexus_client::transfer::endpoint_host_name(endpoint).map(str::to_string)
    }
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// The file, relative to each server's root (burst.nexus.server.root).
    path: String,
    /// The servers holding a replica (HOST:PORT,...).
    #[arg(long, value_name = "A,B,C", value_delimiter = ',', required = true)]
    replicas: Vec<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// IO backend: auto, io_uring or epoll (burst.nexus.io.backend).
    #[arg(long)]
    pub(crate) backend: Option<String>,
}

/// One push to make.
struct Job {
    file: String,
    endpoint: String,
    address: SocketAddr,
    paradata: String,
    /// The replicas after `endpoint`, for a replicated push.
    chain: Vec<String>,
}

/// How one push ended.
struct Done {
    bytes: u64,
    /// Committed by the first server: its digest.
    digest: Option<u64>,
    /// Failed: the code (None: the local file) and message.
    error: Option<(Option<ErrorCode>, String)>,
    cancelled: bool,
    report: Option<String>,
}

pub(crate) fn run(client: &Client, args: PushArgs) -> ExitCode {
    let jobs = match jobs(&args) {
        Ok(jobs) => jobs,
        Err(e) => return usage(&e),
    };
    if args.parallel == 0 || args.parallel > 256 {
        return usage("--parallel must be 1 to 256");
    }
    let replicas = jobs[0].chain.len() + 1;
    if let Some(q) = args.quorum {
        if q == 0 || q > replicas {
            return usage(&format!(
                "--quorum must be 1 to {replicas} (the replicas named)"
            ));
        }
    }
    let operation = Arc::new(client.operation(OperationOptions {
        cancel_on_error: args.manifest.is_some(),
        id: None,
    }));
    // Ctrl-C or SIGTERM cancels every push. A push blocked reading its input (a pipe that
    // stays open) cannot see that, so the process exits after a grace period: the server
    // keeps nothing of a push whose connection closed either.
    let cancelled = Arc::clone(&operation);
    let interrupted = crate::pull::on_signal(move || {
        cancelled.cancel_all();
        std::thread::sleep(INTERRUPT_GRACE);
        eprintln!("nexus push: interrupted; every push was cancelled, nothing of them kept");
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    });
    let sent = Arc::new(AtomicU64::new(0));
    let total = jobs
        .iter()
        .map(|j| local_size(&j.file))
        .sum::<Option<u64>>();
    let show = !args.console.quiet && !args.console.no_progress && !args.json;
    let polled = Arc::clone(&sent);
    let (bar, stop) = crate::pull::progress(show, move || (polled.load(Ordering::Relaxed), total));
    let started = Instant::now();
    let quorum = args.quorum;
    let jobs = Arc::new(jobs);
    let results: Vec<Done> = {
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..args.parallel.min(jobs.len()))
            .map(|_| {
                let (jobs, next, operation, sent) = (
                    Arc::clone(&jobs),
                    Arc::clone(&next),
                    Arc::clone(&operation),
                    Arc::clone(&sent),
                );
                std::thread::spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(job) = jobs.get(i) else { break };
                        done.push((i, push_one(&operation, job, quorum, &sent)));
                    }
                    done
                })
            })
            .collect();
        let mut all: Vec<(usize, Done)> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, d)| d).collect()
    };
    stop.store(true, Ordering::Release);
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let interrupted = interrupted.load(Ordering::Acquire);
    let mut entries = Vec::new();
    let mut code = 0;
    for (job, done) in jobs.iter().zip(&results) {
        let (entry, entry_code) = entry_report(job, done, quorum);
        if code == 0 && entry_code != 0 {
            code = entry_code;
        }
        entries.push(entry);
    }
    if interrupted {
        code = EXIT_INTERRUPTED;
    }
    let bytes: u64 = results.iter().map(|d| d.bytes).sum();
    if args.json {
        let report = json!({
            "ok": code == 0,
            "bytes": bytes,
            "duration_seconds": seconds,
            "bytes_per_second": bytes as f64 / seconds.max(1e-9),
            "entries": entries,
            "exit_code": code,
        });
        crate::emit(&format!("{report}\n"));
    }
    for entry in &entries {
        complain(entry);
    }
    if interrupted {
        eprintln!("nexus push: interrupted; every push was cancelled, nothing of them kept");
    } else if code == 0 && !args.console.quiet && !args.json {
        let rate = HumanBytes((bytes as f64 / seconds.max(1e-9)) as u64);
        let what = match &entries[..] {
            [one] => {
                let digest = one["digest"].as_str().unwrap_or("-");
                let replicas = match one["replicas"].as_array() {
                    Some(r) => format!(
                        ", on {} of {} replicas",
                        r.iter().filter(|r| r["state"] == "committed").count(),
                        r.len()
                    ),
                    None => String::new(),
                };
                format!("committed, xxh3 {digest} verified{replicas}")
            }
            all => format!("{} pushes, each committed and verified", all.len()),
        };
        eprintln!(
            "nexus push: {} in {seconds:.2} s ({rate}/s): {what}",
            HumanBytes(bytes)
        );
    }
    ExitCode::from(code)
}

/// A failed entry (or replica) on stderr, messages escaped.
fn complain(entry: &Value) {
    let target = format!(
        "{} {} {}",
        entry["file"].as_str().unwrap_or(""),
        entry["endpoint"].as_str().unwrap_or(""),
        Printable(entry["paradata"].as_str().unwrap_or(""))
    );
    let error = entry.get("error").filter(|e| !e.is_null());
    if let Some(error) = error {
        eprintln!(
            "nexus push: {target}: {}: {} (after {} bytes)",
            error["code"].as_str().unwrap_or("local"),
            Printable(error["message"].as_str().unwrap_or("")),
            entry["bytes"]
        );
    }
    // The replicas' states: they explain a quorum missed, or warn of one that failed under
    // a quorum met. (A failed push's error already names the replica that failed.)
    let failed_push =
        error.is_some_and(|e| e["code"] != "sink_failed" || entry["quorum"].is_null());
    for replica in entry["replicas"].as_array().into_iter().flatten() {
        if replica["state"] != "committed" && !failed_push {
            eprintln!(
                "nexus push: replica {}: {}: {}",
                replica["endpoint"].as_str().unwrap_or(""),
                replica["state"].as_str().unwrap_or(""),
                Printable(replica["message"].as_str().unwrap_or(""))
            );
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("nexus push: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn jobs(args: &PushArgs) -> Result<Vec<Job>, String> {
    if let Some(manifest) = &args.manifest {
        if args.file.is_some() {
            return Err("give FILE ENDPOINT SINK_PARADATA, or --manifest FILE, not both".into());
        }
        let text = std::fs::read_to_string(manifest)
            .map_err(|e| format!("cannot read manifest {manifest:?}: {e}"))?;
        let mut jobs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [file, endpoint, paradata] = fields[..] else {
                return Err(format!(
                    "manifest {manifest:?} line {}: expected FILE ENDPOINT SINK_PARADATA",
                    n + 1
                ));
            };
            if file == "-" {
                return Err(format!(
                    "manifest {manifest:?} line {}: stdin cannot be pushed from a manifest",
                    n + 1
                ));
            }
            jobs.push(job(file, endpoint, paradata, &[])?);
        }
        if jobs.is_empty() {
            return Err(format!("manifest {manifest:?} lists no push"));
        }
        return Ok(jobs);
    }
    let Some(file) = &args.file else {
        return Err("give FILE ENDPOINT SINK_PARADATA, or --manifest FILE".into());
    };
    match (&args.replicas[..], &args.target[..]) {
        ([], [endpoint, paradata]) => Ok(vec![job(file, endpoint, paradata, &[])?]),
        ([], _) => Err("give FILE ENDPOINT SINK_PARADATA".into()),
        ([first, rest @ ..], [paradata]) => Ok(vec![job(file, first, paradata, rest)?]),
        (_, _) => Err("with --replicas, give FILE SINK_PARADATA (the servers are the list)".into()),
    }
}

fn job(file: &str, endpoint: &str, paradata: &str, chain: &[String]) -> Result<Job, String> {
    let address = parse_endpoint(endpoint)?;
    if !chain.is_empty() && !paradata.starts_with("file:") {
        return Err("a replicated push goes to a file: sink".into());
    }
    for replica in chain {
        parse_endpoint(replica)?;
    }
    Ok(Job {
        file: file.to_string(),
        endpoint: endpoint.to_string(),
        address,
        paradata: paradata.to_string(),
        chain: chain.to_vec(),
    })
}

/// The size of a regular file, None for stdin, pipes and what cannot be read.
fn local_size(file: &str) -> Option<u64> {
    if file == "-" {
        return None;
    }
    std::fs::metadata(file)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// The paradata the first server gets: the user's, plus the rest of the chain.
fn first_paradata(job: &Job, quorum: Option<usize>) -> String {
    nexus_client::replication::replicated_paradata(&job.paradata, &job.chain, quorum)
}

fn push_one(operation: &Operation, job: &Job, quorum: Option<usize>, sent: &AtomicU64) -> Done {
    let mut done = Done {
        bytes: 0,
        digest: None,
        error: None,
        cancelled: false,
        report: None,
    };
    let opened = match job.file.as_str() {
        "-" => std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from),
        path => File::open(path),
    };
    let input = match opened {
        Ok(file) => file,
        Err(e) => {
            done.error = Some((None, format!("cannot open {:?}: {e}", job.file)));
            return done;
        }
    };
    let options = PushOptions {
        size: local_size(&job.file),
        traceparent: None,
    };
    let mut handle = operation.push(job.address, &first_paradata(job, quorum), options);
    // One arena, taken again once the connection dropped what was cut from it: no fresh
    // memory (and its page faults) per read.
    let mut arena = BytesMut::new();
    loop {
        if arena.capacity() < READ_SIZE {
            arena.reserve(ARENA);
        }
        let n = match read_full(&input, &mut arena) {
            Ok(n) => n,
            Err(e) => {
                // Dropping the handle cancels the push: the server keeps nothing.
                drop(handle);
                done.error = Some((None, format!("reading {:?} failed: {e}", job.file)));
                return done;
            }
        };
        if n == 0 {
            break;
        }
        let buf = arena.split_to(n);
        if let Err(end) = handle.write(buf.freeze()) {
            done.bytes = handle.bytes_sent();
            return ended(done, end.outcome, end.report);
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
        done.bytes = handle.bytes_sent();
    }
    let end = handle.finish();
    ended(done, end.outcome, end.report)
}

fn ended(mut done: Done, outcome: Outcome, report: Option<String>) -> Done {
    match outcome {
        Outcome::Complete(c) => {
            done.digest = Some(c.digest);
            done.bytes = c.bytes;
            done.report = report;
        }
        Outcome::Error { code, message } => done.error = Some((Some(code), message)),
        Outcome::Cancelled => done.cancelled = true,
        Outcome::TimedOut => {
            done.error = Some((
                Some(ErrorCode::TIMEOUT),
                "the server stopped answering".into(),
            ))
        }
    }
    done
}

/// Appends to `arena` (empty, with room for [`READ_SIZE`]) up to `READ_SIZE` bytes of
/// `input`, until that much or the input ends (a pipe gives little at a time). Reads into
/// the spare capacity: no pass to zero it first.
fn read_full(input: &File, arena: &mut BytesMut) -> std::io::Result<usize> {
    while arena.len() < READ_SIZE {
        let want = READ_SIZE - arena.len();
        let spare = &mut arena.spare_capacity_mut()[..want];
        match rustix::io::read(input, spare) {
            Ok(([], _)) => break,
            Ok((init, _)) => {
                let n = init.len();
                // SAFETY: `read` initialised the first `n` bytes of the spare capacity (it
                // returned them as `init`), and `n <= want <= capacity - len`.
                unsafe { arena.set_len(arena.len() + n) };
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(arena.len())
}

/// The JSON entry of one push and its exit code.
fn entry_report(job: &Job, done: &Done, quorum: Option<usize>) -> (Value, u8) {
    let mut entry = json!({
        "file": job.file,
        "endpoint": job.endpoint,
        "paradata": job.paradata,
        "bytes": done.bytes,
        "state": if done.digest.is_some() { "complete" } else if done.cancelled { "cancelled" } else { "failed" },
        "digest": done.digest.map(|d| format!("{d:016x}")),
        "error": done.error.as_ref().map(|(code, message)| json!({
            "code": code.map(|c| c.to_string()),
            "message": message,
        })),
    });
    let mut code = match (&done.error, done.cancelled) {
        (Some((code, _)), _) => exit_code(*code),
        (None, true) => EXIT_STREAM,
        (None, false) => 0,
    };
    if job.chain.is_empty() {
        // The sink's own report (s3: names the object and its ETag), as JSON where it is.
        if let Some(report) = &done.report {
            entry["report"] =
                serde_json::from_str(report).unwrap_or_else(|_| Value::String(report.clone()));
        }
    } else {
        let replicas = replicas(job, done);
        let committed = replicas
            .iter()
            .filter(|r| r["state"] == "committed")
            .count();
        let needed = quorum.unwrap_or(replicas.len());
        if code == 0 && committed < needed {
            let first = replicas.iter().find(|r| r["state"] != "committed");
            let failed = first.and_then(|r| r["state"].as_str().and_then(ErrorCode::from_name));
            code = exit_code(Some(failed.unwrap_or(ErrorCode::SINK_FAILED)));
            if code == EXIT_CONNECTION {
                // A lost replica does not lose the client's own connection: the push failed.
                code = EXIT_STREAM;
            }
            entry["state"] = "failed".into();
            entry["error"] = json!({
                "code": "sink_failed",
                "message": format!("{committed} of {} replicas committed; {needed} needed", replicas.len()),
            });
        }
        entry["replicas"] = Value::Array(replicas);
        entry["quorum"] = needed.into();
    }
    (entry, code)
}

/// What each replica did. The first server's outcome is the push's; its report (SOURCES.md,
/// "Replication") has a line for each later replica that was reached; a replicated error
/// message names the replica that failed (`replica B:1271: code: ...`).
fn replicas(job: &Job, done: &Done) -> Vec<Value> {
    let mut all: Vec<Value> = std::iter::once(&job.endpoint)
        .chain(&job.chain)
        .map(|endpoint| json!({"endpoint": endpoint, "state": "unknown", "message": "not reached"}))
        .collect();
    let index_of = |endpoint: &str| job.chain.iter().position(|r| r == endpoint).map(|i| i + 1);
    if done.digest.is_some() {
        let states = nexus_client::replication::replica_states(
            &job.endpoint,
            &job.chain,
            done.report.as_deref(),
        );
        return states
            .into_iter()
            .map(|s| json!({"endpoint": s.endpoint, "state": s.state, "message": s.message}))
            .collect();
    }
    // The push failed: no replica keeps anything. Name the one that failed.
    let (code, mut message) = match &done.error {
        Some((code, message)) => (
            code.map_or("failed".to_string(), |c| c.to_string()),
            message.as_str(),
        ),
        None => ("cancelled".to_string(), "cancelled"),
    };
    let mut failed = 0;
    let mut failed_code = code;
    while let Some(rest) = message.strip_prefix("replica ") {
        let Some((endpoint, rest)) = rest.split_once(": ") else {
            break;
        };
        let Some(i) = index_of(endpoint) else { break };
        let (inner, rest) = rest.split_once(": ").unwrap_or(("sink_failed", rest));
        failed = i;
        failed_code = inner.to_string();
        message = rest;
    }
    for (i, replica) in all.iter_mut().enumerate().take(failed + 1) {
        if i == failed {
            replica["state"] = failed_code.clone().into();
            replica["message"] = message.into();
        } else {
            replica["state"] = "aborted".into();
            replica["message"] =
                format!("kept nothing: {} failed", job_endpoint(job, failed)).into();
        }
    }
    all
}

fn job_endpoint(job: &Job, i: usize) -> &str {
    match i {
        0 => &job.endpoint,
        i => &job.chain[i - 1],
    }
}

/// Exit code for an error code (None: the local file).
fn exit_code(code: Option<ErrorCode>) -> u8 {
    match code {
        None => EXIT_OUTPUT,
        Some(code) => crate::pull::exit_code_of(code),
    }
}

/// `nexus verify`: pulls the file from every replica at once (the data is dropped as it
/// arrives; each stream's COMPLETE digest, checked against the bytes, is the replica's) and
/// compares. Exit 0 when all have it with one digest, 4 when the digests differ, else the
/// pull exit code of the first replica that failed.
pub(crate) fn verify(client: &Client, args: VerifyArgs) -> ExitCode {
    let mut addresses = Vec::new();
    for replica in &args.replicas {
        match parse_endpoint(replica) {
            Ok(address) => addresses.push(address),
            Err(e) => {
                eprintln!("nexus verify: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let paradata = format!("file:{}", args.path);
    let handles: Vec<_> = addresses
        .iter()
        .map(|a| client.initiate(*a, &paradata, StreamOptions::default()))
        .collect();
    let ends: Vec<_> = std::thread::scope(|scope| {
        let running: Vec<_> = handles
            .into_iter()
            .map(|mut h| scope.spawn(move || h.for_each_chunk(|_| {})))
            .collect();
        running.into_iter().map(|r| r.join()).collect()
    });
    let mut results = Vec::new();
    let mut digests = std::collections::BTreeSet::new();
    let mut code = 0;
    for (replica, end) in args.replicas.iter().zip(ends) {
        let entry = match end.map(|e| e.outcome) {
            Ok(Outcome::Complete(c)) => {
                digests.insert(c.digest);
                json!({"endpoint": replica, "bytes": c.bytes, "digest": format!("{:016x}", c.digest)})
            }
            Ok(Outcome::Error { code: e, message }) => {
                if code == 0 {
                    code = crate::pull::exit_code_of(e);
                }
                json!({"endpoint": replica, "error": {"code": e.to_string(), "message": message}})
            }
            _ => {
                code = code.max(EXIT_CONNECTION);
                json!({"endpoint": replica, "error": {"code": "timeout", "message": "no answer"}})
            }
        };
        results.push(entry);
    }
    let same = digests.len() <= 1;
    if code == 0 && !same {
        code = EXIT_INTEGRITY;
    }
    if args.json {
        let report = json!({"path": args.path, "same": same && code == 0, "replicas": results, "exit_code": code});
        crate::emit(&format!("{report}\n"));
    } else {
        for r in &results {
            match r.get("digest") {
                Some(d) => crate::emit(&format!(
                    "{} {} bytes xxh3 {}\n",
                    r["endpoint"].as_str().unwrap_or(""),
                    r["bytes"],
                    d.as_str().unwrap_or("")
                )),
                None => crate::emit(&format!(
                    "{} {}: {}\n",
                    r["endpoint"].as_str().unwrap_or(""),
                    r["error"]["code"].as_str().unwrap_or(""),
                    Printable(r["error"]["message"].as_str().unwrap_or(""))
                )),
            }
        }
    }
    match code {
        0 => eprintln!(
            "nexus verify: {}: every replica holds the same data",
            args.path
        ),
        EXIT_INTEGRITY => eprintln!("nexus verify: {}: the replicas differ", args.path),
        _ => eprintln!("nexus verify: {}: a replica could not be read", args.path),
    }
    ExitCode::from(code)
}
