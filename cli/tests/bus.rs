//! The AMQP workflow bus, as real processes: three `nexus run` nodes with the same rules on
//! one real RabbitMQ node (private, on free ports), 300 events raised through one node's
//! HTTP sensor. Every event runs exactly once when no node dies; with one node killed by
//! SIGKILL in the middle, every event still runs (duplicates counted and reported, none
//! lost); with the broker stopped for 10 s and started again, the nodes reconnect, `/readyz`
//! says when they cannot, and nothing is lost.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use nexus_testkit::{http_get, http_request, spawn_run, wait_until, RabbitMq, Running, TempDir};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

const EVENTS: usize = 300;

/// The whole of a scenario, on a loaded 2-core machine: three nodes and a broker.
const PATIENCE: Duration = Duration::from_secs(300);

fn rules(dir: &Path) -> String {
    let out = dir.join("done.log");
    let text = format!(
        r#"
[sensors.hook]
kind = "http"

[rules.work]
on = "hook"
concurrency = 4

[[rules.work.steps]]
name = "do"
retries = 0
command = {{ run = ["sh", "-c", "sleep 0.02; echo \"$NEXUS_EVENT_ID $NODE\" >> {out}"] }}
"#,
        out = out.display()
    );
    let path = dir.join("rules.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn node(broker: &RabbitMq, dir: &Path, rules: &str, name: &str) -> Running {
    let db = dir.join(format!("{name}.db"));
    spawn_run(
        Path::new(NEXUS),
        &[rules],
        &[
            ("BURST_NEXUS_WORKFLOW_BUS", &broker.url()),
            ("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap()),
            ("NODE", name),
        ],
    )
}

/// Nodes n1, n2 and n3 on `broker`, connected.
fn three_nodes(broker: &RabbitMq, dir: &Path) -> Vec<Running> {
    let rules = rules(dir);
    let nodes: Vec<Running> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| node(broker, dir, &rules, n))
        .collect();
    wait_until("the nodes to reach the broker", || nodes.iter().all(ready));
    nodes
}

fn ready(node: &Running) -> bool {
    http_get(node.admin, "/readyz").is_ok_and(|(status, _)| status == 200)
}

/// Raises event `i` on `node`'s HTTP sensor, trying again while the bus cannot take it (503).
fn raise(node: &Running, i: usize) {
    let deadline = Instant::now() + PATIENCE;
    let key = format!("e{i:04}");
    loop {
        let (status, body) = http_request(
            node.admin,
            "POST",
            "/sensors/hook",
            &[
                ("Idempotency-Key", &key),
                ("Content-Type", "application/json"),
            ],
            b"{}",
        )
        .unwrap();
        match status {
            // A fresh id is taken once, when the broker confirmed it: never a duplicate.
            202 => return,
            503 => {
                assert!(Instant::now() < deadline, "event {key} never taken: {body}");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!("POST {key}: {other} {body}"),
        }
    }
}

/// Each event id that ran, with the nodes it ran on (in order).
fn done(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(dir.join("done.log")).unwrap_or_default();
    let mut runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some((id, node)) = line.split_once(' ') {
            runs.entry(id.to_string())
                .or_default()
                .push(node.to_string());
        }
    }
    runs
}

fn wait_for_all(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let runs = done(dir);
        if runs.len() >= EVENTS {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {EVENTS} events ran",
            runs.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expected() -> BTreeSet<String> {
    (0..EVENTS).map(|i| format!("e{i:04}")).collect()
}

/// Runs beyond the first of each event, reported.
fn duplicates(runs: &BTreeMap<String, Vec<String>>) -> usize {
    let extra: usize = runs.values().map(|nodes| nodes.len() - 1).sum();
    eprintln!(
        "{extra} duplicate runs (at least once): {:?}",
        runs.iter().filter(|(_, n)| n.len() > 1).collect::<Vec<_>>()
    );
    extra
}

#[test]
fn three_nodes_run_every_event_exactly_once() {
    let broker = RabbitMq::start();
    let dir = TempDir::new("bus-once");
    let nodes = three_nodes(&broker, dir.path());
    for i in 0..EVENTS {
        raise(&nodes[0], i);
    }
    let runs = wait_for_all(dir.path());
    assert_eq!(runs.keys().cloned().collect::<BTreeSet<_>>(), expected());
    assert_eq!(duplicates(&runs), 0, "no node died: every event runs once");
    // Competing consumers: the work spread over the nodes.
    let per_node: BTreeSet<&String> = runs.values().flatten().collect();
    assert_eq!(per_node.len(), 3, "every node took some: {per_node:?}");
    wait_until("the queue to empty", || {
        broker.queue_depth("nexus.rule.work") == Some(0)
    });
}

#[test]
fn a_node_killed_mid_run_loses_no_event() {
    let broker = RabbitMq::start();
    let dir = TempDir::new("bus-kill");
    let mut nodes = three_nodes(&broker, dir.path());
    for i in 0..EVENTS {
        raise(&nodes[0], i);
    }
    wait_until("n2 to have run some", || {
        done(dir.path()).values().flatten().any(|n| n == "n2")
    });
    nodes[1].child.0.kill().unwrap();
    nodes[1].child.0.wait().unwrap();
    let runs = wait_for_all(dir.path());
    assert_eq!(runs.keys().cloned().collect::<BTreeSet<_>>(), expected());
    // At least once: what n2 held unacked ran again elsewhere; counted and reported.
    let extra = duplicates(&runs);
    assert!(extra <= 4, "at most n2's prefetch ran twice: {extra}");
    wait_until("the queue to empty", || {
        broker.queue_depth("nexus.rule.work") == Some(0)
    });
}

#[test]
fn the_nodes_come_back_after_the_broker_is_down_for_ten_seconds() {
    let mut broker = RabbitMq::start();
    let dir = TempDir::new("bus-outage");
    let nodes = three_nodes(&broker, dir.path());
    for i in 0..EVENTS / 2 {
        raise(&nodes[0], i);
    }
    broker.stop();
    wait_until("the nodes to see the broker gone", || {
        nodes.iter().all(|n| !ready(n))
    });
    let (status, body) = http_get(nodes[0].admin, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("broker"), "{body}");
    // While it is down an event is refused (the sender tries again), not lost.
    let (status, _) = http_request(
        nodes[0].admin,
        "POST",
        "/sensors/hook",
        &[
            ("Idempotency-Key", "refused"),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    )
    .unwrap();
    assert_eq!(status, 503);
    // The outage itself: ten seconds of a broker that is gone.
    std::thread::sleep(Duration::from_secs(10));
    broker.boot();
    wait_until("the nodes to reconnect", || nodes.iter().all(ready));
    for i in EVENTS / 2..EVENTS {
        raise(&nodes[0], i);
    }
    let runs = wait_for_all(dir.path());
    assert_eq!(runs.keys().cloned().collect::<BTreeSet<_>>(), expected());
    duplicates(&runs);
}

#[test]
fn a_run_that_fails_for_good_sends_its_event_to_the_dead_letter_queue() {
    let broker = RabbitMq::start();
    let dir = TempDir::new("bus-dead");
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        r#"
[sensors.hook]
kind = "http"

[rules.bad]
on = "hook"

[[rules.bad.steps]]
name = "fail"
retries = 0
command = { run = ["sh", "-c", "exit 3"] }
"#,
    )
    .unwrap();
    let one = node(&broker, dir.path(), path.to_str().unwrap(), "n1");
    wait_until("the node to reach the broker", || ready(&one));
    raise(&one, 0);
    wait_until("the event in the dead-letter queue", || {
        broker.queue_depth("nexus.dead.bad") == Some(1)
    });
    assert_eq!(broker.queue_depth("nexus.rule.bad"), Some(0));
}
