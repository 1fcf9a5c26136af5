//! Operations, checked with the real tools: `promtool check metrics` on a live scrape, a real
//! Prometheus server scraping `nexus serve` during transfers, `/readyz` while draining, JSON
//! logs with stream spans, and properties from a `--config` file.
//!
//! promtool and prometheus come from Debian's `prometheus` package (`.ci/run` installs it).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use nexus_testkit::{free_port, http_get, spawn_serve, wait_until, Client, TempDir, PATIENCE};

fn nexus() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nexus"))
}

fn tool(name: &str) -> &str {
    assert!(
        Command::new(name).arg("--version").output().is_ok(),
        "{name} is not installed: apt-get install prometheus (.ci/run does)"
    );
    name
}

/// The value of an unlabelled sample (or the first sample whose line starts with `series`).
fn sample(scrape: &str, series: &str) -> f64 {
    nexus_testkit::prometheus_sample(scrape, series)
        .unwrap_or_else(|| panic!("no sample {series} in the scrape:\n{scrape}"))
}

#[test]
fn a_live_scrape_passes_promtool_and_counts_what_was_served() {
    let promtool = tool("promtool");
    let served = spawn_serve(nexus(), &[]);
    let admin = served.admin.unwrap();
    let mut client = Client::connect(served.address);
    let pulled = client.pull("synthetic:3MiB");
    assert_eq!(pulled.completion().bytes, 3 << 20);
    let refused = client.pull("nosuch:thing");
    assert!(!refused.error().1.is_empty());
    // Counters are published at scrape time; the stream's end reaches them right after its
    // COMPLETE, so wait for it rather than race it.
    let mut scrape = String::new();
    wait_until("the finished stream in the scrape", || {
        scrape = http_get(admin, "/metrics").unwrap().1;
        scrape.contains("nexus_server_streams_finished_total{outcome=\"complete\"} 1")
    });
    assert_eq!(sample(&scrape, "nexus_press_bytes_total"), (3 << 20) as f64);
    assert_eq!(sample(&scrape, "nexus_press_items_total"), 3.0);
    assert_eq!(sample(&scrape, "nexus_press_rejects_total"), 1.0);
    assert_eq!(sample(&scrape, "nexus_server_streams_started_total"), 1.0);
    assert_eq!(sample(&scrape, "nexus_server_connections"), 1.0);
    assert_eq!(sample(&scrape, "nexus_server_stream_size_bytes_count"), 1.0);
    assert_eq!(
        sample(
            &scrape,
            "nexus_server_stream_size_bytes_bucket{le=\"16777216\"}"
        ),
        1.0
    );
    assert_eq!(sample(&scrape, "nexus_server_ready"), 1.0);
    assert!(scrape.contains("nexus_io_backend{backend="), "{scrape}");
    assert!(
        scrape.contains("# HELP nexus_press_bytes_total"),
        "{scrape}"
    );
    // No stream id or peer address as a label: every label is from the fixed sets, and a
    // `code` is one of the error codes' names (or `other`).
    let codes: Vec<&str> = nexus_server::stream_error_labels().collect();
    for line in scrape.lines().filter(|l| l.contains('{')) {
        let labels = &line[line.find('{').unwrap()..];
        let known = ["outcome=", "reason=", "backend=", "version=", "le="]
            .iter()
            .any(|l| labels.starts_with(&format!("{{{l}")));
        let code = labels
            .strip_prefix("{code=\"")
            .and_then(|rest| rest.split('"').next())
            .is_some_and(|c| codes.contains(&c));
        assert!(known || code, "unexpected label in {line}");
    }
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The other routes.
    assert_eq!(http_get(admin, "/healthz").unwrap(), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/nope").unwrap().0, 404);
}

#[test]
fn readyz_is_unready_while_draining_and_healthz_stays_up() {
    let served = spawn_serve(nexus(), &[("BURST_NEXUS_SERVER_DRAIN_TIMEOUT_MS", "60000")]);
    let admin = served.admin.unwrap();
    // "Listening." is logged just before the server is marked ready.
    wait_until("/readyz to say ready", || {
        http_get(admin, "/readyz").unwrap() == (200, "ready\n".into())
    });
    // A stream the client never reads keeps the drain going.
    let mut client = Client::connect(served.address);
    let stuck = client.initiate("synthetic:1TiB");
    let deadline = Instant::now() + PATIENCE;
    while client.next_event(deadline).is_some_and(
        |e| !matches!(e, nexus_protocol::ClientEvent::Chunk { stream, .. } if stream == stuck),
    ) {}
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(served.child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("/readyz to say draining", || {
        http_get(admin, "/readyz").unwrap() == (503, "draining\n".into())
    });
    assert_eq!(http_get(admin, "/healthz").unwrap().0, 200);
}

/// The value of a PromQL instant query (the first series), if it has one yet.
fn promql(prometheus: SocketAddr, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={encoded}")).ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_nexus_during_transfers() {
    let prometheus_bin = tool("prometheus");
    let served = spawn_serve(nexus(), &[]);
    let admin = served.admin.unwrap();
    let dir = TempDir::new("prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: nexus\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let prometheus = Command::new(prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _prometheus = nexus_testkit::ChildGuard(prometheus);
    wait_until("Prometheus to be ready", || {
        http_get(web, "/-/ready").is_ok_and(|(status, _)| status == 200)
    });
    // Keep data flowing until Prometheus has seen the bytes counter rise between scrapes.
    let mut client = Client::connect(served.address);
    let deadline = Instant::now() + PATIENCE;
    let mut rate = None;
    while rate.is_none_or(|r| r <= 0.0) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the bytes move"
        );
        assert_eq!(client.pull("synthetic:64MiB").completion().bytes, 64 << 20);
        rate = promql(web, "rate(nexus_press_bytes_total[10s])");
    }
    assert!(promql(web, "up{job=\"nexus\"}") == Some(1.0));
}

#[test]
fn json_logs_carry_stream_spans() {
    let dir = TempDir::new("json-logs");
    let mut child = Command::new(nexus())
        .arg("serve")
        .env("BURST_NEXUS_SERVER_PORT", "0")
        .env("BURST_NEXUS_ADMIN_ADDRESS", "")
        .env("BURST_NEXUS_LOG_FORMAT", "json")
        .env("BURST_NEXUS_SERVER_ROOT", dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = nexus_testkit::ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            eprintln!("[nexus] {line}");
            let json: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let _ = tx.send(json);
        }
    });
    let listening = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(listening["fields"]["message"], "Listening.");
    let address: SocketAddr = listening["fields"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A refused stream is logged inside its span: the line carries the stream id.
    let mut client = Client::connect(address);
    let refused = client.pull("file:missing.bin");
    assert!(!refused.error().1.is_empty());
    let line = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["fields"]["message"], "Stream refused.", "{line}");
    assert_eq!(line["span"]["name"], "stream", "{line}");
    assert_eq!(line["span"]["stream"], 1, "{line}");
    assert!(line["span"]["operation"].is_u64(), "{line}");
}

