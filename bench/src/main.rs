//! `nexus-bench`: Nexus against what users would otherwise use, side by side over loopback,
//! interleaved (A B A B ...) so that drift on a shared machine hits both alike.
//!
//! Every transfer runs between real processes: `nexus serve` (one shard per core) and `nexus pull` to
//! /dev/null, found next to this binary; the baselines are iperf3, nginx + curl and Arrow
//! Flight (pyarrow), installed on first use. CPU is user+sys of both ends from the kernel's
//! own accounting (`wait4`, `/proc`), peak RSS likewise. Scenarios and their baselines:
//!
//! | scenario | Nexus | baseline |
//! |---|---|---|
//! | `single` | one `synthetic:` stream | `iperf3 -P 1 -l 1M`, same duration |
//! | `file` | one `file:` from page cache | nginx (sendfile) + curl; `iperf3 -Z` |
//! | `mux16` | 16 streams, one connection | `iperf3 -P 1` |
//! | `parallel` | 4 streams on 4 connections | `iperf3 -P 4` |
//! | `flight` | one `synthetic:` stream | Arrow Flight `do_get` |
//! | `matrix` | C x P x S clients x streams x servers | - (aggregate, digests verified) |
//! | `zstd` | compressible file with `--zstd` | the same without |
//! | `backends` | `single`, `mux16` on io_uring | the same on epoll |
//! | `soak` | one long stream, RSS sampled every second | - (must stay flat) |
//! | `small` | 4 KiB streams on a warm pooled connection: time to first byte, streams/s | a bare TCP ping-pong on loopback (the floor under time to first byte) |
//! | `netns` | `single` between two network namespaces over a veth link capped at 10 Gbit/s (`tc tbf`) | `iperf3 -P 1` over the same link |
//! | `push` | `nexus push` of a page-cached file into `discard:` | `nexus pull` of the same file |
//! | `push-file` (in `push`) | the same into the `file:` sink (fsync, rename) | the same pull |
//! | `replication` | a push along a chain of 3 servers, links capped by `tc tbf` in network namespaces | one push to one server over the same links |
//! | `replication-fanout` (in `replication`) | 3 pushes from the client at once | the same single push |
//! | `tls-single` (in `tls`) | one `synthetic:` stream over TLS 1.3 (AES-128-GCM) | the same in plaintext |
//! | `tls-mux16` (in `tls`) | 16 streams on one TLS connection | the same in plaintext |
//! | `tls-file` (in `tls`) | one `file:` from page cache over TLS | nginx https + curl, TLS 1.3 AES-128-GCM |
//! | `workflow-streams` (in `workflow`) | 4 KiB streams/s from `nexus serve --rules` (each end an event) | the same from `nexus serve` |
//! | `workflow-events` (in `workflow`) | `POST /sensors/NAME` per second, each starting a run | `GET /healthz` on the same connection |
//! | `workflow-latency` (in `workflow`) | a POST to its run's end on a live `events:runs` stream | - (p50, p99) |
//! | `mysql` | rows/s the mysql sensor reads and counts from a MariaDB binlog, from a checkpoint | `mariadb-binlog --read-from-remote-server` over the same range |
//! | `bus-1`, `bus-3` (in `bus`) | events/s through RabbitMQ (confirms, acks), 1 and 3 `nexus run` nodes | the embedded workflow, 1 node |
//!
//! Usage: `cargo build --release -p nexus-cli -p nexus-bench && target/release/nexus-bench
//! [--quick] [--runs N] [--backend io_uring|epoll] [--only a,b] [--hog] [--json-out FILE]
//! [--chart FILE.svg]`; `nexus-bench chart IN.ndjson OUT.svg` redraws a chart;
//! `nexus-bench pull ADDRESS PARADATA...` pulls in-process (for profiling a server);
//! `nexus-bench streams ADDRESS COUNT [IN_FLIGHT]` runs small streams through the pooled client (for
//! profiling the client, `bench/scripts/client-instructions.sh`).

// A benchmark reports on stdout by design.
#![allow(clippy::print_stdout)]

