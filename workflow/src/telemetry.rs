//! The workflow's metrics, recorded through the `metrics` facade as things happen (events,
//! runs and steps are control-plane events, a few per stream at most). Labels are sensor,
//! rule and step names from the rules file, and small fixed sets of results.

use std::time::Duration;

use crate::store::State;

/// The Prometheus names.
pub mod names {
    /// Events raised, by `sensor` and `result` (accepted, duplicate, invalid).
    pub const EVENTS: &str = "nexus_workflow_events_total";
    /// Runs created, by `rule`.
    pub const RUNS_QUEUED: &str = "nexus_workflow_runs_queued_total";
    /// Runs ended, by `rule` and `state` (success, failed).
    pub const RUNS_ENDED: &str = "nexus_workflow_runs_total";
    /// Runs executing now, by `rule`.
    pub const RUNS_ACTIVE: &str = "nexus_workflow_runs_active";
    /// One try of a step, by `rule`, `step` and `outcome` (success, failed, interrupted).
    pub const STEP_DURATION: &str = "nexus_workflow_step_duration_seconds";
    /// Sensor polls that failed (a directory gone, a watch refused), by `sensor`.
    pub const SENSOR_ERRORS: &str = "nexus_workflow_sensor_errors_total";
    /// Timer and cron ticks that fell while the process was down, by `sensor`.
    pub const MISSED_TICKS: &str = "nexus_workflow_sensor_missed_ticks_total";
    /// 1 while the AMQP bus is connected to its broker, else 0.
    pub const BUS_CONNECTED: &str = "nexus_workflow_bus_connected";
    /// Connections to the broker lost.
    pub const BUS_RECONNECTS: &str = "nexus_workflow_bus_reconnects_total";
    /// Events the broker confirmed, by `rule`.
    pub const BUS_PUBLISHED: &str = "nexus_workflow_bus_published_total";
    /// Deliveries the broker marked as given out before, by `rule`.
    pub const BUS_REDELIVERED: &str = "nexus_workflow_bus_redelivered_total";
    /// Deliveries of an event whose run had already succeeded on this node, by `rule`.
    pub const BUS_DUPLICATES: &str = "nexus_workflow_bus_duplicates_total";
    /// Deliveries sent to the dead-letter queue (their run failed for good), by `rule`.
    pub const BUS_DEAD_LETTERED: &str = "nexus_workflow_bus_dead_lettered_total";
}

/// Name, type, labels, original name (none), meaning: the README's rows.
pub const METRICS: &[(&str, &str, &str, &str, &str)] = &[
    (
        names::EVENTS,
        "counter",
        "sensor, result",
        "",
        "Workflow events raised: accepted, duplicate (an id seen before), invalid (failed the sensor's schema).",
    ),
    (
        names::RUNS_QUEUED,
        "counter",
        "rule",
        "",
        "Workflow runs created by matching events.",
    ),
    (
        names::RUNS_ENDED,
        "counter",
        "rule, state",
        "",
        "Workflow runs ended, success or failed.",
    ),
    (
        names::RUNS_ACTIVE,
        "gauge",
        "rule",
        "",
        "Workflow runs executing now.",
    ),
    (
        names::STEP_DURATION,
        "histogram",
        "rule, step, outcome",
        "",
        "Time of one try of a workflow step: success, failed, interrupted.",
    ),
    (
        names::SENSOR_ERRORS,
        "counter",
        "sensor",
        "",
        "Sensor polls that failed (the sensor backs off and tries again).",
    ),
    (
        names::MISSED_TICKS,
        "counter",
        "sensor",
        "",
        "Timer and cron ticks that fell while the process was down.",
    ),
    (
        names::BUS_CONNECTED,
        "gauge",
        "",
        "",
        "1 while the AMQP workflow bus is connected to its broker, else 0 (burst.nexus.workflow.bus).",
    ),
    (
        names::BUS_RECONNECTS,
        "counter",
        "",
        "",
        "Connections of the workflow bus to its broker that were lost.",
    ),
    (
        names::BUS_PUBLISHED,
        "counter",
        "rule",
        "",
        "Events the broker confirmed for a rule's queue.",
    ),
    (
        names::BUS_REDELIVERED,
        "counter",
        "rule",
        "",
        "Bus deliveries the broker had given out before (a node died or lost its connection before its ack).",
    ),
    (
        names::BUS_DUPLICATES,
        "counter",
        "rule",
        "",
        "Bus deliveries of an event whose run had already succeeded on this node: acked, not run again.",
    ),
    (
        names::BUS_DEAD_LETTERED,
        "counter",
        "rule",
        "",
        "Bus deliveries sent to the rule's dead-letter queue nexus.dead.RULE (the run failed for good).",
    ),
];

/// Buckets of the step duration histogram, in seconds.
pub const STEP_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// The histograms and their buckets, for the exporter.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[(names::STEP_DURATION, STEP_BUCKETS)];

/// Describes the metrics to the installed recorder (call it after installing one).
pub fn describe() {
    for (name, kind, _, _, meaning) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *meaning),
            "histogram" => metrics::describe_histogram!(*name, *meaning),
            _ => metrics::describe_gauge!(*name, *meaning),
        }
    }
}

pub(crate) fn event(sensor: &str, result: &'static str) {
    events(sensor, result, 1);
}

pub(crate) fn events(sensor: &str, result: &'static str, n: u64) {
    metrics::counter!(names::EVENTS, "sensor" => sensor.to_string(), "result" => result)
        .increment(n);
}

pub(crate) fn run_queued(rule: &str) {
    metrics::counter!(names::RUNS_QUEUED, "rule" => rule.to_string()).increment(1);
}

pub(crate) fn run_started(rule: &str) {
    metrics::gauge!(names::RUNS_ACTIVE, "rule" => rule.to_string()).increment(1.0);
}

pub(crate) fn run_interrupted(rule: &str) {
    metrics::gauge!(names::RUNS_ACTIVE, "rule" => rule.to_string()).decrement(1.0);
}

pub(crate) fn run_ended(rule: &str, state: State) {
    metrics::gauge!(names::RUNS_ACTIVE, "rule" => rule.to_string()).decrement(1.0);
    metrics::counter!(names::RUNS_ENDED, "rule" => rule.to_string(), "state" => state.as_str())
        .increment(1);
}

pub(crate) fn step_took(rule: &str, step: &str, outcome: &'static str, took: Duration) {
    metrics::histogram!(names::STEP_DURATION, "rule" => rule.to_string(),
                        "step" => step.to_string(), "outcome" => outcome)
    .record(took.as_secs_f64());
}

pub(crate) fn sensor_error(sensor: &str) {
    metrics::counter!(names::SENSOR_ERRORS, "sensor" => sensor.to_string()).increment(1);
}

pub(crate) fn missed_ticks(sensor: &str, n: u64) {
    metrics::counter!(names::MISSED_TICKS, "sensor" => sensor.to_string()).increment(n);
}