#[test]
fn a_properties_file_sits_below_the_environment() {
    let dir = TempDir::new("props-file");
    let file = dir.path().join("nexus.properties");
    std::fs::write(
        &file,
        "# tuned\nburst.nexus.pipe.size=42\nburst.nexus.server.port=1400\n",
    )
    .unwrap();
    let out = Command::new(nexus())
        .args(["config", "--config"])
        .arg(&file)
        .env("BURST_NEXUS_SERVER_PORT", "1500")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("(file; BURST_NEXUS_PIPE_SIZE)\nburst.nexus.pipe.size=42\n"),
        "{text}"
    );
    assert!(
        text.contains("(env; BURST_NEXUS_SERVER_PORT)\nburst.nexus.server.port=1500\n"),
        "{text}"
    );
    // A bad line stops `serve` before anything starts, naming the file and the line.
    std::fs::write(&file, "burst.nexus.server.prot=1\n").unwrap();
    let out = Command::new(nexus())
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nexus.properties:1") && err.contains("burst.nexus.server.port"),
        "{err}"
    );
}

/// Sends `request` raw and reads the whole response (the server closes after it).
fn raw_http(admin: SocketAddr, request: &str) -> String {
    let mut socket = std::net::TcpStream::connect(admin).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    socket.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut socket, &mut response).unwrap();
    response
}

/// Kubernetes probes with a 1 s timeout: idle and slow clients holding admin connections must
/// not delay them. (The hand-written responder served one connection at a time: four idle
/// sockets made /healthz take 19 s.)
#[test]
fn probes_are_answered_while_idle_and_slow_clients_hold_connections() {
    use std::io::Read;
    let served = spawn_serve(nexus(), &[]);
    let admin = served.admin.unwrap();
    wait_until("the server to be ready", || {
        http_get(admin, "/readyz").is_ok_and(|(status, _)| status == 200)
    });
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    let mut slow = std::net::TcpStream::connect(admin).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let mut probe = std::net::TcpStream::connect(admin).unwrap();
        probe
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        write!(
            probe,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        probe
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("{path} was not answered within the probe's 1 s: {e}"));
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
    // The slow client is cut at the header deadline: the server closes it.
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest);
    assert!(closed.is_ok(), "the slow client was not closed: {closed:?}");
    drop(idle);
}

