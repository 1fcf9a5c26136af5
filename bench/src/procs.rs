//! Processes and their own accounting: CPU (user + sys) and peak RSS of each end, read from
//! the kernel (`wait4` for a process that runs to its end, `/proc` for one that keeps
//! running), never estimated.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nexus_testkit::ChildGuard;

use crate::netns::Place;

/// CPU and memory one process used.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// User + system CPU seconds.
    pub(crate) cpu_s: f64,
    /// Peak resident set size, MiB.
    pub(crate) peak_rss_mib: f64,
}

/// A command that ran to its end.
pub(crate) struct Finished {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) seconds: f64,
    pub(crate) usage: Usage,
}

/// Runs `command` to its end and reads its own CPU time and peak RSS from `wait4`.
pub(crate) fn run_measured(command: &mut Command) -> std::io::Result<Finished> {
    run_watched(command, |_| {})
}

/// As [`run_measured`], calling `started` with the child's pid once it runs (to sample it).
pub(crate) fn run_watched(
    command: &mut Command,
    started: impl FnOnce(u32),
) -> std::io::Result<Finished> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    started(child.id());
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std has not waited on it); `status` and
    // `usage` are valid, exclusively borrowed out-pointers for the duration of the call.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    // Reaped here: std must neither wait for nor signal this pid again (it may be reused).
    std::mem::forget(child);
    if reaped != pid {
        return Err(std::io::Error::last_os_error());
    }
    let seconds = start.elapsed().as_secs_f64();
    let time = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Finished {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        seconds,
        usage: Usage {
            cpu_s: time(usage.ru_utime) + time(usage.ru_stime),
            // ru_maxrss is in KiB on Linux.
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        },
    })
}

/// A process that keeps running (a server): CPU from `/proc/PID/stat`, peak RSS from
/// `VmHWM` in `/proc/PID/status` (the peak since it started, so start one per run).
pub(crate) struct Daemon {
    pub(crate) guard: ChildGuard,
    cpu_at_start: f64,
}

impl Daemon {
    pub(crate) fn new(guard: ChildGuard) -> Daemon {
        let cpu_at_start = cpu_seconds(guard.0.id());
        Daemon {
            guard,
            cpu_at_start,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// Starts counting CPU from now (after a warm-up, say).
    pub(crate) fn reset_cpu(&mut self) {
        self.cpu_at_start = cpu_seconds(self.pid());
    }

    /// CPU since start (or the last reset) and the peak RSS so far.
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            cpu_s: cpu_seconds(self.pid()) - self.cpu_at_start,
            peak_rss_mib: status_kib(self.pid(), "VmHWM:") / 1024.0,
        }
    }
}

/// user + system CPU seconds of a process (all its threads).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name; the
    // clock tick is 100 Hz on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `kB` line of `/proc/PID/status` (VmRSS:, VmHWM:), in KiB.
pub(crate) fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The `nexus` binary next to this one (`cargo build --release -p nexus-cli -p nexus-bench`).
pub(crate) fn nexus_binary() -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    me.with_file_name("nexus")
}

/// `nexus serve` as deployed (one shard per core) on `backend`, serving `root`. A connection
/// lives on one shard, so one-connection scenarios use one core of the server either way.
pub(crate) fn nexus_server(backend: &str, root: &Path) -> (Daemon, SocketAddr) {
    nexus_server_with(backend, root, &[])
}

/// [`nexus_server`] with more environment (TLS, say).
pub(crate) fn nexus_server_with(
    backend: &str,
    root: &Path,
    env: &[(&str, &str)],
) -> (Daemon, SocketAddr) {
    let root = root.to_string_lossy().into_owned();
    let mut all = vec![
        ("BURST_NEXUS_IO_BACKEND", backend),
        ("BURST_NEXUS_SERVER_ROOT", root.as_str()),
    ];
    all.extend_from_slice(env);
    let (guard, address) = nexus_testkit::spawn_nexus_serve(&nexus_binary(), &all);
    (Daemon::new(guard), address)
}

/// `nexus pull` of `paradata` from `address` to /dev/null; see [`nexus_pull_streams`].
pub(crate) fn nexus_pull(
    address: SocketAddr,
    paradata: &[String],
    backend: &str,
    extra: &[&str],
    scratch: &Path,
) -> Finished {
    let streams: Vec<(SocketAddr, &str)> = paradata.iter().map(|p| (address, p.as_str())).collect();
    nexus_pull_streams(&streams, backend, extra, scratch, |_| {})
}

/// One `nexus pull` process for these streams, to /dev/null: one stream with `-o`, several
/// as a manifest pulled all at once (one operation). Exit 0 means every stream completed
/// with its digest verified; anything else fails the bench. `started` gets the pid.
pub(crate) fn nexus_pull_streams(
    streams: &[(SocketAddr, &str)],
    backend: &str,
    extra: &[&str],
    scratch: &Path,
    started: impl FnOnce(u32),
) -> Finished {
    nexus_pull_streams_at(
        &Place::loopback(),
        streams,
        backend,
        extra,
        scratch,
        started,
    )
}

/// [`nexus_pull_streams`] on the client side of `place`.
pub(crate) fn nexus_pull_streams_at(
    place: &Place,
    streams: &[(SocketAddr, &str)],
    backend: &str,
    extra: &[&str],
    scratch: &Path,
    started: impl FnOnce(u32),
) -> Finished {
    static MANIFESTS: AtomicU64 = AtomicU64::new(0);
    let mut command = place.client_command(nexus_binary());
    command
        .arg("pull")
        .args(["--backend", backend])
        .args(extra)
        .env("BURST_NEXUS_CLIENT_THREADS", "1");
    let mut manifest = None;
    if let [(address, one)] = streams {
        command.args([&address.to_string(), *one, "-o", "/dev/null"]);
    } else {
        let number = MANIFESTS.fetch_add(1, Ordering::Relaxed);
        let path = scratch.join(format!("manifest-{}-{number}", std::process::id()));
        let manifest = manifest.insert(path);
        let lines: String = streams
            .iter()
            .map(|(address, p)| format!("{address} {p} /dev/null\n"))
            .collect();
        std::fs::write(&manifest, lines).expect("manifest");
        command
            .arg("--manifest")
            .arg(&*manifest)
            .args(["--parallel", &streams.len().to_string()]);
    }
    let finished = run_watched(&mut command, started).expect("nexus pull");
    if let Some(manifest) = manifest {
        let _ = std::fs::remove_file(manifest);
    }
    assert!(
        finished.ok,
        "nexus pull failed: {}",
        finished.stderr.chars().take(2000).collect::<String>()
    );
    finished
}

/// Whether `program` runs (`--version`).
pub(crate) fn available(program: &str, version_arg: &str) -> bool {
    Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
