//! Nexus workflow: sensors raise events, rules move streams, executors consume them.
//!
//! A rules file (TOML, [`spec`]) declares sensors (timer, cron, file watch, HTTP) and rules:
//! "on this sensor's events, when the payload matches, run these steps". A step pulls a
//! stream into a file, pushes a file into a sink (or replicas), pipes a stream into a
//! command, or verifies a stream ([`exec`]). Steps form a graph (`after`); a rule can follow
//! another rule's runs (the built-in `runs` sensor), and every stream that ends on the node is
//! an event of the built-in `streams` sensor.
//!
//! [`Workflow::start`] runs a checked [`Plan`]: one thread per sensor and `concurrency`
//! worker threads per rule, all on the control plane, away from any data-plane shard. The
//! state (event log, checkpoints, runs and steps) is SQLite ([`store`]); delivery is at
//! least once, and a restart resumes unfinished runs.

pub mod admin;
/// The AMQP 0-9-1 bus (feature `amqp`).
#[cfg(feature = "amqp")]
pub mod bus;
pub mod event;
pub mod exec;
/// Fuzz entry point for what the HTTP sensor reads from the network: for the fuzz target and
/// the tests that replay its corpus, not part of the API (feature `fuzz`, or `cfg(fuzzing)`).
#[cfg(any(fuzzing, feature = "fuzz"))]
pub mod fuzz;
/// The `mysql` pressure sensor (feature `mysql`).
#[cfg(feature = "mysql")]
pub mod mysql;
/// S3: the `s3` sensor, and the `s3:` source and sink (feature `s3`).
#[cfg(feature = "s3")]
pub mod s3;
pub mod sensor;
pub mod serve;
pub mod spec;
pub mod stop;
pub mod store;
pub mod telemetry;
pub mod template;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use nexus_client::Client;
use nexus_config::{bind, BadValue, Binding, Values};
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};

pub use event::Event;
pub use spec::Plan;
pub use stop::Stop;
pub use store::{RunView, State, Store};

use crate::exec::{Failure, Job};
#[cfg(feature = "amqp")]
use crate::spec::BUILT_IN_SENSORS;
use crate::spec::{Action, Rule, Step};

/// Workflow settings from `burst.nexus.workflow.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowConfig {
    /// The SQLite state file (`burst.nexus.workflow.state`).
    pub state: PathBuf,
    /// Runs of one rule at once unless the rule says (`burst.nexus.workflow.rule.concurrency`).
    pub rule_concurrency: usize,
    /// Retries of a failed step unless it says (`burst.nexus.workflow.step.retries`).
    pub step_retries: u32,
    /// First wait before a retry, doubling (`burst.nexus.workflow.step.backoff.ms`).
    pub step_backoff: Duration,
    /// Longest one try of a step (`burst.nexus.workflow.step.timeout.ms`).
    pub step_timeout: Duration,
    /// Largest body `POST /sensors/NAME` takes (`burst.nexus.workflow.http.body.max`).
    pub http_body_max: u64,
    /// How long ended events, their runs and steps are kept
    /// (`burst.nexus.workflow.retention.ms`).
    pub retention: Duration,
    /// Which stream ends become `streams` events (`burst.nexus.workflow.streams.events`).
    pub streams_events: StreamsEvents,
    /// Where S3 is, for the `s3` sensor and the `s3:` source and sink (`burst.nexus.s3.*`).
    pub s3: S3Config,
    /// `embedded`, or the AMQP URL of the broker the nodes share
    /// (`burst.nexus.workflow.bus`).
    pub bus: String,
}

/// S3 settings (`burst.nexus.s3.*`). Credentials are not properties: they come as the AWS
/// tools take them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the
/// instance's role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The S3 endpoint (`burst.nexus.s3.endpoint`); empty: AWS, for the region.
    pub endpoint: String,
    /// The region (`burst.nexus.s3.region`).
    pub region: String,
    /// The buckets `nexus serve` serves as `s3:BUCKET/KEY` and takes pushes into
    /// (`burst.nexus.s3.buckets`); none by default.
    pub buckets: Vec<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            buckets: Vec::new(),
        }
    }
}

/// A comma-separated list; blanks around names and empty names are dropped.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(str::to_string)
        .collect()
}

/// Which stream ends become events of the `streams` sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamsEvents {
    /// Every one: the event log (and `events:streams`) sees all of them.
    All,
    /// Only those a rule's filter matches; with no rule on `streams`, the server does not
    /// even watch its streams (no cost on the data path).
    Rules,
}

