//! `nexus run RULES.toml` (the workflow on its own, or `--check` it), `nexus runs` (list the
//! runs in the state database), and the workflow inside `nexus serve --rules`.
//!
//! Exit codes: 0 done (or the file is good); 2 bad usage, a rules file with problems (each
//! on its own line), or a state database that cannot be opened.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use nexus_client::ClientConfig;
use nexus_config::Values;
use nexus_workflow::{Plan, State, Store, Workflow, WorkflowConfig};

use crate::{emit, fail, PropertyArgs};

#[derive(Args)]
pub(crate) struct RunArgs {
    /// The rules file (TOML): sensors, rules and their steps.
    pub(crate) rules: PathBuf,
    /// Check the file (its sensors, filters and templates against the sensors' schemas, the
    /// step and rule graphs) and exit: 0 when it is good, 2 with every problem.
    #[arg(long)]
    pub(crate) check: bool,
    /// The state database (burst.nexus.workflow.state).
    #[arg(long, value_name = "FILE")]
    pub(crate) state: Option<PathBuf>,
    /// Admin HTTP endpoint for /metrics, /runs and POST /sensors/NAME
    /// (burst.nexus.admin.address; '' for none).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) admin: Option<String>,
    #[command(flatten)]
    pub(crate) properties: PropertyArgs,
}

#[derive(Args)]
pub(crate) struct RunsArgs {
    /// Print JSON (an array of runs with their steps).
    #[arg(long)]
    json: bool,
    /// Only the runs of this rule.
    #[arg(long, value_name = "RULE")]
    rule: Option<String>,
    /// Only runs in this state: queued, started, retrying, failed or success.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    state: Option<State>,
    /// Most runs listed, newest first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// The state database (burst.nexus.workflow.state).
    #[arg(long = "db", value_name = "FILE")]
    db: Option<PathBuf>,
    #[command(flatten)]
    properties: PropertyArgs,
}

fn parse_state(text: &str) -> Result<State, String> {
    State::parse(text)
        .filter(|s| *s != State::Skipped)
        .ok_or_else(|| format!("{text:?}: queued, started, retrying, failed or success"))
}

/// Reads and checks a rules file.
pub(crate) fn load(path: &Path, config: &WorkflowConfig) -> Result<Plan, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Plan::compile(&text, config).map_err(|e| format!("{}:\n{e}", path.display()))
}

/// Starts the workflow of `rules` with the properties in `values`.
pub(crate) fn start(values: &Values, rules: &Path) -> Result<Arc<Workflow>, String> {
    let config = WorkflowConfig::from_values(values).map_err(|e| e.to_string())?;
    let plan = load(rules, &config)?;
    let store = Store::open(&config.state).map_err(|e| e.to_string())?;
    let client = ClientConfig::from_values(values)
        .map_err(|e| e.to_string())
        .and_then(|c| nexus_client::Client::new(c).map_err(|e| e.to_string()))?;
    let (sensors, rules_count) = (plan.sensors.len(), plan.rules.len());
    let workflow = Workflow::start(plan, store, client, config.clone())
        .map_err(|e| format!("the workflow cannot start: {e}"))?;
    tracing::info!(
        rules = %rules.display(),
        sensors,
        rules_count,
        state = %config.state.display(),
        "Workflow running."
    );
    Ok(Arc::new(workflow))
}

/// Installs the process's Prometheus recorder with the server's and the workflow's
/// metrics described (the server's published from `stats` once it is set).
pub(crate) fn recorder(
    stats: Arc<std::sync::OnceLock<Arc<nexus_server::ServerStats>>>,
) -> Result<nexus_server::admin::RenderMetrics, String> {
    let render = nexus_server::admin::prometheus_with(stats, nexus_workflow::telemetry::HISTOGRAMS)
        .map_err(|e| e.to_string())?;
    nexus_workflow::telemetry::describe();
    Ok(render)
}

/// The admin routes of a running workflow.
pub(crate) fn routes(
    values: &Values,
    workflow: &Arc<Workflow>,
) -> Result<Arc<dyn nexus_server::admin::Routes>, String> {
    let secret = values.secret().map_err(|e| e.to_string())?;
    Ok(Arc::new(nexus_workflow::admin::WorkflowRoutes::new(
        Arc::clone(workflow),
        secret,
    )))
}