/// As in the nexus binary (cli/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod baselines;
mod bus;
mod mysql;
mod netns;
mod procs;
mod push;
mod report;
mod tls;
mod workflow;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_client::{ClientConfig, Item, StreamOptions};
use nexus_protocol::StreamId;
use serde_json::json;

use procs::{nexus_pull, nexus_server, Daemon, Finished, Usage};
use report::{Record, Side};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A scenario: its records, one per baseline.
type Scenario = fn(&Options) -> Vec<Record>;

struct Options {
    quick: bool,
    runs: usize,
    backend: String,
    only: Option<Vec<String>>,
    json_out: Option<PathBuf>,
    chart: Option<PathBuf>,
    /// Scratch files (data files, manifests, nginx prefix).
    scratch: PathBuf,
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }

    /// `full` bytes, or `quick` bytes with `--quick`.
    fn size(&self, full: u64, quick: u64) -> u64 {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

fn usage_exit(message: &str) -> ! {
    eprintln!("{message}");
    eprintln!(
        "usage: nexus-bench [--quick] [--runs N] [--backend io_uring|epoll] [--only a,b] [--hog] \
         [--json-out FILE] [--chart FILE.svg]\n       nexus-bench chart IN.ndjson OUT.svg\n       \
         nexus-bench pull ADDRESS PARADATA...\n       nexus-bench streams ADDRESS COUNT [IN_FLIGHT]"
    );
    std::process::exit(2)
}

fn main() {
    let target = baselines::target_dir();
    let mut options = Options {
        quick: false,
        runs: 3,
        backend: "io_uring".into(),
        only: None,
        json_out: None,
        chart: None,
        scratch: target.join("bench-data"),
    };
    let mut hog = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "pull" => return pull_in_process(args.collect()),
            "streams" => return streams_in_process(args.collect()),
            "chart" => {
                let (Some(input), Some(output)) = (args.next(), args.next()) else {
                    usage_exit("chart needs IN.ndjson OUT.svg");
                };
                return redraw(Path::new(&input), Path::new(&output));
            }
            "--quick" => options.quick = true,
            "--hog" => hog = true,
            "--runs" => {
                options.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage_exit("--runs takes a positive number"))
            }
            "--backend" => options.backend = args.next().unwrap_or_default(),
            "--only" => {
                options.only = Some(
                    args.next()
                        .unwrap_or_default()
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            }
            "--json-out" => options.json_out = args.next().map(PathBuf::from),
            "--chart" => options.chart = args.next().map(PathBuf::from),
            other => usage_exit(&format!("unknown argument {other}")),
        }
    }
    if !procs::nexus_binary().exists() {
        usage_exit(&format!(
            "{:?} not found: cargo build --release -p nexus-cli -p nexus-bench",
            procs::nexus_binary()
        ));
    }
    std::fs::create_dir_all(&options.scratch).expect("scratch directory");
    let _hog = hog.then(cpu_hog);
    let started = Instant::now();
    let mut records = Vec::new();
    let scenarios: [(&str, Scenario); 17] = [
        ("single", single),
        ("file", file),
        ("mux16", mux16),
        ("parallel", parallel),
        ("flight", flight),
        ("matrix", matrix),
        ("zstd", zstd),
        ("backends", backends),
        ("soak", soak),
        ("small", small),
        ("netns", netns_single),
        ("push", push::push),
        ("replication", push::replication),
        ("workflow", workflow::workflow),
        ("tls", tls::tls),
        ("mysql", mysql::mysql),
        ("bus", bus::bus),
    ];
    for (name, run) in scenarios {
        if options.wants(name) {
            eprintln!("== {name}");
            records.extend(run(&options));
        }
    }
    println!();
    print!("{}", report::table(&records));
    println!(
        "\n{} scenario records in {:.0} s{}",
        records.len(),
        started.elapsed().as_secs_f64(),
        if options.quick { " (--quick)" } else { "" }
    );
    let lines: Vec<serde_json::Value> = records.iter().map(Record::to_json).collect();
    if let Some(path) = &options.json_out {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).expect("write --json-out");
        println!("NDJSON: {path:?}");
    }
    if let Some(path) = &options.chart {
        std::fs::write(path, report::chart(&lines)).expect("write --chart");
        println!("chart: {path:?}");
    }
}