impl std::str::FromStr for StreamsEvents {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "all" => Ok(StreamsEvents::All),
            "rules" => Ok(StreamsEvents::Rules),
            _ => Err(format!("{text:?}: all or rules")),
        }
    }
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        WorkflowConfig {
            state: PathBuf::from("nexus-workflow.db"),
            rule_concurrency: 4,
            step_retries: 3,
            step_backoff: Duration::from_millis(1000),
            step_timeout: Duration::from_secs(3600),
            http_body_max: 1 << 20,
            retention: Duration::from_secs(7 * 24 * 3600),
            streams_events: StreamsEvents::All,
            s3: S3Config::default(),
            bus: "embedded".into(),
        }
    }
}

impl WorkflowConfig {
    /// Every property the workflow reads.
    pub const PROPERTIES: &'static [Binding<WorkflowConfig>] = &[
        bind!("burst.nexus.workflow.state", parse::<PathBuf>, |c, v| {
            c.state = v
        }),
        bind!(
            "burst.nexus.workflow.rule.concurrency",
            positive::<usize>,
            |c, v| c.rule_concurrency = v
        ),
        bind!("burst.nexus.workflow.step.retries", parse::<u32>, |c, v| {
            c.step_retries = v
        }),
        bind!("burst.nexus.workflow.step.backoff.ms", millis, |c, v| {
            c.step_backoff = v
        }),
        bind!("burst.nexus.workflow.step.timeout.ms", millis, |c, v| {
            c.step_timeout = v
        }),
        bind!("burst.nexus.workflow.http.body.max", size, |c, v| {
            c.http_body_max = v
        }),
        bind!("burst.nexus.workflow.retention.ms", millis, |c, v| {
            c.retention = v
        }),
        bind!(
            "burst.nexus.workflow.streams.events",
            parse::<StreamsEvents>,
            |c, v| c.streams_events = v
        ),
        bind!("burst.nexus.workflow.bus", parse::<String>, |c, v| c.bus =
            v),
        bind!("burst.nexus.s3.endpoint", parse::<String>, |c, v| {
            c.s3.endpoint = v
        }),
        bind!("burst.nexus.s3.region", parse::<String>, |c, v| {
            c.s3.region = v
        }),
        bind!("burst.nexus.s3.buckets", parse::<String>, |c, v| {
            c.s3.buckets = list(&v)
        }),
    ];

    /// The configuration `values` describe.
    pub fn from_values(values: &Values) -> Result<WorkflowConfig, BadValue> {
        let mut c = WorkflowConfig::default();
        nexus_config::apply(&mut c, values, Self::PROPERTIES)?;
        Ok(c)
    }
}

/// Why an event was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaiseError {
    /// No sensor of that name.
    #[error("no sensor {0:?}")]
    UnknownSensor(String),
    /// The payload does not fit the sensor's schema.
    #[error("the payload does not fit the schema of sensor {sensor}: {message}")]
    Invalid {
        /// The sensor.
        sensor: String,
        /// Each failing path and why.
        message: String,
    },
    /// The state could not be written.
    #[error("{0}")]
    Store(String),
    /// The bus could not take it (its broker is down): try again.
    #[error("{0}")]
    Unavailable(String),
}

/// What happened to a raised event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raised {
    /// Logged; these runs were queued.
    New {
        /// The event's id.
        id: String,
        /// The runs it started.
        runs: Vec<i64>,
    },
    /// The sensor already had an event with this id: nothing new.
    Duplicate {
        /// The event's id.
        id: String,
    },
}

/// A running workflow. [`stop`](Self::stop) (or drop) stops the sensors and interrupts the
/// runs; unfinished runs resume at the next start on the same state.
pub struct Workflow {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub(crate) struct Shared {
    pub(crate) plan: Plan,
    pub(crate) store: Store,
    pub(crate) client: Client,
    pub(crate) config: WorkflowConfig,
    pub(crate) stop: Stop,
    queues: HashMap<String, Sender<store::OpenRun>>,
    step_slots: HashMap<(String, String), Arc<Slots>>,
    /// Bumped on every new event: the `events:` source waits on it.
    appended: (Mutex<u64>, Condvar),
    /// The AMQP bus, when `burst.nexus.workflow.bus` names a broker.
    #[cfg(feature = "amqp")]
    bus: Option<bus::Bus>,
}

/// A counting semaphore for step concurrency.
struct Slots {
    free: Mutex<usize>,
    wake: Condvar,
}

impl Slots {
    /// Takes a slot, waiting for one; false when the workflow stops first
    /// ([`wake_all`](Self::wake_all) at the stop).
    fn acquire(&self, stop: &Stop) -> bool {
        let mut free = self.free.lock();
        while *free == 0 {
            if stop.is_stopped() {
                return false;
            }
            self.wake.wait(&mut free);
        }
        *free -= 1;
        true
    }

    /// Wakes every waiter (to see the stop). The lock is taken, so a waiter that found the
    /// workflow running is already waiting.
    fn wake_all(&self) {
        let _free = self.free.lock();
        self.wake.notify_all();
    }

