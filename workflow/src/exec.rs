//! Executors: what a step does with a stream. Each takes its fields already filled from the
//! templates, runs until done, failed, past its timeout or stopped, and returns its result
//! as JSON (`steps.NAME.*` for later steps).
//!
//! Idempotent on the event: a replayed step writes the same output again, never a second
//! copy. `pull` writes `OUTPUT.nexus-part` and renames it over `OUTPUT` (a retry continues
//! the part file); `push` treats `already_exists` on a step's later try as its earlier try's
//! commit; `command` gets the event id (`NEXUS_EVENT_ID`) to make its own output idempotent.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use nexus_client::replication;
use nexus_client::transfer::{
    parse_endpoint, Entry, EntryState, Output, Transfer, TransferOptions,
};
use nexus_client::{
    Client, ErrorCode, Operation, OperationOptions, Outcome, PushOptions, StreamOptions,
};
use serde_json::{json, Value};

use crate::event::StreamPayload;
use crate::stop::{Stop, Watchdog};

/// Why a try failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened.
    pub message: String,
    /// Whether trying again can help (a template error cannot).
    pub retryable: bool,
    /// The workflow is stopping: the run stays open and resumes at the next start.
    pub interrupted: bool,
}

impl Failure {
    pub(crate) fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: true,
            interrupted: false,
        }
    }

    pub(crate) fn permanent(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: false,
            interrupted: false,
        }
    }
}

/// A step ready to run: the action with every template filled.
#[derive(Debug, Clone)]
pub enum Job {
    /// Pull `paradata` from `endpoint` into `output`.
    Pull {
        /// The server.
        endpoint: String,
        /// What to stream.
        paradata: String,
        /// The output file (or directory, ending in `/`).
        output: String,
    },
    /// Push `file` to `sink` on `endpoint`, through `replicas`.
    Push {
        /// The local file.
        file: String,
        /// The first server.
        endpoint: String,
        /// The sink paradata.
        sink: String,
        /// Further servers.
        replicas: Vec<String>,
        /// Success at this many committed replicas.
        quorum: Option<usize>,
    },
    /// Run `argv` with `env` (and the event's variables), stdin from a stream or a file.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment.
        env: Vec<(String, String)>,
        /// Working directory.
        dir: Option<String>,
        /// A stream to pull into stdin: (endpoint, paradata).
        stream: Option<(String, String)>,
        /// A file for stdin.
        file: Option<String>,
    },
    /// Pull and verify `paradata`, against `digest` when given.
    Checksum {
        /// The server.
        endpoint: String,
        /// What to stream.
        paradata: String,
        /// The expected xxh3-64, hex.
        digest: Option<String>,
    },
}

/// What an executor may use.
pub struct Context<'a> {
    /// The client (pool, auth) every stream goes through.
    pub client: &'a Client,
    /// Stops the workflow.
    pub stop: &'a Stop,
    /// When this try gives up.
    pub deadline: Instant,
    /// Variables for commands: `NEXUS_EVENT_ID` and the rest.
    pub env: &'a [(String, String)],
    /// Whether an earlier try of this step ran (possibly to its end, unheard).
    pub tried_before: bool,
    /// Each stream the step moved, as a `streams` event payload (JSON text).
    pub streamed: &'a dyn Fn(String),
}

fn endpoint(text: &str) -> Result<SocketAddr, Failure> {
    parse_endpoint(text).map_err(|e| Failure::permanent(format!("endpoint {text:?}: {e}")))
}

/// Runs `job`.
pub fn run(job: &Job, cx: &Context<'_>) -> Result<Value, Failure> {
    let result = match job {
        Job::Pull {
            endpoint: e,
            paradata,
            output,
        } => pull(cx, endpoint(e)?, paradata, output),
        Job::Push {
            file,
            endpoint: e,
            sink,
            replicas,
            quorum,
        } => push(cx, endpoint(e)?, file, sink, replicas, *quorum),
        Job::Command {
            argv,
            env,
            dir,
            stream,
            file,
        } => command(
            cx,
            argv,
            env,
            dir.as_deref(),
            stream.as_ref(),
            file.as_deref(),
        ),
        Job::Checksum {
            endpoint: e,
            paradata,
            digest,
        } => checksum(cx, endpoint(e)?, paradata, digest.as_deref()),
    };
    result.map_err(|mut f| {
        if cx.stop.is_stopped() {
            f.interrupted = true;
        } else if Instant::now() >= cx.deadline {
            f.message = format!("timed out: {}", f.message);
        }
        f
    })
}

