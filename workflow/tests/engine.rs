//! The engine through its library API, with real commands and a real SQLite file: the step
//! graph, retries, timeouts, the step concurrency limit, and a stop in the middle of a run
//! resumed by the next start without a duplicate.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use nexus_testkit::{wait_until, TempDir};
use nexus_workflow::{Raised, RunView, State, Store, Workflow};
use serde_json::json;

mod common;

fn start(dir: &Path, rules: &str) -> Workflow {
    common::start_with(common::config(dir), rules)
}

fn run_of(workflow: &Workflow, id: i64) -> Option<RunView> {
    workflow
        .runs(None, None, 1000)
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
}

fn wait_for_end(workflow: &Workflow, id: i64) -> RunView {
    wait_until("the run to end", || {
        run_of(workflow, id).is_some_and(|r| matches!(r.state, State::Success | State::Failed))
    });
    run_of(workflow, id).unwrap()
}

fn raise(workflow: &Workflow, id: &str) -> i64 {
    match workflow.raise("hook", Some(id.into()), json!({})).unwrap() {
        Raised::New { runs, .. } => {
            assert_eq!(runs.len(), 1);
            runs[0]
        }
        other => panic!("{other:?}"),
    }
}

fn step<'a>(run: &'a RunView, name: &str) -> &'a nexus_workflow::store::StepView {
    run.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {run:?}"))
}

#[test]
fn a_failing_step_is_retried_then_fails_the_run_and_skips_what_follows() {
    let dir = TempDir::new("wf-retry");
    let rules = r#"
[sensors.hook]
kind = "http"

[rules.r]
on = "hook"

[[rules.r.steps]]
name = "first"
command = { run = ["true"] }

[[rules.r.steps]]
name = "flaky"
after = ["first"]
retries = 2
backoff = "10ms"
command = { run = ["sh", "-c", "echo try >> tries; echo broken >&2; exit 3"], dir = "{{ rule }}" }

[[rules.r.steps]]
name = "last"
after = ["flaky"]
command = { run = ["true"] }
"#;
    std::fs::create_dir(dir.path().join("r")).unwrap();
    let rules = rules.replace("{{ rule }}", dir.path().join("r").to_str().unwrap());
    let workflow = start(dir.path(), &rules);
    let run = wait_for_end(&workflow, raise(&workflow, "e1"));
    assert_eq!(run.state, State::Failed);
    assert_eq!(step(&run, "first").state, State::Success);
    let flaky = step(&run, "flaky");
    assert_eq!((flaky.state, flaky.attempts), (State::Failed, 3));
    let error = flaky.error.as_deref().unwrap();
    assert!(error.contains("exited with status 3: broken"), "{error}");
    assert_eq!(step(&run, "last").state, State::Skipped);
    assert!(
        run.error.as_deref().unwrap().starts_with("flaky: "),
        "{run:?}"
    );
    let tries = std::fs::read_to_string(dir.path().join("r/tries")).unwrap();
    assert_eq!(tries.lines().count(), 3);
}

#[test]
fn a_step_past_its_timeout_is_killed_and_fails() {
    let dir = TempDir::new("wf-timeout");
    let rules = r#"
[sensors.hook]
kind = "http"

[rules.r]
on = "hook"

[[rules.r.steps]]
name = "slow"
retries = 0
timeout = "300ms"
command = { run = ["sh", "-c", "sleep 600"] }
"#;
    let workflow = start(dir.path(), rules);
    let run = wait_for_end(&workflow, raise(&workflow, "e1"));
    assert_eq!(run.state, State::Failed);
    let error = step(&run, "slow").error.clone().unwrap();
    assert!(error.contains("killed after"), "{error}");
}

#[test]
fn independent_steps_run_side_by_side_and_a_step_limit_holds_across_runs() {
    let dir = TempDir::new("wf-limit");
    // `guarded` fails if another copy of it holds the lock directory: with concurrency = 1
    // it never does, however the four runs interleave. `a` and `b` wait for each other, so
    // they pass only when they run at the same time.
    let rules = format!(
        r#"
[sensors.hook]
kind = "http"

[rules.r]
on = "hook"
concurrency = 4

[[rules.r.steps]]
name = "a"
timeout = "60s"
retries = 0
command = {{ run = ["sh", "-c", "touch a.$NEXUS_RUN; while [ ! -e b.$NEXUS_RUN ]; do sleep 0.01; done"], dir = "{d}" }}

[[rules.r.steps]]
name = "b"
timeout = "60s"
retries = 0
command = {{ run = ["sh", "-c", "touch b.$NEXUS_RUN; while [ ! -e a.$NEXUS_RUN ]; do sleep 0.01; done"], dir = "{d}" }}

[[rules.r.steps]]
name = "guarded"
after = ["a", "b"]
concurrency = 1
retries = 0
command = {{ run = ["sh", "-c", "mkdir lock || exit 9; sleep 0.1; rmdir lock"], dir = "{d}" }}
"#,
        d = dir.path().display()
    );
    let workflow = start(dir.path(), &rules);
    let ids: Vec<i64> = (0..4).map(|i| raise(&workflow, &format!("e{i}"))).collect();
    for id in ids {
        let run = wait_for_end(&workflow, id);
        assert_eq!(run.state, State::Success, "{run:?}");
    }
}

#[test]
fn a_stopped_run_resumes_at_the_next_start_without_a_duplicate() {
    let dir = TempDir::new("wf-resume");
    let rules = format!(
        r#"
[sensors.hook]
kind = "http"

[rules.r]
on = "hook"

[[rules.r.steps]]
name = "once"
command = {{ run = ["sh", "-c", "echo $NEXUS_EVENT_ID >> done"], dir = "{d}" }}

[[rules.r.steps]]
name = "gated"
after = ["once"]
command = {{ run = ["sh", "-c", "echo started >> gated; while [ ! -e gate ]; do sleep 0.01; done; echo $NEXUS_EVENT_ID >> out"], dir = "{d}" }}
"#,
        d = dir.path().display()
    );
    let workflow = start(dir.path(), &rules);
    let id = raise(&workflow, "e1");
    wait_until("the gated step to start", || {
        dir.path().join("gated").exists()
    });
    workflow.stop();
    drop(workflow);
    let open = run_of_store(dir.path(), id);
    assert_eq!(open.state, State::Started, "{open:?}");

    let workflow = start(dir.path(), &rules);
    // The same event again is a duplicate: no second run.
    assert!(matches!(
        workflow
            .raise("hook", Some("e1".into()), json!({}))
            .unwrap(),
        Raised::Duplicate { .. }
    ));
    std::fs::write(dir.path().join("gate"), b"").unwrap();
    let run = wait_for_end(&workflow, id);
    assert_eq!(run.state, State::Success, "{run:?}");
    assert_eq!(
        step(&run, "once").attempts,
        1,
        "a step that succeeded is not run again"
    );
    assert_eq!(step(&run, "gated").attempts, 2);
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert_eq!(read("done"), "e1\n");
    assert_eq!(read("out"), "e1\n");
    assert_eq!(workflow.runs(None, None, 100).unwrap().len(), 1);
}

fn run_of_store(dir: &Path, id: i64) -> RunView {
    let store = Store::open(&dir.join("state.db")).unwrap();
    store
        .runs(None, None, 100)
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap()
}
