//! The push direction: `push` (a page-cached file into `discard:`) against `pull` of the same
//! file to /dev/null, interleaved; `push-file` (into the `file:` sink, fsync and rename
//! included) against the same pull, reported apart; and `replication`: one push against a
//! chain of three replicas over network namespaces whose links `tc tbf` caps, with a fan-out
//! from the client to the three for comparison.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nexus_testkit::spawn_serve;
use serde_json::json;

use crate::procs::{nexus_binary, nexus_pull, nexus_server, run_measured, Daemon, Usage};
use crate::report::{Record, Side};
use crate::{data_file, log_pair, Options, GIB, MIB};

/// `nexus push FILE ENDPOINT SINK` (or a manifest), run in `netns` when given. Fails the bench
/// unless every push completed.
fn nexus_push(args: &[String], netns: Option<&str>, env: &[(&str, &str)]) -> (f64, Usage) {
    let mut command = crate::netns::in_ns(netns, nexus_binary());
    command
        .arg("push")
        .args(args)
        .args(["--no-progress", "-q"])
        .env("BURST_NEXUS_CLIENT_THREADS", "1")
        .envs(env.iter().copied());
    let finished = run_measured(&mut command).expect("nexus push");
    assert!(
        finished.ok,
        "nexus push failed: {}",
        finished.stderr.chars().take(2000).collect::<String>()
    );
    (finished.seconds, finished.usage)
}

/// A server whose upload root is `root` (pushed files land there).
fn upload_server(backend: &str, root: &Path) -> (Daemon, SocketAddr) {
    let root = root.to_string_lossy().into_owned();
    let served = spawn_serve(
        &nexus_binary(),
        &[
            ("BURST_NEXUS_IO_BACKEND", backend),
            ("BURST_NEXUS_SERVER_ROOT", &root),
            ("BURST_NEXUS_SERVER_UPLOAD_ROOT", &root),
        ],
    );
    (Daemon::new(served.child), served.address)
}

fn pull_side(options: &Options, len: u64) -> Side {
    let (server, address) = nexus_server(&options.backend, &options.scratch);
    let pulled = nexus_pull(
        address,
        &["file:push.bin".to_string()],
        &options.backend,
        &[],
        &options.scratch,
    );
    Side {
        bytes: len,
        seconds: pulled.seconds,
        server: server.usage(),
        client: pulled.usage,
    }
}

fn push_side(options: &Options, file: &Path, len: u64, sink: &str, root: &Path) -> Side {
    let (server, address) = upload_server(&options.backend, root);
    let args = [
        file.to_string_lossy().into_owned(),
        address.to_string(),
        sink.to_string(),
        "--backend".into(),
        options.backend.clone(),
    ];
    let (seconds, client) = nexus_push(&args, None, &[]);
    Side {
        bytes: len,
        seconds,
        server: server.usage(),
        client,
    }
}

/// `push` to `discard:` and to `file:`, each against a pull of the same page-cached file.
pub(crate) fn push(options: &Options) -> Vec<Record> {
    let len = options.size(8 * GIB, 2 * GIB);
    let file = data_file(options, "push.bin", len, |offset, out| {
        nexus_server::synthetic::fill(5, offset, out)
    });
    let uploads = options.scratch.join("uploads");
    std::fs::create_dir_all(&uploads).expect("upload root");
    let (mut discard, mut to_file) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let pulled = pull_side(options, len);
        let pushed = push_side(options, &file, len, "discard:", &uploads);
        log_pair("push discard: vs pull", run, &pushed, Some(&pulled));
        discard.push((pushed, Some(pulled)));
        let pulled = pull_side(options, len);
        let sink = format!("file:run-{run}.bin?replace=true");
        let stored = push_side(options, &file, len, &sink, &uploads);
        let _ = std::fs::remove_file(uploads.join(format!("run-{run}.bin")));
        log_pair("push file: vs pull", run, &stored, Some(&pulled));
        to_file.push((stored, Some(pulled)));
    }
    let extra = json!({"bytes": len, "page_cache": true, "backend": options.backend});
    vec![
        Record {
            scenario: "push".into(),
            baseline: Some("pull file: (same file)".into()),
            pairs: discard,
            extra: extra.clone(),
            note: Some("nexus push of a page-cached file into discard:; target >= 0.95".into()),
        },
        Record {
            scenario: "push-file".into(),
            baseline: Some("pull file: (same file)".into()),
            pairs: to_file,
            extra,
            note: Some(format!(
                "into the file: sink under {}: written, fsync, rename; reported apart",
                uploads.display()
            )),
        },
    ]
}

