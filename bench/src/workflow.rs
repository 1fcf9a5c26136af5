//! The workflow's cost, each figure beside its baseline in the same run:
//! - `workflow-streams`: 4 KiB streams per second from `nexus serve --rules` (every stream end
//!   recorded as an event) against plain `nexus serve`, interleaved;
//! - `workflow-events`: `POST /sensors/NAME` (an event written and synced) per second on one
//!   keep-alive connection, against `GET /healthz` on the same endpoint (the HTTP floor);
//! - `workflow-latency`: from a POST to its run's end seen on a live `events:runs` stream
//!   (a one-step rule that pulls and verifies a 4 KiB stream), sequential, p50 and p99.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nexus_client::{ClientConfig, Item, StreamOptions};
use nexus_testkit::{spawn_serve_with, Served};
use serde_json::{json, Value};

use crate::procs::nexus_binary;
use crate::report::{median, Record};
use crate::Options;

const RULES: &str = r#"
[sensors.hook]
kind = "http"

[rules.probe]
on = "hook"
concurrency = 4

[[rules.probe.steps]]
name = "get"
retries = 0
checksum = { endpoint = "ADDRESS", paradata = "synthetic:4KiB" }
"#;

/// `nexus serve`, with `--rules` (its probe rule pulling from `endpoint`) when asked.
fn server(options: &Options, rules: bool, tag: &str, endpoint: &str) -> Served {
    server_with(options, rules, tag, endpoint, "all")
}