/// `--hog`: a busy loop in a process of its own for the whole run, so every scenario (Nexus
/// and baseline alike) shares the machine with a CPU-bound neighbour, as on a busy cluster
/// node. Its CPU is not counted on either side. Killed on drop, and gone with the bench.
fn cpu_hog() -> nexus_testkit::ChildGuard {
    eprintln!("--hog: a busy loop (sh) shares the machine for the whole run");
    // Exits on its own once the bench is gone (checked every 100,000 turns), so an
    // interrupted bench leaves no hog behind.
    let lifeline = format!(
        "i=0; while :; do i=$((i+1)); if [ $i -ge 100000 ]; then i=0; \
         kill -0 {} 2>/dev/null || exit 0; fi; done",
        std::process::id()
    );
    let child = Command::new("sh")
        .args(["-c", &lifeline])
        .spawn()
        .expect("start the busy loop");
    nexus_testkit::ChildGuard(child)
}

fn redraw(input: &Path, output: &Path) {
    let text = std::fs::read_to_string(input).expect("read NDJSON");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    std::fs::write(output, report::chart(&lines)).expect("write chart");
}

/// The Nexus side of one run of `bytes`: a fresh server on `backend` serving the scratch
/// directory, and `nexus pull` of `paradata`.
fn nexus_run(
    options: &Options,
    backend: &str,
    paradata: &[String],
    bytes: u64,
    extra: &[&str],
) -> Side {
    let (server, address) = nexus_server(backend, &options.scratch);
    let pulled = nexus_pull(address, paradata, backend, extra, &options.scratch);
    Side {
        bytes,
        seconds: pulled.seconds,
        server: server.usage(),
        client: pulled.usage,
    }
}

fn synthetic(streams: usize, each: u64) -> Vec<String> {
    (0..streams)
        .map(|i| format!("synthetic:{each}?seed={i}"))
        .collect()
}

fn log_pair(name: &str, run: usize, nexus: &Side, base: Option<&Side>) {
    let base = base.map_or(String::from("no baseline result"), |b| {
        format!(
            "baseline {:.2} GB/s ({:.3} CPU s/GB)",
            b.gbps(),
            b.cpu_s_per_gb()
        )
    });
    eprintln!(
        "{name} run {run}: nexus {:.2} GB/s ({:.3} CPU s/GB, RSS {:.0}/{:.0} MiB), {base}",
        nexus.gbps(),
        nexus.cpu_s_per_gb(),
        nexus.server.peak_rss_mib,
        nexus.client.peak_rss_mib,
    );
}

/// Nexus pulls of `paradata` interleaved with iperf3 for the same duration.
fn against_iperf(
    options: &Options,
    name: &str,
    paradata: &[String],
    bytes: u64,
    parallel: usize,
) -> Vec<Record> {
    if !baselines::ensure_apt("iperf3", "iperf3") {
        return vec![Record::skipped(
            name,
            Some("iperf3"),
            "iperf3 could not be installed".into(),
        )];
    }
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let nexus = nexus_run(options, &options.backend, paradata, bytes, &[]);
        let base = baselines::iperf3(nexus.seconds, parallel, false);
        log_pair(name, run, &nexus, base.as_ref());
        pairs.push((nexus, base));
    }
    vec![Record {
        scenario: name.into(),
        baseline: Some(format!("iperf3 -P {parallel} -l 1M")),
        pairs,
        extra: json!({"streams": paradata.len(), "backend": options.backend}),
        note: None,
    }]
}

fn single(options: &Options) -> Vec<Record> {
    let bytes = options.size(16 * GIB, 2 * GIB);
    against_iperf(options, "single", &synthetic(1, bytes), bytes, 1)
}

fn mux16(options: &Options) -> Vec<Record> {
    let each = options.size(GIB, 128 * MIB);
    against_iperf(options, "mux16", &synthetic(16, each), 16 * each, 1)
}

