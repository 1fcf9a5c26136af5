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
//! Reads copy ciphertext into the session's buffer, decrypt it there and copy the plaintext
//! into the caller's buffer; writes encrypt into the session's records and gather them into
//! one buffer for the socket. Writes are serialised by a lock local to the connection's
//! thread, so the records the reader makes the session send (an alert, a key update's
//! answer) never land in the middle of the writer's.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, BufRead, Write};
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

/// A TLS session on a connection.
pub(crate) struct Session {
    tls: RefCell<rustls::Connection>,
    role: Role,
    /// Ciphertext read and not yet given to the session (taken out during a read).
    incoming: RefCell<BytesMut>,
    /// The buffer records are gathered into for the socket, kept between writes.
    outgoing: Cell<Option<BytesMut>>,
    /// One writer at a time on the socket (see the module's description).
    write_lock: tokio::sync::Mutex<()>,
    /// The first TLS failure, described, for the owner's error messages.
    failure: RefCell<Option<String>>,
}

impl Session {
    pub(crate) fn server(config: Arc<rustls::ServerConfig>) -> io::Result<Session> {
        let tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Session::new(tls.into(), Role::Server))
    }

    pub(crate) fn client(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Session> {
        let tls = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(Session::new(tls.into(), Role::Client))
    }

    fn new(mut tls: rustls::Connection, role: Role) -> Session {
        // Writes are bounded by the driver's batch; the session need not bound them again.
        tls.set_buffer_limit(None);
        Session {
            tls: RefCell::new(tls),
            role,
            incoming: RefCell::new(BytesMut::new()),
            outgoing: Cell::new(None),
            write_lock: tokio::sync::Mutex::new(()),
            failure: RefCell::new(None),
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

    /// Gives the session the ciphertext read so far and moves the plaintext into `buf`, at
    /// most up to `limit` bytes long. Returns whether the peer closed the TLS session.
    fn pump(&self, buf: &mut BytesMut, limit: usize) -> io::Result<bool> {
        let mut tls = self.tls.borrow_mut();
        let mut incoming = self.incoming.borrow_mut();
        loop {
            // Plaintext first: the session holds at most 16 KiB of it before it stops reading.
            while buf.len() < limit {
                match tls.reader().fill_buf() {
                    Ok([]) => return Ok(true),
                    Ok(plain) => {
                        let n = plain.len().min(limit - buf.len());
                        buf.extend_from_slice(&plain[..n]);
                        tls.reader().consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The peer closed TCP without close_notify: the protocol above knows
                    // whether its frames were complete, as on a plain socket.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
            if buf.len() >= limit || incoming.is_empty() {
                return Ok(false);
            }
            let n = tls.read_tls(&mut &incoming[..])?;
            incoming.advance(n);
            if let Err(e) = tls.process_new_packets() {
                drop(incoming);
                drop(tls);
                return Err(self.fail(describe(&e, self.role)));
            }
        }
    }
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
        if buf.len() > start || closed {
            return (Ok(buf.len() - start), buf);
        }
        let (result, incoming) = read_ciphertext(socket, session).await;
        *session.incoming.borrow_mut() = incoming;
        match result {
            Ok(0) => {
                // End of the TCP stream: the session learns it, and says whether it was clean.
                let mut tls = session.tls.borrow_mut();
                if let Err(e) = tls.read_tls(&mut io::empty()) {
                    return (Err(e), buf);
                }
            }
            Ok(_) => {}
            Err(e) => return (Err(e), buf),
        }
        if session.tls.borrow().wants_write() {
            // An alert or a key update's answer: sent by a task of its own, so this read
            // never waits on a write.
            let (socket, session) = (socket.clone(), Rc::clone(session));
            tokio::task::spawn_local(async move {
                let _ = write(&socket, &session, Vec::new()).await;
            });
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

/// Encrypts `segments` and writes them, with whatever else the session has to send.
pub(crate) async fn write(
    socket: &Socket,
    session: &Session,
    segments: Vec<Bytes>,
) -> (io::Result<()>, Vec<Bytes>) {
    let _turn = session.write_lock.lock().await;
    {
        let mut tls = session.tls.borrow_mut();
        for segment in &segments {
            // Never short: the buffer limit is off.
            if let Err(e) = tls.writer().write_all(segment) {
                return (Err(e), segments);
            }
        }
    }
    // Until the session has nothing more: a record queued while a write was on its way (by
    // the reader) goes out in the next round.
    loop {
        let mut out = session.outgoing.take().unwrap_or_default();
        out.clear();
        {
            let mut tls = session.tls.borrow_mut();
            let mut writer = (&mut out).writer();
            while tls.wants_write() {
                if let Err(e) = tls.write_tls(&mut writer) {
                    return (Err(e), segments);
                }
            }
        }
        if out.is_empty() {
            session.outgoing.set(Some(out));
            return (Ok(()), segments);
        }
        let (result, mut back) = socket.write_all(vec![out.freeze()]).await;
        if let Some(out) = back.pop().and_then(|b| b.try_into_mut().ok()) {
            session.outgoing.set(Some(out));
        }
        if let Err(e) = result {
            return (Err(e), segments);
        }
    }
}

use bytes::BufMut;

/// Sends close_notify, so the peer can tell the end of the session from a cut.
pub(crate) async fn close(socket: &Socket, session: &Session) {
    session.tls.borrow_mut().send_close_notify();
    let _ = write(socket, session, Vec::new()).await;
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

/// Runs the handshake of `session` on `socket`.
pub(crate) async fn handshake(socket: &Socket, session: &Session) -> Result<(), HandshakeError> {
    let peer = match session.role {
        Role::Server => "the client",
        Role::Client => "the server",
    };
    let mut first = true;
    loop {
        let (result, _) = write(socket, session, Vec::new()).await;
        if let Err(e) = result {
            return Err(HandshakeError::Io(format!(
                "the TLS handshake with {peer} failed: {e}"
            )));
        }
        if !session.tls.borrow().is_handshaking() {
            return Ok(());
        }
        let (result, incoming) = read_ciphertext(socket, session).await;
        *session.incoming.borrow_mut() = incoming;
        match result {
            Ok(0) => {
                let cause = session.failure().unwrap_or_else(|| {
                    format!("{peer} closed the connection during the TLS handshake")
                });
                return Err(HandshakeError::Io(cause));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(HandshakeError::Io(format!(
                    "the TLS handshake with {peer} failed: {e}"
                )))
            }
        }
        if first {
            first = false;
            if let Some(error) = not_tls(&session.incoming.borrow(), session.role) {
                return Err(error);
            }
        }
        let fed = {
            let mut tls = session.tls.borrow_mut();
            let mut incoming = session.incoming.borrow_mut();
            let mut fed = Ok(());
            while !incoming.is_empty() && fed.is_ok() {
                fed = match tls.read_tls(&mut &incoming[..]) {
                    Ok(n) => {
                        incoming.advance(n);
                        tls.process_new_packets().map(|_| ())
                    }
                    Err(e) => Err(rustls::Error::General(e.to_string())),
                };
                if !tls.is_handshaking() {
                    break; // application data after the handshake stays for the reads
                }
            }
            fed
        };
        if let Err(e) = fed {
            let message = describe(&e, session.role);
            session.fail(message.clone());
            // The alert that tells the peer why, then give up.
            let _ = write(socket, session, Vec::new()).await;
            return Err(HandshakeError::Tls(message));
        }
    }
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
            format!("{peer} ended the TLS handshake: {what}")
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
    fn modes_parse_and_print() {
        for mode in [Mode::Off, Mode::Tls, Mode::Mutual] {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        assert!("on".parse::<Mode>().is_err());
    }
}