    fn release(&self) {
        *self.free.lock() += 1;
        self.wake.notify_one();
    }
}

impl Workflow {
    /// Starts `plan` on `store`, moving streams through `client`: settles what a crash left
    /// half done, queues the unfinished runs, then starts the sensors and workers.
    pub fn start(
        plan: Plan,
        store: Store,
        client: Client,
        config: WorkflowConfig,
    ) -> std::io::Result<Workflow> {
        let stop = Stop::new()?;
        let mut queues = HashMap::new();
        let mut receivers = Vec::new();
        let mut step_slots = HashMap::new();
        for rule in plan.rules.values() {
            let (tx, rx) = unbounded();
            queues.insert(rule.name.clone(), tx);
            receivers.push((rule.name.clone(), rule.concurrency, rx));
            for step in &rule.steps {
                if let Some(n) = step.concurrency {
                    step_slots.insert(
                        (rule.name.clone(), step.name.clone()),
                        Arc::new(Slots {
                            free: Mutex::new(n),
                            wake: Condvar::new(),
                        }),
                    );
                }
            }
        }
        let mut threads = Vec::new();
        #[cfg(feature = "amqp")]
        let (bus, delivered) = if config.bus == "embedded" {
            (None, None)
        } else {
            if !config.bus.starts_with("amqp://") {
                return Err(std::io::Error::other(format!(
                    "burst.nexus.workflow.bus {:?}: write embedded, or amqp://USER:PASSWORD@HOST:PORT/VHOST",
                    config.bus
                )));
            }
            let rules = plan
                .rules
                .values()
                .filter(|r| bus_borne(&r.on))
                .map(|r| {
                    (
                        r.name.clone(),
                        u16::try_from(r.concurrency).unwrap_or(u16::MAX),
                    )
                })
                .collect();
            let (tx, rx) = unbounded();
            let (bus, thread) = bus::Bus::start(config.bus.clone(), rules, tx)?;
            threads.push(thread);
            (Some(bus), Some(rx))
        };
        #[cfg(not(feature = "amqp"))]
        if config.bus != "embedded" {
            return Err(std::io::Error::other(
                "burst.nexus.workflow.bus: this nexus was built without the amqp feature",
            ));
        }
        let shared = Arc::new(Shared {
            plan,
            store,
            client,
            config,
            stop,
            queues,
            step_slots,
            appended: (Mutex::new(0), Condvar::new()),
            #[cfg(feature = "amqp")]
            bus,
        });
        let io = |e: store::StoreError| std::io::Error::other(e.to_string());
        let settled = shared.store.settle().map_err(io)?;
        let open = shared.store.open_runs().map_err(io)?;
        if settled > 0 || !open.is_empty() {
            tracing::info!(
                resumed = open.len(),
                settled,
                "Resuming the runs a previous process left unfinished."
            );
        }
        for run in open {
            if shared.on_bus(&run.rule) {
                // Its delivery went back to the broker with the last process's connection:
                // the broker gives it out again, here or to another node, and a delivery
                // here queues this run again (from its first step that did not succeed).
                let message = "interrupted; the bus gives its event out again";
                shared
                    .store
                    .finish_run(run.id, State::Failed, Some(message), None)
                    .map_err(io)?;
                continue;
            }
            match shared.queues.get(&run.rule) {
                Some(queue) => {
                    let _ = queue.send(run);
                }
                None => {
                    let message = format!("rule {:?} is no longer in the rules file", run.rule);
                    tracing::warn!(run = run.id, rule = %run.rule, "{message}; the run fails.");
                    shared
                        .store
                        .finish_run(run.id, State::Failed, Some(&message), None)
                        .map_err(io)?;
                }
            }
        }
        #[cfg(feature = "amqp")]
        if let Some(delivered) = delivered {
            let intake = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("nexus-bus-intake".into())
                    .spawn(move || bus_intake(&intake, &delivered))?,
            );
        }
        for (rule, concurrency, rx) in receivers {
            for i in 0..concurrency {
                let shared = Arc::clone(&shared);
                let rx = rx.clone();
                let rule = rule.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("nexus-rule-{rule}-{i}"))
                        .spawn(move || worker(&shared, &rx))?,
                );
            }
        }
        for sensor in shared.plan.sensors.values() {
            if let Some(thread) = sensor::spawn(&shared, sensor)? {
                threads.push(thread);
            }
        }
        let pruner = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("nexus-workflow-prune".into())
                .spawn(move || prune(&pruner))?,
        );
        Ok(Workflow {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Raises an event on `sensor` (the HTTP sensor's door, and an embedder's).
    pub fn raise(
        &self,
        sensor: &str,
        id: Option<String>,
        payload: Value,
    ) -> Result<Raised, RaiseError> {
        let id = id.unwrap_or_else(unique_id);
        self.shared.raise(Event::now(sensor, id, payload), None)
    }

    /// The sensor named `name`, when it is an `http` sensor.
    pub fn is_http_sensor(&self, name: &str) -> bool {
        self.shared
            .plan
            .sensors
            .get(name)
            .is_some_and(|s| matches!(s.kind, spec::SensorKind::Http))
    }

    /// Runs, newest first.
    pub fn runs(
        &self,
        rule: Option<&str>,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<RunView>, String> {
        self.shared
            .store
            .runs(rule, state, limit)
            .map_err(|e| e.to_string())
    }

    /// A sensor's events after `after` (an id, or a sequence number from an earlier call),
    /// waiting up to `wait` for one when there is none yet. `Ok(None)` when `after` names no
    /// event of the sensor.
    pub fn events_after(
        &self,
        sensor: &str,
        after: Option<&str>,
        after_seq: Option<i64>,
        wait: Duration,
    ) -> Result<Option<Vec<(i64, Event)>>, String> {
        let seen = *self.shared.appended.0.lock();
        let found = self
            .shared
            .store
            .events_after(sensor, after, after_seq, 1000)
            .map_err(|e| e.to_string())?;
        if matches!(&found, Some(v) if v.is_empty()) && !wait.is_zero() {
            let mut count = self.shared.appended.0.lock();
            if *count == seen {
                self.shared.appended.1.wait_for(&mut count, wait);
            }
        }
        Ok(found)
    }

    /// Records streams that ended on this node's server as `streams` events (payloads as
    /// JSON text valid against the `streams` schema), in one transaction.
    pub fn streams_ended(&self, payloads: Vec<String>) {
        self.shared.streamed_many(payloads);
    }

    /// Whether stream ends are wanted at all: always with `streams.events = all`, only when
    /// a rule listens to `streams` with `rules`.
    pub fn wants_stream_ends(&self) -> bool {
        self.shared.config.streams_events == StreamsEvents::All
            || self.shared.plan.rules.values().any(|r| r.on == "streams")
    }

    /// Whether the workflow can take events: `Err` says why not (its bus has lost the
    /// broker). For `/readyz`.
    pub fn ready(&self) -> Result<(), String> {
        #[cfg(feature = "amqp")]
        if let Some(bus) = &self.shared.bus {
            if !bus.is_connected() {
                return Err("the workflow bus is not connected to its broker".into());
            }
        }
        Ok(())
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.is_stopped()
    }

    /// Whether a sensor of this name exists.
    pub fn has_sensor(&self, name: &str) -> bool {
        self.shared.plan.sensors.contains_key(name)
    }

    /// The largest HTTP sensor body.
    pub fn http_body_max(&self) -> u64 {
        self.shared.config.http_body_max
    }

    /// Stops sensors and workers; running steps are interrupted and their runs stay open.
    /// Returns once every sensor and worker thread has ended.
    pub fn stop(&self) {
        self.shared.stop.stop();
        #[cfg(feature = "amqp")]
        if let Some(bus) = &self.shared.bus {
            bus.stop();
        }
        self.shared.appended.1.notify_all();
        for slots in self.shared.step_slots.values() {
            slots.wake_all();
        }
        let threads: Vec<JoinHandle<()>> = self.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Workflow {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The next item of a stream (for the sensors that read one on their own runtime).
#[cfg(any(feature = "s3", feature = "mysql", feature = "amqp"))]
pub(crate) fn next_item<S: futures_core::Stream + Unpin + ?Sized>(
    stream: &mut S,
) -> impl std::future::Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| std::pin::Pin::new(&mut *stream).poll_next(cx))
}

/// A unique id for events that have no natural one (`streams`, an HTTP event without an
/// `Idempotency-Key`): the process's start time and a counter, so no system call per event
/// and no repeat across restarts.
fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    format!("{epoch:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Shared {
    /// Validates, logs and dispatches `event`.
    pub(crate) fn raise(
        &self,
        event: Event,
        cursor: Option<(&str, &str)>,
    ) -> Result<Raised, RaiseError> {
        let rules = self.matching(&event)?;
        #[cfg(feature = "amqp")]
        if let Some(bus) = &self.bus {
            return self.publish(bus, event, cursor, &rules);
        }
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        let runs = self
            .store
            .raise(&event, cursor, &names)
            .map_err(|e| RaiseError::Store(e.to_string()))?;
        Ok(self.dispatch(event, &rules, runs))
    }

    /// Whether runs of `rule` come from the bus (its sensor's events go through the broker).
    fn on_bus(&self, rule: &str) -> bool {
        #[cfg(feature = "amqp")]
        if self.bus.is_some() {
            return self.plan.rules.get(rule).is_some_and(|r| bus_borne(&r.on));
        }
        let _ = rule;
        false
    }

    /// Publishes `event` for each of `rules` and, once the broker confirmed them all,
    /// records it here with no runs: its cursor moves, and the runs happen where the broker
    /// delivers them.
    #[cfg(feature = "amqp")]
    fn publish(
        &self,
        bus: &bus::Bus,
        event: Event,
        cursor: Option<(&str, &str)>,
        rules: &[&Rule],
    ) -> Result<Raised, RaiseError> {
        let store = |e: store::StoreError| RaiseError::Store(e.to_string());
        if self
            .store
            .has_event(&event.sensor, &event.id)
            .map_err(store)?
        {
            telemetry::event(&event.sensor, "duplicate");
            return Ok(Raised::Duplicate { id: event.id });
        }
        for rule in rules {
            bus.publish(&rule.name, &event)
                .map_err(|e| RaiseError::Unavailable(format!("workflow bus: {e}")))?;
        }
        // This node's consumer may have recorded it already (with its run): the event stays,
        // and the cursor moves either way.
        self.store.record_published(&event, cursor).map_err(store)?;
        telemetry::event(&event.sensor, "accepted");
        self.appended();
        Ok(Raised::New {
            id: event.id,
            runs: Vec::new(),
        })
    }

    /// Checks `event` against its sensor's schema; the rules it starts.
    fn matching(&self, event: &Event) -> Result<Vec<&Rule>, RaiseError> {
        let Some(sensor) = self.plan.sensors.get(&event.sensor) else {
            return Err(RaiseError::UnknownSensor(event.sensor.clone()));
        };
        if let Err(message) = sensor.schema.validate(&event.payload) {
            telemetry::event(&event.sensor, "invalid");
            return Err(RaiseError::Invalid {
                sensor: event.sensor.clone(),
                message,
            });
        }
        Ok(self
            .plan
            .rules
            .values()
            .filter(|r| r.on == event.sensor && r.matches(&event.payload))
            .collect())
    }

    /// Queues the runs an event recorded in the state started (`None`: it was a duplicate).
    fn dispatch(&self, event: Event, rules: &[&Rule], runs: Option<Vec<i64>>) -> Raised {
        let Some(runs) = runs else {
            telemetry::event(&event.sensor, "duplicate");
            return Raised::Duplicate { id: event.id };
        };
        telemetry::event(&event.sensor, "accepted");
        self.appended();
        self.queue(&event, rules, &runs);
        Raised::New { id: event.id, runs }
    }

    /// Wakes the readers of the event log (`events:`).
    fn appended(&self) {
        *self.appended.0.lock() += 1;
        self.appended.1.notify_all();
    }

    /// Hands the runs `event` started (one per rule, in order) to their rules' workers.
    fn queue(&self, event: &Event, rules: &[&Rule], runs: &[i64]) {
        for (rule, id) in rules.iter().zip(runs) {
            telemetry::run_queued(&rule.name);
            if let Some(queue) = self.queues.get(&rule.name) {
                let _ = queue.send(store::OpenRun {
                    id: *id,
                    rule: rule.name.clone(),
                    event: event.clone(),
                    delivery: None,
                });
            }
        }
    }

    /// Streams ended: `streams` events (payloads as JSON text, made from typed values by
    /// this crate), recorded in one transaction. A payload is parsed only when a rule
    /// listens to `streams`: the cost per stream end stays an id, a row and its share of
    /// one sync.
    pub(crate) fn streamed_many(&self, payloads: Vec<String>) {
        let listening: Vec<&Rule> = self
            .plan
            .rules
            .values()
            .filter(|r| r.on == "streams")
            .collect();
        let time_ms = event::unix_ms(std::time::SystemTime::now());
        let mut rows: Vec<(String, String, Vec<&str>)> = Vec::with_capacity(payloads.len());
        let mut parsed: Vec<Option<(Value, Vec<&Rule>)>> = Vec::with_capacity(payloads.len());
        for text in payloads {
            let mut wanted = None;
            if !listening.is_empty() {
                let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let rules: Vec<&Rule> = listening
                    .iter()
                    .copied()
                    .filter(|r| r.matches(&value))
                    .collect();
                if !rules.is_empty() {
                    wanted = Some((value, rules));
                }
            }
            if wanted.is_none() && self.config.streams_events == StreamsEvents::Rules {
                continue;
            }
            let names = wanted
                .as_ref()
                .map(|(_, rules)| rules.iter().map(|r| r.name.as_str()).collect())
                .unwrap_or_default();
            rows.push((unique_id(), text, names));
            parsed.push(wanted);
        }
        if rows.is_empty() {
            return;
        }
        let results = match self.store.raise_many("streams", time_ms, &rows) {
            Ok(results) => results,
            Err(e) => {
                telemetry::sensor_error("streams");
                tracing::warn!(error = %e, events = rows.len(), "Stream completion events were not recorded.");
                return;
            }
        };
        telemetry::events("streams", "accepted", rows.len() as u64);
        self.appended();
        for (((id, _, _), wanted), runs) in rows.into_iter().zip(parsed).zip(results) {
            let (Some((payload, rules)), Some(runs)) = (wanted, runs) else {
                continue;
            };
            let event = Event {
                id,
                sensor: "streams".into(),
                time_ms,
                payload,
            };
            self.queue(&event, &rules, &runs);
        }
    }
}

/// Whether a rule on `sensor` takes its runs from the bus: the events of every sensor but
/// the built-in ones (`streams`, `runs`: what ended on this node stays on this node).
#[cfg(feature = "amqp")]
fn bus_borne(sensor: &str) -> bool {
    !BUILT_IN_SENSORS.contains(&sensor)
}

/// Takes what the bus delivers: records the event and queues its run, or, when the run
/// already succeeded here, acks it at once.
#[cfg(feature = "amqp")]
fn bus_intake(shared: &Shared, delivered: &Receiver<bus::Delivered>) {
    let Some(bus) = &shared.bus else {
        return;
    };
    while let Ok((rule, event, delivery, _redelivered)) = delivered.recv() {
        match shared.store.take_delivery(&event, &rule) {
            Ok(Some(id)) => {
                telemetry::run_queued(&rule);
                shared.appended();
                if let Some(queue) = shared.queues.get(&rule) {
                    let _ = queue.send(store::OpenRun {
                        id,
                        rule,
                        event,
                        delivery: Some(delivery),
                    });
                }
            }
            Ok(None) => {
                metrics::counter!(telemetry::names::BUS_DUPLICATES, "rule" => rule.clone())
                    .increment(1);
                tracing::info!(rule = %rule, event = %event.id,
                               "The bus delivered an event whose run already succeeded here; acked.");
                bus.settle(delivery, bus::Settle::Ack);
            }
            Err(e) => {
                tracing::warn!(rule = %rule, event = %event.id, error = %e,
                               "Cannot record an event from the bus; it goes back to the queue.");
                bus.settle(delivery, bus::Settle::Requeue);
            }
        }
    }
}

/// How often ended events past the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Deletes ended events older than the retention, with their runs and steps: at start, then
/// every [`PRUNE_EVERY`], in transactions of at most 10,000 events.
fn prune(shared: &Shared) {
    loop {
        let cut = event::unix_ms(std::time::SystemTime::now())
            - i64::try_from(shared.config.retention.as_millis()).unwrap_or(i64::MAX);
        let mut removed = 0;
        loop {
            match shared.store.prune(cut, 10_000) {
                Ok(n) => {
                    removed += n;
                    if n < 10_000 || shared.stop.is_stopped() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot delete old workflow events.");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                retention_ms = shared.config.retention.as_millis() as u64,
                "Deleted ended workflow events past the retention."
            );
        }
        if shared.stop.wait(PRUNE_EVERY) {
            return;
        }
    }
}

fn worker(shared: &Shared, runs: &Receiver<store::OpenRun>) {
    loop {
        let run = select! {
            recv(shared.stop.receiver()) -> _ => return,
            recv(runs) -> run => match run {
                Ok(run) => run,
                Err(_) => return,
            },
        };
        if shared.stop.is_stopped() {
            return;
        }
        let Some(rule) = shared.plan.rules.get(&run.rule) else {
            continue;
        };
        let ended = execute(shared, rule, &run);
        if let Err(e) = &ended {
            tracing::error!(run = run.id, rule = %rule.name, error = %e, "A run's state could not be written.");
        }
        #[cfg(feature = "amqp")]
        if let (Some(bus), Some(delivery)) = (&shared.bus, run.delivery.clone()) {
            match ended {
                Ok(Some(State::Success)) => bus.settle(delivery, bus::Settle::Ack),
                Ok(Some(_)) => bus.settle(delivery, bus::Settle::Dead),
                // Interrupted (stopping): the broker gives it out again when the
                // connection closes.
                Ok(None) => {}
                Err(_) => bus.settle(delivery, bus::Settle::Requeue),
            }
        }
    }
}

/// How one step ended.
enum StepEnd {
    Success(Value),
    Failed(String),
    Interrupted,
}

/// Runs `run` of `rule` to its end: its final state, or `None` when the workflow stopped
/// first (the run stays open).
fn execute(
    shared: &Shared,
    rule: &Rule,
    run: &store::OpenRun,
) -> Result<Option<State>, store::StoreError> {
    let store = &shared.store;
    store.set_run(run.id, State::Started)?;
    telemetry::run_started(&rule.name);
    let records = store.steps(run.id)?;
    let mut results: HashMap<String, Value> = HashMap::new();
    // Steps that failed for good, with why.
    let mut failed: Vec<(String, String)> = Vec::new();
    for (name, record) in &records {
        if record.state == State::Success {
            results.insert(name.clone(), record.result.clone().unwrap_or(Value::Null));
        }
    }
    let mut interrupted = false;
    let mut running: Vec<String> = Vec::new();
    let (done_tx, done_rx) = unbounded::<(String, StepEnd)>();
    std::thread::scope(|scope| loop {
        if failed.is_empty() && !interrupted {
            for step in &rule.steps {
                let ready = !results.contains_key(&step.name)
                    && !running.contains(&step.name)
                    && step.after.iter().all(|a| results.contains_key(a));
                if !ready {
                    continue;
                }
                running.push(step.name.clone());
                let context = context(rule, run, &results);
                let prior = records.get(&step.name).map_or(0, |r| r.attempts);
                let done_tx = done_tx.clone();
                scope.spawn(move || {
                    let end = run_step(shared, rule, run, step, &context, prior);
                    let _ = done_tx.send((step.name.clone(), end));
                });
            }
        }
        if running.is_empty() {
            break;
        }
        let Ok((name, end)) = done_rx.recv() else {
            break;
        };
        running.retain(|n| *n != name);
        match end {
            StepEnd::Success(value) => {
                results.insert(name, value);
            }
            StepEnd::Failed(message) => failed.push((name, message)),
            StepEnd::Interrupted => interrupted = true,
        }
    });
    if interrupted {
        // Left open: the next start resumes it from the steps that did not succeed.
        telemetry::run_interrupted(&rule.name);
        return Ok(None);
    }
    let (state, error) = if failed.is_empty() {
        (State::Success, None)
    } else {
        for step in &rule.steps {
            if !results.contains_key(&step.name) && !failed.iter().any(|(n, _)| *n == step.name) {
                store.set_step(
                    run.id,
                    &step.name,
                    State::Skipped,
                    0,
                    Some("an earlier step failed"),
                    None,
                )?;
            }
        }
        let why: Vec<String> = failed.iter().map(|(n, m)| format!("{n}: {m}")).collect();
        (State::Failed, Some(why.join("; ")))
    };
    // The run's own event (sensor `runs`) is written with its end, in one transaction.
    let steps: serde_json::Map<String, Value> = results.into_iter().collect();
    let payload = json!({"rule": rule.name, "run": run.id, "event": run.event.id,
                         "sensor": run.event.sensor, "state": state.as_str(), "error": error,
                         "steps": steps});
    let follow = Event::now("runs", format!("run-{}", run.id), payload);
    let followers = match shared.matching(&follow) {
        Ok(rules) => rules,
        Err(e) => {
            tracing::error!(error = %e, "A run's completion event does not fit its schema.");
            Vec::new()
        }
    };
    let names: Vec<&str> = followers.iter().map(|r| r.name.as_str()).collect();
    let runs = store.finish_run(run.id, state, error.as_deref(), Some((&follow, &names)))?;
    telemetry::run_ended(&rule.name, state);
    shared.dispatch(follow, &followers, runs);
    match &error {
        None => {
            tracing::info!(run = run.id, rule = %rule.name, event = %run.event.id, "Run succeeded.")
        }
        Some(e) => {
            tracing::warn!(run = run.id, rule = %rule.name, event = %run.event.id, error = %e, "Run failed.")
        }
    }
    Ok(Some(state))
}

fn context(rule: &Rule, run: &store::OpenRun, results: &HashMap<String, Value>) -> Value {
    let steps: serde_json::Map<String, Value> = results
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    json!({"event": run.event.to_json(), "rule": rule.name, "run": run.id, "steps": steps})
}

fn render_job(action: &Action, cx: &Value) -> Result<Job, String> {
    let r = |at: &str, source: &str| template::render(source, cx).map_err(|e| format!("{at}: {e}"));
    Ok(match action {
        Action::Pull(p) => Job::Pull {
            endpoint: r("pull.endpoint", &p.endpoint)?,
            paradata: r("pull.paradata", &p.paradata)?,
            output: r("pull.output", &p.output)?,
        },
        Action::Push(p) => Job::Push {
            file: r("push.file", &p.file)?,
            endpoint: r("push.endpoint", &p.endpoint)?,
            sink: r("push.sink", &p.sink)?,
            replicas: p
                .replicas
                .iter()
                .map(|x| r("push.replicas", x))
                .collect::<Result<_, _>>()?,
            quorum: p.quorum,
        },
        Action::Command(c) => {
            let (stream, file) = match &c.stdin {
                Some(s) => match (&s.endpoint, &s.paradata, &s.file) {
                    (Some(e), Some(p), _) => (
                        Some((
                            r("command.stdin.endpoint", e)?,
                            r("command.stdin.paradata", p)?,
                        )),
                        None,
                    ),
                    (_, _, Some(f)) => (None, Some(r("command.stdin.file", f)?)),
                    _ => (None, None),
                },
                None => (None, None),
            };
            Job::Command {
                argv: c
                    .run
                    .iter()
                    .map(|a| r("command.run", a))
                    .collect::<Result<_, _>>()?,
                env: c
                    .env
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), r(&format!("command.env.{k}"), v)?)))
                    .collect::<Result<_, String>>()?,
                dir: c.dir.as_ref().map(|d| r("command.dir", d)).transpose()?,
                stream,
                file,
            }
        }
        Action::Checksum(c) => Job::Checksum {
            endpoint: r("checksum.endpoint", &c.endpoint)?,
            paradata: r("checksum.paradata", &c.paradata)?,
            digest: c
                .digest
                .as_ref()
                .map(|d| r("checksum.digest", d))
                .transpose()?,
        },
    })
}

