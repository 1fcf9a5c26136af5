//! The client's handshake: ACCEPT checked against what BIND asked (PROTOCOL.md 4.1), then,
//! with a secret, the proofs exchanged both ways (4.2).

use std::time::{Duration, Instant};

use super::{ClientConnection, ClientEvent, Phase};
use crate::auth::{self, Role};
use crate::conn::MIN_HEARTBEAT;
use crate::error::WireError;
use crate::frame::{Accept, Frame, CHUNK_OVERHEAD_MAX, PROOF_LEN};
use crate::types::{ErrorCode, VERSION_MAX, VERSION_MIN};

pub(super) fn on_accept(
    conn: &mut ClientConnection,
    accept: Accept,
    now: Instant,
) -> Result<(), WireError> {
    let settings = &conn.side.settings;
    let max = conn
        .side
        .settings
        .max_version
        .clamp(VERSION_MIN, VERSION_MAX);
    if !(VERSION_MIN..=max).contains(&accept.version) {
        return Err(WireError::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!("server chose version {}, not offered", accept.version),
        ));
    }
    if accept.initial_window == 0 || accept.initial_window > settings.initial_window {
        return Err(WireError::protocol(format!(
            "ACCEPT initial_window {} is 0 or above the {} asked for",
            accept.initial_window, settings.initial_window
        )));
    }
    let min_frame = (CHUNK_OVERHEAD_MAX + 1024) as u32;
    if accept.max_frame_size < min_frame {
        return Err(WireError::protocol(format!(
            "ACCEPT max_frame_size {} is below the minimum of {min_frame}",
            accept.max_frame_size
        )));
    }
    if accept.max_window < accept.initial_window {
        return Err(WireError::protocol(format!(
            "ACCEPT max_window {} is below its initial_window {}",
            accept.max_window, accept.initial_window
        )));
    }
    match (accept.auth_required, settings.secret.as_deref()) {
        (true, Some(secret)) => {
            let proof = auth::proof(
                secret,
                accept.version,
                Role::Client,
                &conn.side.nonce,
                &accept.nonce,
            );
            conn.core.outbox.control(&Frame::Auth { proof });
        }
        (true, None) => {
            return Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                "the server requires authentication and no secret is configured",
            ))
        }
        (false, Some(_)) => {
            return Err(WireError::new(
                ErrorCode::AUTH_FAILED,
                "a secret is configured but the server does not authenticate: refusing an \
                 unauthenticated server",
            ))
        }
        (false, None) => {}
    }
    let interval = Duration::from_millis(accept.heartbeat_interval_ms.into());
    conn.core.clock.negotiated(interval.max(MIN_HEARTBEAT), now);
    match accept.auth_required {
        true => conn.side.phase = Phase::AwaitAuth(accept),
        false => establish(conn, accept),
    }
    Ok(())
}

pub(super) fn on_auth(
    conn: &mut ClientConnection,
    proof: &[u8; PROOF_LEN],
) -> Result<(), WireError> {
    let Phase::AwaitAuth(accept) = std::mem::replace(&mut conn.side.phase, Phase::AwaitAccept)
    else {
        return Err(WireError::protocol("AUTH outside the handshake"));
    };
    let secret = conn.side.settings.secret.as_deref().unwrap_or_default();
    let ok = auth::verify(
        secret,
        accept.version,
        Role::Server,
        &conn.side.nonce,
        &accept.nonce,
        proof,
    );
    if !ok {
        conn.side.phase = Phase::AwaitAuth(accept);
        return Err(WireError::new(
            ErrorCode::AUTH_FAILED,
            "the server's authentication proof is wrong: it does not know the secret",
        ));
    }
    establish(conn, accept);
    Ok(())
}

fn establish(conn: &mut ClientConnection, accept: Accept) {
    conn.core.clock.handshake_deadline = None;
    conn.core.inbox.max_payload = conn.side.settings.max_frame_size;
    conn.core.events.push_back(ClientEvent::Established {
        version: accept.version,
        server_name: accept.name.clone(),
    });
    conn.side.phase = Phase::Established(accept);
}