/// One stream between two network namespaces over a veth link capped at 10 Gbit/s by `tc
/// tbf`, against iperf3 over the same link: the one scenario that is not loopback.
fn netns_single(options: &Options) -> Vec<Record> {
    const RATE: &str = "10gbit";
    let name = "netns";
    if !baselines::ensure_apt("iperf3", "iperf3") {
        return vec![Record::skipped(
            name,
            Some("iperf3"),
            "iperf3 could not be installed".into(),
        )];
    }
    let link = match netns::link(RATE) {
        Ok(link) => link,
        Err(e) => {
            return vec![Record::skipped(
                name,
                Some("iperf3"),
                format!("no network namespaces here (needs root and iproute2): {e}"),
            )]
        }
    };
    let place = &link.place;
    // About 6 s at the link's 1.25 GB/s (1 s with --quick).
    let bytes = options.size(8 * GIB, GIB);
    let paradata = synthetic(1, bytes);
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let (server, address) = netns::nexus_server_at(
            place,
            &procs::nexus_binary(),
            &options.backend,
            &options.scratch,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let streams: Vec<(SocketAddr, &str)> = vec![(address, paradata[0].as_str())];
        let pulled = procs::nexus_pull_streams_at(
            place,
            &streams,
            &options.backend,
            &[],
            &options.scratch,
            |_| {},
        );
        let nexus = Side {
            bytes,
            seconds: pulled.seconds,
            server: server.usage(),
            client: pulled.usage,
        };
        drop(server);
        let base = baselines::iperf3_at(place, nexus.seconds, 1, false);
        log_pair(name, run, &nexus, base.as_ref());
        pairs.push((nexus, base));
    }
    vec![Record {
        scenario: name.into(),
        baseline: Some("iperf3 -P 1 -l 1M, same link".into()),
        pairs,
        extra: json!({"link": format!("veth between two netns, tc tbf {RATE} each way"),
                      "backend": options.backend}),
        note: Some(format!(
            "veth pair between two network namespaces, tbf {RATE}"
        )),
    }]
}

/// P streams on P connections: P `nexus pull` processes at once, against `iperf3 -P P`.
fn parallel(options: &Options) -> Vec<Record> {
    const P: usize = 4;
    if !baselines::ensure_apt("iperf3", "iperf3") {
        return vec![Record::skipped(
            "parallel",
            Some("iperf3"),
            "iperf3 could not be installed".into(),
        )];
    }
    let each = options.size(4 * GIB, 512 * MIB);
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let (server, address) = nexus_server(&options.backend, &options.scratch);
        let start = Instant::now();
        let clients: Vec<_> = (0..P)
            .map(|i| {
                let paradata = vec![format!("synthetic:{each}?seed={i}")];
                let (backend, scratch) = (options.backend.clone(), options.scratch.clone());
                std::thread::spawn(move || nexus_pull(address, &paradata, &backend, &[], &scratch))
            })
            .collect();
        let finished: Vec<Finished> = clients
            .into_iter()
            .map(|c| c.join().expect("pull"))
            .collect();
        let nexus = Side {
            bytes: each * P as u64,
            seconds: start.elapsed().as_secs_f64(),
            server: server.usage(),
            client: sum_usage(finished.iter().map(|f| f.usage)),
        };
        drop(server);
        let base = baselines::iperf3(nexus.seconds, P, false);
        log_pair("parallel", run, &nexus, base.as_ref());
        pairs.push((nexus, base));
    }
    vec![Record {
        scenario: "parallel".into(),
        baseline: Some(format!("iperf3 -P {P} -l 1M")),
        pairs,
        extra: json!({"connections": P, "backend": options.backend}),
        note: Some(format!(
            "{P} nexus pull processes, one connection each; RSS is the largest client"
        )),
    }]
}

/// CPU summed, peak RSS the largest: several processes on one side.
fn sum_usage(usages: impl Iterator<Item = Usage>) -> Usage {
    usages.fold(Usage::default(), |acc, u| Usage {
        cpu_s: acc.cpu_s + u.cpu_s,
        peak_rss_mib: acc.peak_rss_mib.max(u.peak_rss_mib),
    })
}

