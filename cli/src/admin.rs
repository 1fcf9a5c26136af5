//! The admin HTTP endpoint of `nexus serve` (`burst.nexus.admin.address`): `/metrics` for
//! Prometheus, `/healthz` (the process answers) and `/readyz` (200 only while serving; 503
//! while starting and draining).
//!
//! A plain blocking HTTP/1.1 responder on its own thread: three GET routes do not justify an
//! HTTP stack. Requests are read with a deadline and a size cap; anything else gets 404/405.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nexus_config::metric_names as names;

/// Longest request head read.
const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How often the exporter's upkeep runs (it drains histogram buckets so memory stays flat).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where the server is in its life, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

/// A running admin endpoint.
pub(crate) struct Admin {
    phase: Arc<AtomicU8>,
}

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

impl Admin {
    /// Listens on `address` and serves until the process ends; `refresh` runs before each
    /// scrape to publish counters kept outside the recorder.
    pub(crate) fn start(
        address: SocketAddr,
        handle: PrometheusHandle,
        refresh: Box<dyn Fn() + Send>,
    ) -> Result<Admin, String> {
        let listener = TcpListener::bind(address)
            .map_err(|e| format!("burst.nexus.admin.address {address}: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("burst.nexus.admin.address {address}: {e}"))?;
        let phase = Arc::new(AtomicU8::new(Phase::Starting as u8));
        let seen = Arc::clone(&phase);
        std::thread::Builder::new()
            .name("nexus-admin".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            let phase = phase_of(seen.load(Ordering::Relaxed));
                            if let Err(e) = serve_one(stream, phase, &handle, &*refresh) {
                                tracing::debug!(error = %e, "Admin request failed.");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Admin accept failed.");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| format!("admin thread: {e}"))?;
        tracing::info!(admin = %address, "Admin endpoint listening (/metrics, /healthz, /readyz).");
        Ok(Admin { phase })
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        metrics::gauge!(names::SERVER_READY).set(if phase == Phase::Ready { 1.0 } else { 0.0 });
    }
}

fn phase_of(value: u8) -> Phase {
    match value {
        1 => Phase::Ready,
        2 => Phase::Draining,
        _ => Phase::Starting,
    }
}

/// The route a request head asks for, or the status to answer instead.
fn route(head: &[u8]) -> Result<&str, (u16, &'static str)> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or((400, "Bad Request"))?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| (400, "Bad Request"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "Bad Request"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((400, "Bad Request"));
    }
    if method != "GET" && method != "HEAD" {
        return Err((405, "Method Not Allowed"));
    }
    Ok(target.split('?').next().unwrap_or(target))
}

fn serve_one(
    mut stream: TcpStream,
    phase: Phase,
    handle: &PrometheusHandle,
    refresh: &dyn Fn(),
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_DEADLINE))?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            return respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = "text/plain; charset=utf-8";
    match route(&head) {
        Err((code, reason)) => respond(&mut stream, code, reason, text, ""),
        Ok("/metrics") => {
            refresh();
            let body = handle.render();
            respond(
                &mut stream,
                200,
                "OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
        }
        Ok("/healthz") => respond(&mut stream, 200, "OK", text, "ok\n"),
        Ok("/readyz") => match phase {
            Phase::Ready => respond(&mut stream, 200, "OK", text, "ready\n"),
            Phase::Starting => respond(&mut stream, 503, "Service Unavailable", text, "starting\n"),
            Phase::Draining => respond(&mut stream, 503, "Service Unavailable", text, "draining\n"),
        },
        Ok(_) => respond(
            &mut stream,
            404,
            "Not Found",
            text,
            "try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
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

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn requests_are_routed_or_refused() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok("/metrics")
        );
        assert_eq!(route(b"GET /readyz?x=1 HTTP/1.0\r\n\r\n"), Ok("/readyz"));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err((405, "Method Not Allowed"))
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Err((400, "Bad Request")));
        assert_eq!(
            route(b"\x16\x03\x01\x02\x00\r\n\r\n"),
            Err((400, "Bad Request"))
        );
        assert_eq!(route(b"GET / SSH-2.0\r\n\r\n"), Err((400, "Bad Request")));
    }
}
