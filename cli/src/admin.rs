//! What `nexus serve` publishes on its admin endpoint (`nexus_server::admin`): the
//! Prometheus recorder, and the server's counters copied into it just before each scrape.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nexus_config::metric_names as names;

/// How often the exporter's upkeep runs (it drains histogram buckets so memory stays flat).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::SERVER_STREAM_DURATION.into()),
            names::DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::SERVER_STREAM_SIZE.into()),
                names::SIZE_BUCKETS,
            )
        })
        .map_err(|e| format!("metrics: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("metrics: {e}"))?;
    for (name, kind, _, _, meaning) in names::TABLE {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *meaning),
            "histogram" => metrics::describe_histogram!(*name, *meaning),
            _ => metrics::describe_gauge!(*name, *meaning),
        }
    }
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("nexus-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("metrics upkeep thread: {e}"))?;
    Ok(handle)
}

/// Publishes the server's counters to the recorder, just before a scrape renders them.
pub(crate) fn publish_server_stats(s: &nexus_server::StatsSnapshot) {
    use metrics::{counter, gauge};
    gauge!(names::SERVER_STREAMS_ACTIVE).set(s.streams_open as f64);
    gauge!(names::SERVER_CONNECTIONS).set(s.connections_open as f64);
    gauge!(names::SERVER_MEMORY_HELD).set(s.memory_held as f64);
    counter!(names::PRESS_ITEMS).absolute(s.chunks_sent);
    counter!(names::PRESS_BYTES).absolute(s.bytes_sent);
    counter!(names::SERVER_CHUNKS_COMPRESSED).absolute(s.chunks_compressed);
    counter!(names::PRESS_REJECTS).absolute(s.streams_rejected);
    counter!(names::SERVER_STREAMS_STARTED).absolute(s.streams_total);
    for (outcome, value) in [
        ("complete", s.streams_complete),
        ("cancelled", s.streams_cancelled),
        ("error", s.streams_error),
        ("timeout", s.streams_timeout),
    ] {
        counter!(names::SERVER_STREAMS_FINISHED, "outcome" => outcome).absolute(value);
    }
    counter!(names::SERVER_CONNECTIONS_ACCEPTED).absolute(s.connections_total);
    counter!(names::SERVER_CONNECTIONS_REFUSED, "reason" => "connection_limit")
        .absolute(s.connections_refused);
    counter!(names::SERVER_CONNECTIONS_REFUSED, "reason" => "auth_throttled")
        .absolute(s.connections_refused_auth);
    for (code, value) in nexus_server::PROTOCOL_ERROR_CODES
        .iter()
        .zip(s.protocol_errors_by_reason)
    {
        let reason = code.name().unwrap_or("unknown");
        counter!(names::PROTOCOL_ERRORS, "reason" => reason).absolute(value);
    }
}