/// `nexus run`.
pub(crate) fn run(args: RunArgs) -> ExitCode {
    let signals = crate::Signals::install();
    let mut flags = Vec::new();
    if let Some(state) = &args.state {
        flags.push(("burst.nexus.workflow.state", state.display().to_string()));
    }
    if let Some(admin) = &args.admin {
        flags.push(("burst.nexus.admin.address", admin.clone()));
    }
    let level = if args.check { "warn" } else { "info" };
    let values = match crate::resolve(flags, &args.properties, level) {
        Ok(values) => values,
        Err(e) => return fail(&e.to_string()),
    };
    if args.check {
        let config = match WorkflowConfig::from_values(&values) {
            Ok(c) => c,
            Err(e) => return fail(&e.to_string()),
        };
        return match load(&args.rules, &config) {
            Ok(plan) => {
                emit(&format!(
                    "{}: good ({} sensors, {} rules)\n",
                    args.rules.display(),
                    plan.sensors.len(),
                    plan.rules.len()
                ));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let admin_address = match crate::admin_address(&values) {
        Ok(a) => a,
        Err(e) => return fail(&e.to_string()),
    };
    // The recorder first: what the workflow records as it starts (resumed runs) is kept.
    let render = match admin_address.map(|_| recorder(Arc::new(std::sync::OnceLock::new()))) {
        Some(Ok(render)) => Some(render),
        Some(Err(e)) => return fail(&e),
        None => None,
    };
    let workflow = match start(&values, &args.rules) {
        Ok(w) => w,
        Err(e) => return fail(&e),
    };
    let admin = match admin_address.zip(render) {
        Some((address, render)) => {
            let started = routes(&values, &workflow).and_then(|routes| {
                let tls = crate::admin_tls(&values)?;
                nexus_server::admin::Admin::start_with_tls(address, render, Some(routes), tls)
                    .map_err(|e| e.to_string())
            });
            match started {
                Ok(admin) => Some(admin),
                Err(e) => {
                    workflow.stop();
                    return fail(&e);
                }
            }
        }
        None => None,
    };
    if let Some(admin) = &admin {
        admin.set_phase(nexus_server::admin::Phase::Ready);
    }
    let signal = crate::Signals::wait_or_park(signals);
    tracing::info!(
        signal,
        "Stopping the workflow; unfinished runs resume at the next start."
    );
    if let Some(admin) = &admin {
        admin.set_phase(nexus_server::admin::Phase::Draining);
    }
    workflow.stop();
    tracing::info!("Stopped.");
    ExitCode::SUCCESS
}

/// `nexus runs`.
pub(crate) fn runs(args: RunsArgs) -> ExitCode {
    let mut flags = Vec::new();
    if let Some(db) = &args.db {
        flags.push(("burst.nexus.workflow.state", db.display().to_string()));
    }
    let values = match crate::resolve(flags, &args.properties, "warn") {
        Ok(values) => values,
        Err(e) => return fail(&e.to_string()),
    };
    let config = match WorkflowConfig::from_values(&values) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if !config.state.exists() {
        return fail(&format!(
            "no workflow state at {} (burst.nexus.workflow.state; give --db FILE)",
            config.state.display()
        ));
    }
    let listed = Store::open(&config.state)
        .and_then(|store| store.runs(args.rule.as_deref(), args.state, args.limit.max(1)));
    let runs = match listed {
        Ok(runs) => runs,
        Err(e) => return fail(&e.to_string()),
    };
    if args.json {
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&runs).unwrap_or_else(|_| "[]".into())
        ));
        return ExitCode::SUCCESS;
    }
    let mut text = format!(
        "{:>6}  {:<16} {:<9} {:<24} {:<24} STEPS\n",
        "RUN", "RULE", "STATE", "CREATED", "EVENT"
    );
    for run in &runs {
        let steps: Vec<String> = run
            .steps
            .iter()
            .map(|s| format!("{}:{}({})", s.name, s.state.as_str(), s.attempts))
            .collect();
        text.push_str(&format!(
            "{:>6}  {:<16} {:<9} {:<24} {:<24} {}\n",
            run.id,
            run.rule,
            run.state.as_str(),
            run.created,
            format!("{}/{}", run.sensor, run.event),
            steps.join(" ")
        ));
        if let Some(e) = &run.error {
            text.push_str(&format!("        error: {e}\n"));
        }
    }
    emit(&text);
    ExitCode::SUCCESS
}
