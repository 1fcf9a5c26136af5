//! `nexus run`, `nexus runs` and `nexus serve --rules` as real processes: a file that lands is
//! pulled, piped into a command and verified, and a rule follows another; a run killed with
//! SIGKILL resumes and the file sensor's rescan sees what changed while it was down; the HTTP
//! sensor's token, limits and schema; stream ends as events and the `events:` source; missed
//! timer ticks.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nexus_testkit::{
    http_get, http_request, json_stdout, scrape_sample, spawn_run, spawn_serve, spawn_serve_with,
    stderr_of, wait_until, write_pattern_file, TempDir,
};
use serde_json::Value;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

fn nexus(args: &[&str]) -> Output {
    Command::new(NEXUS)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `nexus runs --json --db DB`.
fn runs(db: &Path) -> Vec<Value> {
    let out = nexus(&["runs", "--json", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    json_stdout(&out).as_array().unwrap().clone()
}

fn runs_of<'a>(all: &'a [Value], rule: &str) -> Vec<&'a Value> {
    all.iter().filter(|r| r["rule"] == rule).collect()
}

fn write_rules(dir: &Path, text: &str) -> String {
    let path = dir.join("rules.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Puts a file into a watched directory in one step (written beside it, then renamed).
fn land(dir: &Path, name: &str, data: &[u8]) {
    let staging = dir.parent().unwrap().join(format!(".staging-{name}"));
    std::fs::write(&staging, data).unwrap();
    std::fs::rename(&staging, dir.join(name)).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn check_says_good_or_names_every_problem_and_exits_2() {
    let dir = TempDir::new("wf-check");
    let good = write_rules(
        dir.path(),
        r#"
[sensors.tick]
kind = "timer"
every = "1h"

[rules.r]
on = "tick"

[[rules.r.steps]]
name = "s"
command = { run = ["echo", "{{ event.payload.scheduled }}"] }
"#,
    );
    let out = nexus(&["run", "--check", &good]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("good (3 sensors, 1 rules)"));
    let text = read(Path::new(&good))
        .replace("scheduled }}", "sheduled }}")
        .replace(
            "on = \"tick\"",
            "on = \"tick\"\nfilter = { missed = \"many\" }",
        );
    let bad = write_rules(dir.path(), &text);
    let out = nexus(&["run", "--check", &bad]);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr_of(&out);
    assert!(
        e.contains("rules.r.filter.missed: \"many\" can never match"),
        "{e}"
    );
    assert!(
        e.contains("rules.r.steps (s).command.run[1]: {{ event.payload.sheduled }}: payload field \"sheduled\" is not in the schema"),
        "{e}"
    );
    let out = nexus(&["run", "--check", "/nonexistent/rules.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_landed_file_is_pulled_piped_into_a_command_verified_and_followed() {
    let dir = TempDir::new("wf-land");
    let inbox = dir.path().join("inbox");
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::create_dir_all(&out_dir).unwrap();
    let uploads = dir.path().join("uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    let server = spawn_serve(
        Path::new(NEXUS),
        &[
            ("BURST_NEXUS_SERVER_ROOT", inbox.to_str().unwrap()),
            ("BURST_NEXUS_SERVER_UPLOAD_ROOT", uploads.to_str().unwrap()),
        ],
    );
    let endpoint = server.address.to_string();
    let rules = write_rules(
        dir.path(),
        &format!(
            r#"
[sensors.landing]
kind = "file"
path = "{inbox}"
debounce = "100ms"

[rules.fetch]
on = "landing"
filter = {{ change = "created" }}

[[rules.fetch.steps]]
name = "get"
pull = {{ endpoint = "{endpoint}", paradata = "file:{{{{ event.payload.relative }}}}", output = "{out}/" }}

[[rules.fetch.steps]]
name = "pipe"
after = ["get"]
command = {{ run = ["sh", "-c", "cat > \"$NEXUS_PAYLOAD_NAME.piped\"; echo \"$NEXUS_EVENT_ID $NEXUS_RULE\" > \"$NEXUS_PAYLOAD_NAME.env\""], dir = "{out}", stdin = {{ endpoint = "{endpoint}", paradata = "file:{{{{ event.payload.relative }}}}" }} }}

[[rules.fetch.steps]]
name = "copy"
after = ["get"]
push = {{ file = "{{{{ steps.get.path }}}}", endpoint = "{endpoint}", sink = "file:copies/{{{{ event.payload.name }}}}" }}

[[rules.fetch.steps]]
name = "verify"
after = ["get"]
checksum = {{ endpoint = "{endpoint}", paradata = "file:{{{{ event.payload.relative }}}}", digest = "{{{{ steps.get.digest }}}}" }}

[rules.then]
on = "runs"
filter = {{ rule = "fetch", state = "success" }}

[[rules.then.steps]]
name = "note"
command = {{ run = ["sh", "-c", "echo \"$1\" >> {out}/followed", "-", "{{{{ event.payload.steps.get.path }}}}"] }}
"#,
            inbox = inbox.display(),
            out = out_dir.display(),
        ),
    );
    let db = dir.path().join("state.db");
    let running = spawn_run(
        Path::new(NEXUS),
        &[&rules],
        &[("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap())],
    );
    let source = dir.path().join("data.bin");
    let data = write_pattern_file(&source, 3 << 20, 19);
    land(&inbox, "data.bin", &data);
    wait_until("both rules to succeed", || {
        let all = runs(&db);
        runs_of(&all, "then")
            .iter()
            .any(|r| r["state"] == "success")
    });
    let all = runs(&db);
    let fetch = runs_of(&all, "fetch");
    assert_eq!(fetch.len(), 1, "{all:?}");
    let run = fetch[0];
    assert_eq!(run["state"], "success", "{run}");
    assert_eq!(std::fs::read(out_dir.join("data.bin")).unwrap(), data);
    assert_eq!(std::fs::read(out_dir.join("data.bin.piped")).unwrap(), data);
    let event = run["event"].as_str().unwrap();
    assert_eq!(
        read(&out_dir.join("data.bin.env")),
        format!("{event} fetch\n")
    );
    let get = &run["steps"][0];
    assert_eq!(get["name"], "get");
    assert_eq!(get["result"]["bytes"], data.len());
    let digest = format!("{:016x}", nexus_testkit::digest(&data));
    assert_eq!(get["result"]["digest"], digest.as_str());
    let verify = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "verify")
        .unwrap();
    assert_eq!(verify["result"]["digest"], digest.as_str());
    assert_eq!(
        read(&out_dir.join("followed")).trim(),
        out_dir.join("data.bin").to_str().unwrap()
    );
    // No part file is left behind.
    assert!(!out_dir.join("data.bin.nexus-part").exists());
    assert_eq!(
        std::fs::read(uploads.join("copies/data.bin")).unwrap(),
        data
    );
    // Each stream a step moved (three pulls and a push) is an event of `streams`.
    assert!(
        scrape_sample(
            running.admin,
            "nexus_workflow_events_total{sensor=\"streams\",result=\"accepted\"}"
        ) >= 4.0
    );
}

#[test]
fn a_killed_run_resumes_and_the_rescan_sees_what_changed_while_down() {
    let dir = TempDir::new("wf-resume");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let log = dir.path().join("log");
    let gate = dir.path().join("gate");
    let rules = write_rules(
        dir.path(),
        &format!(
            r#"
[sensors.landing]
kind = "file"
path = "{inbox}"
debounce = "50ms"

[rules.note]
on = "landing"

[[rules.note.steps]]
name = "log"
command = {{ run = ["sh", "-c", "if [ \"$NEXUS_PAYLOAD_NAME\" = slow ]; then echo started > {dir}/slow-started; while [ ! -e {gate} ]; do sleep 0.01; done; fi; echo \"$NEXUS_PAYLOAD_CHANGE $NEXUS_PAYLOAD_RELATIVE\" >> {log}"] }}
"#,
            inbox = inbox.display(),
            dir = dir.path().display(),
            gate = gate.display(),
            log = log.display(),
        ),
    );
    let db = dir.path().join("state.db");
    let env = [("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap())];
    // A file there before the first start is found by the first scan.
    std::fs::write(inbox.join("known"), b"1").unwrap();
    let run = spawn_run(Path::new(NEXUS), &[&rules], &env);
    wait_until("the first file's event", || {
        read(&log).contains("created known")
    });
    land(&inbox, "slow", b"2");
    wait_until("the slow step to start", || {
        dir.path().join("slow-started").exists()
    });
    let slow_run = runs(&db)
        .into_iter()
        .find(|r| r["state"] == "started")
        .expect("the slow run is open");
    drop(run); // SIGKILL
               // While it is down: one file comes, one goes.
    std::fs::write(inbox.join("new"), b"3").unwrap();
    std::fs::remove_file(inbox.join("known")).unwrap();
    let _run = spawn_run(Path::new(NEXUS), &[&rules], &env);
    wait_until("the changes made while down", || {
        let text = read(&log);
        text.contains("created new") && text.contains("deleted known")
    });
    std::fs::write(&gate, b"").unwrap();
    wait_until("the resumed run", || read(&log).contains("created slow"));
    std::fs::write(inbox.join("new"), b"a longer text").unwrap();
    wait_until("the update", || read(&log).contains("updated new"));
    wait_until("every run to end", || {
        runs(&db).iter().all(|r| r["state"] == "success")
    });
    let text = read(&log);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "created known",
            "created new",
            "created slow",
            "deleted known",
            "updated new",
        ],
        "each change once: no duplicate from the replay"
    );
    let resumed = runs(&db)
        .into_iter()
        .find(|r| r["id"] == slow_run["id"])
        .unwrap();
    assert_eq!(resumed["state"], "success");
    assert_eq!(resumed["steps"][0]["attempts"], 2, "{resumed}");
    assert_eq!(runs(&db).len(), 5);
}

#[test]
fn the_http_sensor_takes_authorised_valid_bodies_and_lists_runs() {
    let dir = TempDir::new("wf-http");
    let rules = write_rules(
        dir.path(),
        r#"
[sensors.hook]
kind = "http"
schema = { type = "object", required = ["file"], properties = { file = { type = "string" } } }

[rules.r]
on = "hook"

[[rules.r.steps]]
name = "s"
command = { run = ["true"] }
"#,
    );
    let db = dir.path().join("state.db");
    let run = spawn_run(
        Path::new(NEXUS),
        &[&rules],
        &[
            ("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap()),
            ("BURST_NEXUS_AUTH_SECRET", "s3cret-s3cret-s3cret"),
            ("BURST_NEXUS_WORKFLOW_HTTP_BODY_MAX", "1KiB"),
        ],
    );
    let admin = run.admin;
    let post = |headers: &[(&str, &str)], body: &[u8]| {
        http_request(admin, "POST", "/sensors/hook", headers, body).unwrap()
    };
    let token = ("Authorization", "Bearer s3cret-s3cret-s3cret");
    let (status, _) = post(&[], br#"{"file": "a"}"#);
    assert_eq!(status, 401);
    let (status, _) = post(&[("Authorization", "Bearer wrong")], br#"{"file": "a"}"#);
    assert_eq!(status, 401);
    let (status, body) = post(&[token], br#"{"file": 3}"#);
    assert_eq!(status, 400);
    assert!(
        body.contains("/file: 3 is not of type \"string\""),
        "{body}"
    );
    let (status, body) = post(&[token], b"{not json");
    assert_eq!((status, body.contains("not JSON")), (400, true), "{body}");
    let big = format!(r#"{{"file": "{}"}}"#, "x".repeat(4096));
    let (status, _) = post(&[token], big.as_bytes());
    assert_eq!(status, 413);
    let (status, _) = http_request(admin, "POST", "/sensors/nope", &[token], b"{}").unwrap();
    assert_eq!(status, 404);
    let keyed = [token, ("Idempotency-Key", "job-1")];
    let (status, body) = post(&keyed, br#"{"file": "a"}"#);
    assert_eq!(status, 202, "{body}");
    let accepted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(accepted["id"], "job-1");
    let (status, body) = post(&keyed, br#"{"file": "a"}"#);
    assert_eq!(status, 200);
    assert!(body.contains("\"duplicate\":true"), "{body}");
    wait_until("the run to succeed", || {
        let (_, body) = http_get(admin, "/runs?state=success").unwrap();
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let (_, body) = http_get(admin, "/runs?rule=r").unwrap();
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["id"], accepted["runs"][0]);
    assert_eq!(listed[0]["event"], "job-1");
    let (status, _) = http_get(admin, "/runs?state=bogus").unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        scrape_sample(
            admin,
            "nexus_workflow_events_total{sensor=\"hook\",result=\"invalid\"}"
        ),
        1.0
    );
    assert_eq!(
        scrape_sample(
            admin,
            "nexus_workflow_events_total{sensor=\"hook\",result=\"duplicate\"}"
        ),
        1.0
    );
    // The state is an SQLite file an operator reads with sqlite3, while nexus runs.
    let out = Command::new("sqlite3")
        .args([
            "-readonly",
            db.to_str().unwrap(),
            "SELECT rule || '|' || state FROM runs; PRAGMA journal_mode; PRAGMA user_version;",
        ])
        .output()
        .expect("sqlite3 (scripts/test installs it)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "r|success\nwal\n2\n",
        "{}",
        stderr_of(&out)
    );
    // nexus runs filters too.
    let out = nexus(&[
        "runs",
        "--db",
        db.to_str().unwrap(),
        "--state",
        "failed",
        "--json",
    ]);
    assert_eq!(json_stdout(&out), serde_json::json!([]));
    let out = nexus(&["runs", "--db", db.to_str().unwrap(), "--rule", "r"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hook/job-1"));
}

#[test]
fn a_server_with_rules_turns_streams_into_events_and_serves_its_event_log() {
    let dir = TempDir::new("wf-serve");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let data = write_pattern_file(&root.join("a.bin"), 100_000, 3);
    let seen = dir.path().join("seen");
    let rules = write_rules(
        dir.path(),
        &format!(
            r#"
[sensors.hook]
kind = "http"

[rules.served]
on = "streams"
filter = {{ side = "server", direction = "pull", outcome = "complete", paradata = "file:a.bin" }}

[[rules.served.steps]]
name = "note"
command = {{ run = ["sh", "-c", "echo \"$NEXUS_PAYLOAD_DIGEST $NEXUS_PAYLOAD_BYTES\" >> {seen}"] }}
"#,
            seen = seen.display()
        ),
    );
    let db = dir.path().join("state.db");
    let server = spawn_serve_with(
        Path::new(NEXUS),
        &["--rules", &rules],
        &[
            ("BURST_NEXUS_SERVER_ROOT", root.to_str().unwrap()),
            ("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap()),
        ],
    );
    let endpoint = server.address.to_string();
    let admin = server.admin.unwrap();
    let out = nexus(&[
        "pull",
        &endpoint,
        "file:a.bin",
        "-o",
        dir.path().join("a.out").to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let digest = format!("{:016x}", nexus_testkit::digest(&data));
    wait_until("the stream's event to run its rule", || {
        !read(&seen).is_empty()
    });
    assert_eq!(read(&seen), format!("{digest} {}\n", data.len()));

    // The event log as a stream: what is there, then live.
    for (id, n) in [("h1", 1), ("h2", 2)] {
        let body = format!("{{\"n\": {n}}}");
        let (status, _) = http_request(
            admin,
            "POST",
            "/sensors/hook",
            &[("Idempotency-Key", id)],
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(status, 202);
    }
    let mut feed = Command::new(NEXUS)
        .args(["pull", &endpoint, "events:hook", "-o", "-", "-q"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(feed.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    assert_eq!(next()["id"], "h1");
    let second = next();
    assert_eq!(
        (second["id"].as_str(), second["payload"]["n"].as_i64()),
        (Some("h2"), Some(2))
    );
    let (status, _) = http_request(
        admin,
        "POST",
        "/sensors/hook",
        &[("Idempotency-Key", "h3")],
        b"{\"n\": 3}",
    )
    .unwrap();
    assert_eq!(status, 202);
    assert_eq!(
        next()["id"],
        "h3",
        "a new event reaches a reader that is waiting"
    );
    let _ = feed.kill();
    let _ = feed.wait();

    // Resumed after an id; an id that does not exist fails at once.
    let mut after = Command::new(NEXUS)
        .args(["pull", &endpoint, "events:hook?after=h2", "-o", "-", "-q"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(after.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["id"], "h3");
    let _ = after.kill();
    let _ = after.wait();
    let out = nexus(&["pull", &endpoint, "events:hook?after=nope", "-o", "-"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr_of(&out).contains("not_found: sensor \"hook\" has no event \"nope\""),
        "{}",
        stderr_of(&out)
    );
}

/// A timer sensor ticking every 100 ms (plus `sensor_extra`) whose rule (plus `rule_extra`)
/// appends `$NEXUS_PAYLOAD_<FIELD>` of each tick to a log: the rules file, the log, and the
/// state database to use.
fn logging_timer(
    dir: &Path,
    sensor_extra: &str,
    rule_extra: &str,
    field: &str,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join("log");
    let rules = write_rules(
        dir,
        &format!(
            r#"
[sensors.tick]
kind = "timer"
every = "100ms"
{sensor_extra}

[rules.r]
on = "tick"
{rule_extra}

[[rules.r.steps]]
name = "s"
command = {{ run = ["sh", "-c", "echo $NEXUS_PAYLOAD_{field} >> {log}"] }}
"#,
            log = log.display()
        ),
    );
    (rules, log, dir.join("state.db"))
}

/// Runs `nexus run RULES` until `started` holds, kills it, and stays down `down_ms`: the
/// ticks of that time fall while nothing runs.
fn run_then_stay_down(rules: &str, env: &[(&str, &str)], started: impl Fn() -> bool, down_ms: u64) {
    let run = spawn_run(Path::new(NEXUS), &[rules], env);
    wait_until("a tick", started);
    drop(run);
    let down = Instant::now();
    wait_until("time to pass", || {
        down.elapsed() >= Duration::from_millis(down_ms)
    });
}

#[test]
fn a_timer_reports_the_ticks_that_fell_while_it_was_down() {
    let dir = TempDir::new("wf-timer");
    let (rules, log, db) = logging_timer(dir.path(), "", "", "MISSED");
    let env = [("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap())];
    // Let at least five intervals fall while nothing runs.
    run_then_stay_down(&rules, &env, || !read(&log).is_empty(), 500);
    let before = read(&log).lines().count();
    let run = spawn_run(Path::new(NEXUS), &[&rules], &env);
    // A run left open by the kill may finish first (with missed = 0); the first new tick
    // says how many fell.
    let fell = |text: &str| -> Vec<u64> {
        text.lines()
            .skip(before)
            .map(|l| l.trim().parse().unwrap())
            .filter(|n| *n > 0)
            .collect()
    };
    wait_until("the first tick after the restart", || {
        !fell(&read(&log)).is_empty()
    });
    let text = read(&log);
    assert!(
        fell(&text)[0] >= 3,
        "the first tick after the restart says how many fell: {text}"
    );
    assert!(
        scrape_sample(
            run.admin,
            "nexus_workflow_sensor_missed_ticks_total{sensor=\"tick\"}"
        ) >= 3.0
    );
    assert!(run
        .log
        .lock()
        .iter()
        .any(|l| l.contains("Ticks fell while the process was down")));
}

/// The example in deploy/ (and WORKFLOW.md's pointer to it) stays a valid rules file.
#[test]
fn the_deploy_example_passes_the_check() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/workflow/rules.example.toml"
    );
    let out = nexus(&["run", "--check", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

/// A push step to replicas: under a quorum it succeeds with a dead replica and lists each
/// replica's state; without one (all must commit) the dead replica fails it.
#[test]
fn a_push_step_replicates_and_holds_its_quorum() {
    let dir = TempDir::new("wf-replicas");
    let servers: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let root = dir.path().join(name);
            std::fs::create_dir_all(&root).unwrap();
            spawn_serve(
                Path::new(NEXUS),
                &[
                    ("BURST_NEXUS_SERVER_ROOT", root.to_str().unwrap()),
                    ("BURST_NEXUS_SERVER_UPLOAD_ROOT", root.to_str().unwrap()),
                ],
            )
        })
        .collect();
    // A replica that is not there: a port that was free a moment ago.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let local = dir.path().join("local.bin");
    let data = write_pattern_file(&local, 1 << 20, 5);
    let (a, b) = (servers[0].address, servers[1].address);
    let rules = write_rules(
        dir.path(),
        &format!(
            r#"
[sensors.hook]
kind = "http"
schema = {{ type = "object", required = ["name", "quorum"], properties = {{ name = {{ type = "string", pattern = "^[a-z]+$" }}, quorum = {{ type = "boolean" }} }} }}

[rules.quorum]
on = "hook"
filter = {{ quorum = true }}

[[rules.quorum.steps]]
name = "copy"
retries = 0
push = {{ file = "{local}", endpoint = "{a}", sink = "file:{{{{ event.payload.name }}}}", replicas = ["{b}", "{dead}"], quorum = 2 }}

[rules.all]
on = "hook"
filter = {{ quorum = false }}

[[rules.all.steps]]
name = "copy"
retries = 0
push = {{ file = "{local}", endpoint = "{a}", sink = "file:{{{{ event.payload.name }}}}", replicas = ["{b}", "{dead}"] }}
"#,
            local = local.display()
        ),
    );
    let db = dir.path().join("state.db");
    let run = spawn_run(
        Path::new(NEXUS),
        &[&rules],
        &[("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap())],
    );
    for body in [
        r#"{"name": "q", "quorum": true}"#,
        r#"{"name": "all", "quorum": false}"#,
    ] {
        let (status, answer) =
            http_request(run.admin, "POST", "/sensors/hook", &[], body.as_bytes()).unwrap();
        assert_eq!(status, 202, "{answer}");
    }
    wait_until("both runs to end", || {
        let all = runs(&db);
        all.len() == 2
            && all
                .iter()
                .all(|r| r["state"] == "success" || r["state"] == "failed")
    });
    let all = runs(&db);
    let quorum = runs_of(&all, "quorum")[0];
    assert_eq!(quorum["state"], "success", "{quorum}");
    let states: Vec<&str> = quorum["steps"][0]["result"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states[..2], ["committed", "committed"]);
    assert_ne!(states[2], "committed");
    for name in ["a", "b"] {
        assert_eq!(
            std::fs::read(dir.path().join(name).join("q")).unwrap(),
            data
        );
    }
    let every = runs_of(&all, "all")[0];
    assert_eq!(every["state"], "failed", "{every}");
    assert!(
        every["error"].as_str().unwrap().contains(&dead.to_string()),
        "{every}"
    );
    for name in ["a", "b"] {
        assert!(
            !dir.path().join(name).join("all").exists(),
            "nothing kept on {name}"
        );
    }
}

/// With `burst.nexus.workflow.streams.events = rules`, only the stream ends a rule wants
/// become events.
#[test]
fn only_the_stream_ends_a_rule_wants_are_recorded_when_asked() {
    let dir = TempDir::new("wf-streams-rules");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    for name in ["a.bin", "b.bin"] {
        write_pattern_file(&root.join(name), 1000, 1);
    }
    let rules = write_rules(
        dir.path(),
        r#"
[rules.b]
on = "streams"
filter = { paradata = "file:b.bin", outcome = "complete" }

[[rules.b.steps]]
name = "s"
command = { run = ["true"] }
"#,
    );
    let db = dir.path().join("state.db");
    let server = spawn_serve_with(
        Path::new(NEXUS),
        &["--rules", &rules],
        &[
            ("BURST_NEXUS_SERVER_ROOT", root.to_str().unwrap()),
            ("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap()),
            ("BURST_NEXUS_WORKFLOW_STREAMS_EVENTS", "rules"),
        ],
    );
    let endpoint = server.address.to_string();
    for name in ["a.bin", "b.bin"] {
        let out = nexus(&[
            "pull",
            &endpoint,
            &format!("file:{name}"),
            "-o",
            "/dev/null",
            "-q",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    }
    wait_until("the rule on b.bin to run", || {
        runs(&db).iter().any(|r| r["state"] == "success")
    });
    let series = "nexus_workflow_events_total{sensor=\"streams\",result=\"accepted\"}";
    assert_eq!(scrape_sample(server.admin.unwrap(), series), 1.0);
}

/// `missed = "catch_up"`: every tick that fell while the process was down is raised after
/// the restart, so the ticks seen form one unbroken sequence.
#[test]
fn a_catch_up_timer_raises_every_tick_that_fell() {
    let dir = TempDir::new("wf-catch-up");
    let (rules, log, db) = logging_timer(
        dir.path(),
        "missed = \"catch_up\"",
        "concurrency = 8",
        "SCHEDULED_MS",
    );
    let env = [("BURST_NEXUS_WORKFLOW_STATE", db.to_str().unwrap())];
    let ticks = || -> Vec<i64> {
        let mut v: Vec<i64> = read(&log)
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    run_then_stay_down(&rules, &env, || !ticks().is_empty(), 600);
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let _run = spawn_run(Path::new(NEXUS), &[&rules], &env);
    // Runs end in any order: wait for a tick after the restart, then for the gaps to fill.
    wait_until("a tick after the restart", || {
        ticks().last().is_some_and(|t| *t > restarted)
    });
    wait_until("every tick between the first and the last", || {
        let t = ticks();
        t.windows(2).all(|w| w[1] - w[0] == 100)
    });
    let t = ticks();
    assert!(
        t.len() >= 7,
        "at least the six that fell while down, and one after: {t:?}"
    );
}