/// A file of `len` bytes under the scratch directory, made once (kept between runs), and
/// read once so that it is in the page cache.
fn data_file(options: &Options, name: &str, len: u64, fill: impl Fn(u64, &mut [u8])) -> PathBuf {
    let path = options.scratch.join(name);
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(len) {
        eprintln!("writing {len} bytes to {path:?}");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("data file"));
        let mut block = vec![0u8; 4 << 20];
        let mut offset = 0;
        while offset < len {
            let n = (len - offset).min(block.len() as u64) as usize;
            fill(offset, &mut block[..n]);
            std::io::Write::write_all(&mut file, &block[..n]).expect("write data file");
            offset += n as u64;
        }
    }
    let _ = Command::new("cat")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .status();
    path
}

fn file(options: &Options) -> Vec<Record> {
    let len = options.size(8 * GIB, GIB);
    data_file(options, "file.bin", len, |offset, out| {
        nexus_server::synthetic::fill(7, offset, out)
    });
    let paradata = vec!["file:file.bin".to_string()];
    let have_iperf = baselines::ensure_apt("iperf3", "iperf3");
    let have_nginx =
        baselines::ensure_apt("nginx", "nginx") && baselines::ensure_apt("curl", "curl");
    let (mut vs_nginx, mut vs_iperf) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let nexus = nexus_run(options, &options.backend, &paradata, len, &[]);
        let nginx = if have_nginx {
            baselines::nginx_curl(&options.scratch, "file.bin", &options.scratch)
        } else {
            None
        };
        let zerocopy = if have_iperf {
            baselines::iperf3(nexus.seconds, 1, true)
        } else {
            None
        };
        log_pair("file vs nginx+curl", run, &nexus, nginx.as_ref());
        log_pair("file vs iperf3 -Z", run, &nexus, zerocopy.as_ref());
        vs_nginx.push((nexus, nginx));
        vs_iperf.push((nexus, zerocopy));
    }
    let extra = json!({"file_bytes": len, "page_cache": true, "backend": options.backend});
    vec![
        Record {
            scenario: "file".into(),
            baseline: Some("nginx+curl".into()),
            pairs: vs_nginx,
            extra: extra.clone(),
            note: (!have_nginx).then(|| "nginx or curl could not be installed".into()),
        },
        Record {
            scenario: "file".into(),
            baseline: Some("iperf3 -Z -P 1 -l 1M".into()),
            pairs: vs_iperf,
            extra,
            note: (!have_iperf).then(|| "iperf3 could not be installed".into()),
        },
    ]
}

fn flight(options: &Options) -> Vec<Record> {
    let Some(python) = baselines::ensure_pyarrow(&baselines::target_dir()) else {
        return vec![Record::skipped(
            "flight",
            Some("Arrow Flight"),
            "pyarrow could not be installed into target/bench-venv".into(),
        )];
    };
    // Whole 16 MiB batches on the Flight side; the same bytes for Nexus.
    let bytes = options.size(8 * GIB, 2 * GIB);
    let script = baselines::flight_script();
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let nexus = nexus_run(options, &options.backend, &synthetic(1, bytes), bytes, &[]);
        let base = baselines::flight(&python, &script, bytes);
        log_pair("flight", run, &nexus, base.as_ref());
        pairs.push((nexus, base));
    }
    vec![Record {
        scenario: "flight".into(),
        baseline: Some("Arrow Flight do_get (pyarrow)".into()),
        pairs,
        extra: json!({"batch": "16 values of 1 MiB, one binary column"}),
        note: Some("Flight's CPU includes Python's start-up and pyarrow's import".into()),
    }]
}