/// [`server`] with `burst.nexus.workflow.streams.events` set to `streams_events`.
fn server_with(
    options: &Options,
    rules: bool,
    tag: &str,
    endpoint: &str,
    streams_events: &str,
) -> Served {
    let dir = options.scratch.join(format!("workflow-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let state = dir.join("state.db");
    let path = dir.join("rules.toml");
    std::fs::write(&path, RULES.replace("ADDRESS", endpoint)).expect("rules");
    let env = [
        ("BURST_NEXUS_IO_BACKEND", options.backend.as_str()),
        (
            "BURST_NEXUS_SERVER_ROOT",
            options.scratch.to_str().expect("utf-8"),
        ),
        ("BURST_NEXUS_WORKFLOW_STATE", state.to_str().expect("utf-8")),
        ("BURST_NEXUS_WORKFLOW_STREAMS_EVENTS", streams_events),
    ];
    let args: Vec<&str> = if rules {
        vec!["--rules", path.to_str().expect("utf-8")]
    } else {
        vec![]
    };
    spawn_serve_with(&nexus_binary(), &args, &env)
}

/// 4 KiB streams with 64 in flight from one pooled connection; streams per second.
fn small_rate(address: SocketAddr, total: usize) -> f64 {
    let client = nexus_client::Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .expect("client");
    let mut warm = client.initiate(address, "synthetic:4KiB", StreamOptions::default());
    assert!(warm.for_each_chunk(|_| {}).is_complete());
    crate::small_streams_per_second(&client, address, total, 64)
}

/// One keep-alive HTTP/1.1 connection.
struct Http {
    reader: BufReader<TcpStream>,
    address: SocketAddr,
}

impl Http {
    fn connect(address: SocketAddr) -> Http {
        let stream = TcpStream::connect(address).expect("admin endpoint");
        stream.set_nodelay(true).expect("nodelay");
        Http {
            reader: BufReader::new(stream),
            address,
        }
    }

    /// Sends a request and reads the answer: status and body.
    fn request(&mut self, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            self.address,
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(head.as_bytes())
            .expect("request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("an HTTP status");
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("length");
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

pub(crate) fn workflow(options: &Options) -> Vec<Record> {
    let mut records = Vec::new();

    // Stream ends as events: the data plane's cost of --rules.
    let total = if options.quick { 20_000 } else { 100_000 };
    let (mut with, mut without, mut unwatched) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..options.runs {
        // No POST reaches these: the rule's endpoint is never used.
        let plain = server(options, false, "plain", "127.0.0.1:1");
        without.push(small_rate(plain.address, total));
        drop(plain);
        // streams.events = rules and no rule on streams: the server does not watch.
        let quiet = server_with(options, true, "quiet", "127.0.0.1:1", "rules");
        unwatched.push(small_rate(quiet.address, total));
        drop(quiet);
        let ruled = server(options, true, "rules", "127.0.0.1:1");
        with.push(small_rate(ruled.address, total));
        let admin = ruled.admin.expect("admin endpoint");
        let series = "nexus_workflow_events_total{sensor=\"streams\",result=\"accepted\"}";
        let recorded_by = Instant::now();
        // The streams of this run (and the warm-up) must all become events.
        while nexus_testkit::scrape_sample(admin, series) < total as f64 {
            assert!(
                recorded_by.elapsed() < Duration::from_secs(120),
                "stream ends were not all recorded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let lag = recorded_by.elapsed().as_secs_f64();
        eprintln!(
            "workflow-streams run {}: plain {:.0}/s, with rules {:.0}/s, last event recorded {:.2} s after the last stream",
            run + 1,
            without[run],
            with[run],
            lag
        );
    }
    let (w, p, u) = (
        median(with.clone()),
        median(without.clone()),
        median(unwatched.clone()),
    );
    let note = format!(
        "{w:.0} streams/s with --rules (every end an event) vs {p:.0}/s plain: {:.2}x; with streams.events=rules and no rule on streams {u:.0}/s: {:.2}x ({total} x 4 KiB, 64 in flight)",
        w / p,
        u / p
    );
    eprintln!("workflow-streams: {note}");
    records.push(Record {
        scenario: "workflow-streams".into(),
        baseline: Some("nexus serve without rules".into()),
        pairs: Vec::new(),
        extra: json!({"with_rules_per_s": with, "plain_per_s": without, "unwatched_per_s": unwatched,
                      "ratio": w / p, "unwatched_ratio": u / p}),
        note: Some(note),
    });

    // Events: POST rate against the HTTP floor, and the latency of a whole run. The rule's
    // step pulls from a second, plain server.
    let data = nexus_testkit::spawn_serve(
        &nexus_binary(),
        &[("BURST_NEXUS_IO_BACKEND", options.backend.as_str())],
    );
    let served = server(options, true, "events", &data.address.to_string());
    let admin = served.admin.expect("admin endpoint");
    let n = if options.quick { 300 } else { 2_000 };
    let mut http = Http::connect(admin);
    let start = Instant::now();
    for _ in 0..n {
        assert_eq!(http.request("GET", "/healthz", "", "").0, 200);
    }
    let floor = n as f64 / start.elapsed().as_secs_f64();

    // A live reader of the runs that end.
    let client = nexus_client::Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .expect("client");
    let mut feed = client.initiate(served.address, "events:runs", StreamOptions::default());
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    let reader = std::thread::spawn(move || {
        let mut pending = String::new();
        while let Some(Item::Chunk(chunk)) = feed.recv() {
            let at = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let event: Value = serde_json::from_str(&line).expect("a JSON line");
                let id = event["payload"]["event"].as_str().unwrap_or("").to_string();
                assert_eq!(event["payload"]["state"], "success", "{event}");
                if tx.send((id, at)).is_err() {
                    return;
                }
            }
        }
    });
    let samples = if options.quick { 200 } else { 1_000 };
    let mut latency: Vec<f64> = Vec::with_capacity(samples);
    for i in 0..samples {
        let id = format!("lat-{i}");
        let start = Instant::now();
        let (status, body) = http.request(
            "POST",
            "/sensors/hook",
            &format!("Idempotency-Key: {id}\r\n"),
            "{}",
        );
        assert_eq!(status, 202, "{body}");
        loop {
            let (seen, at) = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a run ends");
            if seen == id {
                latency.push(at.duration_since(start).as_secs_f64() * 1e3);
                break;
            }
        }
    }
    latency.sort_by(f64::total_cmp);
    let pct = |p: usize| latency[(latency.len() * p / 100).min(latency.len() - 1)];
    let start = Instant::now();
    for i in 0..n {
        let (status, _) = http.request(
            "POST",
            "/sensors/hook",
            &format!("Idempotency-Key: rate-{i}\r\n"),
            "{}",
        );
        assert_eq!(status, 202);
    }
    let accepted = n as f64 / start.elapsed().as_secs_f64();
    // Every one of those runs ends (and is seen) before the figures count.
    let mut ended = 0;
    while ended < n {
        let (seen, _) = rx.recv_timeout(Duration::from_secs(120)).expect("runs end");
        if seen.starts_with("rate-") {
            ended += 1;
        }
    }
    let drained = start.elapsed().as_secs_f64();
    drop(rx);
    drop(served);
    let _ = reader.join();
    drop(data);
    let note = format!(
        "{accepted:.0} events/s accepted (each synced, each starting a run) vs {floor:.0} GET /healthz/s on the same connection: {:.2}x; all {n} runs ended {drained:.2} s after the first POST ({:.0} runs/s)",
        accepted / floor,
        n as f64 / drained
    );
    eprintln!("workflow-events: {note}");
    records.push(Record {
        scenario: "workflow-events".into(),
        baseline: Some("GET /healthz".into()),
        pairs: Vec::new(),
        extra: json!({"events_per_s": accepted, "healthz_per_s": floor, "runs_per_s": n as f64 / drained}),
        note: Some(note),
    });
    let note = format!(
        "POST to its run's end on events:runs (one step: pull and verify 4 KiB): p50 {:.2} ms, p99 {:.2} ms ({samples} sequential)",
        pct(50),
        pct(99)
    );
    eprintln!("workflow-latency: {note}");
    records.push(Record {
        scenario: "workflow-latency".into(),
        baseline: None,
        pairs: Vec::new(),
        extra: json!({"p50_ms": pct(50), "p99_ms": pct(99)}),
        note: Some(note),
    });
    records
}
