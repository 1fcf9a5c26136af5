//! Shared-secret challenge-response (PROTOCOL.md, "Authentication").
//!
//! proof = HMAC-SHA256(secret, lp("nexus-auth") || lp(version u16 BE) || lp(role) ||
//! lp(client nonce) || lp(server nonce)), where lp(x) is x's length as u32 BE followed by x
//! and role is "client" or "server". Both nonces are fresh per connection, so a proof is
//! worthless on any other connection; the role keeps a server proof from being reflected
//! as a client proof.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{NONCE_LEN, PROOF_LEN};

/// Which side computes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that sent BIND.
    Client,
    /// The side that sent ACCEPT.
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
}

fn mac(
    secret: &[u8],
    version: u16,
    role: Role,
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    for field in [
        &b"nexus-auth"[..],
        &version.to_be_bytes()[..],
        role.label(),
        &client_nonce[..],
        &server_nonce[..],
    ] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// The proof `role` sends on a connection with these nonces.
pub fn proof(
    secret: &[u8],
    version: u16,
    role: Role,
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    mac(secret, version, role, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `candidate` is the proof `role` must send; compared in constant time.
pub fn verify(
    secret: &[u8],
    version: u16,
    role: Role,
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
    candidate: &[u8; PROOF_LEN],
) -> bool {
    mac(secret, version, role, client_nonce, server_nonce)
        .verify_slice(candidate)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_depends_on_every_input() {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        let base = proof(b"secret", 1, Role::Client, &c, &s);
        assert!(verify(b"secret", 1, Role::Client, &c, &s, &base));
        assert_ne!(base, proof(b"secreT", 1, Role::Client, &c, &s));
        assert_ne!(base, proof(b"secret", 2, Role::Client, &c, &s));
        assert_ne!(base, proof(b"secret", 1, Role::Server, &c, &s));
        assert_ne!(base, proof(b"secret", 1, Role::Client, &s, &c));
        assert!(!verify(b"secret", 1, Role::Server, &c, &s, &base));
    }
}
