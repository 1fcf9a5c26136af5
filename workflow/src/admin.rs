//! The workflow's paths on the admin endpoint: `GET /runs` (JSON, `?rule=R&state=S&limit=N`)
//! and `POST /sensors/NAME` (the HTTP sensor: the JSON body becomes an event's payload).
//!
//! A POST needs `Authorization: Bearer SECRET` when `burst.nexus.auth.secret` is set (401
//! otherwise). The body is at most `burst.nexus.workflow.http.body.max` bytes (413), must be
//! JSON (400) valid against the sensor's schema (400 naming the failing path). An
//! `Idempotency-Key` header is the event id: posting it again is answered 200 `duplicate`
//! and starts nothing. A new event is answered 202 once it is in the state database.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use nexus_server::admin::{RouteRequest, RouteResponse, Routes};
use serde_json::{json, Value};

use crate::{RaiseError, Raised, State, Workflow};

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// Most runs `/runs` lists.
pub const MAX_LISTED: usize = 10_000;

/// The routes of one workflow.
pub struct WorkflowRoutes {
    workflow: Arc<Workflow>,
    secret: Option<Vec<u8>>,
}

impl WorkflowRoutes {
    /// Routes for `workflow`; POSTs need `secret` as a bearer token when there is one.
    pub fn new(workflow: Arc<Workflow>, secret: Option<Vec<u8>>) -> WorkflowRoutes {
        WorkflowRoutes { workflow, secret }
    }

    fn authorized(&self, request: &RouteRequest) -> bool {
        let Some(secret) = &self.secret else {
            return true;
        };
        let given = request
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes)
            .unwrap_or_default();
        // Constant time in the secret's length: no early exit on the first difference.
        given.len() == secret.len()
            && given
                .iter()
                .zip(secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn runs(&self, query: Option<&str>) -> RouteResponse {
        let wanted = match parse_runs_query(query.unwrap_or("")) {
            Ok(wanted) => wanted,
            Err(e) => return (StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
        };
        match self
            .workflow
            .runs(wanted.rule.as_deref(), wanted.state, wanted.limit)
        {
            Ok(runs) => (
                StatusCode::OK,
                JSON,
                serde_json::to_string(&runs).unwrap_or_else(|_| "[]".into()),
            ),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        }
    }

    fn post(&self, name: &str, request: &RouteRequest) -> RouteResponse {
        if !self.authorized(request) {
            return (
                StatusCode::UNAUTHORIZED,
                TEXT,
                "a secret is configured: send Authorization: Bearer SECRET\n".into(),
            );
        }
        if !self.workflow.is_http_sensor(name) {
            return (
                StatusCode::NOT_FOUND,
                TEXT,
                format!("no http sensor {name:?} in the rules\n"),
            );
        }
        let payload: Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    format!("the body is not JSON: {e}\n"),
                )
            }
        };
        let id = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if id.as_deref().is_some_and(|i| !idempotency_key_fits(i)) {
            return (
                StatusCode::BAD_REQUEST,
                TEXT,
                "Idempotency-Key: 1 to 200 printable ASCII characters, no '?' or '&'\n".into(),
            );
        }
        match self.workflow.raise(name, id, payload) {
            Ok(Raised::New { id, runs }) => (
                StatusCode::ACCEPTED,
                JSON,
                json!({"id": id, "runs": runs}).to_string(),
            ),
            Ok(Raised::Duplicate { id }) => (
                StatusCode::OK,
                JSON,
                json!({"id": id, "duplicate": true}).to_string(),
            ),
            Err(RaiseError::Invalid { message, .. }) => (
                StatusCode::BAD_REQUEST,
                TEXT,
                format!("the payload does not fit the schema of sensor {name}:\n{message}\n"),
            ),
            Err(RaiseError::Unavailable(e)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("{e}; try again\n"),
            ),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        }
    }
}

/// What `GET /runs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunsQuery {
    /// `rule=`.
    pub rule: Option<String>,
    /// `state=`.
    pub state: Option<State>,
    /// `limit=` (default 100, at most [`MAX_LISTED`]).
    pub limit: usize,
}

/// Parses the query string of `GET /runs` (`rule=R&state=S&limit=N`, no `?`); the error says
/// which parameter is wrong.
pub fn parse_runs_query(query: &str) -> Result<RunsQuery, String> {
    let mut wanted = RunsQuery {
        rule: None,
        state: None,
        limit: 100,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "rule" => wanted.rule = Some(value.to_string()),
            "state" => {
                wanted.state = Some(
                    State::parse(value)
                        .filter(|s| *s != State::Skipped)
                        .ok_or_else(|| {
                            format!("state {value:?}: queued, started, retrying, failed or success")
                        })?,
                )
            }
            "limit" => {
                wanted.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LISTED).contains(n))
                    .ok_or_else(|| format!("limit {value:?}: 1 to {MAX_LISTED}"))?
            }
            other => return Err(format!("unknown parameter {other:?} (rule, state, limit)")),
        }
    }
    Ok(wanted)
}

/// Whether an `Idempotency-Key` can be an event id: 1 to 200 printable ASCII characters
/// without `?` and `&`, so that every id fits in `events:NAME?after=ID`.
pub fn idempotency_key_fits(key: &str) -> bool {
    (1..=200).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'&')
}

impl Routes for WorkflowRoutes {
    fn serves(&self, path: &str) -> bool {
        path == "/runs" || path.starts_with("/sensors/")
    }

    fn body_limit(&self) -> usize {
        usize::try_from(self.workflow.http_body_max()).unwrap_or(usize::MAX)
    }

    fn respond(&self, request: RouteRequest) -> RouteResponse {
        match (&request.method, request.path.as_str()) {
            (&Method::GET, "/runs") => self.runs(request.query.as_deref()),
            (&Method::POST, path) if path.starts_with("/sensors/") => {
                let name = path.trim_start_matches("/sensors/").to_string();
                self.post(&name, &request)
            }
            (_, "/runs") => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET /runs\n".into()),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "POST /sensors/NAME\n".into(),
            ),
        }
    }

    fn ready(&self) -> Result<(), String> {
        self.workflow.ready()
    }
}
