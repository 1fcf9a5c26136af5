//! Replicated pushes: `file:PATH?replicas=B,C[&quorum=N]` writes PATH here and forwards the
//! same bytes, as they arrive, to the next replica `B` with `replicas=C`: a pipeline in which
//! each link carries the data once (SOURCES.md, "Replication").
//!
//! The order of commits keeps anything half-written invisible: a replica commits (fsync, then
//! the atomic link) only after every replica behind it has committed and said so. Without
//! `quorum` a failure behind a replica fails it too, and it keeps nothing; with `quorum` it
//! reports the failure, goes on with the replica after the failed one (replaying what it
//! holds so far), commits its own copy, and the client counts.
//!
//! The forwarding itself is a [`Forwarder`], given by the application (the `nexus` command
//! uses `nexus-client`), so the server crate does not depend on the client.

use std::sync::Arc;

use bytes::Bytes;
use nexus_protocol::ErrorCode;

use crate::paradata::SourceError;

/// Most replicas a push may name after the first.
pub const MAX_REPLICAS: usize = 16;

/// Opens pushes to other servers, for replication.
pub trait Forwarder: Send + Sync + 'static {
    /// Starts a push of `paradata` to `endpoint` (`HOST:PORT`), of `declared` bytes when
    /// known. Must not block for long: it runs on a shard.
    fn forward(
        &self,
        endpoint: &str,
        paradata: &str,
        declared: Option<u64>,
    ) -> Result<Box<dyn Forward>, SourceError>;
}

/// One forwarded push, driven from a sink thread. Dropping it without `finish` cancels it.
pub trait Forward: Send {
    /// Sends the next piece, waiting for window.
    fn write(&mut self, data: Bytes) -> Result<(), SourceError>;
    /// Ends the data and waits for the next replica's commit; returns its report.
    fn finish(&mut self) -> Result<Option<String>, SourceError>;
}

/// What a push asks for: the replicas after this one, and whether a quorum suffices.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Chain {
    pub(crate) replicas: Vec<String>,
    pub(crate) quorum: Option<usize>,
}

