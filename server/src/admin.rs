//! The admin HTTP endpoint (`burst.nexus.admin.address`): `/metrics` for Prometheus,
//! `/healthz` (the process answers) and `/readyz` (200 only while serving; 503 while starting
//! and draining).
//!
//! [`prometheus`] installs the process's Prometheus recorder and gives the `/metrics`
//! renderer for a server: its counters are published just before each scrape
//! (`crate::telemetry`).
//!
//! HTTP/1.1 through hyper, on its own thread and current-thread runtime, away from the
//! shards: requests are served concurrently (an idle or slow client never delays a probe),
//! every request's head must arrive within [`HEADER_DEADLINE`], a connection lasts at most
//! [`CONNECTION_DEADLINE`], and at most [`MAX_CONNECTIONS`] are open at once (more are closed
//! at once). GET and HEAD for its own paths; an embedder adds more (any method, with a
//! bounded body) through [`Routes`]: the workflow's `/runs` and `POST /sensors/NAME`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::telemetry::{self, names};
use crate::tls::{Endpoint, Identity};
use crate::ServerStats;

/// Time a client has to send a request's head.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// The longest an admin connection stays open.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// Most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 128;

/// Where the server is in its life, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not listening yet: `/readyz` is 503 `starting`.
    Starting = 0,
    /// Serving: `/readyz` is 200.
    Ready = 1,
    /// Shutting down: `/readyz` is 503 `draining`.
    Draining = 2,
}

/// Renders the Prometheus text exposition for `/metrics`.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The address could not be bound.
    #[error(
        "burst.nexus.admin.address {address}: {source} (another nexus serve? give each server \
         its own with --admin HOST:PORT, or --admin '' for none)"
    )]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Its thread or runtime could not start.
    #[error("the admin endpoint cannot start: {0}")]
    Start(std::io::Error),
    /// The Prometheus recorder could not be installed (one per process).
    #[error("metrics: {0}")]
    Recorder(String),
}

/// How often the exporter's upkeep runs (it drains histogram buckets so memory stays flat).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder (once per process),
/// with the server's histogram buckets and descriptions, and returns the `/metrics` renderer:
/// it publishes the server's counters (`telemetry::publish`) once `stats` is set, then
/// renders. `stats` may be set after the endpoint starts (it starts before the server, so
/// `/readyz` says "starting").
pub fn prometheus(stats: Arc<OnceLock<Arc<ServerStats>>>) -> Result<RenderMetrics, AdminError> {
    prometheus_with(stats, &[])
}

/// [`prometheus`], with the histogram buckets of an embedder's metrics too (name, buckets).
pub fn prometheus_with(
    stats: Arc<OnceLock<Arc<ServerStats>>>,
    histograms: &[(&str, &[f64])],
) -> Result<RenderMetrics, AdminError> {
    let failed = |e: &dyn std::fmt::Display| AdminError::Recorder(e.to_string());
    let mut builder = PrometheusBuilder::new();
    let ours = [
        (names::STREAM_DURATION, telemetry::DURATION_BUCKETS),
        (names::STREAM_SIZE, telemetry::SIZE_BUCKETS),
        (names::TIME_TO_FIRST_BYTE, telemetry::FIRST_BYTE_BUCKETS),
        (names::PUSH_DURATION, telemetry::DURATION_BUCKETS),
        (names::PUSH_COMMIT, telemetry::FIRST_BYTE_BUCKETS),
    ];
    for &(name, buckets) in ours.iter().chain(histograms) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
            .map_err(|e| failed(&e))?;
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| failed(&e))?;
    telemetry::describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("nexus-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(AdminError::Start)?;
    Ok(Arc::new(move || {
        if let Some(stats) = stats.get() {
            telemetry::publish(stats);
        }
        handle.render()
    }))
}

