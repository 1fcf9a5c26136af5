//! The rules file (TOML): sensors, rules and their steps, and [`Plan::compile`], which checks
//! all of it (schemas, filters, templates, the step and rule graphs) before anything runs.
//! `nexus run --check` is `Plan::compile` and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::event::{kind_schema, Schema};
use crate::template;
use crate::WorkflowConfig;

/// Sensors every workflow has without declaring them.
pub const BUILT_IN_SENSORS: &[&str] = &["streams", "runs"];

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Sensors by name.
    #[serde(default)]
    pub sensors: BTreeMap<String, SensorSpec>,
    /// Rules by name.
    #[serde(default)]
    pub rules: BTreeMap<String, RuleSpec>,
}

/// One `[sensors.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSpec {
    /// `timer`, `cron`, `file` or `http`.
    pub kind: String,
    /// timer: the interval (`30s`, `5m`).
    pub every: Option<String>,
    /// cron: `[sec] min hour day-of-month month day-of-week`, UTC.
    pub schedule: Option<String>,
    /// timer and cron: `skip` (default) or `catch_up` for ticks missed while down.
    pub missed: Option<String>,
    /// file: the directory watched.
    pub path: Option<PathBuf>,
    /// file: watch subdirectories too (default false).
    pub recursive: Option<bool>,
    /// file: quiet time before a changed file raises its event (default `500ms`).
    pub debounce: Option<String>,
    /// http: the payload's JSON Schema (default: any object).
    pub schema: Option<toml::Value>,
    /// s3: the bucket listed.
    pub bucket: Option<String>,
    /// s3: the folder of keys listed (`landing/2026`: the objects under it); default all.
    pub prefix: Option<String>,
    /// mysql: `mysql://USER:PASSWORD@HOST:PORT`.
    pub url: Option<String>,
    /// mysql: the table counted, `DATABASE.TABLE`.
    pub table: Option<String>,
    /// mysql: rows changed that raise an event (default 1000).
    pub threshold: Option<u64>,
    /// mysql: the longest a change waits for its event (default `1m`).
    pub max_delay: Option<String>,
    /// mysql: the replica id the sensor announces (unique among the server's replicas).
    pub server_id: Option<u32>,
    /// Longest one poll of the sensor may take (file rescan), default `30s`.
    pub timeout: Option<String>,
}

/// One `[rules.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The sensor whose events start this rule.
    pub on: String,
    /// Payload fields (dotted paths) and the values they must equal.
    #[serde(default)]
    pub filter: BTreeMap<String, toml::Value>,
    /// Runs of this rule at once (default `burst.nexus.workflow.rule.concurrency`).
    pub concurrency: Option<usize>,
    /// The steps; `after` orders them into a graph.
    pub steps: Vec<StepSpec>,
}

/// One step of a rule: exactly one of `pull`, `push`, `command`, `checksum`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique within the rule; templates of later steps read its result as `steps.NAME`.
    pub name: String,
    /// Steps that must succeed first.
    #[serde(default)]
    pub after: Vec<String>,
    /// Tries after the first failure (default `burst.nexus.workflow.step.retries`).
    pub retries: Option<u32>,
    /// Wait before the first retry, doubling after each (default
    /// `burst.nexus.workflow.step.backoff.ms`).
    pub backoff: Option<String>,
    /// Longest one try may take (default `burst.nexus.workflow.step.timeout.ms`).
    pub timeout: Option<String>,
    /// Tries of this step running at once across the rule's runs (default: no limit but the
    /// rule's).
    pub concurrency: Option<usize>,
    /// Pull a stream into a file.
    pub pull: Option<PullSpec>,
    /// Push a file into a sink.
    pub push: Option<PushSpec>,
    /// Run a command.
    pub command: Option<CommandSpec>,
    /// Pull a stream, verify it and drop it.
    pub checksum: Option<ChecksumSpec>,
}

/// `pull = { endpoint, paradata, output }`; every field is a template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullSpec {
    /// `host:port`.
    pub endpoint: String,
    /// What to stream.
    pub paradata: String,
    /// The file written (atomically); a path ending in `/` is a directory, and the file
    /// is named after the paradata's last path component.
    pub output: String,
}

/// `push = { file, endpoint, sink, replicas, quorum }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    /// The local file sent.
    pub file: String,
    /// The first server.
    pub endpoint: String,
    /// The sink paradata (`file:PATH`).
    pub sink: String,
    /// Further servers for a replicated push.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Success once this many replicas committed (default all).
    pub quorum: Option<usize>,
}