/// The event's variables for commands.
fn command_env(rule: &Rule, run: &store::OpenRun, step: &Step) -> Vec<(String, String)> {
    let e = &run.event;
    let mut env = vec![
        ("NEXUS_EVENT_ID".to_string(), e.id.clone()),
        ("NEXUS_EVENT_SENSOR".to_string(), e.sensor.clone()),
        ("NEXUS_EVENT_TIME".to_string(), event::rfc3339(e.time_ms)),
        ("NEXUS_EVENT_PAYLOAD".to_string(), e.payload.to_string()),
        ("NEXUS_RULE".to_string(), rule.name.clone()),
        ("NEXUS_RUN".to_string(), run.id.to_string()),
        ("NEXUS_STEP".to_string(), step.name.clone()),
    ];
    if let Some(fields) = e.payload.as_object() {
        for (k, v) in fields {
            let key: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            env.push((format!("NEXUS_PAYLOAD_{key}"), value));
        }
    }
    env
}

fn run_step(
    shared: &Shared,
    rule: &Rule,
    run: &store::OpenRun,
    step: &Step,
    cx: &Value,
    prior: u32,
) -> StepEnd {
    let slots = shared
        .step_slots
        .get(&(rule.name.clone(), step.name.clone()))
        .cloned();
    if let Some(slots) = &slots {
        if !slots.acquire(&shared.stop) {
            return StepEnd::Interrupted;
        }
    }
    let end = tries(shared, rule, run, step, cx, prior);
    if let Some(slots) = &slots {
        slots.release();
    }
    end
}