/// Network namespaces for the replication scenario: `nxb-c` (the client) and `nxb-1..3`
/// (servers), each joined by a veth pair to a bridge in the root namespace, every veth end
/// capped with `tc tbf` at `rate` in its sending direction. Removed on drop.
struct Lab {
    nodes: Vec<String>,
}

const BRIDGE: &str = "nxb-br";

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

impl Lab {
    fn build(rate: &str) -> Result<Lab, String> {
        let mut lab = Lab { nodes: Vec::new() };
        lab.teardown();
        let ok = sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])
            && sh(&["ip", "link", "set", BRIDGE, "up"]);
        if !ok {
            return Err("cannot create a bridge (needs root and iproute2)".into());
        }
        for (i, node) in ["nxb-c", "nxb-1", "nxb-2", "nxb-3"].iter().enumerate() {
            let (outer, inner) = (format!("{node}-o"), format!("{node}-i"));
            let address = format!("10.231.0.{}/24", i + 1);
            let steps: Vec<Vec<&str>> = vec![
                vec!["ip", "netns", "add", node],
                vec![
                    "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
                vec!["ip", "link", "set", &inner, "netns", node],
                vec!["ip", "link", "set", &outer, "master", BRIDGE, "up"],
                vec!["ip", "-n", node, "addr", "add", &address, "dev", &inner],
                vec!["ip", "-n", node, "link", "set", &inner, "up"],
                vec!["ip", "-n", node, "link", "set", "lo", "up"],
                // Into the node (bridge side sends) and out of it (node side sends).
                vec![
                    "tc", "qdisc", "add", "dev", &outer, "root", "tbf", "rate", rate, "burst",
                    "1mb", "latency", "50ms",
                ],
                vec![
                    "ip", "netns", "exec", node, "tc", "qdisc", "add", "dev", &inner, "root",
                    "tbf", "rate", rate, "burst", "1mb", "latency", "50ms",
                ],
            ];
            lab.nodes.push(node.to_string());
            for step in steps {
                if !sh(&step) {
                    return Err(format!("setup step failed: {}", step.join(" ")));
                }
            }
        }
        Ok(lab)
    }

    fn teardown(&self) {
        for node in ["nxb-c", "nxb-1", "nxb-2", "nxb-3"] {
            let _ = Command::new("ip").args(["netns", "del", node]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{node}-o")])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `nexus serve` inside `netns` on `10.231.0.N:1270`, uploads into `root`.
fn lab_server(scratch: &Path, netns: &str, ip: &str, root: &Path, secret: &str) -> Daemon {
    let wrapper = scratch.join(format!("serve-in-{netns}"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {netns} {} \"$@\"\n",
            nexus_binary().display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let root = root.to_string_lossy().into_owned();
    let served = spawn_serve(
        &wrapper,
        &[
            ("BURST_NEXUS_SERVER_BIND", ip),
            ("BURST_NEXUS_SERVER_PORT", "1270"),
            ("BURST_NEXUS_SERVER_ROOT", &root),
            ("BURST_NEXUS_SERVER_UPLOAD_ROOT", &root),
            ("BURST_NEXUS_AUTH_SECRET", secret),
        ],
    );
    Daemon::new(served.child)
}

/// `replication`: one push to one server, against the same push along a chain of three
/// (client → 1 → 2 → 3), every link capped (1 Gbit/s by default); and a fan-out of three pushes from
/// the client, which its own link bounds near 1/3.
pub(crate) fn replication(options: &Options) -> Vec<Record> {
    // 2 cores run the client and three servers: at 2 Gbit/s per link the chain is bound by
    // CPU, not by the links (see bench/RESULTS.md). NEXUS_BENCH_LINK overrides.
    let rate = std::env::var("NEXUS_BENCH_LINK").unwrap_or_else(|_| "1gbit".into());
    let rate = rate.as_str();
    let lab = match Lab::build(rate) {
        Ok(lab) => lab,
        Err(e) => return vec![Record::skipped("replication", Some("single push"), e)],
    };
    let len = options.size(4 * GIB, 512 * MIB);
    let file = data_file(options, "replicate.bin", len, |offset, out| {
        nexus_server::synthetic::fill(9, offset, out)
    });
    // Replicas write to memory (tmpfs when /dev/shm is one): the links are the subject.
    let base = PathBuf::from("/dev/shm").join(format!("nexus-bench-{}", std::process::id()));
    let secret = "bench-secret";
    let env = [("BURST_NEXUS_AUTH_SECRET", secret)];
    let ips = ["10.231.0.2", "10.231.0.3", "10.231.0.4"];
    let endpoints: Vec<String> = ips.iter().map(|ip| format!("{ip}:1270")).collect();
    let (mut chain_pairs, mut fan_pairs) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let one_run = |mode: &str| -> Side {
            let roots: Vec<PathBuf> = (1..=3).map(|i| base.join(format!("r{i}"))).collect();
            for root in &roots {
                let _ = std::fs::remove_dir_all(root);
                std::fs::create_dir_all(root).expect("replica root");
            }
            let servers: Vec<Daemon> = (0..3)
                .map(|i| {
                    lab_server(
                        &options.scratch,
                        &lab.nodes[i + 1],
                        ips[i],
                        &roots[i],
                        secret,
                    )
                })
                .collect();
            let local = file.to_string_lossy().into_owned();
            let start = Instant::now();
            let (_, client) = match mode {
                "single" => nexus_push(
                    &[local, endpoints[0].clone(), "file:blob".into()],
                    Some("nxb-c"),
                    &env,
                ),
                "chain" => nexus_push(
                    &[
                        local,
                        "file:blob".into(),
                        "--replicas".into(),
                        endpoints.join(","),
                    ],
                    Some("nxb-c"),
                    &env,
                ),
                _ => {
                    let manifest = options.scratch.join("fanout-manifest");
                    let lines: String = endpoints
                        .iter()
                        .map(|e| format!("{local} {e} file:blob\n"))
                        .collect();
                    std::fs::write(&manifest, lines).expect("manifest");
                    let manifest = manifest.to_string_lossy().into_owned();
                    nexus_push(
                        &[
                            "--manifest".into(),
                            manifest,
                            "--parallel".into(),
                            "3".into(),
                        ],
                        Some("nxb-c"),
                        &env,
                    )
                }
            };
            let seconds = start.elapsed().as_secs_f64();
            let usage = servers
                .iter()
                .map(Daemon::usage)
                .fold(Usage::default(), |a, u| Usage {
                    cpu_s: a.cpu_s + u.cpu_s,
                    peak_rss_mib: a.peak_rss_mib.max(u.peak_rss_mib),
                });
            drop(servers);
            if mode != "single" {
                for root in &roots {
                    let got = std::fs::metadata(root.join("blob")).map(|m| m.len()).ok();
                    assert_eq!(got, Some(len), "{mode}: a replica misses the file");
                }
            }
            let _ = std::fs::remove_dir_all(&base);
            Side {
                bytes: len,
                seconds,
                server: usage,
                client,
            }
        };
        let single = one_run("single");
        let chain = one_run("chain");
        let fan = one_run("fanout");
        log_pair(
            "replication chain of 3 vs single",
            run,
            &chain,
            Some(&single),
        );
        log_pair(
            "replication fan-out to 3 vs single",
            run,
            &fan,
            Some(&single),
        );
        chain_pairs.push((chain, Some(single)));
        fan_pairs.push((fan, Some(single)));
    }
    let extra = json!({"bytes": len, "link": rate, "replicas": 3, "backend": "auto"});
    vec![
        Record {
            scenario: "replication".into(),
            baseline: Some("single push, same links".into()),
            pairs: chain_pairs,
            extra: extra.clone(),
            note: Some(format!(
                "chain client→1→2→3 (each link tbf {rate}); GB/s is the file's, per replica; \
                 server CPU summed over the 3; target >= 0.9"
            )),
        },
        Record {
            scenario: "replication-fanout".into(),
            baseline: Some("single push, same links".into()),
            pairs: fan_pairs,
            extra,
            note: Some("3 pushes from the client at once: its link is shared, ~1/3".into()),
        },
    ]
}
