//! `bus`: events per second through the AMQP workflow bus (a private RabbitMQ node,
//! publisher confirms, manual acks), with 1 and 3 `nexus run` nodes consuming, against the
//! embedded workflow (one node, no broker) in the same run. N events are POSTed by 8
//! clients at once to one node's HTTP sensor (each answered once the broker confirmed it,
//! or, embedded, once recorded); each runs
//! a one-step rule (`sh -c 'echo ID >> FILE'`, the same in every setup). Reported: the
//! POST rate (publish with confirm) and the end-to-end rate (first POST to last run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_testkit::{http_get, http_request, spawn_run, RabbitMq, Running};
use serde_json::json;

use crate::procs::nexus_binary;
use crate::report::Record;
use crate::Options;

/// Clients POSTing at once.
const POSTERS: usize = 8;

/// The rules of one setup: its rule (and so its queue) named after it, so that what one
/// setup left on the broker never reaches the next.
fn rules(dir: &Path, tag: &str) -> PathBuf {
    let text = format!(
        r#"
[sensors.hook]
kind = "http"

[rules.work-{tag}]
on = "hook"
concurrency = 8

[[rules.work-{tag}.steps]]
name = "do"
retries = 0
command = {{ run = ["sh", "-c", "echo \"$NEXUS_EVENT_ID\" >> {}"] }}
"#,
        dir.join("done.log").display()
    );
    let path = dir.join("rules.toml");
    std::fs::write(&path, text).expect("rules");
    path
}

/// (POSTs per second, runs per second end to end) for `nodes` nodes on `bus`.
fn rate(
    options: &Options,
    tag: &str,
    bus: Option<&RabbitMq>,
    nodes: usize,
    events: usize,
) -> (f64, f64) {
    let dir = options.scratch.join(format!("bus-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let rules = rules(&dir, tag);
    let url = bus.map_or_else(|| "embedded".to_string(), RabbitMq::url);
    let running: Vec<Running> = (0..nodes)
        .map(|i| {
            let db = dir.join(format!("n{i}.db"));
            spawn_run(
                &nexus_binary(),
                &[rules.to_str().expect("utf-8")],
                &[
                    ("BURST_NEXUS_WORKFLOW_BUS", url.as_str()),
                    ("BURST_NEXUS_WORKFLOW_STATE", db.to_str().expect("utf-8")),
                ],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !running
        .iter()
        .all(|n| http_get(n.admin, "/readyz").is_ok_and(|(s, _)| s == 200))
    {
        assert!(Instant::now() < deadline, "the nodes never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let admin = running[0].admin;
    std::thread::scope(|scope| {
        for t in 0..POSTERS {
            scope.spawn(move || {
                for i in (t..events).step_by(POSTERS) {
                    let key = format!("b{i}");
                    let (status, body) = http_request(
                        admin,
                        "POST",
                        "/sensors/hook",
                        &[
                            ("Idempotency-Key", &key),
                            ("Content-Type", "application/json"),
                        ],
                        b"{}",
                    )
                    .expect("POST");
                    assert_eq!(status, 202, "{tag}: {body}");
                }
            });
        }
    });
    let posted = started.elapsed().as_secs_f64();
    let log = dir.join("done.log");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let lines = std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= events {
            break;
        }
        assert!(Instant::now() < deadline, "{lines} of {events} runs ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = started.elapsed().as_secs_f64();
    drop(running);
    (events as f64 / posted, events as f64 / total)
}

/// The `bus` scenario.
pub(crate) fn bus(options: &Options) -> Vec<Record> {
    let events = if options.quick { 200 } else { 2000 };
    if !Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
        && !crate::baselines::ensure_apt("rabbitmq-plugins", "rabbitmq-server")
    {
        eprintln!("bus: skipped: rabbitmq-server could not be installed");
        return Vec::new();
    }
    let broker = RabbitMq::start();
    let mut records = Vec::new();
    let (embedded_post, embedded) = rate(options, "embedded", None, 1, events);
    for nodes in [1usize, 3] {
        let (post, end) = rate(
            options,
            &format!("amqp-{nodes}"),
            Some(&broker),
            nodes,
            events,
        );
        let note = format!(
            "{events} events, one-step runs: {nodes} node(s) on RabbitMQ take {post:.0} POST/s \
             (publish + confirm) and run {end:.0} events/s end to end; embedded (1 node, no broker) \
             {embedded_post:.0} POST/s, {embedded:.0} events/s: {:.2}x",
            end / embedded
        );
        eprintln!("bus-{nodes}: {note}");
        records.push(Record {
            scenario: format!("bus-{nodes}"),
            baseline: Some("embedded workflow, 1 node".into()),
            pairs: Vec::new(),
            extra: json!({"events": events, "nodes": nodes, "post_per_s": post, "events_per_s": end,
                          "embedded_post_per_s": embedded_post, "embedded_events_per_s": embedded,
                          "ratio": end / embedded}),
            note: Some(note),
        });
    }
    records
}