fn tries(
    shared: &Shared,
    rule: &Rule,
    run: &store::OpenRun,
    step: &Step,
    cx: &Value,
    prior: u32,
) -> StepEnd {
    let store = &shared.store;
    let log = |r: Result<(), store::StoreError>| {
        if let Err(e) = r {
            tracing::error!(error = %e, "A step's state could not be written.");
        }
    };
    let job = match render_job(&step.action, cx) {
        Ok(job) => job,
        Err(e) => {
            log(store.set_step(run.id, &step.name, State::Failed, prior + 1, Some(&e), None));
            return StepEnd::Failed(e);
        }
    };
    let env = command_env(rule, run, step);
    let mut attempt = prior;
    loop {
        attempt += 1;
        log(store.set_step(run.id, &step.name, State::Started, attempt, None, None));
        let started = Instant::now();
        let streamed = |payload: String| shared.streamed_many(vec![payload]);
        let context = exec::Context {
            client: &shared.client,
            stop: &shared.stop,
            deadline: started + step.timeout,
            env: &env,
            tried_before: attempt > 1,
            streamed: &streamed,
        };
        let result = exec::run(&job, &context);
        let outcome = match &result {
            Ok(_) => "success",
            Err(f) if f.interrupted => "interrupted",
            Err(_) => "failed",
        };
        telemetry::step_took(&rule.name, &step.name, outcome, started.elapsed());
        match result {
            Ok(value) => {
                log(store.set_step(
                    run.id,
                    &step.name,
                    State::Success,
                    attempt,
                    None,
                    Some(&value),
                ));
                return StepEnd::Success(value);
            }
            Err(Failure {
                interrupted: true, ..
            }) => return StepEnd::Interrupted,
            Err(f) => {
                let tries_left = f.retryable && attempt <= step.retries;
                if !tries_left {
                    log(store.set_step(
                        run.id,
                        &step.name,
                        State::Failed,
                        attempt,
                        Some(&f.message),
                        None,
                    ));
                    return StepEnd::Failed(f.message);
                }
                log(store.set_step(
                    run.id,
                    &step.name,
                    State::Retrying,
                    attempt,
                    Some(&f.message),
                    None,
                ));
                log(store.set_run(run.id, State::Retrying));
                let shift = (attempt - prior).saturating_sub(1).min(16);
                let wait = step
                    .backoff
                    .saturating_mul(1 << shift)
                    .min(Duration::from_secs(300));
                tracing::info!(run = run.id, rule = %rule.name, step = %step.name, attempt,
                               error = %f.message, wait_ms = wait.as_millis() as u64, "Step failed; trying again.");
                if shared.stop.wait(wait) {
                    return StepEnd::Interrupted;
                }
                log(store.set_run(run.id, State::Started));
            }
        }
    }
}
