//! What the workflow's test binaries share: a workflow started on a state file in a test's
//! directory, with a client of one thread.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use nexus_client::{Client, ClientConfig};
use nexus_workflow::{Plan, Store, Workflow, WorkflowConfig};

/// The default configuration, its state in `dir`.
pub(crate) fn config(dir: &Path) -> WorkflowConfig {
    WorkflowConfig {
        state: dir.join("state.db"),
        ..WorkflowConfig::default()
    }
}

/// A client of one thread.
pub(crate) fn client() -> Client {
    Client::new(ClientConfig {
        threads: 1,
        ..ClientConfig::default()
    })
    .unwrap()
}

/// Starts `rules` under `config`.
pub(crate) fn start_with(config: WorkflowConfig, rules: &str) -> Workflow {
    let plan = Plan::compile(rules, &config).unwrap();
    let store = Store::open(&config.state).unwrap();
    Workflow::start(plan, store, client(), config).unwrap()
}