/// Where a pull writes: `output`, or `output` + the paradata's file name for a directory.
pub fn output_path(paradata: &str, output: &str) -> Result<PathBuf, Failure> {
    if !output.ends_with('/') {
        return Ok(PathBuf::from(output));
    }
    let path = paradata.split('?').next().unwrap_or("");
    let name = path.rsplit(['/', ':']).next().unwrap_or("");
    if name.is_empty() || name == ".." || name == "." {
        return Err(Failure::permanent(format!(
            "output {output:?} is a directory and paradata {paradata:?} names no file"
        )));
    }
    Ok(Path::new(output).join(name))
}

/// Refuses a filled-in path with a `..` component: a payload (an HTTP caller's, say) must
/// not steer a step's output out of the directory its rule names.
fn no_parent_steps(key: &str, path: &Path) -> Result<(), Failure> {
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Failure::permanent(format!(
            "{key} {} has a '..' component",
            path.display()
        )));
    }
    Ok(())
}

fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".nexus-part");
    PathBuf::from(name)
}

/// An operation for a step's streams, cancelled (with `also`) when the try passes its
/// deadline or the workflow stops, until the returned watchdog is dropped.
fn watched_operation(
    cx: &Context<'_>,
    also: impl FnOnce() + Send + 'static,
) -> (Operation, Watchdog) {
    let op = cx.client.operation(OperationOptions::default());
    let cancel = op.clone();
    let watch = Watchdog::start(cx.stop, cx.deadline, move || {
        also();
        cancel.cancel_all();
    });
    (op, watch)
}

/// The `streams` payload of a stream a step moved.
fn stream_event(
    direction: &'static str,
    outcome: &Outcome,
    bytes: u64,
    paradata: &str,
    peer: SocketAddr,
) -> String {
    let (outcome, error, digest) = match outcome {
        Outcome::Complete(c) => ("complete", None, Some(format!("{:016x}", c.digest))),
        Outcome::Error { code, message } => ("error", Some(format!("{code}: {message}")), None),
        Outcome::Cancelled => ("cancelled", None, None),
        Outcome::TimedOut => ("timed_out", None, None),
    };
    StreamPayload {
        direction,
        side: "client",
        outcome,
        error,
        bytes,
        digest,
        paradata: paradata.to_string(),
        peer: peer.to_string(),
    }
    .to_text()
}

fn pull(
    cx: &Context<'_>,
    endpoint: SocketAddr,
    paradata: &str,
    output: &str,
) -> Result<Value, Failure> {
    let path = output_path(paradata, output)?;
    no_parent_steps("pull.output", &path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    }
    let part = part_path(&path);
    // A file: stream continues the part file an earlier try left, as `nexus pull --resume`
    // does; any other stream starts again.
    let options = TransferOptions {
        resume_output: paradata.starts_with("file:"),
        keep_partial: true,
        ..TransferOptions::default()
    };
    let transfer =
        Transfer::new(cx.client, options).map_err(|e| Failure::permanent(e.to_string()))?;
    let cancel = Arc::clone(&transfer);
    let _watch = Watchdog::start(cx.stop, cx.deadline, move || cancel.cancel());
    let report = transfer.pull(&[Entry {
        endpoint,
        paradata: paradata.to_string(),
        output: Output::File(part.clone()),
    }]);
    let entry = report
        .entries
        .into_iter()
        .next()
        .ok_or_else(|| Failure::new("the transfer reported nothing"))?;
    let (outcome, error) = match (&entry.state, &entry.error) {
        (EntryState::Complete, _) => ("complete", None),
        (_, Some(e)) if e.code == "timeout" => ("timed_out", Some(e.message.clone())),
        (_, Some(e)) => ("error", Some(format!("{}: {}", e.code, e.message))),
        _ => ("cancelled", None),
    };
    (cx.streamed)(
        StreamPayload {
            direction: "pull",
            side: "client",
            outcome,
            error,
            bytes: entry.bytes,
            digest: entry.digest.clone(),
            paradata: paradata.to_string(),
            peer: endpoint.to_string(),
        }
        .to_text(),
    );
    match entry.state {
        EntryState::Complete => {
            std::fs::rename(&part, &path).map_err(|e| {
                Failure::new(format!(
                    "cannot rename {} to {}: {e}",
                    part.display(),
                    path.display()
                ))
            })?;
            Ok(
                json!({"path": path, "bytes": entry.bytes + entry.continued_from_bytes,
                      "digest": entry.digest}),
            )
        }
        _ => Err(match entry.error {
            Some(e) => {
                let retryable = !matches!(
                    entry.code,
                    Some(
                        ErrorCode::NOT_FOUND
                            | ErrorCode::BAD_PARADATA
                            | ErrorCode::PERMISSION_DENIED
                    )
                );
                Failure {
                    message: format!("pull {paradata} from {endpoint}: {}: {}", e.code, e.message),
                    retryable,
                    interrupted: false,
                }
            }
            None => Failure::new(format!("pull {paradata} from {endpoint}: cancelled")),
        }),
    }
}

