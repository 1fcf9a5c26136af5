//! The `nexus` binary as a real process: `nexus serve` started on free ports and read for
//! its addresses, `nexus pull` run to its end, and the child killed when a test ends.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use crate::PATIENCE;

/// A child process killed (and reaped) when dropped, so a failing test or bench leaves no
/// server behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `nexus` binary at `binary` as `nexus serve` on a free port with these extra
/// environment variables; returns it and the address it reports in its "Listening." log
/// line. Its log goes on to this process's stderr, prefixed with `[nexus]`.
pub fn spawn_nexus_serve(binary: &Path, env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    let served = spawn_serve(binary, env);
    (served.child, served.address)
}

/// A `nexus serve` process started by [`spawn_serve`].
pub struct Served {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// Where it serves the protocol.
    pub address: SocketAddr,
    /// Where its admin endpoint listens, if it has one.
    pub admin: Option<SocketAddr>,
    /// Lines it has written to stderr so far.
    pub log_lines: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The first 10,000 of them.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Served {
    /// Its resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.child.0.id())
    }
}

/// The resident memory of process `pid` (VmRSS), in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Starts `nexus serve` on free ports (the protocol and the admin endpoint, unless `env`
/// says otherwise) and waits until it listens.
pub fn spawn_serve(binary: &Path, env: &[(&str, &str)]) -> Served {
    spawn_serve_with(binary, &[], env)
}

/// [`spawn_serve`] with more arguments after `serve`.
pub fn spawn_serve_with(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let args: Vec<&str> = ["serve"].iter().chain(args).copied().collect();
    let (child, rx, log_lines, log) = spawn_logged(binary, &args, env);
    let mut admin = None;
    let address = loop {
        let (is_admin, text) = rx
            .recv_timeout(PATIENCE)
            .expect("nexus serve never said where it listens");
        let parsed: SocketAddr = text.parse().expect("a socket address in the log");
        if is_admin {
            admin = Some(parsed);
        } else {
            break parsed;
        }
    };
    Served {
        child,
        address,
        admin,
        log_lines,
        log,
    }
}

/// A `nexus run` process started by [`spawn_run`].
pub struct Running {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// Where its admin endpoint listens.
    pub admin: SocketAddr,
    /// The first 10,000 lines of its log.
    pub log: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

/// Starts `nexus run ARGS` with its admin endpoint on a free port and waits until it serves.
pub fn spawn_run(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    let args: Vec<&str> = ["run"].iter().chain(args).copied().collect();
    let (child, rx, _, log) = spawn_logged(binary, &args, env);
    loop {
        let (is_admin, text) = rx
            .recv_timeout(PATIENCE)
            .expect("nexus run never said where its admin endpoint listens");
        if is_admin {
            return Running {
                child,
                admin: text.parse().expect("a socket address in the log"),
                log,
            };
        }
    }
}

type Logged = (
    ChildGuard,
    std::sync::mpsc::Receiver<(bool, String)>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
);

/// Starts `nexus ARGS` on free ports, its stderr read for its whole life (and the
/// addresses it names sent on the channel: `(is_admin, address)`).
fn spawn_logged(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Logged {
    use std::io::BufRead;
    let mut child = std::process::Command::new(binary)
        .args(args)
        .env("BURST_NEXUS_SERVER_PORT", "0")
        .env("BURST_NEXUS_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let log_lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&log_lines);
    let log = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let kept = std::sync::Arc::clone(&log);
    // Keep reading for the child's whole life, so its log writes never hit a closed pipe.
    std::thread::spawn(move || {
        let field = |line: &str, name: &str| {
            line.split(name)
                .nth(1)
                .and_then(|rest| {
                    rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                        .next()
                })
                .map(str::to_string)
        };
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("[nexus] {}", line.escape_debug());
            let mut kept = kept.lock();
            if kept.len() < 10_000 {
                kept.push(line.clone());
            }
            drop(kept);
            if let Some(admin) = field(&line, "admin=") {
                let _ = tx.send((true, admin));
            } else if let Some(address) = field(&line, "address=") {
                let _ = tx.send((false, address));
            }
        }
    });
    (guard, rx, log_lines, log)
}

/// Runs `nexus pull ARGS` with these extra environment variables (and no inherited
/// `RUST_LOG`, so its log is the default a user sees) and waits for it.
pub fn run_pull(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary)
        .arg("pull")
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary:?}: {e}"))
}

/// A finished process's stderr, as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A finished process's stdout as JSON (`nexus pull --json`'s report), panicking with the
/// text when it is not JSON.
pub fn json_stdout(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The `state` of every entry of a `nexus pull --json` report, in order.
pub fn entry_states(report: &serde_json::Value) -> Vec<&str> {
    report["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {report}"))
        .iter()
        .map(|e| e["state"].as_str().unwrap_or("(no state)"))
        .collect()
}