/// `command = { run = [...], stdin = {...}, env = {...} }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments, each a template; no shell unless you name one.
    pub run: Vec<String>,
    /// What the command reads: a pulled stream or a file; nothing when absent.
    pub stdin: Option<StdinSpec>,
    /// More environment variables (templates).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (a template).
    pub dir: Option<String>,
}

/// A command's standard input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinSpec {
    /// The server of a stream to pull into stdin.
    pub endpoint: Option<String>,
    /// Its paradata.
    pub paradata: Option<String>,
    /// A file to read instead.
    pub file: Option<String>,
}

/// `checksum = { endpoint, paradata, digest }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumSpec {
    /// `host:port`.
    pub endpoint: String,
    /// What to stream.
    pub paradata: String,
    /// The xxh3-64 digest (16 hex digits) it must have; without one, the stream's own
    /// end-to-end check is the test.
    pub digest: Option<String>,
}

/// What a step does, checked.
#[derive(Debug, Clone)]
pub enum Action {
    /// See [`PullSpec`].
    Pull(PullSpec),
    /// See [`PushSpec`].
    Push(PushSpec),
    /// See [`CommandSpec`].
    Command(CommandSpec),
    /// See [`ChecksumSpec`].
    Checksum(ChecksumSpec),
}

impl Action {
    /// `pull`, `push`, `command` or `checksum`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Pull(_) => "pull",
            Action::Push(_) => "push",
            Action::Command(_) => "command",
            Action::Checksum(_) => "checksum",
        }
    }

    /// Every template of the action, with the key it is under.
    fn templates(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = Vec::new();
        match self {
            Action::Pull(p) => {
                out.push(("pull.endpoint".into(), &p.endpoint));
                out.push(("pull.paradata".into(), &p.paradata));
                out.push(("pull.output".into(), &p.output));
            }
            Action::Push(p) => {
                out.push(("push.file".into(), &p.file));
                out.push(("push.endpoint".into(), &p.endpoint));
                out.push(("push.sink".into(), &p.sink));
                for (i, r) in p.replicas.iter().enumerate() {
                    out.push((format!("push.replicas[{i}]"), r));
                }
            }
            Action::Command(c) => {
                for (i, a) in c.run.iter().enumerate() {
                    out.push((format!("command.run[{i}]"), a));
                }
                for (k, v) in &c.env {
                    out.push((format!("command.env.{k}"), v));
                }
                if let Some(d) = &c.dir {
                    out.push(("command.dir".into(), d));
                }
                if let Some(s) = &c.stdin {
                    for (k, v) in [
                        ("endpoint", &s.endpoint),
                        ("paradata", &s.paradata),
                        ("file", &s.file),
                    ] {
                        if let Some(v) = v {
                            out.push((format!("command.stdin.{k}"), v));
                        }
                    }
                }
            }
            Action::Checksum(c) => {
                out.push(("checksum.endpoint".into(), &c.endpoint));
                out.push(("checksum.paradata".into(), &c.paradata));
                if let Some(d) = &c.digest {
                    out.push(("checksum.digest".into(), d));
                }
            }
        }
        out
    }
}

/// How missed ticks are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// Reported (log line, metric, `missed` in the next tick's payload), not raised.
    Skip,
    /// Each raised, oldest first, up to [`MAX_CATCH_UP`].
    CatchUp,
}

/// Most missed ticks a `catch_up` sensor raises after a restart; older ones are skipped
/// and reported.
pub const MAX_CATCH_UP: u64 = 1000;

/// A checked sensor.
#[derive(Debug)]
pub struct Sensor {
    /// Its name.
    pub name: String,
    /// What it watches.
    pub kind: SensorKind,
    /// Its payload schema.
    pub schema: Schema,
    /// Longest one poll may take.
    pub timeout: Duration,
}

/// A checked sensor's settings.
#[derive(Debug)]
pub enum SensorKind {
    /// Fixed interval.
    Timer {
        /// The interval.
        every: Duration,
        /// Missed ticks.
        missed: Missed,
    },
    /// A cron schedule (UTC).
    Cron {
        /// The schedule.
        schedule: Box<croner::Cron>,
        /// Missed ticks.
        missed: Missed,
    },
    /// A directory.
    File {
        /// The directory.
        path: PathBuf,
        /// Subdirectories too.
        recursive: bool,
        /// Quiet time per file.
        debounce: Duration,
    },
    /// A bucket's objects under a prefix, listed every `every`.
    S3 {
        /// The bucket.
        bucket: String,
        /// The folder of keys (no leading or trailing `/`); empty: the whole bucket.
        prefix: String,
        /// Time between listings.
        every: Duration,
    },
    /// Rows of one table changed, read from a MySQL or MariaDB binary log.
    Mysql {
        /// The server.
        url: String,
        /// `DATABASE.TABLE`.
        table: String,
        /// Rows changed that raise an event.
        threshold: u64,
        /// The longest a counted change waits for its event.
        max_delay: Duration,
        /// The replica id announced.
        server_id: u32,
    },
    /// `POST /sensors/NAME` on the admin endpoint.
    Http,
    /// Every stream that ends on this node.
    Streams,
    /// Every run that ends.
    Runs,
}

