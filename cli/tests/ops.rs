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
    // No stream id or peer address as a label: every label is from the fixed sets.
    for line in scrape.lines().filter(|l| l.contains('{')) {
        let labels = &line[line.find('{').unwrap()..];
        assert!(
            ["outcome=", "reason=", "backend=", "version=", "le="]
                .iter()
                .any(|l| labels.starts_with(&format!("{{{l}"))),
            "unexpected label in {line}"
        );
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