/// C clients (processes) each pull P streams from each of S servers, all at once.
fn matrix(options: &Options) -> Vec<Record> {
    let (c, p, s) = if options.quick {
        (8, 4, 2)
    } else {
        (64, 16, 4)
    };
    let each = options.size(8 * MIB, 4 * MIB);
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let servers: Vec<(Daemon, SocketAddr)> = (0..s)
            .map(|_| nexus_server(&options.backend, &options.scratch))
            .collect();
        let start = Instant::now();
        let clients: Vec<_> = (0..c)
            .map(|client| {
                let addresses: Vec<SocketAddr> = servers.iter().map(|(_, a)| *a).collect();
                let (backend, scratch) = (options.backend.clone(), options.scratch.clone());
                std::thread::spawn(move || {
                    // P streams to every server, all in one operation.
                    let paradata: Vec<(SocketAddr, String)> = addresses
                        .iter()
                        .flat_map(|a| {
                            (0..p).map(move |i| {
                                (*a, format!("synthetic:{each}?seed={}", client * p + i))
                            })
                        })
                        .collect();
                    let streams: Vec<(SocketAddr, &str)> =
                        paradata.iter().map(|(a, p)| (*a, p.as_str())).collect();
                    procs::nexus_pull_streams(&streams, &backend, &[], &scratch, |_| {})
                })
            })
            .collect();
        let finished: Vec<Finished> = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        let seconds = start.elapsed().as_secs_f64();
        let side = Side {
            bytes: (c * p * s) as u64 * each,
            seconds,
            server: sum_usage(servers.iter().map(|(d, _)| d.usage())),
            client: sum_usage(finished.iter().map(|f| f.usage)),
        };
        log_pair("matrix", run, &side, None);
        pairs.push((side, None));
    }
    vec![Record {
        scenario: "matrix".into(),
        baseline: None,
        pairs,
        extra: json!({"clients": c, "streams_per_server": p, "servers": s, "stream_bytes": each}),
        note: Some(format!(
            "{c} x {p} x {s}: {} streams, every digest verified (nexus pull exits 0 only then)",
            c * p * s
        )),
    }]
}

fn zstd(options: &Options) -> Vec<Record> {
    let len = options.size(2 * GIB, 256 * MIB);
    data_file(options, "text.log", len, nexus_testkit::log_text);
    let paradata = vec!["file:text.log".to_string()];
    let mut pairs = Vec::new();
    for run in 1..=options.runs {
        let packed = nexus_run(options, &options.backend, &paradata, len, &["--zstd"]);
        let raw = nexus_run(options, &options.backend, &paradata, len, &[]);
        log_pair("zstd", run, &packed, Some(&raw));
        pairs.push((packed, Some(raw)));
    }
    vec![Record {
        scenario: "zstd".into(),
        baseline: Some("Nexus without zstd".into()),
        pairs,
        extra: json!({"file_bytes": len, "level": 1}),
        note: Some("loopback is faster than zstd: compression pays only on slower links".into()),
    }]
}

fn backends(options: &Options) -> Vec<Record> {
    let single = options.size(4 * GIB, GIB);
    let each = options.size(256 * MIB, 64 * MIB);
    let mut records = Vec::new();
    for (name, paradata, bytes) in [
        ("backends-single", synthetic(1, single), single),
        ("backends-mux16", synthetic(16, each), 16 * each),
    ] {
        let mut pairs = Vec::new();
        for run in 1..=options.runs {
            let uring = nexus_run(options, "io_uring", &paradata, bytes, &[]);
            let epoll = nexus_run(options, "epoll", &paradata, bytes, &[]);
            log_pair(name, run, &uring, Some(&epoll));
            pairs.push((uring, Some(epoll)));
        }
        records.push(Record {
            scenario: name.into(),
            baseline: Some("Nexus on epoll".into()),
            pairs,
            extra: json!({"nexus_backend": "io_uring", "streams": paradata.len()}),
            note: None,
        });
    }
    records
}

