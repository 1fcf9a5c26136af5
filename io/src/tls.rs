//! TLS on a connection, through rustls's sans-IO session: the socket still reads and writes
//! owned buffers on either backend, and the session sits between them and the protocol.
//!
//! - [`server_config`] and [`client_config`] build rustls configurations from PEM files:
//!   TLS 1.3 only, ALPN [`ALPN`], ring as the crypto provider, AES-128-GCM first.
//! - [`Connection::server_tls`](crate::Connection::server_tls) and
//!   [`Connection::client_tls`](crate::Connection::client_tls) wrap a connected socket;
//!   [`Connection::handshake`](crate::Connection::handshake) runs the handshake, after which
//!   reads return plaintext and writes take plaintext, as on a plain socket.
//! - Failures are described for people ([`HandshakeError`], [`describe`]): which side
//!   refused what, and the property to check.
//!
//! rustls runs the handshake (its unbuffered API); then its `KernelConnection`, the API meant
//! for kernel TLS, hands over the traffic keys and computes new ones at each key update, and
//! the records are sealed and opened here with ring's AEAD (see [`Session`]): a write copies
//! the plaintext once into the outgoing buffer and seals it in place, a read opens records
//! in place and copies the plaintext once into the caller's buffer. (rustls's buffered
//! record layer made two more copies per byte on each side, plus an allocation per record:
//! TLS ran at a quarter of plaintext speed.) The same hand-over is where kernel TLS would
//! take the keys instead, where the kernel offers it.
//!
//! Writes are serialised by a lock local to the connection's thread, so the records the
//! reader makes the session send (a key update's answer) never land in the middle of the
//! writer's.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::Socket;

/// The ALPN protocol name a Nexus peer offers and accepts (PROTOCOL.md, section 2.1): the
/// wire protocol, whose versions BIND and ACCEPT then negotiate.
pub const ALPN: &[u8] = b"nexus/2";

/// The first byte of every TLS record of a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Ciphertext read per socket read: a few records.
const READ_SIZE: usize = 256 << 10;

/// Whether and how a server's data port uses TLS (`burst.nexus.server.tls.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Plaintext.
    #[default]
    Off,
    /// TLS; clients are authenticated by the shared secret, if any.
    Tls,
    /// TLS with a client certificate signed by the configured CA, required.
    Mutual,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        match text {
            "off" => Ok(Mode::Off),
            "tls" => Ok(Mode::Tls),
            "mutual" => Ok(Mode::Mutual),
            other => Err(format!(
                "unknown TLS mode {other:?}; expected off, tls or mutual"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::Tls => "tls",
            Mode::Mutual => "mutual",
        })
    }
}

