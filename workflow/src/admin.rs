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
        let (mut rule, mut state, mut limit) = (None, None, 100usize);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "rule" => rule = Some(value.to_string()),
                "state" => match State::parse(value) {
                    Some(s) => state = Some(s),
                    None => {
                        return (
                            StatusCode::BAD_REQUEST,
                            TEXT,
                            format!(
                                "state {value:?}: queued, started, retrying, failed or success\n"
                            ),
                        )
                    }
                },
                "limit" => match value.parse::<usize>() {
                    Ok(n) if (1..=MAX_LISTED).contains(&n) => limit = n,
                    _ => {
                        return (
                            StatusCode::BAD_REQUEST,
                            TEXT,
                            format!("limit {value:?}: 1 to {MAX_LISTED}\n"),
                        )
                    }
                },
                other => {
                    return (
                        StatusCode::BAD_REQUEST,
                        TEXT,
                        format!("unknown parameter {other:?} (rule, state, limit)\n"),
                    )
                }
            }
        }
        match self.workflow.runs(rule.as_deref(), state, limit) {
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
        // Printable ASCII without `?` and `&`: the id must fit in `events:NAME?after=ID`.
        let fits = |i: &str| {
            (1..=200).contains(&i.len())
                && i.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'&')
        };
        if id.as_deref().is_some_and(|i| !fits(i)) {
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
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        }
    }
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
}