impl SensorKind {
    /// The kind's name.
    pub fn name(&self) -> &'static str {
        match self {
            SensorKind::Timer { .. } => "timer",
            SensorKind::Cron { .. } => "cron",
            SensorKind::File { .. } => "file",
            SensorKind::S3 { .. } => "s3",
            SensorKind::Mysql { .. } => "mysql",
            SensorKind::Http => "http",
            SensorKind::Streams => "streams",
            SensorKind::Runs => "runs",
        }
    }
}

/// A checked step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its name.
    pub name: String,
    /// Steps before it.
    pub after: Vec<String>,
    /// Retries after the first failure.
    pub retries: u32,
    /// First backoff.
    pub backoff: Duration,
    /// Per-try timeout.
    pub timeout: Duration,
    /// Tries at once across runs; `None` for no limit but the rule's.
    pub concurrency: Option<usize>,
    /// What it does.
    pub action: Action,
}

/// A checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// The sensor it listens to.
    pub on: String,
    /// Dotted payload paths and the JSON values they must equal.
    pub filter: Vec<(String, Value)>,
    /// Runs at once.
    pub concurrency: usize,
    /// Steps, in an order where every step comes after those it depends on.
    pub steps: Vec<Step>,
}

impl Rule {
    /// Whether `payload` passes the filter.
    pub fn matches(&self, payload: &Value) -> bool {
        self.filter.iter().all(|(path, want)| {
            let mut node = payload;
            for key in path.split('.') {
                match node.get(key) {
                    Some(next) => node = next,
                    None => return false,
                }
            }
            node == want
        })
    }
}

/// A rules file, checked: what [`crate::Workflow`] runs.
#[derive(Debug)]
pub struct Plan {
    /// Sensors by name, the built-in ones included.
    pub sensors: BTreeMap<String, Sensor>,
    /// Rules by name.
    pub rules: BTreeMap<String, Rule>,
}

/// A duration written `250ms`, `30s`, `5m`, `2h` or `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (write 250ms, 30s, 5m, 2h or 1d)"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?} is not a duration (write 250ms, 30s, 5m, 2h or 1d)"
            ))
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

fn duration_field(at: &str, text: Option<&String>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(text) => parse_duration(text).map_err(|e| format!("{at}: {e}")),
    }
}

fn json_of(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.iter().map(|(k, v)| (k.clone(), json_of(v))).collect())
        }
    }
}