impl Chain {
    /// Reads `replicas` and `quorum`; other keys are the caller's.
    pub(crate) fn param(&mut self, key: &str, value: &str) -> Result<bool, SourceError> {
        match key {
            "replicas" => {
                self.replicas = value
                    .split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(String::from)
                    .collect();
                if self.replicas.is_empty() || self.replicas.len() > MAX_REPLICAS {
                    return Err(SourceError::bad(format!(
                        "replicas names 1 to {MAX_REPLICAS} servers (HOST:PORT, comma-separated)"
                    )));
                }
                Ok(true)
            }
            "quorum" => {
                let n = value.parse::<usize>().ok().filter(|n| *n >= 1);
                self.quorum = Some(n.ok_or_else(|| {
                    SourceError::bad(format!("quorum must be a number from 1, not {value:?}"))
                })?);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The paradata for the next replica: the same path and `replace`, the rest of the chain.
    pub(crate) fn next_paradata(&self, path: &str, replace: bool) -> String {
        let mut params = Vec::new();
        if replace {
            params.push("replace=true".to_string());
        }
        if self.replicas.len() > 1 {
            params.push(format!("replicas={}", self.replicas[1..].join(",")));
        }
        if let Some(q) = self.quorum {
            params.push(format!("quorum={q}"));
        }
        match params.is_empty() {
            true => format!("file:{path}"),
            false => format!("file:{path}?{}", params.join("&")),
        }
    }
}

/// Where a replicated push goes on from this server.
pub(crate) struct Route {
    pub(crate) forwarder: Arc<dyn Forwarder>,
    /// The replicas after this server, and the quorum.
    pub(crate) chain: Chain,
    pub(crate) path: String,
    pub(crate) replace: bool,
    pub(crate) declared: Option<u64>,
    /// This server's copy so far, to replay to a replica that takes a failed one's place.
    pub(crate) local: std::fs::File,
}

/// The forwarding half of one replicated push, on its sink thread.
pub(crate) struct Replication {
    route: Route,
    /// The replica fed now, an index into the chain.
    at: usize,
    forward: Option<Box<dyn Forward>>,
    /// Bytes this server holds (all of them written before they are forwarded).
    held: u64,
    /// Report lines of the replicas that failed (quorum).
    lines: String,
}

impl Replication {
    pub(crate) fn start(route: Route) -> Result<Replication, SourceError> {
        let mut replication = Replication {
            route,
            at: 0,
            forward: None,
            held: 0,
            lines: String::new(),
        };
        match replication.open() {
            Ok(forward) => replication.forward = Some(forward),
            Err(e) => replication.failed(e)?,
        }
        Ok(replication)
    }

    fn next(&self) -> &str {
        &self.route.chain.replicas[self.at]
    }

    /// A push to the replica at `at`, with the rest of the chain behind it.
    fn open(&self) -> Result<Box<dyn Forward>, SourceError> {
        let rest = Chain {
            replicas: self.route.chain.replicas[self.at..].to_vec(),
            quorum: self.route.chain.quorum,
        };
        let paradata = rest.next_paradata(&self.route.path, self.route.replace);
        self.route
            .forwarder
            .forward(self.next(), &paradata, self.route.declared)
    }

    /// Forwards a piece (already written here).
    pub(crate) fn write(&mut self, data: Bytes) -> Result<(), SourceError> {
        self.held += data.len() as u64;
        let Some(forward) = &mut self.forward else {
            return Ok(());
        };
        match forward.write(data) {
            Ok(()) => Ok(()),
            Err(e) => self.failed(e),
        }
    }

    /// Waits for every replica behind this one; returns their report lines.
    pub(crate) fn finish(&mut self) -> Result<String, SourceError> {
        loop {
            let Some(mut forward) = self.forward.take() else {
                return Ok(self.lines.clone());
            };
            match forward.finish() {
                Ok(report) => {
                    let rest = report.unwrap_or_default();
                    return Ok(format!("{}{} ok\n{rest}", self.lines, self.next()));
                }
                // A replica taking its place (quorum) is finished on the next turn.
                Err(e) => self.failed(e)?,
            }
        }
    }

    /// The replica fed now failed. Without a quorum the push fails. With one, the failure
    /// goes in the report and the push goes on with the replica after it, which first gets
    /// everything this server holds so far: a dead replica does not cut off those behind it.
    fn failed(&mut self, e: SourceError) -> Result<(), SourceError> {
        // Dropping the forward cancels it: the replicas it fed keep nothing.
        self.forward = None;
        if self.route.chain.quorum.is_none() {
            return Err(SourceError::new(
                ErrorCode::SINK_FAILED,
                format!("replica {}: {}: {}", self.next(), e.code, e.message),
            ));
        }
        let mut e = e;
        loop {
            tracing::warn!(replica = %self.next(), error = %e, "A replica failed; the push goes on without it (quorum).");
            self.lines += &format!("{} {} {}\n", self.next(), e.code, one_line(&e.message));
            self.at += 1;
            if self.at == self.route.chain.replicas.len() {
                return Ok(());
            }
            match self.open().and_then(|mut forward| {
                self.replay(forward.as_mut())?;
                Ok(forward)
            }) {
                Ok(forward) => {
                    self.forward = Some(forward);
                    return Ok(());
                }
                Err(next) => e = next,
            }
        }
    }

    /// Sends what this server holds so far to a new replica.
    fn replay(&self, forward: &mut dyn Forward) -> Result<(), SourceError> {
        use std::os::unix::fs::FileExt;
        let mut offset = 0;
        while offset < self.held {
            let n = (self.held - offset).min(REPLAY_PIECE) as usize;
            let mut piece = vec![0; n];
            self.route
                .local
                .read_exact_at(&mut piece, offset)
                .map_err(|e| {
                    SourceError::new(
                        ErrorCode::SINK_FAILED,
                        format!("reading back {:?} to replay it: {e}", self.route.path),
                    )
                })?;
            forward.write(Bytes::from(piece))?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Bytes read back per piece when replaying to a replica.
const REPLAY_PIECE: u64 = 1 << 20;

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_replica_gets_the_rest_of_the_chain() {
        let mut chain = Chain::default();
        assert!(chain.param("replicas", "b:1,c:2").unwrap());
        assert!(!chain.param("replace", "true").unwrap());
        assert_eq!(
            chain.next_paradata("d/x", true),
            "file:d/x?replace=true&replicas=c:2"
        );
        chain.param("quorum", "2").unwrap();
        assert_eq!(
            chain.next_paradata("x", false),
            "file:x?replicas=c:2&quorum=2"
        );
        chain.param("replicas", "c:2").unwrap();
        assert_eq!(chain.next_paradata("x", false), "file:x?quorum=2");
    }

    #[test]
    fn bad_chains_are_refused() {
        let mut chain = Chain::default();
        assert!(chain.param("replicas", ",").is_err());
        assert!(chain.param("quorum", "0").is_err());
        assert!(chain.param("quorum", "x").is_err());
        let many = vec!["a:1"; MAX_REPLICAS + 1].join(",");
        assert!(chain.param("replicas", &many).is_err());
    }
}