/// One long stream while RSS of both ends is sampled every second.
fn soak(options: &Options) -> Vec<Record> {
    let bytes = options.size(50_000_000_000, 8 * GIB);
    let (server, address) = nexus_server(&options.backend, &options.scratch);
    let server_pid = server.pid();
    let samples: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut sampler = None;
    let paradata = format!("synthetic:{bytes}");
    let pulled = procs::nexus_pull_streams(
        &[(address, &paradata)],
        &options.backend,
        &[],
        &options.scratch,
        |client| {
            let (samples, done) = (Arc::clone(&samples), Arc::clone(&done));
            sampler = Some(std::thread::spawn(move || {
                let rss = |pid| procs::status_kib(pid, "VmRSS:") / 1024.0;
                // A sample a second, from the first second on (not the process's start-up).
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let (s, c) = (rss(server_pid), rss(client));
                    if done.load(Ordering::Acquire) || c == 0.0 {
                        break;
                    }
                    samples.lock().expect("samples").push((s, c));
                }
            }));
        },
    );
    done.store(true, Ordering::Release);
    if let Some(sampler) = sampler {
        let _ = sampler.join();
    }
    let side = Side {
        bytes,
        seconds: pulled.seconds,
        server: server.usage(),
        client: pulled.usage,
    };
    let samples = samples.lock().expect("samples").clone();
    // Growth after the first quarter (warm-up: pools fill, the tile is made).
    let settled = &samples[samples.len() / 4..];
    let range = |pick: fn(&(f64, f64)) -> f64| {
        let v: Vec<f64> = settled.iter().map(pick).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    };
    let (server_rss, client_rss) = (range(|s| s.0), range(|s| s.1));
    log_pair("soak", 1, &side, None);
    let note = format!(
        "{} samples; after warm-up RSS server {:.0}-{:.0} MiB, client {:.0}-{:.0} MiB",
        samples.len(),
        server_rss.0,
        server_rss.1,
        client_rss.0,
        client_rss.1
    );
    eprintln!("soak: {note}");
    vec![Record {
        scenario: "soak".into(),
        baseline: None,
        pairs: vec![(side, None)],
        extra: json!({
            "rss_samples_mib": samples.iter().map(|s| [s.0.round(), s.1.round()]).collect::<Vec<_>>(),
            "settled_server_rss_mib": [server_rss.0, server_rss.1],
            "settled_client_rss_mib": [client_rss.0, client_rss.1],
        }),
        note: Some(note),
    }]
}

/// Time to first byte, one stream at a time, and 4 KiB streams per second with 64 in flight,
/// on a warm pooled connection of `nexus-client` in this process.
fn small(options: &Options) -> Vec<Record> {
    let (_server, address) = nexus_server(&options.backend, &options.scratch);
    let client = nexus_client::Client::new(ClientConfig {
        threads: 1,
        backend: options.backend.parse().unwrap_or_default(),
        ..ClientConfig::default()
    })
    .expect("client");
    // The same client without the first-item spin (burst.nexus.client.first.item.spin.us=0),
    // to show what the spin saves.
    let sleeper = nexus_client::Client::new(ClientConfig {
        threads: 1,
        backend: options.backend.parse().unwrap_or_default(),
        first_item_spin: Duration::ZERO,
        ..ClientConfig::default()
    })
    .expect("client");
    for c in [&client, &sleeper] {
        let mut warm = c.initiate(address, "synthetic:4KiB", StreamOptions::default());
        warm.for_each_chunk(|_| {});
    }
    let samples = if options.quick { 2_000 } else { 20_000 };
    // Time to first byte and its floor in alternating blocks of 100, so that all see the
    // same machine: here the floor alone moved from 85 to 288 us p50 within minutes.
    let mut ping = PingPong::start();
    let mut ttfb = Vec::with_capacity(samples);
    let mut ttfb_sleeping = Vec::with_capacity(samples);
    let mut floor = Vec::with_capacity(samples);
    let first_byte = |c: &nexus_client::Client| {
        let start = Instant::now();
        let mut h = c.initiate(address, "synthetic:4KiB", StreamOptions::default());
        let first = h.recv();
        let took = start.elapsed();
        assert!(matches!(first, Some(Item::Chunk(_))), "no data: {first:?}");
        h.for_each_chunk(|_| {});
        took
    };
    while ttfb.len() < samples {
        for _ in 0..100 {
            ttfb.push(first_byte(&client));
        }
        for _ in 0..100 {
            ttfb_sleeping.push(first_byte(&sleeper));
        }
        for _ in 0..100 {
            floor.push(ping.round_trip());
        }
    }
    drop(sleeper);
    ping.stop();
    let percentile = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    };
    let (p50, p99) = (percentile(&mut ttfb, 50), percentile(&mut ttfb, 99));
    let sleeping_p50 = percentile(&mut ttfb_sleeping, 50);
    let (floor_p50, floor_p99) = (percentile(&mut floor, 50), percentile(&mut floor, 99));
    let total = if options.quick { 20_000 } else { 100_000 };
    let in_flight = 64;
    let rate = small_streams_per_second(&client, address, total, in_flight);
    let note = format!(
        "time to first byte p50 {p50:.0} us, p99 {p99:.0} us ({samples} sequential; without the first-item spin p50 {sleeping_p50:.0} us); bare TCP ping-pong p50 {floor_p50:.0} us, p99 {floor_p99:.0} us: p50 ratio {:.2}x; {rate:.0} streams/s ({total}, {in_flight} in flight)",
        p50 / floor_p50
    );
    eprintln!("small: {note}");
    vec![Record {
        scenario: "small".into(),
        baseline: None,
        pairs: Vec::new(),
        extra: json!({"ttfb_p50_us": p50, "ttfb_p99_us": p99, "ttfb_no_spin_p50_us": sleeping_p50,
                      "streams_per_s": rate,
                      "tcp_ping_pong_p50_us": floor_p50, "tcp_ping_pong_p99_us": floor_p99}),
        note: Some(note),
    }]
}

