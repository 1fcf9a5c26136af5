//! `nexus-bench`: Nexus and iperf3 side by side over loopback, interleaved (A B A B ...) so
//! that drift on a shared machine hits both alike; prints each run and the median ratio.
//!
//! Scenarios so far: `single` (one `synthetic:` stream vs `iperf3 -P 1 -l 1M`) and `mux16`
//! (16 streams on one connection vs `iperf3 -P 1`), each read by the blocking protocol driver
//! of `nexus-testkit` (the protocol and server alone) and by `nexus-client` (`client-single`,
//! `client-mux16`: pool, IO thread, queue handles); and `small`: time to first byte and 4 KiB
//! streams per second on a warm pooled connection (no baseline; targets: p50 under 100 us,
//! at least 50k streams/s). The server is the real `nexus serve` process (found next to this
//! binary), the client runs in this process. CPU is user+sys of both ends, from /proc for
//! Nexus and from iperf3's own report (getrusage) for iperf3.
//!
//! Usage: `cargo build --release -p nexus-cli -p nexus-bench &&
//! target/release/nexus-bench [--quick] [--runs N] [--backend io_uring|epoll]`.

// A benchmark reports on stdout by design.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nexus_client::{ClientConfig, Item, StreamOptions};
use nexus_protocol::{Outcome, StreamId};
use nexus_testkit::{spawn_nexus_serve, ChildGuard, Client};

struct Options {
    quick: bool,
    runs: usize,
    backend: String,
}

fn main() {
    let mut options = Options {
        quick: false,
        runs: 3,
        backend: "io_uring".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // For profiling a server started by hand: pull streams and print the rate.
            "pull" => {
                let address: SocketAddr =
                    args.next().and_then(|a| a.parse().ok()).unwrap_or_else(|| {
                        eprintln!("usage: nexus-bench pull ADDRESS PARADATA...");
                        std::process::exit(2)
                    });
                let mut client = Client::connect(address);
                let start = Instant::now();
                let ids: Vec<StreamId> = args.by_ref().map(|p| client.initiate(&p)).collect();
                let bytes: u64 = client
                    .finish_keeping(&ids, false)
                    .values()
                    .map(|p| p.completion().bytes)
                    .sum();
                let seconds = start.elapsed().as_secs_f64();
                println!(
                    "{bytes} bytes in {seconds:.2} s: {:.2} GB/s",
                    bytes as f64 / seconds / 1e9
                );
                return;
            }
            "--quick" => options.quick = true,
            "--runs" => options.runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--backend" => options.backend = args.next().unwrap_or_default(),
            other => {
                eprintln!("unknown argument {other}; usage: nexus-bench [--quick] [--runs N] [--backend B]");
                std::process::exit(2);
            }
        }
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("iperf3 is not installed (apt-get install iperf3); no baseline to compare with");
        std::process::exit(2);
    }
    let gib: u64 = 1 << 30;
    let (single, per_stream) = if options.quick {
        (2 * gib, gib / 8)
    } else {
        (16 * gib, gib)
    };
    let results = [
        scenario("single", &options, Driver::Testkit, 1, single),
        scenario("mux16", &options, Driver::Testkit, 16, per_stream),
        scenario("client-single", &options, Driver::Pooled, 1, single),
        scenario("client-mux16", &options, Driver::Pooled, 16, per_stream),
    ];
    small(&options);
    println!();
    println!("| scenario | Nexus GB/s | iperf3 GB/s | ratio (median) | Nexus CPU s/GB | iperf3 CPU s/GB |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            r.name, r.nexus_gbps, r.iperf_gbps, r.ratio, r.nexus_cpu, r.iperf_cpu
        );
    }
}

struct Summary {
    name: &'static str,
    nexus_gbps: f64,
    iperf_gbps: f64,
    ratio: f64,
    nexus_cpu: f64,
    iperf_cpu: f64,
}

/// One measured transfer.
struct Run {
    bytes: u64,
    seconds: f64,
    cpu_seconds: f64,
}

impl Run {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    fn cpu_per_gb(&self) -> f64 {
        self.cpu_seconds / (self.bytes as f64 / 1e9)
    }
}

