//! The server's handshake: BIND answered with ACCEPT (version, limits, heartbeat), then, with
//! a secret, the client's AUTH proof checked and the server's sent (PROTOCOL.md 4.1, 4.2).

use std::time::{Duration, Instant};

use super::{Handshake, Phase, ServerConnection, ServerEvent, ServerSide};
use crate::auth::{self, Role};
use crate::conn::{MAX_WINDOW, MIN_HEARTBEAT};
use crate::error::WireError;
use crate::frame::{Accept, Bind, Frame, CHUNK_OVERHEAD_MAX, PROOF_LEN};
use crate::types::{ErrorCode, VERSION_MAX, VERSION_MIN};

pub(super) fn on_bind(
    conn: &mut ServerConnection,
    bind: Bind,
    now: Instant,
) -> Result<(), WireError> {
    let settings = &conn.side.settings;
    let max = conn
        .side
        .settings
        .max_version
        .clamp(VERSION_MIN, VERSION_MAX);
    let version = bind.max_version.min(max);
    if version < bind.min_version.max(VERSION_MIN) {
        return Err(WireError::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "client speaks versions {}..={}, server {VERSION_MIN}..={max}",
                bind.min_version, bind.max_version
            ),
        ));
    }
    if bind.initial_window == 0 {
        return Err(WireError::protocol("BIND initial_window is 0"));
    }
    let min_frame = CHUNK_OVERHEAD_MAX + 1024;
    if (bind.max_frame_size as usize) < min_frame {
        return Err(WireError::protocol(format!(
            "BIND max_frame_size {} is below the minimum of {min_frame}",
            bind.max_frame_size
        )));
    }
    let initial_window = bind
        .initial_window
        .min(settings.max_window)
        .min(MAX_WINDOW as u32);
    // 0: no preference, the server's own interval. Below 100 ms is raised to 100 ms.
    let asked = Duration::from_millis(bind.heartbeat_interval_ms.into());
    let interval = match asked.is_zero() {
        true => settings.timers.heartbeat_interval,
        false => asked.min(settings.timers.heartbeat_interval),
    }
    .max(MIN_HEARTBEAT);
    let auth_required = settings.secret.is_some();
    let accept = Accept {
        version,
        auth_required,
        nonce: conn.side.nonce,
        initial_window,
        max_frame_size: settings.max_frame_size,
        max_streams: settings.max_streams,
        max_paradata: settings.max_paradata,
        heartbeat_interval_ms: interval.as_millis() as u32,
        name: settings.name.clone(),
        max_window: max_window(settings.max_window, initial_window),
    };
    conn.core.clock.negotiated(interval, now);
    conn.core.outbox.control(&Frame::Accept(accept));
    let handshake = Handshake {
        version,
        client_nonce: bind.nonce,
        client_name: bind.name,
        max_chunk: bind.max_frame_size as usize - CHUNK_OVERHEAD_MAX,
        initial_window,
    };
    match auth_required {
        true => conn.side.phase = Phase::AwaitAuth(handshake),
        false => establish(conn, handshake, now),
    }
    Ok(())
}

pub(super) fn on_auth(
    conn: &mut ServerConnection,
    proof: &[u8; PROOF_LEN],
    now: Instant,
) -> Result<(), WireError> {
    let Phase::AwaitAuth(handshake) = std::mem::replace(&mut conn.side.phase, Phase::AwaitBind)
    else {
        return Err(WireError::protocol("AUTH outside the handshake"));
    };
    let secret = conn.side.settings.secret.as_deref().unwrap_or_default();
    let (c, s) = (&handshake.client_nonce, &conn.side.nonce);
    if !auth::verify(secret, handshake.version, Role::Client, c, s, proof) {
        conn.side.phase = Phase::AwaitAuth(handshake);
        return Err(WireError::new(
            ErrorCode::AUTH_FAILED,
            "wrong authentication proof",
        ));
    }
    let proof = auth::proof(secret, handshake.version, Role::Server, c, s);
    conn.core.outbox.control(&Frame::Auth { proof });
    establish(conn, handshake, now);
    Ok(())
}

/// The largest window a stream may reach (ACCEPT `max_window`).
pub(super) fn max_window(configured: u32, initial_window: u32) -> u32 {
    configured.max(initial_window).min(MAX_WINDOW as u32)
}

fn establish(conn: &mut ServerConnection, handshake: Handshake, now: Instant) {
    conn.core.clock.handshake_deadline = None;
    conn.core.inbox.max_payload = conn.side.settings.max_frame_size;
    conn.side.next_progress = Some(now + conn.side.settings.progress_interval);
    conn.core.events.push_back(ServerEvent::Established {
        version: handshake.version,
        client_name: handshake.client_name.clone(),
    });
    conn.side.phase = Phase::Established(handshake);
}

impl ServerSide {
    /// The largest window a stream may reach, once the handshake settled the initial one.
    pub(super) fn max_window(&self) -> u32 {
        let initial = self.handshake().map_or(0, |h| h.initial_window);
        max_window(self.settings.max_window, initial)
    }
}