impl Plan {
    /// Parses and checks a rules file; the error is one precise message per problem, each
    /// naming where (`rules.fetch.steps[1] (load): ...`).
    pub fn compile(text: &str, config: &WorkflowConfig) -> Result<Plan, String> {
        let spec: Spec = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let mut sensors = BTreeMap::new();
        for (name, s) in &spec.sensors {
            match compile_sensor(name, s) {
                Ok(sensor) => {
                    sensors.insert(name.clone(), sensor);
                }
                Err(e) => problems.push(format!("sensors.{name}: {e}")),
            }
        }
        for name in BUILT_IN_SENSORS {
            let schema = Schema::compile(kind_schema(name).unwrap_or_default())?;
            let kind = if *name == "streams" {
                SensorKind::Streams
            } else {
                SensorKind::Runs
            };
            sensors.insert(
                name.to_string(),
                Sensor {
                    name: name.to_string(),
                    kind,
                    schema,
                    timeout: Duration::from_secs(30),
                },
            );
        }
        let mut rules = BTreeMap::new();
        for (name, r) in &spec.rules {
            match compile_rule(name, r, &sensors, &spec.rules, config) {
                Ok(rule) => {
                    rules.insert(name.clone(), rule);
                }
                Err(mut e) => problems.append(&mut e),
            }
        }
        if problems.is_empty() {
            if let Err(e) = check_rule_graph(&rules) {
                problems.push(e);
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Plan { sensors, rules })
    }
}

fn compile_sensor(name: &str, s: &SensorSpec) -> Result<Sensor, String> {
    if BUILT_IN_SENSORS.contains(&name) {
        return Err(format!("{name:?} is a built-in sensor; pick another name"));
    }
    if !valid_name(name) {
        return Err("a name is letters, digits, '-' and '_'".into());
    }
    let unused = |what: &str, set: bool| -> Result<(), String> {
        if set {
            Err(format!("{what} does not apply to a {} sensor", s.kind))
        } else {
            Ok(())
        }
    };
    let missed = || -> Result<Missed, String> {
        match s.missed.as_deref() {
            None | Some("skip") => Ok(Missed::Skip),
            Some("catch_up") => Ok(Missed::CatchUp),
            Some(other) => Err(format!(
                "missed = {other:?}: write \"skip\" or \"catch_up\""
            )),
        }
    };
    let timeout = duration_field("timeout", s.timeout.as_ref(), Duration::from_secs(30))?;
    if s.kind != "s3" {
        unused("bucket", s.bucket.is_some())?;
        unused("prefix", s.prefix.is_some())?;
    }
    if s.kind != "mysql" {
        unused("url", s.url.is_some())?;
        unused("table", s.table.is_some())?;
        unused("threshold", s.threshold.is_some())?;
        unused("max_delay", s.max_delay.is_some())?;
        unused("server_id", s.server_id.is_some())?;
    }
    let kind = match s.kind.as_str() {
        "timer" => {
            unused("schedule", s.schedule.is_some())?;
            unused("path", s.path.is_some())?;
            unused("schema", s.schema.is_some())?;
            let every = s.every.as_ref().ok_or("a timer needs every = \"30s\"")?;
            let every = parse_duration(every).map_err(|e| format!("every: {e}"))?;
            if every < Duration::from_millis(10) {
                return Err("every: at least 10ms".into());
            }
            SensorKind::Timer {
                every,
                missed: missed()?,
            }
        }
        "cron" => {
            unused("every", s.every.is_some())?;
            unused("path", s.path.is_some())?;
            unused("schema", s.schema.is_some())?;
            let text = s
                .schedule
                .as_ref()
                .ok_or("a cron sensor needs schedule = \"[sec] min hour dom month dow\"")?;
            let schedule = croner::Cron::new(text)
                .with_seconds_optional()
                .parse()
                .map_err(|e| {
                    format!("schedule {text:?}: {e} (fields: [second] minute hour day-of-month month day-of-week, UTC)")
                })?;
            SensorKind::Cron {
                schedule: Box::new(schedule),
                missed: missed()?,
            }
        }
        "file" => {
            unused("every", s.every.is_some())?;
            unused("schedule", s.schedule.is_some())?;
            unused("missed", s.missed.is_some())?;
            unused("schema", s.schema.is_some())?;
            let path = s
                .path
                .clone()
                .ok_or("a file sensor needs path = \"/dir\"")?;
            if !path.is_absolute() {
                return Err(format!("path {path:?} must be absolute"));
            }
            SensorKind::File {
                path,
                recursive: s.recursive.unwrap_or(false),
                debounce: duration_field(
                    "debounce",
                    s.debounce.as_ref(),
                    Duration::from_millis(500),
                )?,
            }
        }
        "http" => {
            unused("every", s.every.is_some())?;
            unused("schedule", s.schedule.is_some())?;
            unused("path", s.path.is_some())?;
            unused("missed", s.missed.is_some())?;
            SensorKind::Http
        }
        "s3" => {
            unused("schedule", s.schedule.is_some())?;
            unused("path", s.path.is_some())?;
            unused("missed", s.missed.is_some())?;
            unused("schema", s.schema.is_some())?;
            if !cfg!(feature = "s3") {
                return Err("this nexus was built without the s3 feature".into());
            }
            let bucket = s
                .bucket
                .clone()
                .filter(|b| !b.is_empty())
                .ok_or("an s3 sensor needs bucket = \"NAME\"")?;
            let every = duration_field("every", s.every.as_ref(), Duration::from_secs(30))?;
            if every < Duration::from_millis(100) {
                return Err("every: at least 100ms".into());
            }
            SensorKind::S3 {
                bucket,
                prefix: s
                    .prefix
                    .as_deref()
                    .unwrap_or("")
                    .trim_matches('/')
                    .to_string(),
                every,
            }
        }
        "mysql" => {
            unused("every", s.every.is_some())?;
            unused("schedule", s.schedule.is_some())?;
            unused("path", s.path.is_some())?;
            unused("missed", s.missed.is_some())?;
            unused("schema", s.schema.is_some())?;
            if !cfg!(feature = "mysql") {
                return Err("this nexus was built without the mysql feature".into());
            }
            let url = s
                .url
                .clone()
                .filter(|u| u.starts_with("mysql://"))
                .ok_or("a mysql sensor needs url = \"mysql://USER:PASSWORD@HOST:PORT\"")?;
            let table = s
                .table
                .clone()
                .filter(|t| t.split_once('.').is_some_and(|(d, n)| !d.is_empty() && !n.is_empty()))
                .ok_or("a mysql sensor needs table = \"DATABASE.TABLE\"")?;
            let threshold = s.threshold.unwrap_or(1000);
            if threshold == 0 {
                return Err("threshold: at least 1 row".into());
            }
            let max_delay =
                duration_field("max_delay", s.max_delay.as_ref(), Duration::from_secs(60))?;
            if max_delay < Duration::from_millis(10) {
                return Err("max_delay: at least 10ms".into());
            }
            // A default replica id from the sensor's name, away from the small ids servers
            // are usually given.
            let server_id = s.server_id.unwrap_or_else(|| {
                let h = name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
                0x4e00_0000 | (h & 0x00ff_ffff)
            });
            SensorKind::Mysql {
                url,
                table,
                threshold,
                max_delay,
                server_id,
            }
        }
        other => {
            return Err(format!(
                "kind {other:?}: write timer, cron, file, s3, mysql or http (streams and runs are built in)"
            ))
        }
    };
    let source = match (&kind, &s.schema) {
        (SensorKind::Http, Some(schema)) => json_of(schema),
        _ => kind_schema(kind.name()).unwrap_or_default(),
    };
    let schema = Schema::compile(source).map_err(|e| format!("schema: {e}"))?;
    Ok(Sensor {
        name: name.to_string(),
        kind,
        schema,
        timeout,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn compile_rule(
    name: &str,
    r: &RuleSpec,
    sensors: &BTreeMap<String, Sensor>,
    all: &BTreeMap<String, RuleSpec>,
    config: &WorkflowConfig,
) -> Result<Rule, Vec<String>> {
    let at = format!("rules.{name}");
    let mut problems = Vec::new();
    if !valid_name(name) {
        problems.push(format!("{at}: a name is letters, digits, '-' and '_'"));
    }
    let Some(sensor) = sensors.get(&r.on) else {
        let known: Vec<&str> = sensors.keys().map(String::as_str).collect();
        return Err(vec![format!(
            "{at}.on: no sensor {:?} (there are: {})",
            r.on,
            known.join(", ")
        )]);
    };
    let mut filter = Vec::new();
    for (path, value) in &r.filter {
        let value = json_of(value);
        let keys: Vec<&str> = path.split('.').collect();
        match sensor.schema.field(&keys) {
            Err(e) => problems.push(format!("{at}.filter.{path}: {e} of sensor {}", r.on)),
            Ok(Some(node)) => {
                if let Ok(v) = jsonschema::validator_for(node) {
                    if let Err(e) = v.validate(&value) {
                        problems.push(format!(
                            "{at}.filter.{path}: {value} can never match: the schema of sensor {} says {e}",
                            r.on
                        ));
                    }
                }
            }
            Ok(None) => {}
        }
        filter.push((path.clone(), value));
    }
    if r.on == "runs" {
        match r.filter.get("rule") {
            Some(toml::Value::String(other)) if all.contains_key(other) => {}
            Some(toml::Value::String(other)) => {
                problems.push(format!("{at}.filter.rule: no rule {other:?}"))
            }
            _ => problems.push(format!(
                "{at}.filter.rule: a rule on sensor runs names the rule it follows (filter = {{ rule = \"NAME\" }}), or it would follow itself"
            )),
        }
    }
    let concurrency = r.concurrency.unwrap_or(config.rule_concurrency);
    if concurrency == 0 {
        problems.push(format!("{at}.concurrency: at least 1"));
    }
    if r.steps.is_empty() {
        problems.push(format!("{at}.steps: a rule needs at least one step"));
    }
    // Problems of the steps themselves stop the check before templates (they need a sound
    // step graph); problems of the filter and the rule do not.
    let rule_problems = problems.len();
    let mut steps = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in r.steps.iter().enumerate() {
        let at = format!("{at}.steps[{i}] ({})", s.name);
        if !valid_name(&s.name) {
            problems.push(format!("{at}: a name is letters, digits, '-' and '_'"));
        }
        if !names.insert(s.name.clone()) {
            problems.push(format!("{at}: a second step named {:?}", s.name));
        }
        match compile_step(&at, s, config) {
            Ok(step) => steps.push(step),
            Err(e) => problems.push(e),
        }
    }
    for s in &steps {
        for a in &s.after {
            if !names.contains(a) {
                problems.push(format!(
                    "{at}.steps ({}): after {a:?}: no such step",
                    s.name
                ));
            }
        }
    }
    if problems.len() > rule_problems {
        return Err(problems);
    }
    let steps = match order_steps(steps) {
        Ok(steps) => steps,
        Err(cycle) => {
            problems.push(format!("{at}.steps: `after` makes a cycle: {cycle}"));
            return Err(problems);
        }
    };
    // Templates: each variable must exist: event fields against the sensor's schema, step
    // results only of steps that run before.
    let ancestors = ancestors(&steps);
    for s in &steps {
        for (key, source) in s.action.templates() {
            let where_ = format!("{at}.steps ({}).{key}", s.name);
            if let Err(e) = template::check(source, |var| {
                check_variable(var, sensor, &ancestors[&s.name])
            }) {
                problems.push(format!("{where_}: {e}"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Rule {
        name: name.to_string(),
        on: r.on.clone(),
        filter,
        concurrency,
        steps,
    })
}

fn compile_step(at: &str, s: &StepSpec, config: &WorkflowConfig) -> Result<Step, String> {
    let mut actions = Vec::new();
    if let Some(p) = &s.pull {
        actions.push(Action::Pull(p.clone()));
    }
    if let Some(p) = &s.push {
        actions.push(Action::Push(p.clone()));
        if let Some(q) = p.quorum {
            if q == 0 || q > p.replicas.len() + 1 {
                return Err(format!(
                    "{at}: push.quorum must be 1 to {} (the endpoint and its replicas)",
                    p.replicas.len() + 1
                ));
            }
        }
    }
    if let Some(c) = &s.command {
        if c.run.is_empty() {
            return Err(format!("{at}: command.run needs the program"));
        }
        if let Some(stdin) = &c.stdin {
            let stream = stdin.endpoint.is_some() && stdin.paradata.is_some();
            let file = stdin.file.is_some() && stdin.endpoint.is_none() && stdin.paradata.is_none();
            if !(stream ^ file) {
                return Err(format!(
                    "{at}: command.stdin is {{ endpoint, paradata }} (a stream) or {{ file }}"
                ));
            }
        }
        actions.push(Action::Command(c.clone()));
    }
    if let Some(c) = &s.checksum {
        actions.push(Action::Checksum(c.clone()));
    }
    if actions.len() != 1 {
        return Err(format!(
            "{at}: a step does exactly one of pull, push, command, checksum (found {})",
            actions.len()
        ));
    }
    let timeout = duration_field(
        &format!("{at}: timeout"),
        s.timeout.as_ref(),
        config.step_timeout,
    )?;
    if timeout.is_zero() {
        return Err(format!("{at}: timeout must be above 0"));
    }
    if s.concurrency == Some(0) {
        return Err(format!("{at}: concurrency: at least 1"));
    }
    Ok(Step {
        name: s.name.clone(),
        after: s.after.clone(),
        retries: s.retries.unwrap_or(config.step_retries),
        backoff: duration_field(
            &format!("{at}: backoff"),
            s.backoff.as_ref(),
            config.step_backoff,
        )?,
        timeout,
        concurrency: s.concurrency,
        action: actions.remove(0),
    })
}

fn check_variable(var: &str, sensor: &Sensor, before: &BTreeSet<String>) -> Result<(), String> {
    let parts: Vec<&str> = var.split('.').collect();
    match parts[0] {
        "rule" | "run" => Ok(()),
        "event" => match parts.get(1) {
            None | Some(&"id") | Some(&"sensor") | Some(&"time") | Some(&"time_ms") => Ok(()),
            Some(&"payload") => sensor
                .schema
                .field(&parts[2..])
                .map(|_| ())
                .map_err(|e| format!("{{{{ {var} }}}}: {e} of sensor {}", sensor.name)),
            Some(other) => Err(format!(
                "{{{{ {var} }}}}: an event has id, sensor, time, time_ms and payload, not {other:?}"
            )),
        },
        "steps" => match parts.get(1) {
            Some(step) if before.contains(*step) => Ok(()),
            Some(step) => Err(format!(
                "{{{{ {var} }}}}: step {step:?} does not run before this one (list it in `after`)"
            )),
            None => Ok(()),
        },
        other => Err(format!(
            "{{{{ {var} }}}}: unknown variable {other:?} (there are event, rule, run and steps)"
        )),
    }
}

/// The steps in dependency order, or the names on a cycle.
fn order_steps(steps: Vec<Step>) -> Result<Vec<Step>, String> {
    let mut left: Vec<Step> = steps;
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while !left.is_empty() {
        let (ready, rest): (Vec<Step>, Vec<Step>) = left
            .into_iter()
            .partition(|s| s.after.iter().all(|a| done.contains(a)));
        if ready.is_empty() {
            let names: Vec<&str> = rest.iter().map(|s| s.name.as_str()).collect();
            return Err(names.join(", "));
        }
        for s in &ready {
            done.insert(s.name.clone());
        }
        out.extend(ready);
        left = rest;
    }
    Ok(out)
}

/// Every step's transitive predecessors.
fn ancestors(steps: &[Step]) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for s in steps {
        let mut set = BTreeSet::new();
        for a in &s.after {
            set.insert(a.clone());
            if let Some(theirs) = out.get(a) {
                set.extend(theirs.iter().cloned());
            }
        }
        out.insert(s.name.clone(), set);
    }
    out
}

/// Rules that follow other rules (`on = "runs"`) must not follow themselves round a cycle.
fn check_rule_graph(rules: &BTreeMap<String, Rule>) -> Result<(), String> {
    let follows = |r: &Rule| -> Option<String> {
        if r.on != "runs" {
            return None;
        }
        r.filter
            .iter()
            .find(|(k, _)| k == "rule")
            .and_then(|(_, v)| v.as_str().map(str::to_string))
    };
    for start in rules.values() {
        let mut seen = vec![start.name.clone()];
        let mut at = start;
        while let Some(next) = follows(at) {
            if seen.contains(&next) {
                seen.push(next);
                return Err(format!(
                    "rules: a cycle of rules following each other's runs: {}",
                    seen.join(" <- ")
                ));
            }
            seen.push(next.clone());
            match rules.get(&next) {
                Some(r) => at = r,
                None => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENSORS: &str = r#"
[sensors.landing]
kind = "file"
path = "/data/in"

[sensors.hourly]
kind = "cron"
schedule = "0 0 * * * *"

[sensors.hook]
kind = "http"
schema = { type = "object", additionalProperties = false, properties = { file = { type = "string" } } }
"#;

    fn compile(rules: &str) -> Result<Plan, String> {
        Plan::compile(&format!("{SENSORS}\n{rules}"), &WorkflowConfig::default())
    }

    fn problem(rules: &str) -> String {
        match compile(rules) {
            Ok(_) => panic!("accepted:\n{rules}"),
            Err(e) => e,
        }
    }

    const GOOD: &str = r#"
[rules.fetch]
on = "landing"
filter = { change = "created" }
concurrency = 2

[[rules.fetch.steps]]
name = "get"
retries = 1
backoff = "250ms"
timeout = "10m"
pull = { endpoint = "127.0.0.1:1270", paradata = "file:{{ event.payload.relative }}", output = "/out/" }

[[rules.fetch.steps]]
name = "load"
after = ["get"]
command = { run = ["wc", "-c", "{{ steps.get.path }}"] }

[[rules.fetch.steps]]
name = "check"
after = ["get"]
checksum = { endpoint = "127.0.0.1:1270", paradata = "file:{{ event.payload.relative }}", digest = "{{ steps.get.digest }}" }

[rules.then]
on = "runs"
filter = { rule = "fetch", state = "success" }

[[rules.then.steps]]
name = "note"
command = { run = ["echo", "{{ event.payload.rule }}"] }
"#;

    #[test]
    fn a_good_file_compiles_into_ordered_steps_and_defaults() {
        let plan = compile(GOOD).unwrap();
        assert_eq!(
            plan.sensors.len(),
            5,
            "three declared, streams and runs built in"
        );
        let fetch = &plan.rules["fetch"];
        assert_eq!(fetch.concurrency, 2);
        let names: Vec<&str> = fetch.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[0], "get");
        assert_eq!(fetch.steps[0].retries, 1);
        assert_eq!(fetch.steps[0].backoff, Duration::from_millis(250));
        assert_eq!(fetch.steps[1].retries, 3, "the property's default");
        assert_eq!(plan.rules["then"].concurrency, 4);
        assert!(fetch.matches(&serde_json::json!({"change": "created"})));
        assert!(!fetch.matches(&serde_json::json!({"change": "deleted"})));
    }

    #[test]
    fn filters_are_checked_against_the_sensors_schema() {
        let e = problem(&GOOD.replace("change = \"created\"", "chnage = \"created\""));
        assert!(
            e.contains("rules.fetch.filter.chnage: payload field \"chnage\" is not in the schema (it has: change, mtime_ms, name, path, relative, size) of sensor landing"),
            "{e}"
        );
        let e = problem(&GOOD.replace("change = \"created\"", "change = \"renamed\""));
        assert!(
            e.contains("rules.fetch.filter.change: \"renamed\" can never match"),
            "{e}"
        );
        let e = problem(&GOOD.replace("change = \"created\"", "size = \"big\""));
        assert!(
            e.contains("rules.fetch.filter.size: \"big\" can never match"),
            "{e}"
        );
    }

    #[test]
    fn templates_are_checked_against_the_schema_and_the_step_graph() {
        let e = problem(&GOOD.replace(
            "event.payload.relative }}\", output",
            "event.payload.nmae }}\", output",
        ));
        assert!(
            e.contains("rules.fetch.steps (get).pull.paradata: {{ event.payload.nmae }}: payload field \"nmae\" is not in the schema"),
            "{e}"
        );
        let e = problem(&GOOD.replace("{{ steps.get.path }}", "{{ steps.check.path }}"));
        assert!(
            e.contains("rules.fetch.steps (load).command.run[2]: {{ steps.check.path }}: step \"check\" does not run before this one"),
            "{e}"
        );
        let e = problem(&GOOD.replace("{{ steps.get.path }}", "{{ steps.get.path "));
        assert!(
            e.contains("rules.fetch.steps (load).command.run[2]: syntax error"),
            "{e}"
        );
        let e = problem(&GOOD.replace("{{ event.payload.rule }}", "{{ evnt.payload.rule }}"));
        assert!(e.contains("unknown variable \"evnt\""), "{e}");
    }

    #[test]
    fn graphs_must_have_no_cycles_and_name_real_things() {
        let e = problem(&GOOD.replace("after = [\"get\"]\ncommand", "after = [\"load\"]\ncommand"));
        assert!(
            e.contains("rules.fetch.steps: `after` makes a cycle: load"),
            "{e}"
        );
        let e = problem(&GOOD.replace("after = [\"get\"]\ncommand", "after = [\"gett\"]\ncommand"));
        assert!(e.contains("after \"gett\": no such step"), "{e}");
        let looped = format!(
            "{GOOD}\n[rules.back]\non = \"runs\"\nfilter = {{ rule = \"then\" }}\n[[rules.back.steps]]\nname = \"x\"\ncommand = {{ run = [\"true\"] }}\n"
        )
        .replace("filter = { rule = \"fetch\", state = \"success\" }", "filter = { rule = \"back\" }");
        let e = problem(&looped);
        assert!(
            e.contains("a cycle of rules following each other's runs"),
            "{e}"
        );
        let e = problem(&GOOD.replace("filter = { rule = \"fetch\", state = \"success\" }", ""));
        assert!(
            e.contains("rules.then.filter.rule: a rule on sensor runs names the rule it follows"),
            "{e}"
        );
        let e = problem(&GOOD.replace("on = \"landing\"", "on = \"landed\""));
        assert!(e.contains("rules.fetch.on: no sensor \"landed\" (there are: hook, hourly, landing, runs, streams)"), "{e}");
    }

    #[test]
    fn sensors_and_steps_are_checked() {
        let e = Plan::compile(
            "[sensors.t]\nkind = \"cron\"\nschedule = \"every hour\"\n",
            &WorkflowConfig::default(),
        )
        .unwrap_err();
        assert!(e.starts_with("sensors.t: schedule \"every hour\": "), "{e}");
        let e = Plan::compile(
            "[sensors.t]\nkind = \"timer\"\nevery = \"5 parsecs\"\n",
            &WorkflowConfig::default(),
        )
        .unwrap_err();
        assert!(
            e.contains("sensors.t: every: \"5 parsecs\" is not a duration"),
            "{e}"
        );
        let e = Plan::compile(
            "[sensors.streams]\nkind = \"http\"\n",
            &WorkflowConfig::default(),
        )
        .unwrap_err();
        assert!(e.contains("built-in sensor"), "{e}");
        let e = Plan::compile(
            "[sensors.t]\nkind = \"timer\"\nevery = \"1s\"\npaht = \"/x\"\n",
            &WorkflowConfig::default(),
        )
        .unwrap_err();
        assert!(e.contains("unknown field `paht`"), "{e}");
        let e = problem(&GOOD.replace(
            "command = { run = [\"echo\", \"{{ event.payload.rule }}\"] }",
            "command = { run = [\"echo\"] }\npull = { endpoint = \"a:1\", paradata = \"x:\", output = \"/o\" }",
        ));
        assert!(
            e.contains("a step does exactly one of pull, push, command, checksum (found 2)"),
            "{e}"
        );
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
    }
}
