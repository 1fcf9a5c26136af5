//! The baselines, installed by the bench itself when missing: iperf3, nginx + curl (Debian
//! packages), Arrow Flight (pyarrow from PyPI into a venv under `target/`). A baseline that
//! cannot be installed is skipped with a note, never faked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nexus_testkit::ChildGuard;

use nexus_testkit::free_port;
use serde_json::Value;

use crate::netns::Place;
use crate::procs::{self, available, run_measured, Daemon, Usage};
use crate::report::Side;

/// pyarrow release the Flight baseline runs on.
const PYARROW: &str = "pyarrow==26.0.1";

/// Installs Debian packages whose program is missing; returns whether `program` runs after.
pub(crate) fn ensure_apt(program: &str, package: &str) -> bool {
    if available(program, "-v") || available(program, "--version") {
        return true;
    }
    eprintln!("installing {package} (apt-get) for the baseline");
    let sudo = if nix_uid() == 0 { None } else { Some("sudo") };
    let apt = |args: &[&str]| {
        let mut command = match sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "-qq", "--no-install-recommends", package]) {
        apt(&["update", "-qq"]);
        apt(&["install", "-y", "-qq", "--no-install-recommends", package]);
    }
    available(program, "-v") || available(program, "--version")
}

fn nix_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// The venv python with pyarrow, created under `target/bench-venv` on first use.
pub(crate) fn ensure_pyarrow(target: &Path) -> Option<PathBuf> {
    let venv = target.join("bench-venv");
    let python = venv.join("bin/python");
    let has_flight = |python: &Path| {
        Command::new(python)
            .args(["-c", "import pyarrow.flight"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_flight(&python) {
        return Some(python);
    }
    eprintln!("installing {PYARROW} into {venv:?} for the Arrow Flight baseline");
    let quiet = |c: &mut Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !python.exists() && !quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        return None;
    }
    quiet(Command::new(venv.join("bin/pip")).args(["install", "-q", PYARROW]));
    has_flight(&python).then_some(python)
}

/// `iperf3 -c` for `seconds` with `parallel` connections (and `-Z`, sendfile, when
/// `zerocopy`), against a one-off `iperf3 -s -1`. CPU from iperf3's own report
/// (getrusage of each end), peak RSS from `wait4`.
pub(crate) fn iperf3(seconds: f64, parallel: usize, zerocopy: bool) -> Option<Side> {
    iperf3_at(&Place::loopback(), seconds, parallel, zerocopy)
}

/// [`iperf3`] with its ends where `place` says.
pub(crate) fn iperf3_at(
    place: &Place,
    seconds: f64,
    parallel: usize,
    zerocopy: bool,
) -> Option<Side> {
    let port = free_port().to_string();
    let server = place
        .server_command("iperf3")
        .args(["-s", "-1", "-B", &place.host, "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Daemon::new(ChildGuard(server));
    let duration = seconds.clamp(2.0, 60.0).round().to_string();
    let parallel = parallel.to_string();
    for _ in 0..50 {
        let mut command = place.client_command("iperf3");
        command.args([
            "-c",
            &place.host,
            "-p",
            &port,
            "-P",
            &parallel,
            "-l",
            "1M",
            "-J",
            "-t",
            &duration,
        ]);
        if zerocopy {
            command.arg("-Z");
        }
        let out = run_measured(&mut command).ok()?;
        // With -J, iperf3 3.12 can exit 0 with an "error" object when the server is not
        // listening yet; only a report with results counts.
        let report: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        let end = &report["end"];
        let (Some(bytes), Some(seconds)) = (
            end["sum_received"]["bytes"].as_u64(),
            end["sum_received"]["seconds"].as_f64(),
        ) else {
            if report["error"]
                .as_str()
                .is_some_and(|e| e.contains("unable to connect"))
            {
                std::thread::sleep(Duration::from_millis(100)); // still starting
                continue;
            }
            eprintln!(
                "iperf3 gave no result: {}",
                out.stdout.chars().take(400).collect::<String>()
            );
            return None;
        };
        let cpu = |key: &str| end["cpu_utilization_percent"][key].as_f64().unwrap_or(0.0);
        let host = cpu("host_total") / 100.0 * seconds;
        let remote = cpu("remote_total") / 100.0 * seconds;
        let server_usage = server.usage();
        return Some(Side {
            bytes,
            seconds,
            server: Usage {
                cpu_s: remote,
                peak_rss_mib: server_usage.peak_rss_mib,
            },
            client: Usage {
                cpu_s: host,
                peak_rss_mib: out.usage.peak_rss_mib,
            },
        });
    }
    eprintln!("iperf3 never connected");
    None
}

/// TLS for the nginx baseline: its certificate and key, and the CA curl trusts.
pub(crate) struct Https<'a> {
    pub(crate) cert: &'a Path,
    pub(crate) key: &'a Path,
    pub(crate) ca: &'a Path,
}

/// nginx serving `root` with sendfile (one process, `master_process off`), and
/// `curl -o /dev/null` of `file`. Returns None when either is missing.
pub(crate) fn nginx_curl(root: &Path, file: &str, scratch: &Path) -> Option<Side> {
    nginx_curl_over(root, file, scratch, None)
}

/// [`nginx_curl`], over https when `https` is given: TLS 1.3 with AES-128-GCM on both ends
/// (the suite Nexus prefers), so the two compare at the same cipher.
pub(crate) fn nginx_curl_over(
    root: &Path,
    file: &str,
    scratch: &Path,
    https: Option<&Https<'_>>,
) -> Option<Side> {
    let port = free_port();
    let prefix = scratch.join("nginx");
    let listen = match https {
        None => format!("listen 127.0.0.1:{port};"),
        Some(tls) => format!(
            "listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_protocols TLSv1.3;",
            tls.cert.display(),
            tls.key.display()
        ),
    };
    std::fs::create_dir_all(prefix.join("logs")).ok()?;
    let config = prefix.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\n\
             error_log {log} warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
             client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
             fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n\
             scgi_temp_path {tmp}/scgi;\n\
             server {{ {listen} root {root}; }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            log = prefix.join("logs/error.log").display(),
            tmp = prefix.display(),
            root = root.display(),
        ),
    )
    .ok()?;
    let server = Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg(prefix.join("logs/stderr.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut server = Daemon::new(ChildGuard(server));
    let (url, tls_args) = match https {
        None => (format!("http://127.0.0.1:{port}/{file}"), Vec::new()),
        Some(tls) => (
            format!("https://localhost:{port}/{file}"),
            vec![
                "--cacert".to_string(),
                tls.ca.display().to_string(),
                "--tlsv1.3".into(),
                "--tls13-ciphers".into(),
                "TLS_AES_128_GCM_SHA256".into(),
            ],
        ),
    };
    // Wait until it answers (a HEAD request), then count from a fresh start.
    let mut up = false;
    for _ in 0..100 {
        let head = Command::new("curl")
            .args(["-sf", "-I", "-o", "/dev/null", &url])
            .args(&tls_args)
            .status();
        if head.is_ok_and(|s| s.success()) {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !up {
        eprintln!("nginx did not come up; see {prefix:?}/logs");
        return None;
    }
    server.reset_cpu();
    let out = run_measured(
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-w", "%{size_download}", &url])
            .args(&tls_args),
    )
    .ok()?;
    if !out.ok {
        eprintln!("curl failed: {}", out.stderr);
        return None;
    }
    Some(Side {
        bytes: out.stdout.trim().parse().unwrap_or(0),
        seconds: out.seconds,
        server: server.usage(),
        client: out.usage,
    })
}

/// Arrow Flight `do_get` of about `bytes` (whole 16 MiB batches) with pyarrow.
pub(crate) fn flight(python: &Path, script: &Path, bytes: u64) -> Option<Side> {
    let port = free_port().to_string();
    let server = Command::new(python)
        .arg(script)
        .args(["serve", &port, &bytes.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut server = Daemon::new(ChildGuard(server));
    server.reset_cpu();
    let out = run_measured(Command::new(python).arg(script).args(["get", &port])).ok()?;
    if !out.ok {
        eprintln!("flight client failed: {}", out.stderr);
        return None;
    }
    let report: Value = serde_json::from_str(out.stdout.trim()).ok()?;
    Some(Side {
        bytes: report["bytes"].as_u64()?,
        // The client's own clock around do_get (Python's start-up excluded).
        seconds: report["seconds"].as_f64()?,
        server: server.usage(),
        client: out.usage,
    })
}

/// Where the flight script is (next to the bench's sources).
pub(crate) fn flight_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("flight.py")
}

/// The workspace's target directory.
pub(crate) fn target_dir() -> PathBuf {
    procs::nexus_binary()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}