/// A TLS configuration that cannot be built, naming the file and the property.
#[derive(Debug, thiserror::Error)]
#[error("{property} ({path}): {message}")]
pub struct ConfigError {
    /// The property that names the file.
    pub property: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(property: &'static str, path: &Path, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            property,
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// The files of a server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// TLS or mutual.
    pub mode: Mode,
    /// PEM certificate chain, leaf first (`burst.nexus.server.tls.cert`).
    pub cert: PathBuf,
    /// PEM private key (`burst.nexus.server.tls.key`).
    pub key: PathBuf,
    /// PEM CA bundle that signs client certificates (`burst.nexus.server.tls.client.ca`);
    /// mutual mode only.
    pub client_ca: Option<PathBuf>,
}

/// A server configuration built from its files, with the leaf certificate's expiry.
pub struct ServerIdentity {
    /// For [`Connection::server_tls`](crate::Connection::server_tls).
    pub config: Arc<rustls::ServerConfig>,
    /// When the leaf certificate expires (`None` when its validity cannot be read).
    pub not_after: Option<SystemTime>,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The crypto provider: ring, TLS 1.3 suites with AES-128-GCM first (AES-NI makes it the
/// cheapest per byte on x86; ChaCha20 stays for peers without it).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn read_certs(
    property: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::new(property, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(property, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(property, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn read_key(property: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::new(property, path, e))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| ConfigError::new(property, path, format!("no PEM private key: {e}")))
}

fn read_roots(property: &'static str, path: &Path) -> Result<rustls::RootCertStore, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(property, path)? {
        roots
            .add(cert)
            .map_err(|e| ConfigError::new(property, path, format!("not a usable CA: {e}")))?;
    }
    Ok(roots)
}

/// Builds a server configuration from its files: TLS 1.3, ALPN [`ALPN`], no session tickets
/// (pooled connections live long; resumption would only add state), and in mutual mode a
/// client certificate verified against `client_ca`, required.
pub fn server_config(files: &ServerFiles) -> Result<ServerIdentity, ConfigError> {
    const CERT: &str = "burst.nexus.server.tls.cert";
    const KEY: &str = "burst.nexus.server.tls.key";
    const CA: &str = "burst.nexus.server.tls.client.ca";
    let certs = read_certs(CERT, &files.cert)?;
    let not_after = not_after(&certs[0]);
    let key = read_key(KEY, &files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::new(CERT, &files.cert, e))?;
    let builder = match (files.mode, &files.client_ca) {
        (Mode::Mutual, Some(ca)) => {
            let roots = read_roots(CA, ca)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .map_err(|e| ConfigError::new(CA, ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        (Mode::Mutual, None) => {
            return Err(ConfigError::new(
                CA,
                Path::new(""),
                "mutual TLS needs the CA bundle that signs client certificates",
            ))
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        ConfigError::new(
            KEY,
            &files.key,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    // After the handshake, records are sealed and opened by this crate (see `Session`).
    config.enable_secret_extraction = true;
    Ok(ServerIdentity {
        config: Arc::new(config),
        not_after,
    })
}

/// The files and name of a client's TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// PEM CA bundle that signs server certificates (`burst.nexus.client.tls.ca`).
    pub ca: PathBuf,
    /// PEM certificate chain for mutual TLS (`burst.nexus.client.tls.cert`).
    pub cert: Option<PathBuf>,
    /// Its PEM private key (`burst.nexus.client.tls.key`).
    pub key: Option<PathBuf>,
}

/// Builds a client configuration: servers verified against `ca`, TLS 1.3, ALPN [`ALPN`],
/// and a client certificate when `cert` and `key` are both set.
pub fn client_config(files: &ClientFiles) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    const CA: &str = "burst.nexus.client.tls.ca";
    const CERT: &str = "burst.nexus.client.tls.cert";
    const KEY: &str = "burst.nexus.client.tls.key";
    let roots = read_roots(CA, &files.ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::new(CA, &files.ca, e))?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(CERT, cert)?, read_key(KEY, key)?)
            .map_err(|e| {
                ConfigError::new(KEY, key, format!("does not fit the certificate: {e}"))
            })?,
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), None) => {
            return Err(ConfigError::new(
                KEY,
                cert,
                "a client certificate needs its key",
            ))
        }
        (None, Some(key)) => {
            return Err(ConfigError::new(
                CERT,
                key,
                "a client key needs its certificate",
            ))
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: `name` as given (a DNS name
/// or an IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|e| format!("{name:?} is not a DNS name or an IP address: {e}"))
}

/// Which end of the connection this is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

impl Role {
    fn peer(self) -> &'static str {
        match self {
            Role::Server => "the client",
            Role::Client => "the server",
        }
    }
}

/// Largest plaintext of one record (RFC 8446, 5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext of one record (RFC 8446, 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag of every suite offered.
const TAG: usize = 16;
/// Outer type of every protected record.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// Records sent under one key before a key update, at most; the suite's confidentiality limit
/// lowers it (AES-GCM: 2^24.5, RFC 8446 5.5). Tests lower it to see key updates happen.
static RECORDS_PER_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 24);

/// Lowers the number of records sent under one key before a key update (for tests: a
/// stream of a few MiB then crosses several updates). Process-wide.
#[doc(hidden)]
pub fn set_records_per_key(records: u64) {
    RECORDS_PER_KEY.store(records.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// A TLS session on a connection: rustls's handshake, then a record layer of ours.
///
/// rustls drives the handshake (unbuffered API); after it, its `KernelConnection` (the API
/// meant for kTLS) hands over the traffic keys and sequence numbers and computes new keys at
/// each key update, and records are sealed and opened here with ring's AEAD: plaintext is
/// copied once into the outgoing buffer and sealed in place (one pass over memory a record
/// at a time, hot in cache), and records are opened in place in the read buffer and copied
/// once into the caller's. rustls's own record layer copies each record twice more.
pub(crate) struct Session {
    state: RefCell<State>,
    role: Role,
    /// Ciphertext read and not yet opened (at most a partial record between reads).
    incoming: RefCell<BytesMut>,
    /// Plaintext opened and not yet taken by a read (a read asked for less than a record).
    plain: RefCell<BytesMut>,
    /// The buffer records are sealed into for the socket, kept between writes.
    outgoing: Cell<Option<BytesMut>>,
    /// One writer at a time on the socket (see the module's description).
    write_lock: tokio::sync::Mutex<()>,
    /// The first TLS failure, described, for the owner's error messages.
    failure: RefCell<Option<String>>,
    /// The low-water mark the owner asked for, in plaintext bytes (see
    /// [`Connection::set_recv_lowat`](crate::Connection::set_recv_lowat)), and the one the
    /// kernel has (0: never set, i.e. 1 byte; `usize::MAX`: setting it failed, leave it).
    lowat_wanted: Cell<usize>,
    lowat_set: Cell<usize>,
}

enum State {
    /// Not yet handshaken (or handshaking: taken out meanwhile).
    Handshake(Box<Handshake>),
    Records(Box<Records>),
    /// The handshake failed, or is running.
    None,
}

enum Handshake {
    Server(rustls::server::UnbufferedServerConnection),
    Client(rustls::client::UnbufferedClientConnection),
}

impl Handshake {
    /// One step of the handshake over `incoming` (see [`step`]).
    fn step(
        &mut self,
        incoming: &mut [u8],
        out: &mut BytesMut,
        plain: &mut BytesMut,
    ) -> (usize, Step) {
        match self {
            Handshake::Server(c) => step(c.process_tls_records(incoming), out, plain),
            Handshake::Client(c) => step(c.process_tls_records(incoming), out, plain),
        }
    }

    fn is_handshaking(&self) -> bool {
        match self {
            Handshake::Server(c) => c.is_handshaking(),
            Handshake::Client(c) => c.is_handshaking(),
        }
    }
}

/// The record layer after the handshake.
struct Records {
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    /// Records under one key before a key update is sent.
    records_per_key: u64,
    /// The peer asked for a key update: send ours before the next record.
    answer_key_update: bool,
    /// close_notify received.
    peer_closed: bool,
    /// Key updates received since the last application data: a peer that sends nothing but
    /// key updates (each an HKDF here) is cut off, as rustls does.
    updates_in_a_row: u8,
}

enum Kernel {
    Server(rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>),
    Client(rustls::kernel::KernelConnection<rustls::client::ClientConnectionData>),
}

impl Kernel {
    fn update(
        &mut self,
        transmit: bool,
    ) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match (self, transmit) {
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> rustls::SupportedCipherSuite {
        match self {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// One direction's key, IV and sequence number.
struct Keys {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, rustls::ConnectionTrafficSecrets)) -> Result<Keys, String> {
        use rustls::ConnectionTrafficSecrets as S;
        let (algorithm, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
            _ => return Err("the negotiated cipher suite has no record layer here".into()),
        };
        let key = ring::aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| "a traffic key of the wrong length".to_string())?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| "a traffic IV of the wrong length".to_string())?;
        Ok(Keys {
            key: ring::aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446, 5.3): the IV with the sequence number XORed into its
    /// last 8 bytes. The sequence number then moves on, so no nonce repeats under a key.
    fn next_nonce(&mut self) -> ring::aead::Nonce {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(nonce)
    }
}

impl Records {
    /// Seals `content` (already at `out[start + HEADER..]`) as one record of `content_type`,
    /// whose header placeholder is at `out[start..]`.
    fn seal(&mut self, out: &mut BytesMut, start: usize, content_type: u8) -> io::Result<()> {
        out.extend_from_slice(&[content_type]);
        let length = out.len() - start - HEADER + TAG;
        let header = [APPLICATION_DATA, 3, 3, (length >> 8) as u8, length as u8];
        out[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.tx.next_nonce();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                nonce,
                ring::aead::Aad::from(header),
                &mut out[start + HEADER..],
            )
            .map_err(|_| io::Error::other("TLS record sealing failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// A whole record of `content_type` holding `content`.
    fn seal_record(
        &mut self,
        out: &mut BytesMut,
        content_type: u8,
        content: &[u8],
    ) -> io::Result<()> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(content);
        self.seal(out, start, content_type)
    }

    /// Sends a key update when the peer asked for one or the key has carried enough records,
    /// then moves to the new sending key.
    fn update_if_due(&mut self, out: &mut BytesMut) -> io::Result<()> {
        if !self.answer_key_update && self.tx.seq < self.records_per_key {
            return Ok(());
        }
        // KeyUpdate, update_not_requested: under the old key, the last record it seals.
        self.seal_record(out, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let secrets = self
            .kernel
            .update(true)
            .map_err(|e| io::Error::other(format!("TLS key update failed: {e}")))?;
        self.tx = Keys::new(secrets).map_err(io::Error::other)?;
        self.answer_key_update = false;
        Ok(())
    }

    /// Seals `segments` into records of up to 16 KiB, across segment boundaries.
    fn seal_segments(&mut self, out: &mut BytesMut, segments: &[Bytes]) -> io::Result<()> {
        let mut open: Option<usize> = None;
        for segment in segments {
            let mut rest = &segment[..];
            while !rest.is_empty() {
                let start = match open {
                    Some(start) => start,
                    None => {
                        self.update_if_due(out)?;
                        let start = out.len();
                        out.extend_from_slice(&[0; HEADER]);
                        *open.insert(start)
                    }
                };
                let room = MAX_PLAINTEXT - (out.len() - start - HEADER);
                let n = rest.len().min(room);
                out.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if n == room {
                    self.seal(out, start, APPLICATION_DATA)?;
                    open = None;
                }
            }
        }
        if let Some(start) = open {
            self.seal(out, start, APPLICATION_DATA)?;
        }
        Ok(())
    }
}

impl Session {
    pub(crate) fn server(config: Arc<rustls::ServerConfig>) -> io::Result<Session> {
        let tls =
            rustls::server::UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Session::new(Box::new(Handshake::Server(tls)), Role::Server))
    }

    pub(crate) fn client(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Session> {
        let tls = rustls::client::UnbufferedClientConnection::new(config, name)
            .map_err(io::Error::other)?;
        Ok(Session::new(Box::new(Handshake::Client(tls)), Role::Client))
    }

    fn new(handshake: Box<Handshake>, role: Role) -> Session {
        Session {
            state: RefCell::new(State::Handshake(handshake)),
            role,
            incoming: RefCell::new(BytesMut::new()),
            plain: RefCell::new(BytesMut::new()),
            outgoing: Cell::new(None),
            write_lock: tokio::sync::Mutex::new(()),
            failure: RefCell::new(None),
            lowat_wanted: Cell::new(1),
            lowat_set: Cell::new(0),
        }
    }

    pub(crate) fn want_recv_lowat(&self, bytes: usize) {
        self.lowat_wanted.set(bytes.max(1));
    }

    /// Before a wait for ciphertext: the kernel's low-water mark is what the owner wants
    /// less what this session already holds, or 1 byte when that is small.
    fn set_recv_lowat(&self, socket: &Socket) {
        if self.lowat_set.get() == usize::MAX {
            return;
        }
        let held = self.incoming.borrow().len() + self.plain.borrow().len();
        let mark = recv_lowat_mark(self.lowat_wanted.get(), held);
        if mark == self.lowat_set.get().max(1) {
            return;
        }
        match socket.set_recv_lowat(mark) {
            Ok(()) => self.lowat_set.set(mark),
            // Only an optimisation: reads work the same without it.
            Err(_) => self.lowat_set.set(usize::MAX),
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Keeps the first failure and turns it into an IO error with the same text.
    fn fail(&self, message: String) -> io::Error {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(message.clone());
        }
        io::Error::new(io::ErrorKind::InvalidData, message)
    }

    /// Moves plaintext into `buf` up to `limit` bytes long: what earlier records left, then
    /// the whole records read so far. Returns whether the peer closed the session.
    fn pump(&self, buf: &mut BytesMut, limit: usize) -> io::Result<bool> {
        {
            let mut plain = self.plain.borrow_mut();
            let n = plain.len().min(limit.saturating_sub(buf.len()));
            buf.extend_from_slice(&plain.split_to(n));
        }
        let mut state = self.state.borrow_mut();
        let State::Records(records) = &mut *state else {
            return Err(io::Error::other("TLS read before the handshake"));
        };
        let mut incoming = self.incoming.borrow_mut();
        while buf.len() < limit && !records.peer_closed && incoming.len() >= HEADER {
            let length = usize::from(u16::from_be_bytes([incoming[3], incoming[4]]));
            if incoming[0] != APPLICATION_DATA || !(TAG + 1..=MAX_CIPHERTEXT).contains(&length) {
                let what = format!(
                    "{} sent a malformed TLS record (type {}, length {length})",
                    self.role.peer(),
                    incoming[0]
                );
                return Err(self.fail(what));
            }
            if incoming.len() < HEADER + length {
                break;
            }
            let header: [u8; HEADER] = [
                incoming[0],
                incoming[1],
                incoming[2],
                incoming[3],
                incoming[4],
            ];
            let nonce = records.rx.next_nonce();
            let opened = records.rx.key.open_in_place(
                nonce,
                ring::aead::Aad::from(header),
                &mut incoming[HEADER..HEADER + length],
            );
            let Ok(inner) = opened else {
                let what = format!(
                    "a TLS record from {} failed its integrity check: the data was changed on \
                     the way",
                    self.role.peer()
                );
                return Err(self.fail(what));
            };
            // The content type is the last byte that is not padding.
            let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                return Err(self.fail(format!(
                    "{} sent a record without a content type",
                    self.role.peer()
                )));
            };
            let (content, content_type) = (&inner[..end], inner[end]);
            match content_type {
                APPLICATION_DATA => {
                    records.updates_in_a_row = 0;
                    let n = content.len().min(limit - buf.len());
                    buf.extend_from_slice(&content[..n]);
                    self.plain.borrow_mut().extend_from_slice(&content[n..]);
                }
                ALERT => match content {
                    [_, 0] => records.peer_closed = true,
                    [_, description] => {
                        let alert = rustls::AlertDescription::from(*description);
                        let error = rustls::Error::AlertReceived(alert);
                        return Err(self.fail(describe(&error, self.role)));
                    }
                    _ => {
                        return Err(
                            self.fail(format!("{} sent a malformed alert", self.role.peer()))
                        )
                    }
                },
                HANDSHAKE => {
                    if let Err(what) = post_handshake(records, content) {
                        return Err(self.fail(format!("{}: {what}", self.role.peer())));
                    }
                }
                other => {
                    return Err(self.fail(format!(
                        "{} sent a record of type {other}",
                        self.role.peer()
                    )));
                }
            }
            incoming.advance(HEADER + length);
        }
        Ok(records.peer_closed)
    }

    /// Whether a key update must be answered.
    fn owes_key_update(&self) -> bool {
        matches!(&*self.state.borrow(), State::Records(r) if r.answer_key_update)
    }
}

/// The kernel's low-water mark for a wait, when the owner wants `wanted` more plaintext bytes
/// and the session holds `held` bytes (ciphertext not yet opened, plaintext not yet taken):
/// never more than `wanted - held`, since what is still on the way is at least that much
/// (records only add bytes); 1 byte when that is under 64 KiB.
fn recv_lowat_mark(wanted: usize, held: usize) -> usize {
    let rest = wanted.saturating_sub(held);
    if rest >= 64 << 10 {
        rest
    } else {
        1
    }
}

/// Handles the handshake messages of one record after the handshake: key updates (and
/// session tickets, which this client does not use). A message split across records is
/// refused: TLS allows it, but no peer splits a 5-byte key update.
fn post_handshake(records: &mut Records, mut content: &[u8]) -> Result<(), String> {
    while !content.is_empty() {
        let [kind, a, b, c, ..] = *content else {
            return Err("a handshake message split across records (unsupported)".into());
        };
        let length = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let Some(body) = content.get(4..4 + length) else {
            return Err("a handshake message split across records (unsupported)".into());
        };
        match (kind, body) {
            (KEY_UPDATE, [request @ (0 | 1)]) => {
                records.updates_in_a_row += 1;
                if records.updates_in_a_row > 32 {
                    return Err("too many key updates without data between them".into());
                }
                let secrets = records
                    .kernel
                    .update(false)
                    .map_err(|e| format!("key update failed: {e}"))?;
                records.rx = Keys::new(secrets)?;
                records.answer_key_update |= *request == 1;
            }
            (NEW_SESSION_TICKET, _) if matches!(records.kernel, Kernel::Client(_)) => {}
            (kind, _) => {
                return Err(format!(
                    "unexpected handshake message {kind} after the handshake"
                ))
            }
        }
        content = &content[4 + length..];
    }
    Ok(())
}

/// Reads plaintext into the spare capacity of `buf`, at most `max` bytes (see
/// [`Connection::read_up_to`](crate::Connection::read_up_to)).
pub(crate) async fn read(
    socket: &Socket,
    session: &Rc<Session>,
    mut buf: BytesMut,
    max: usize,
) -> (io::Result<usize>, BytesMut) {
    let start = buf.len();
    let limit = start.saturating_add(max.max(1));
    loop {
        let closed = match session.pump(&mut buf, limit) {
            Ok(closed) => closed,
            Err(e) => return (Err(e), buf),
        };
        if session.owes_key_update() {
            // Sent by a task of its own, so this read never waits on a write.
            let (socket, session) = (socket.clone(), Rc::clone(session));
            tokio::task::spawn_local(async move {
                let _ = write(&socket, &session, Vec::new()).await;
            });
        }
        if buf.len() > start || closed {
            return (Ok(buf.len() - start), buf);
        }
        session.set_recv_lowat(socket);
        let (result, incoming) = read_ciphertext(socket, session).await;
        *session.incoming.borrow_mut() = incoming;
        match result {
            // The end of TCP: whether the protocol's frames were complete is its to judge,
            // as on a plain socket (a cut without close_notify is a closed transport).
            Ok(0) => return (Ok(0), buf),
            Ok(_) => {}
            Err(e) => return (Err(e), buf),
        }
    }
}

async fn read_ciphertext(socket: &Socket, session: &Session) -> (io::Result<usize>, BytesMut) {
    let mut incoming = std::mem::take(&mut *session.incoming.borrow_mut());
    if incoming.capacity() - incoming.len() < READ_SIZE / 4 {
        incoming.reserve(READ_SIZE);
    }
    socket.read_up_to(incoming, usize::MAX).await
}

/// Seals `segments` into records (and whatever the session owes: a key update's answer) and
/// writes them.
pub(crate) async fn write(
    socket: &Socket,
    session: &Session,
    segments: Vec<Bytes>,
) -> (io::Result<()>, Vec<Bytes>) {
    let _turn = session.write_lock.lock().await;
    let mut out = session.outgoing.take().unwrap_or_default();
    out.clear();
    let total: usize = segments.iter().map(Bytes::len).sum();
    out.reserve(total + (total / MAX_PLAINTEXT + segments.len() + 2) * (HEADER + 1 + TAG));
    let sealed = match &mut *session.state.borrow_mut() {
        State::Records(records) => records
            .update_if_due(&mut out)
            .and_then(|()| records.seal_segments(&mut out, &segments)),
        _ => Err(io::Error::other("TLS write before the handshake")),
    };
    if let Err(e) = sealed {
        return (Err(e), segments);
    }
    if out.is_empty() {
        session.outgoing.set(Some(out));
        return (Ok(()), segments);
    }
    let (result, mut back) = socket.write_all(vec![out.freeze()]).await;
    if let Some(out) = back.pop().and_then(|b| b.try_into_mut().ok()) {
        session.outgoing.set(Some(out));
    }
    (result, segments)
}

/// Sends close_notify, so the peer can tell the end of the session from a cut.
pub(crate) async fn close(socket: &Socket, session: &Session) {
    let _turn = session.write_lock.lock().await;
    let mut out = BytesMut::new();
    if let State::Records(records) = &mut *session.state.borrow_mut() {
        let _ = records.seal_record(&mut out, ALERT, &[1, 0]);
    }
    if !out.is_empty() {
        let _ = socket.write_all(vec![out.freeze()]).await;
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer speaks plaintext Nexus (its first bytes are the Nexus preface).
    #[error("{0}")]
    PlaintextNexus(String),
    /// The peer sent something that is neither TLS nor Nexus.
    #[error("{0}")]
    NotTls(String),
    /// TLS refused: a certificate, an alert, no common protocol; described.
    #[error("{0}")]
    Tls(String),
    /// The connection ended or failed during the handshake.
    #[error("{0}")]
    Io(String),
    /// The handshake did not finish in time.
    #[error("the TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
}

/// What a step of the handshake asks for.
enum Step {
    /// Send what was encoded, then go on.
    Send,
    /// Read more.
    Read,
    /// The handshake is over.
    Done,
    Failed(rustls::Error),
    Closed,
}

/// One step of rustls's unbuffered state machine over `incoming`; encoded records go to
/// `out`, application data that came with the handshake's last flight to `plain`.
fn step<Data>(
    status: rustls::unbuffered::UnbufferedStatus<'_, '_, Data>,
    out: &mut BytesMut,
    plain: &mut BytesMut,
) -> (usize, Step) {
    use rustls::unbuffered::{ConnectionState, EncodeError};
    let mut discard = status.discard;
    let step = match status.state {
        Err(e) => Step::Failed(e),
        Ok(ConnectionState::EncodeTlsData(mut encode)) => {
            let start = out.len();
            let mut room = 4096;
            loop {
                out.resize(start + room, 0);
                match encode.encode(&mut out[start..]) {
                    Ok(n) => {
                        out.truncate(start + n);
                        break Step::Send;
                    }
                    Err(EncodeError::InsufficientSize(need)) => room = need.required_size,
                    Err(e) => {
                        out.truncate(start);
                        break Step::Failed(rustls::Error::General(e.to_string()));
                    }
                }
            }
        }
        Ok(ConnectionState::TransmitTlsData(transmit)) => {
            // The caller sends `out` before the next step.
            transmit.done();
            Step::Send
        }
        Ok(ConnectionState::BlockedHandshake) => Step::Read,
        Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
        Ok(ConnectionState::ReadTraffic(mut traffic)) => {
            while let Some(record) = traffic.next_record() {
                match record {
                    Ok(record) => {
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    Err(e) => return (discard, Step::Failed(e)),
                }
            }
            Step::Send
        }
        Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::Closed,
        Ok(_) => Step::Failed(rustls::Error::General("unexpected TLS state".into())),
    };
    (discard, step)
}

/// Where the record after the first `from` bytes of `incoming` ends, once it has all come;
/// for a header no record can have, the end of what has come (rustls then refuses it at
/// once rather than after a wait).
fn next_record_end(incoming: &[u8], from: usize) -> Option<usize> {
    let header = incoming.get(from..from + HEADER)?;
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(20..=24).contains(&header[0]) || length > MAX_CIPHERTEXT {
        return Some(incoming.len());
    }
    let end = from + HEADER + length;
    (end <= incoming.len()).then_some(end)
}

/// Runs the handshake of `session` on `socket`, then sets up the record layer.
pub(crate) async fn handshake(socket: &Socket, session: &Session) -> Result<(), HandshakeError> {
    let peer = session.role.peer();
    let mut handshake = match std::mem::replace(&mut *session.state.borrow_mut(), State::None) {
        State::Handshake(handshake) => handshake,
        other => {
            *session.state.borrow_mut() = other;
            return Ok(());
        }
    };
    let io_error =
        |e: io::Error| HandshakeError::Io(format!("the TLS handshake with {peer} failed: {e}"));
    let mut out = BytesMut::new();
    let mut first = true;
    let mut peer_closed = false;
    // rustls sees the records one at a time, and none after the one that ends the handshake:
    // what follows (data, a key update, close_notify) is for the record layer. Shown to
    // rustls, a key update request would be answered by a message rustls keeps to send with
    // its next record, and the hand-over would drop it.
    let mut visible = 0;
    loop {
        let next = {
            let mut incoming = session.incoming.borrow_mut();
            let mut plain = session.plain.borrow_mut();
            let (discard, next) = handshake.step(&mut incoming[..visible], &mut out, &mut plain);
            incoming.advance(discard);
            visible -= discard;
            next
        };
        match next {
            Step::Send => {
                if !out.is_empty() {
                    let (result, _) = socket.write_all(vec![out.split().freeze()]).await;
                    result.map_err(io_error)?;
                }
            }
            Step::Read => {
                if let Some(end) = next_record_end(&session.incoming.borrow(), visible) {
                    visible = end;
                    continue;
                }
                let (result, incoming) = read_ciphertext(socket, session).await;
                *session.incoming.borrow_mut() = incoming;
                if result.map_err(io_error)? == 0 {
                    let cause = session.failure().unwrap_or_else(|| {
                        format!("{peer} closed the connection during the TLS handshake")
                    });
                    return Err(HandshakeError::Io(cause));
                }
                if std::mem::take(&mut first) {
                    if let Some(error) = not_tls(&session.incoming.borrow(), session.role) {
                        return Err(error);
                    }
                }
            }
            Step::Done => break,
            // A peer that sent its data and close_notify right behind its last handshake
            // flight: the handshake is over, and so is the peer's side.
            Step::Closed if !handshake.is_handshaking() => {
                peer_closed = true;
                break;
            }
            Step::Closed => {
                return Err(HandshakeError::Io(format!(
                    "{peer} closed TLS during the handshake"
                )))
            }
            Step::Failed(e) => {
                let message = describe(&e, session.role);
                session.fail(message.clone());
                // The alert that tells the peer why, if rustls has one queued.
                let mut incoming = BytesMut::new();
                let mut plain = BytesMut::new();
                let _ = handshake.step(&mut incoming[..], &mut out, &mut plain);
                if !out.is_empty() {
                    let _ = socket.write_all(vec![out.split().freeze()]).await;
                }
                return Err(HandshakeError::Tls(message));
            }
        }
    }
    if !out.is_empty() {
        let (result, _) = socket.write_all(vec![out.split().freeze()]).await;
        result.map_err(io_error)?;
    }
    let converted = match *handshake {
        Handshake::Server(c) => c
            .dangerous_into_kernel_connection()
            .map(|(secrets, kernel)| (secrets, Kernel::Server(kernel))),
        Handshake::Client(c) => c
            .dangerous_into_kernel_connection()
            .map(|(secrets, kernel)| (secrets, Kernel::Client(kernel))),
    };
    let (secrets, kernel) =
        converted.map_err(|e| HandshakeError::Tls(format!("TLS set-up failed: {e}")))?;
    let limit = kernel
        .suite()
        .tls13()
        .map_or(u64::MAX, |suite| suite.common.confidentiality_limit);
    let records_per_key = RECORDS_PER_KEY
        .load(std::sync::atomic::Ordering::Relaxed)
        .min(limit.saturating_sub(limit / 16).max(1));
    let tx = Keys::new(secrets.tx).map_err(HandshakeError::Tls)?;
    let rx = Keys::new(secrets.rx).map_err(HandshakeError::Tls)?;
    *session.state.borrow_mut() = State::Records(Box::new(Records {
        kernel,
        tx,
        rx,
        records_per_key,
        answer_key_update: false,
        peer_closed,
        updates_in_a_row: 0,
    }));
    Ok(())
}

/// The first bytes of a peer that does not speak TLS, described.
fn not_tls(first: &[u8], role: Role) -> Option<HandshakeError> {
    let byte = *first.first()?;
    if byte == TLS_HANDSHAKE_RECORD {
        return None;
    }
    if byte == nexus_protocol::frame::PREFACE[0] {
        return Some(HandshakeError::PlaintextNexus(match role {
            Role::Server => "a plaintext Nexus client on the TLS port (the client needs \
                 burst.nexus.client.tls=true and burst.nexus.client.tls.ca)"
                .to_string(),
            Role::Client => "the server answered in plaintext: its port does not use TLS \
                 (burst.nexus.server.tls.mode is off there); connect without \
                 burst.nexus.client.tls, or turn TLS on at the server"
                .to_string(),
        }));
    }
    let peer = match role {
        Role::Server => "the client",
        Role::Client => "the server",
    };
    Some(HandshakeError::NotTls(format!(
        "{peer} does not speak TLS: its first byte is 0x{byte:02x}, not a TLS handshake record"
    )))
}

/// A rustls error described from `role`'s side, with the property to check.
fn describe(error: &rustls::Error, role: Role) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    let (peer, ca_property) = match role {
        Role::Client => ("the server", "burst.nexus.client.tls.ca"),
        Role::Server => ("the client", "burst.nexus.server.tls.client.ca"),
    };
    match error {
        Error::InvalidCertificate(cert) => {
            let hint = match cert {
                Cert::UnknownIssuer | Cert::BadSignature => {
                    format!(" (not signed by a CA in {ca_property})")
                }
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                    " (connect by a name the certificate holds, or set \
                     burst.nexus.client.tls.server.name)"
                        .to_string()
                }
                Cert::Expired | Cert::ExpiredContext { .. } => {
                    " (the certificate has expired: renew it)".to_string()
                }
                _ => String::new(),
            };
            format!("{peer}'s certificate was refused: {error}{hint}")
        }
        Error::NoCertificatesPresented => format!(
            "{peer} presented no certificate, and mutual TLS requires one \
             (burst.nexus.client.tls.cert and burst.nexus.client.tls.key)"
        ),
        Error::AlertReceived(alert) => {
            let what = match alert {
                Alert::CertificateRequired => "it requires a client certificate (mutual TLS: \
                     set burst.nexus.client.tls.cert and burst.nexus.client.tls.key)"
                    .to_string(),
                Alert::UnknownCA => "it does not trust our certificate's CA".to_string(),
                Alert::CertificateExpired => "our certificate has expired".to_string(),
                Alert::BadCertificate | Alert::UnsupportedCertificate => {
                    "it refused our certificate".to_string()
                }
                Alert::NoApplicationProtocol => {
                    "it does not speak nexus/2 over TLS (no common ALPN protocol)".to_string()
                }
                Alert::ProtocolVersion => "it does not speak TLS 1.3".to_string(),
                other => format!("alert {other:?}"),
            };
            format!("{peer} ended the TLS session: {what}")
        }
        Error::NoApplicationProtocol => {
            format!("{peer} does not speak nexus/2 over TLS (no common ALPN protocol)")
        }
        other => format!("TLS with {peer} failed: {other}"),
    }
}

/// The leaf certificate's notAfter, read from its DER (`None` when it cannot be read; the
/// certificate itself was already accepted by rustls).
pub fn not_after(cert: &[u8]) -> Option<SystemTime> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
    //   validity SEQUENCE { notBefore Time, notAfter Time }, ... } ... }
    let (_, certificate, _) = der(cert)?;
    let (_, mut tbs, _) = der(certificate)?;
    let (tag, _, rest) = der(tbs)?;
    if tag == 0xA0 {
        tbs = rest; // the explicit version
    }
    for _ in 0..3 {
        tbs = der(tbs)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = der(tbs)?;
    let (_, _, rest) = der(validity)?;
    let (tag, time, _) = der(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            // UTCTime YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280).
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |at: usize| -> Option<i64> { rest.get(at..at + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    let seconds = u64::try_from(seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 {
            return None;
        }
        let mut len = 0usize;
        for _ in 0..count {
            let (&byte, tail) = rest.split_first()?;
            len = (len << 8) | usize::from(byte);
            rest = tail;
        }
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn der_lengths_are_checked_against_the_input() {
        assert_eq!(
            der(&[0x30, 0x02, 1, 2, 9]),
            Some((0x30, &[1u8, 2][..], &[9u8][..]))
        );
        assert_eq!(der(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(
            der(&[0x30, 0x81, 0x02, 1, 2]),
            Some((0x30, &[1u8, 2][..], &[][..]))
        );
        assert_eq!(der(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
        assert_eq!(not_after(&[0x30]), None);
    }

    proptest::proptest! {
        /// Whatever a certificate file holds, reading its expiry returns, without a panic.
        #[test]
        fn any_bytes_give_an_expiry_or_none(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = not_after(&data);
            // And the same bytes behind a plausible certificate prefix.
            let mut framed = vec![0x30, 0x82, 0x01, 0xFF, 0x30, 0x82, 0x01, 0xF0, 0xA0, 0x03, 2, 1, 2];
            framed.extend_from_slice(&data);
            let _ = not_after(&framed);
        }
    }

    #[test]
    fn the_low_water_mark_leaves_out_what_the_session_holds() {
        assert_eq!(recv_lowat_mark(1 << 20, 0), 1 << 20);
        // The bench's hang: 900 KiB of a frame to come, 16 KiB of it already read.
        assert_eq!(recv_lowat_mark(900 << 10, 16 << 10), 884 << 10);
        assert_eq!(recv_lowat_mark(100 << 10, 50 << 10), 1, "small: any byte");
        assert_eq!(recv_lowat_mark(1, 10), 1);
        for wanted in [1, 70_000, 1 << 20] {
            for held in [0, 1, 16_406, 1 << 19] {
                let mark = recv_lowat_mark(wanted, held);
                assert!(
                    mark == 1 || mark <= wanted - held,
                    "{wanted} {held}: {mark}"
                );
            }
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [Mode::Off, Mode::Tls, Mode::Mutual] {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        assert!("on".parse::<Mode>().is_err());
    }
}