#[test]
fn head_answers_without_a_body_and_other_methods_are_refused() {
    let served = spawn_serve(nexus(), &[]);
    let admin = served.admin.unwrap();
    let head = raw_http(
        admin,
        "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (headers, body) = head.split_once("\r\n\r\n").unwrap();
    assert!(headers.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 0 && body.is_empty(), "{head}");
    let post = raw_http(
        admin,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(
        post.to_ascii_lowercase().contains("allow: get, head"),
        "{post}"
    );
    let missing = raw_http(
        admin,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}

/// Two servers on one machine, each with its own admin port given by `--admin`.
#[test]
fn the_admin_flag_gives_each_server_its_own_endpoint() {
    let help = Command::new(nexus())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("--admin <HOST:PORT>") && help.contains("/healthz"),
        "{help}"
    );
    let mut servers = Vec::new();
    for _ in 0..2 {
        let mut child = Command::new(nexus())
            .args(["serve", "--port", "0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env_remove("BURST_NEXUS_ADMIN_ADDRESS")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let guard = nexus_testkit::ChildGuard(child);
        // Read its log for its whole life (a closed pipe would fail its log writes).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let line = line.unwrap_or_default();
                if let Some(rest) = line.split("admin=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let admin: SocketAddr = rx.recv_timeout(PATIENCE).unwrap().parse().unwrap();
        servers.push((guard, admin));
    }
    assert_ne!(servers[0].1, servers[1].1);
    for (_, admin) in &servers {
        assert_eq!(http_get(*admin, "/healthz").unwrap().0, 200);
    }
}

/// What an operator expects on a scrape: failed and refused streams by error code, the
/// process's CPU, memory and descriptors, time to first byte, and wire bytes beside payload.
#[test]
fn a_scrape_has_error_codes_process_metrics_first_byte_and_wire_bytes() {
    let dir = TempDir::new("ops-metrics");
    std::fs::write(dir.path().join("log.txt"), "line\n".repeat(200_000)).unwrap();
    let served = spawn_serve(
        nexus(),
        &[("BURST_NEXUS_SERVER_ROOT", dir.path().to_str().unwrap())],
    );
    let admin = served.admin.unwrap();
    let mut client = Client::connect(served.address);
    assert_eq!(client.pull("synthetic:2MiB").completion().bytes, 2 << 20);
    assert_eq!(
        client.pull("file:missing").error().0,
        nexus_protocol::ErrorCode::NOT_FOUND
    );
    assert_eq!(client.pull("file:log.txt").completion().bytes, 1_000_000);
    let mut scrape = String::new();
    wait_until("both streams in the scrape", || {
        scrape = http_get(admin, "/metrics").unwrap().1;
        scrape.contains("nexus_server_streams_finished_total{outcome=\"complete\"} 2")
    });
    assert_eq!(
        sample(
            &scrape,
            "nexus_server_streams_failed_total{code=\"not_found\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&scrape, "nexus_server_streams_failed_total{code=\"other\"}"),
        0.0
    );
    assert_eq!(
        sample(&scrape, "nexus_server_time_to_first_byte_seconds_count"),
        2.0
    );
    let payload = sample(&scrape, "nexus_press_bytes_total");
    let wire = sample(&scrape, "nexus_server_wire_bytes_total");
    assert!(
        wire > payload && wire < payload * 1.01,
        "wire {wire}, payload {payload}"
    );
    assert!(sample(&scrape, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&scrape, "process_open_fds") >= 3.0);
    assert!(sample(&scrape, "process_max_fds") >= sample(&scrape, "process_open_fds"));
    let start = sample(&scrape, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 600.0..=now + 5.0).contains(&start),
        "started at {start}, now {now}"
    );
    assert!(scrape.contains("process_cpu_seconds_total "), "{scrape}");
}

/// Every metric the binary can export: the server's, the client's, then the workflow's.
fn metric_rows() -> impl Iterator<
    Item = &'static (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    ),
> {
    nexus_server::telemetry::METRICS
        .iter()
        .chain(nexus_client::telemetry::METRICS)
        .chain(nexus_workflow::telemetry::METRICS)
}

fn metric_markdown() -> String {
    let mut out = String::from(
        "| Prometheus metric | type | labels | original name | meaning |\n|---|---|---|---|---|\n",
    );
    let or_dash = |text: &str| {
        if text.is_empty() {
            "-".to_string()
        } else {
            format!("`{text}`")
        }
    };
    for (name, kind, labels, original, meaning) in metric_rows() {
        let (labels, original) = (or_dash(labels), or_dash(original));
        out.push_str(&format!(
            "| `{name}` | {kind} | {labels} | {original} | {meaning} |\n"
        ));
    }
    out
}

#[test]
fn the_readme_metric_table_is_the_metric_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let start = readme.find("<!-- metrics:start -->\n").unwrap() + "<!-- metrics:start -->\n".len();
    let end = readme.find("<!-- metrics:end -->").unwrap();
    let expected = metric_markdown();
    if std::env::var_os("NEXUS_WRITE_TABLES").is_some() {
        let mut updated = readme.clone();
        updated.replace_range(start..end, &expected);
        std::fs::write(path, updated).unwrap();
        return;
    }
    assert!(
        readme[start..end] == expected,
        "README.md's metric table is out of date (NEXUS_WRITE_TABLES=1 cargo test -p nexus-cli --test ops the_readme_metric rewrites it):\n{expected}"
    );
}