/// Which client reads the streams.
#[derive(Clone, Copy)]
enum Driver {
    /// testkit's blocking protocol driver: the protocol and the server alone.
    Testkit,
    /// nexus-client: pool, IO thread, queue handles.
    Pooled,
}

fn scenario(
    name: &'static str,
    options: &Options,
    driver: Driver,
    streams: usize,
    bytes_each: u64,
) -> Summary {
    let mut pairs = Vec::new();
    for i in 0..options.runs {
        let nexus = run_nexus(&options.backend, driver, streams, bytes_each);
        let iperf = run_iperf(nexus.seconds);
        println!(
            "{name} run {}: nexus {:.2} GB/s ({:.3} CPU s/GB), iperf3 {:.2} GB/s ({:.3} CPU s/GB)",
            i + 1,
            nexus.gbps(),
            nexus.cpu_per_gb(),
            iperf.gbps(),
            iperf.cpu_per_gb()
        );
        pairs.push((nexus, iperf));
    }
    // Runs where iperf3 reported nothing (printed above) are left out of the medians.
    pairs.retain(|p| p.1.bytes > 0);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Summary {
        name,
        nexus_gbps: median(pairs.iter().map(|p| p.0.gbps()).collect()),
        iperf_gbps: median(pairs.iter().map(|p| p.1.gbps()).collect()),
        ratio: median(pairs.iter().map(|p| p.0.gbps() / p.1.gbps()).collect()),
        nexus_cpu: median(pairs.iter().map(|p| p.0.cpu_per_gb()).collect()),
        iperf_cpu: median(pairs.iter().map(|p| p.1.cpu_per_gb()).collect()),
    }
}

fn nexus_binary() -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    me.with_file_name("nexus")
}

fn start_server(backend: &str) -> (ChildGuard, SocketAddr) {
    spawn_nexus_serve(
        &nexus_binary(),
        &[
            ("BURST_NEXUS_SERVER_THREADS", "1"),
            ("BURST_NEXUS_IO_BACKEND", backend),
        ],
    )
}

fn pooled_client(backend: &str) -> nexus_client::Client {
    nexus_client::Client::new(ClientConfig {
        threads: 1,
        backend: backend.parse().unwrap_or_default(),
        ..ClientConfig::default()
    })
    .expect("client")
}

fn run_nexus(backend: &str, driver: Driver, streams: usize, bytes_each: u64) -> Run {
    if let Driver::Pooled = driver {
        return run_pooled(backend, streams, bytes_each);
    }
    let (guard, address) = start_server(backend);
    let pid = guard.0.id();
    let mut client = Client::connect(address);
    let server_cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
    let client_cpu0 = cpu_seconds("/proc/self/stat");
    let start = Instant::now();
    let ids: Vec<StreamId> = (0..streams)
        .map(|i| client.initiate(&format!("synthetic:{bytes_each}?seed={i}")))
        .collect();
    let results = client.finish_keeping(&ids, false);
    let seconds = start.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - server_cpu0;
    let client_cpu = cpu_seconds("/proc/self/stat") - client_cpu0;
    let cpu = server_cpu + client_cpu;
    if std::env::var_os("NEXUS_BENCH_VERBOSE").is_some() {
        eprintln!("  server {server_cpu:.2} CPU s, client {client_cpu:.2} CPU s, {seconds:.2} s");
    }
    let mut bytes = 0;
    for pulled in results.values() {
        match &pulled.outcome {
            Outcome::Complete(c) => bytes += c.bytes,
            other => panic!("a bench stream failed: {other:?}"),
        }
    }
    Run {
        bytes,
        seconds,
        cpu_seconds: cpu,
    }
}

