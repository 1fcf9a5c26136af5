//! Where a scenario's two ends run: over loopback in the bench's own network namespace, or in
//! two network namespaces of their own joined by a veth pair whose both ends are capped by
//! `tc tbf` (a link that is not loopback: a real queue, a real rate, segments that cross a
//! device). The namespaces are the bench's own, named after its pid, and deleted on drop;
//! no traffic leaves them.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nexus_testkit::ChildGuard;

use crate::procs::Daemon;

/// Where the server and the client of a run live.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    /// The address the server binds and the client dials.
    pub(crate) host: String,
    server_ns: Option<String>,
    client_ns: Option<String>,
}

impl Place {
    /// Both ends over loopback, here.
    pub(crate) fn loopback() -> Place {
        Place {
            host: "127.0.0.1".into(),
            server_ns: None,
            client_ns: None,
        }
    }

    /// `program` to run on the server's side.
    pub(crate) fn server_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(self.server_ns.as_deref(), program)
    }

    /// `program` to run on the client's side.
    pub(crate) fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(self.client_ns.as_deref(), program)
    }
}

/// `ip netns exec` execs `program` in place: the child's pid, CPU time and RSS are the
/// program's own.
pub(crate) fn in_ns(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        None => Command::new(program),
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
    }
}

/// Two namespaces and the veth link between them; deleted on drop.
pub(crate) struct Link {
    pub(crate) place: Place,
    names: [String; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for name in &self.names {
            let _ = quiet(Command::new("ip").args(["netns", "delete", name]));
        }
    }
}

fn quiet(command: &mut Command) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `nexus-bench-{s,c}-PID` joined by a veth pair at 10.201.0.1 (server) and
/// 10.201.0.2 (client), each end shaped to `rate` (`tc` syntax, e.g. `10gbit`) by a token
/// bucket. Needs root (or CAP_NET_ADMIN) and iproute2.
pub(crate) fn link(rate: &str) -> Result<Link, String> {
    let pid = std::process::id();
    let names = [
        format!("nexus-bench-s-{pid}"),
        format!("nexus-bench-c-{pid}"),
    ];
    // Interface names have at most 15 bytes.
    let ifs = [
        format!("nxb{}s", pid % 100_000),
        format!("nxb{}c", pid % 100_000),
    ];
    let addresses = ["10.201.0.1", "10.201.0.2"];
    let link = Link {
        place: Place {
            host: addresses[0].into(),
            server_ns: Some(names[0].clone()),
            client_ns: Some(names[1].clone()),
        },
        names: names.clone(),
    };
    let ip = |args: &[&str]| quiet(Command::new("ip").args(args));
    for name in &names {
        ip(&["netns", "add", name])?;
    }
    ip(&[
        "link", "add", &ifs[0], "netns", &names[0], "type", "veth", "peer", "name", &ifs[1],
        "netns", &names[1],
    ])?;
    for i in 0..2 {
        let (ns, dev) = (names[i].as_str(), ifs[i].as_str());
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", addresses[i]),
            "dev",
            dev,
        ])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // The bucket holds 4 MB: well above rate / HZ, so the cap is the rate, not the timer.
        quiet(Command::new("tc").args([
            "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "4mb",
            "latency", "10ms",
        ]))?;
    }
    Ok(link)
}

/// `nexus serve` (as deployed: one shard per core) in the place's server namespace, bound to
/// its host on port 1270 (the namespace is the bench's own), serving `root`. Waits for its
/// "Listening." line.
pub(crate) fn nexus_server_at(
    place: &Place,
    nexus: &Path,
    backend: &str,
    root: &Path,
) -> Result<(Daemon, SocketAddr), String> {
    let address: SocketAddr = format!("{}:1270", place.host)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut child = place
        .server_command(nexus)
        .arg("serve")
        .env("BURST_NEXUS_SERVER_BIND", &place.host)
        .env("BURST_NEXUS_SERVER_PORT", "1270")
        // Not loopback, and no secret: the namespace is private to this run.
        .env("BURST_NEXUS_SERVER_INSECURE", "true")
        .env("BURST_NEXUS_ADMIN_ADDRESS", "")
        .env("BURST_NEXUS_IO_BACKEND", backend)
        .env("BURST_NEXUS_SERVER_ROOT", root)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start nexus serve: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let guard = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log for the server's whole life, so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("Listening.") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| "nexus serve never said it listens".to_string())?;
    Ok((Daemon::new(guard), address))
}