fn push(
    cx: &Context<'_>,
    endpoint: SocketAddr,
    file: &str,
    sink: &str,
    replicas: &[String],
    quorum: Option<usize>,
) -> Result<Value, Failure> {
    let mut input =
        File::open(file).map_err(|e| Failure::new(format!("cannot open {file:?}: {e}")))?;
    let size = input
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    for r in replicas {
        parse_endpoint(r).map_err(|e| Failure::permanent(format!("replica {r:?}: {e}")))?;
    }
    let paradata = replication::replicated_paradata(sink, replicas, quorum);
    let (op, _watch) = watched_operation(cx, || {});
    let mut handle = op.push(
        endpoint,
        &paradata,
        PushOptions {
            size,
            traceparent: None,
        },
    );
    let ended = match handle.copy_from(&mut input, 1 << 20) {
        Ok(_) => handle.finish(),
        Err(ended) => ended,
    };
    (cx.streamed)(stream_event(
        "push",
        &ended.outcome,
        ended.bytes_received,
        &paradata,
        endpoint,
    ));
    match &ended.outcome {
        Outcome::Complete(c) => {
            // Under a quorum the first server completes even when replicas behind it failed:
            // the step succeeds only when enough of them committed.
            let states = replication::replica_states(
                &endpoint.to_string(),
                replicas,
                ended.report.as_deref(),
            );
            let committed = states.iter().filter(|s| s.state == "committed").count();
            let needed = quorum.unwrap_or(states.len()).min(states.len());
            let listed: Vec<Value> = states
                .iter()
                .map(|s| json!({"endpoint": s.endpoint, "state": s.state, "message": s.message}))
                .collect();
            if committed < needed {
                // Not retried: the servers that committed hold the file now (create-only),
                // so a second try could only find it there.
                return Err(Failure::permanent(format!(
                    "push {file} to {paradata}: {committed} of {} replicas committed; {needed} needed",
                    states.len()
                )));
            }
            Ok(
                json!({"bytes": c.bytes, "digest": format!("{:016x}", c.digest),
                      "replicas": listed}),
            )
        }
        Outcome::Error { code, .. } if *code == ErrorCode::ALREADY_EXISTS && cx.tried_before => {
            Ok(json!({"bytes": size, "digest": null, "already_committed": true}))
        }
        Outcome::Error { code, message } => Err(Failure {
            message: format!(
                "push {file} to {paradata} at {endpoint}: {}: {message}",
                code
            ),
            retryable: !matches!(
                *code,
                ErrorCode::ALREADY_EXISTS | ErrorCode::BAD_PARADATA | ErrorCode::PERMISSION_DENIED
            ),
            interrupted: false,
        }),
        other => Err(Failure::new(format!(
            "push {file} to {paradata} at {endpoint}: {other:?}"
        ))),
    }
}

fn checksum(
    cx: &Context<'_>,
    endpoint: SocketAddr,
    paradata: &str,
    want: Option<&str>,
) -> Result<Value, Failure> {
    let (op, _watch) = watched_operation(cx, || {});
    let mut handle = op.initiate(endpoint, paradata, StreamOptions::default());
    let ended = handle.for_each_chunk(|_| {});
    (cx.streamed)(stream_event(
        "pull",
        &ended.outcome,
        ended.bytes_received,
        paradata,
        endpoint,
    ));
    match &ended.outcome {
        Outcome::Complete(c) => {
            let digest = format!("{:016x}", c.digest);
            if let Some(want) = want {
                if !want.trim().eq_ignore_ascii_case(&digest) {
                    return Err(Failure::permanent(format!(
                        "checksum {paradata} from {endpoint}: digest {digest}, expected {want}"
                    )));
                }
            }
            Ok(json!({"bytes": c.bytes, "digest": digest}))
        }
        Outcome::Error { code, message } => Err(Failure {
            message: format!("checksum {paradata} from {endpoint}: {}: {message}", code),
            retryable: !matches!(*code, ErrorCode::NOT_FOUND | ErrorCode::BAD_PARADATA),
            interrupted: false,
        }),
        other => Err(Failure::new(format!(
            "checksum {paradata} from {endpoint}: {other:?}"
        ))),
    }
}

/// The last bytes a command wrote, for the step's result and error.
const TAIL: usize = 4096;