/// The same transfer through nexus-client: one thread per stream reads its handle.
fn run_pooled(backend: &str, streams: usize, bytes_each: u64) -> Run {
    let (guard, address) = start_server(backend);
    let pid = guard.0.id();
    let client = pooled_client(backend);
    let server_cpu0 = cpu_seconds(&format!("/proc/{pid}/stat"));
    let client_cpu0 = cpu_seconds("/proc/self/stat");
    let start = Instant::now();
    let readers: Vec<_> = (0..streams)
        .map(|i| {
            let mut handle = client.initiate(
                address,
                &format!("synthetic:{bytes_each}?seed={i}"),
                StreamOptions::default(),
            );
            std::thread::spawn(move || {
                let end = handle.for_each_chunk(|_| {});
                match end.outcome {
                    Outcome::Complete(c) => c.bytes,
                    other => panic!("a bench stream failed: {other:?}"),
                }
            })
        })
        .collect();
    let bytes: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    let seconds = start.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(&format!("/proc/{pid}/stat")) - server_cpu0;
    let client_cpu = cpu_seconds("/proc/self/stat") - client_cpu0;
    if std::env::var_os("NEXUS_BENCH_VERBOSE").is_some() {
        eprintln!("  server {server_cpu:.2} CPU s, client {client_cpu:.2} CPU s, {seconds:.2} s");
    }
    Run {
        bytes,
        seconds,
        cpu_seconds: server_cpu + client_cpu,
    }
}

/// Time to first byte, one stream at a time, and 4 KiB streams per second with 64 in flight,
/// on a warm pooled connection.
fn small(options: &Options) {
    let (_guard, address) = start_server(&options.backend);
    let client = pooled_client(&options.backend);
    let mut warm = client.initiate(address, "synthetic:4KiB", StreamOptions::default());
    warm.for_each_chunk(|_| {});
    let samples = if options.quick { 2_000 } else { 20_000 };
    let mut ttfb: Vec<Duration> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            let mut h = client.initiate(address, "synthetic:4KiB", StreamOptions::default());
            let first = h.recv();
            let elapsed = start.elapsed();
            assert!(matches!(first, Some(Item::Chunk(_))), "no data: {first:?}");
            h.for_each_chunk(|_| {});
            elapsed
        })
        .collect();
    ttfb.sort();
    let pct = |p: usize| ttfb[(ttfb.len() * p / 100).min(ttfb.len() - 1)].as_secs_f64() * 1e6;
    let total = if options.quick { 20_000 } else { 100_000 };
    let in_flight = 64;
    let start = Instant::now();
    let mut window = std::collections::VecDeque::with_capacity(in_flight);
    for _ in 0..total {
        if window.len() == in_flight {
            let mut h: nexus_client::StreamHandle = window.pop_front().expect("in flight");
            assert!(h.for_each_chunk(|_| {}).is_complete());
        }
        window.push_back(client.initiate(address, "synthetic:4KiB", StreamOptions::default()));
    }
    for mut h in window {
        assert!(h.for_each_chunk(|_| {}).is_complete());
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "small: time to first byte p50 {:.0} us, p99 {:.0} us ({samples} sequential streams); {rate:.0} streams/s of 4 KiB ({total}, {in_flight} in flight)",
        pct(50),
        pct(99)
    );
}

/// user + system CPU seconds from a /proc/.../stat file.
fn cpu_seconds(path: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn run_iperf(seconds: f64) -> Run {
    // A fresh port per run: a previous one-off server may still be closing its socket.
    static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(15201);
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let _guard = ChildGuard(server);
    let duration = seconds.clamp(2.0, 60.0).round() as u64;
    let mut output = None;
    for _ in 0..50 {
        let out = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-P",
                "1",
                "-l",
                "1M",
                "-J",
            ])
            .args(["-t", &duration.to_string()])
            .output()
            .expect("iperf3 client");
        // With -J, iperf3 3.12 can exit 0 with an "error" object when the server is not
        // listening yet; only a report with results counts.
        if out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("unable to connect")
        {
            output = Some(out.stdout);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // the server is still starting
    }
    let json = String::from_utf8(output.expect("iperf3 never connected")).unwrap_or_default();
    if !json.contains("\"sum_received\"") {
        eprintln!(
            "iperf3 gave no result: {}",
            json.chars().take(400).collect::<String>()
        );
    }
    let number = |key: &str, after: &str| -> f64 {
        let section = json.rfind(after).map_or("", |i| &json[i..]);
        section
            .split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|v| v.split([',', '\n', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let bytes = number("bytes", "\"sum_received\"") as u64;
    let seconds = number("seconds", "\"sum_received\"");
    let host = number("host_total", "\"cpu_utilization_percent\"");
    let remote = number("remote_total", "\"cpu_utilization_percent\"");
    Run {
        bytes,
        seconds,
        cpu_seconds: (host + remote) / 100.0 * seconds,
    }
}
