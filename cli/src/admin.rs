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
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::SERVER_TIME_TO_FIRST_BYTE.into()),
                names::FIRST_BYTE_BUCKETS,
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
pub(crate) fn publish_server_stats(stats: &nexus_server::ServerStats) {
    use metrics::counter;
    let s = &stats.snapshot();
    publish_process();
    counter!(names::SERVER_WIRE_BYTES).absolute(s.wire_bytes);
    for (code, value) in stats.stream_errors() {
        counter!(names::SERVER_STREAMS_FAILED, "code" => code).absolute(value);
    }
    publish_snapshot(s);
}

/// The process metrics Prometheus's own clients export, read from /proc at scrape time.
fn publish_process() {
    use metrics::{counter, gauge};
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) closed by ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if let (Some(utime), Some(stime), true) = (field(14), field(15), ticks > 0) {
            // The facade's counters are whole numbers: whole seconds, enough for rate().
            counter!(names::PROCESS_CPU).absolute((utime + stime) / ticks as u64);
        }
        if let (Some(pages), true) = (field(24), page > 0) {
            gauge!(names::PROCESS_RSS).set((pages * page as u64) as f64);
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(start), Some(boot), true) = (field(22), boot, ticks > 0) {
            gauge!(names::PROCESS_START_TIME).set(boot as f64 + start as f64 / ticks as f64);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!(names::PROCESS_OPEN_FDS).set(fds.count() as f64);
    }
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(limit) = limit {
        gauge!(names::PROCESS_MAX_FDS).set(limit as f64);
    }
}

fn publish_snapshot(s: &nexus_server::StatsSnapshot) {
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
