//! The server's [`Forwarder`] for replicated pushes (`file:PATH?replicas=...`): each hop is a
//! push with `nexus-client`, run from the upload's sink thread, so it may block.

use bytes::Bytes;
use nexus_client::transfer::parse_endpoint;
use nexus_client::{Client, ErrorCode, Outcome, PushHandle, PushOptions};
use nexus_server::{Forward, Forwarder, SourceError};

/// Forwards with one client shared by every shard (a connection per next replica, pooled).
///
/// Without a secret a server forwards to loopback addresses only: otherwise any client that
/// reaches an `--insecure` server could make it connect to, and send data to, any address.
/// With a secret, the clients are the cluster's and may name any replica.
pub(crate) struct ClientForwarder {
    pub(crate) client: Client,
}

impl Forwarder for ClientForwarder {
    fn forward(
        &self,
        endpoint: &str,
        paradata: &str,
        declared: Option<u64>,
    ) -> Result<Box<dyn Forward>, SourceError> {
        // Resolving a name may block: that waits for the sink thread (the first write).
        Ok(Box::new(Forwarded {
            client: self.client.clone(),
            endpoint: endpoint.to_string(),
            paradata: paradata.to_string(),
            declared,
            handle: None,
        }))
    }
}

struct Forwarded {
    client: Client,
    endpoint: String,
    paradata: String,
    declared: Option<u64>,
    handle: Option<PushHandle>,
}

impl Forwarded {
    fn handle(&mut self) -> Result<&mut PushHandle, SourceError> {
        if self.handle.is_none() {
            let address = parse_endpoint(&self.endpoint)
                .map_err(|e| SourceError::new(ErrorCode::UNREACHABLE, e))?;
            let secret = self.client.config().protocol.secret.is_some();
            if !secret && !address.ip().is_loopback() {
                return Err(SourceError::new(
                    ErrorCode::PERMISSION_DENIED,
                    format!(
                        "this server forwards to {} only with a secret set \
                         (burst.nexus.auth.secret, environment BURST_NEXUS_AUTH_SECRET): \
                         without one it forwards to loopback addresses only",
                        self.endpoint
                    ),
                ));
            }
            let options = PushOptions {
                size: self.declared,
                traceparent: None,
            };
            self.handle = Some(self.client.push(address, &self.paradata, options));
        }
        Ok(self.handle.as_mut().expect("set above"))
    }
}

impl Forward for Forwarded {
    fn write(&mut self, data: Bytes) -> Result<(), SourceError> {
        self.handle()?
            .write(data)
            .map_err(|end| failure(end.outcome))
    }

    fn finish(&mut self) -> Result<Option<String>, SourceError> {
        self.handle()?;
        let handle = self.handle.take().expect("set above");
        let end = handle.finish();
        match end.outcome {
            Outcome::Complete(_) => Ok(end.report),
            other => Err(failure(other)),
        }
    }
}

fn failure(outcome: Outcome) -> SourceError {
    match outcome {
        Outcome::Error { code, message } => SourceError::new(code, message),
        Outcome::Cancelled => SourceError::new(ErrorCode::CANCELLED, "the push was cancelled"),
        Outcome::TimedOut => SourceError::new(ErrorCode::TIMEOUT, "the replica stopped answering"),
        Outcome::Complete(_) => SourceError::new(ErrorCode::SINK_FAILED, "ended early"),
    }
}