/// A request for an embedder's route: method, path, query, headers and the whole body
/// (at most [`Routes::body_limit`] bytes; a larger one is answered 413 without reaching it).
#[derive(Debug)]
pub struct RouteRequest {
    /// The method.
    pub method: Method,
    /// The path (`/runs`).
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// A response: status, content type, body.
pub type RouteResponse = (StatusCode, &'static str, String);

/// More paths for the admin endpoint, from an embedder. Called on the admin thread: answer
/// quickly (a database read or write, not a transfer).
pub trait Routes: Send + Sync {
    /// Whether this embedder serves `path` (its body is read only then).
    fn serves(&self, path: &str) -> bool;
    /// The largest body read.
    fn body_limit(&self) -> usize;
    /// The answer.
    fn respond(&self, request: RouteRequest) -> RouteResponse;
    /// Whether the embedder is ready, for `/readyz` once the server is: `Err` says why not
    /// (a broker it cannot reach, say). Ready by default.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A running admin endpoint; it serves until the process ends.
pub struct Admin {
    phase: Arc<AtomicU8>,
    address: SocketAddr,
}

struct Shared {
    phase: Arc<AtomicU8>,
    metrics: RenderMetrics,
    routes: Option<Arc<dyn Routes>>,
    tls: Option<AdminTls>,
}

/// The admin endpoint's https identity (`burst.nexus.admin.tls.cert` and `.key`; TLS 1.3,
/// ALPN http/1.1). Each connection takes the identity current at its accept: the files are
/// checked for a change every `reload_interval` (`burst.nexus.admin.tls.reload.ms`), and
/// [`reload`](Self::reload) (SIGHUP in `nexus serve` and `nexus run`) loads them at once. A
/// reload that fails keeps the previous certificate.
#[derive(Debug, Clone)]
pub struct AdminTls {
    identity: Arc<Identity>,
    reload_interval: Duration,
}

impl AdminTls {
    /// Loads the PEM certificate chain and key; the error names the property at fault.
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        reload_interval: Duration,
    ) -> Result<AdminTls, String> {
        let files = crate::io::tls::ServerFiles {
            mode: crate::io::tls::Mode::Tls,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
        };
        Ok(AdminTls {
            identity: Arc::new(Identity::load(Endpoint::Admin, files)?),
            reload_interval,
        })
    }

    /// Loads the files again now; new connections get the new certificate.
    pub fn reload(&self) -> Result<(), String> {
        self.identity.reload("asked")
    }

    /// Its certificate's expiry and reloads, as metrics, before a scrape.
    fn publish(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let identity = &self.identity;
        if let Some(seconds) = identity.expires_in() {
            metrics::gauge!(names::ADMIN_TLS_CERT_EXPIRY).set(seconds);
        }
        metrics::counter!(names::ADMIN_TLS_RELOADS, "outcome" => "ok")
            .absolute(identity.reloads.load(Relaxed));
        metrics::counter!(names::ADMIN_TLS_RELOADS, "outcome" => "failed")
            .absolute(identity.reload_failures.load(Relaxed));
    }
}

impl Admin {
    /// Listens on `address` (port 0 picks one) in phase [`Phase::Starting`].
    pub fn start(address: SocketAddr, metrics: RenderMetrics) -> Result<Admin, AdminError> {
        Admin::start_with(address, metrics, None)
    }

    /// As [`start`](Self::start), serving `routes` too.
    pub fn start_with(
        address: SocketAddr,
        metrics: RenderMetrics,
        routes: Option<Arc<dyn Routes>>,
    ) -> Result<Admin, AdminError> {
        Admin::start_with_tls(address, metrics, routes, None)
    }

    /// As [`start_with`](Self::start_with), over https when `tls` is given.
    pub fn start_with_tls(
        address: SocketAddr,
        metrics: RenderMetrics,
        routes: Option<Arc<dyn Routes>>,
        tls: Option<AdminTls>,
    ) -> Result<Admin, AdminError> {
        let https = tls.is_some();
        let bind_error = |source| AdminError::Bind { address, source };
        let listener = std::net::TcpListener::bind(address).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let phase = Arc::new(AtomicU8::new(Phase::Starting as u8));
        let shared = Arc::new(Shared {
            phase: Arc::clone(&phase),
            metrics,
            routes,
            tls,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(AdminError::Start)?;
        std::thread::Builder::new()
            .name("nexus-admin".into())
            .spawn(move || runtime.block_on(serve(listener, shared)))
            .map_err(AdminError::Start)?;
        let scheme = if https { "https" } else { "http" };
        tracing::info!(admin = %address, scheme, "Admin endpoint listening (/metrics, /healthz, /readyz).");
        Ok(Admin { phase, address })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Moves `/readyz` to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
}

async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
    if let Some(tls) = shared.tls.clone() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tls.reload_interval).await;
                tls.identity.reload_if_changed();
            }
        });
    }
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "The admin endpoint cannot listen.");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "Admin accept failed.");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Over the limit the connection is closed at once: a flood of idle sockets cannot
        // hold the endpoint, and the ones let in are cut at their deadlines.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let acceptor = (shared.tls.as_ref())
            .map(|tls| tokio_rustls::TlsAcceptor::from(tls.identity.current()));
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, request).await) }
            });
            let http = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .clone();
            // The TLS handshake counts in the connection's deadline too.
            let connection = async move {
                match acceptor {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "Admin TLS handshake failed."),
                    },
                }
            };
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

async fn route(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let path = request.uri().path().to_string();
    let Some(routes) = shared.routes.as_ref().filter(|r| r.serves(&path)) else {
        return respond(shared, &request);
    };
    let limit = routes.body_limit();
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                TEXT,
                format!("the body is larger than {limit} bytes\n"),
            )
        }
        Err(e) => return reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
    };
    let request = RouteRequest {
        method: parts.method,
        path,
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    };
    // On the runtime's blocking pool: an embedder's answer may touch a disk (a database
    // write with fsync), and probes and scrapes must not wait behind it.
    let routes = Arc::clone(routes);
    match tokio::task::spawn_blocking(move || routes.respond(request)).await {
        Ok((status, content_type, text)) => reply(status, content_type, text),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
    }
}

fn respond(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET or HEAD\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let phase = shared.phase.load(Ordering::Relaxed);
    match request.uri().path() {
        "/metrics" => {
            metrics::gauge!(names::READY).set(f64::from(phase == Phase::Ready as u8));
            if let Some(tls) = &shared.tls {
                tls.publish();
            }
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                (shared.metrics)(),
            )
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => match phase {
            1 => match shared.routes.as_ref().map_or(Ok(()), |r| r.ready()) {
                Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
            },
            2 => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into()),
            _ => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n".into()),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// A response; hyper leaves the body out for HEAD but keeps its length.
fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