/// The floor under time to first byte: 64-byte round trips over one loopback TCP connection
/// (`TCP_NODELAY`) to an echo thread in this process, one at a time.
struct PingPong {
    socket: std::net::TcpStream,
    echo: std::thread::JoinHandle<()>,
}

impl PingPong {
    fn start() -> PingPong {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let address = listener.local_addr().expect("address");
        let echo = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("accept");
            socket.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 64];
            while socket.read_exact(&mut buf).is_ok() {
                if socket.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        let socket = std::net::TcpStream::connect(address).expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        let mut ping = PingPong { socket, echo };
        // The first hundred warm the path up.
        for _ in 0..100 {
            ping.round_trip();
        }
        ping
    }

    fn round_trip(&mut self) -> Duration {
        use std::io::{Read, Write};
        let mut buf = [7u8; 64];
        let start = Instant::now();
        self.socket.write_all(&buf).expect("ping");
        self.socket.read_exact(&mut buf).expect("pong");
        start.elapsed()
    }

    fn stop(self) {
        drop(self.socket);
        let _ = self.echo.join();
    }
}

/// `total` streams of 4 KiB from `address`, `in_flight` at a time, on `client`'s pooled
/// connection; streams per second.
fn small_streams_per_second(
    client: &nexus_client::Client,
    address: SocketAddr,
    total: usize,
    in_flight: usize,
) -> f64 {
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
    total as f64 / start.elapsed().as_secs_f64()
}

/// `COUNT` small streams (as `small`, `IN_FLIGHT` at a time, 64 by default) through the
/// pooled client, from a server started by hand: the client's own cost per stream, e.g.
/// under callgrind (`bench/scripts/client-instructions.sh`), or its wake-ups with 1 in
/// flight.
fn streams_in_process(args: Vec<String>) {
    let (Some(address), Some(count), Some(in_flight)) = (
        args.first().and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(1).and_then(|n| n.parse::<usize>().ok()),
        args.get(2)
            .map_or(Some(64), |n| n.parse::<usize>().ok().filter(|&n| n > 0)),
    ) else {
        usage_exit("streams needs ADDRESS COUNT [IN_FLIGHT]");
    };
    let client = nexus_client::Client::new(ClientConfig {
        threads: 1,
        backend: std::env::var("BURST_NEXUS_IO_BACKEND")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or_default(),
        ..ClientConfig::default()
    })
    .expect("client");
    let rate = small_streams_per_second(&client, address, count, in_flight);
    println!("{count} streams, {in_flight} in flight: {rate:.0} streams/s");
}

/// Pulls streams from a server started by hand, in this process, and prints the rate.
fn pull_in_process(args: Vec<String>) {
    let Some(address) = args.first().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        usage_exit("pull needs ADDRESS PARADATA...");
    };
    let mut client = nexus_testkit::Client::connect(address);
    let start = Instant::now();
    let ids: Vec<StreamId> = args[1..].iter().map(|p| client.initiate(p)).collect();
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
}