fn tail_of(mut reader: impl Read) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * TAIL {
            tail.drain(..tail.len() - TAIL);
        }
    }
    if tail.len() > TAIL {
        tail.drain(..tail.len() - TAIL);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

fn command(
    cx: &Context<'_>,
    argv: &[String],
    env: &[(String, String)],
    dir: Option<&str>,
    stream: Option<&(String, String)>,
    file: Option<&str>,
) -> Result<Value, Failure> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(cx.env.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a timeout kills the command and whatever it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe; it allocates nothing and touches no lock. It makes the
    // command die with the thread that started it: a workflow killed with SIGKILL leaves no
    // command running on, to race with the one its resumed run starts.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(dir) = dir {
        no_parent_steps("command.dir", Path::new(dir))?;
        cmd.current_dir(dir);
    }
    match (stream, file) {
        (Some(_), _) => cmd.stdin(Stdio::piped()),
        (None, Some(f)) => {
            cmd.stdin(File::open(f).map_err(|e| Failure::new(format!("stdin {f:?}: {e}")))?)
        }
        (None, None) => cmd.stdin(Stdio::null()),
    };
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| Failure::new(format!("cannot start {:?}: {e}", argv[0])))?;
    let pid = child.id();
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&killed);
    // Past the deadline (or at a stop) the command is killed and its stdin stream cancelled.
    let (op, watch) = watched_operation(cx, move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        kill_group(pid);
    });
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out = std::thread::spawn(move || stdout.map(tail_of).unwrap_or_default());
    let err = std::thread::spawn(move || stderr.map(tail_of).unwrap_or_default());
    let mut stream_error = None;
    if let (Some((e, paradata)), Some(mut stdin)) = (stream, child.stdin.take()) {
        let address = endpoint(e)?;
        let mut handle = op.initiate(address, paradata, StreamOptions::default());
        let mut write_failed = None;
        let ended = handle.for_each_chunk(|chunk| {
            if write_failed.is_none() {
                if let Err(e) = stdin.write_all(chunk) {
                    // The command stopped reading: the rest of the stream is not wanted.
                    write_failed = Some(e);
                    op.cancel_all();
                }
            }
        });
        drop(stdin);
        (cx.streamed)(stream_event(
            "pull",
            &ended.outcome,
            ended.bytes_received,
            paradata,
            address,
        ));
        if let Some(e) = write_failed {
            // A command that stops reading early (head) closes its stdin: not an error of
            // ours; its exit status says whether it succeeded.
            tracing::debug!(error = %e, "command closed its stdin early");
        } else if !ended.is_complete() {
            stream_error = Some(format!(
                "stdin stream {paradata} from {address}: {:?}",
                ended.outcome
            ));
            kill_group(pid);
        }
    }
    let status = child
        .wait()
        .map_err(|e| Failure::new(format!("waiting for {:?}: {e}", argv[0])))?;
    drop(watch);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(e) = stream_error {
        return Err(Failure::new(e));
    }
    if killed.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Failure::new(format!(
            "{:?} killed after {seconds:.1} s",
            argv[0]
        )));
    }
    match status.code() {
        Some(0) => Ok(json!({"exit": 0, "stdout": stdout, "seconds": seconds})),
        Some(code) => Err(Failure::new(format!(
            "{:?} exited with status {code}: {}",
            argv[0],
            stderr.trim_end()
        ))),
        None => Err(Failure::new(format!(
            "{:?} ended by a signal: {}",
            argv[0],
            stderr.trim_end()
        ))),
    }
}

/// Kills the process group of a command started with `process_group(0)` (its id is the
/// child's). The child is reaped only after its watchdog is gone and this last call made, so
/// the id cannot have been reused.
fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_output_takes_the_file_name_of_the_paradata() {
        assert_eq!(
            output_path("file:a/b.csv", "/out/x").unwrap(),
            Path::new("/out/x")
        );
        assert_eq!(
            output_path("file:a/b.csv?offset=3", "/out/").unwrap(),
            Path::new("/out/b.csv")
        );
        assert!(output_path("file:a/", "/out/").is_err());
    }

    #[test]
    fn a_filled_in_path_may_not_climb_out() {
        assert!(no_parent_steps("k", Path::new("/out/a/b.csv")).is_ok());
        let e = no_parent_steps("pull.output", Path::new("/out/../etc/passwd")).unwrap_err();
        assert!(!e.retryable);
        assert_eq!(
            e.message,
            "pull.output /out/../etc/passwd has a '..' component"
        );
    }

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let text: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let tail = tail_of(&text[..]);
        assert_eq!(tail.len(), TAIL);
        assert_eq!(tail.as_bytes(), &text[text.len() - TAIL..]);
    }
}
