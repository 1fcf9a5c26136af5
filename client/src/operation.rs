//! Macro operations: many streams across endpoints under one operation id, with progress
//! across all of them, cancel-all, first-error-cancels-the-rest and a summary per stream.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nexus_protocol::{OperationId, Outcome};
use parking_lot::Mutex;

use crate::client::{Client, StreamOptions};
use crate::conn::Command;
use crate::stream::{Ended, StreamHandle, StreamShared};

/// How an operation behaves.
#[derive(Debug, Clone)]
pub struct OperationOptions {
    /// The first stream that fails (error or timeout) cancels the others. Default: true.
    pub cancel_on_error: bool,
    /// The id sent to servers; a random one when `None`.
    pub id: Option<OperationId>,
}

impl Default for OperationOptions {
    fn default() -> Self {
        OperationOptions {
            cancel_on_error: true,
            id: None,
        }
    }
}

/// Counters across an operation's streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OperationProgress {
    /// Streams started.
    pub streams: usize,
    /// Streams ended, whatever the outcome.
    pub finished: usize,
    /// Streams ended other than complete.
    pub failed: usize,
    /// Data bytes received across all streams.
    pub bytes_received: u64,
    /// Sum of the announced totals, when every started stream announced one.
    pub expected_bytes: Option<u64>,
    /// Items the servers report as sent.
    pub items_sent: u64,
    /// Items the servers expect to send, when every stream's source counts items.
    pub items_expected: Option<u64>,
}

/// One stream's line in an operation's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Where it came from.
    pub endpoint: SocketAddr,
    /// What was asked for.
    pub paradata: String,
    /// Bytes received.
    pub bytes_received: u64,
    /// How it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
}

#[derive(Debug)]
pub(crate) struct OperationShared {
    pub(crate) id: OperationId,
    cancel_on_error: bool,
    cancelled: AtomicBool,
    streams: Mutex<Vec<Arc<StreamShared>>>,
    first_failure: Mutex<Option<(SocketAddr, String, Ended)>>,
}

impl OperationShared {
    pub(crate) fn add(&self, stream: Arc<StreamShared>) {
        if self.cancelled.load(Ordering::Acquire) {
            // Started after cancel-all: it ends at once, without reaching a server.
            stream.cancel_requested.store(true, Ordering::Release);
        }
        self.streams.lock().push(stream);
    }

    /// Called by the IO thread when one of the streams ended.
    pub(crate) fn stream_ended(&self, stream: &StreamShared, end: &Ended) {
        let failed = matches!(end.outcome, Outcome::Error { .. } | Outcome::TimedOut);
        if !failed {
            return;
        }
        {
            let mut first = self.first_failure.lock();
            if first.is_none() {
                *first = Some((
                    stream.endpoint,
                    stream.request.paradata.clone(),
                    end.clone(),
                ));
            }
        }
        if self.cancel_on_error && !self.cancelled.load(Ordering::Acquire) {
            tracing::info!(operation = %self.id, outcome = ?end.outcome, "A stream failed; cancelling the rest of the operation.");
            self.cancel_all();
        }
    }

    pub(crate) fn cancel_all(&self) {
        self.cancelled.store(true, Ordering::Release);
        let streams: Vec<Arc<StreamShared>> = self.streams.lock().clone();
        let mut connections = HashSet::new();
        for stream in &streams {
            stream.cancel_requested.store(true, Ordering::Release);
            if stream.is_ended() {
                continue;
            }
            if let Some(route) = stream.route.lock().as_ref() {
                if connections.insert(route.id) {
                    // One CANCEL frame per connection covers all its streams of the operation.
                    route.send(Command::CancelOperation(self.id));
                }
            }
        }
    }
}

/// A group of streams across endpoints. Dropping it does not cancel its streams; dropping
/// their handles does.
#[derive(Debug, Clone)]
pub struct Operation {
    client: Client,
    shared: Arc<OperationShared>,
}

impl Operation {
    pub(crate) fn new(client: Client, options: OperationOptions) -> Operation {
        let id = options.id.unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            // Ids only need to be distinct among a server's running operations.
            let _ = getrandom::fill(&mut bytes);
            OperationId(u64::from_le_bytes(bytes).max(1))
        });
        Operation {
            client,
            shared: Arc::new(OperationShared {
                id,
                cancel_on_error: options.cancel_on_error,
                cancelled: AtomicBool::new(false),
                streams: Mutex::new(Vec::new()),
                first_failure: Mutex::new(None),
            }),
        }
    }

    /// The id servers see.
    pub fn id(&self) -> OperationId {
        self.shared.id
    }

    /// Starts a stream as part of the operation.
    pub fn initiate(
        &self,
        endpoint: SocketAddr,
        paradata: &str,
        options: StreamOptions,
    ) -> StreamHandle {
        self.client
            .initiate_in(endpoint, paradata, options, Some(Arc::clone(&self.shared)))
    }

    /// Starts a push as part of the operation: cancelled, watched and summarised with the
    /// operation's other streams.
    pub fn push(
        &self,
        endpoint: SocketAddr,
        paradata: &str,
        options: crate::PushOptions,
    ) -> crate::PushHandle {
        self.client
            .push_in(endpoint, paradata, options, Some(Arc::clone(&self.shared)))
    }

    /// Cancels every stream: one CANCEL per connection; every producer stops and acknowledges,
    /// and no chunk is returned by any handle from now on. Streams started later end at once.
    pub fn cancel_all(&self) {
        self.shared.cancel_all();
    }

    /// Whether cancel-all happened (asked for, or after a failure).
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::Acquire)
    }

    /// Counters across all streams.
    pub fn progress(&self) -> OperationProgress {
        let streams = self.shared.streams.lock();
        let mut p = OperationProgress {
            streams: streams.len(),
            expected_bytes: Some(0),
            items_expected: Some(0),
            ..OperationProgress::default()
        };
        for s in streams.iter() {
            let sp = s.progress();
            p.bytes_received += sp.bytes_received;
            p.items_sent += sp.items_sent;
            p.items_expected = match (p.items_expected, sp.items_expected) {
                (Some(total), Some(e)) => Some(total.saturating_add(e)),
                _ => None,
            };
            p.expected_bytes = match (p.expected_bytes, sp.expected_bytes) {
                (Some(total), Some(e)) => Some(total.saturating_add(e)),
                _ => None,
            };
            if let Some(end) = s.ended.lock().as_ref() {
                p.finished += 1;
                if !end.is_complete() {
                    p.failed += 1;
                }
            }
        }
        p
    }

    /// The first stream that failed: endpoint, paradata and how it ended.
    pub fn first_error(&self) -> Option<(SocketAddr, String, Ended)> {
        self.shared.first_failure.lock().clone()
    }

    /// One line per stream, in the order they were started.
    pub fn summary(&self) -> Vec<StreamSummary> {
        self.shared
            .streams
            .lock()
            .iter()
            .map(|s| StreamSummary {
                endpoint: s.endpoint,
                paradata: s.request.paradata.clone(),
                bytes_received: s.bytes_received.load(Ordering::Relaxed),
                outcome: s.ended.lock().as_ref().map(|e| e.outcome.clone()),
            })
            .collect()
    }
}
