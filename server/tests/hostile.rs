//! Bad input against a real server, on both IO backends: each gets a clear error, and the
//! server keeps serving other clients. Also authentication and the connection limit, and the
//! same inputs inside TLS, and bytes that are not TLS on a TLS port.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nexus_protocol::auth::{self, Role};
use nexus_protocol::frame::{Bind, Frame, NONCE_LEN, PREFACE};
use nexus_protocol::{ClientSettings, ErrorCode, VERSION_MAX, VERSION_MIN};
use nexus_server::{Backend, Server, TlsMode, TlsSettings};
use nexus_testkit::{
    both_backends, builtin_registry, connection_error, exchange_raw, exchange_raw_tls,
    read_frames_until_close, start_server, start_with, test_config, Client, Pki, TempDir, Validity,
};

/// A good client still gets its data.
fn still_serving(server: &Server) {
    let mut client = Client::connect(server.local_addr());
    assert_eq!(
        client.pull("synthetic:100KiB").completion().bytes,
        100 << 10
    );
}

fn bind_frame(nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    let bind = Frame::Bind(Bind {
        min_version: VERSION_MIN,
        max_version: VERSION_MAX,
        nonce,
        initial_window: 1 << 20,
        max_frame_size: 1 << 20,
        heartbeat_interval_ms: 5000,
        name: "hostile-test".into(),
    });
    out.extend_from_slice(&bind.to_bytes());
    out
}

/// Bad first bytes and bad frames, each with the error it must get: (what, bytes, code,
/// a word the message must hold).
fn hostile_cases() -> Vec<(&'static str, Vec<u8>, ErrorCode, &'static str)> {
    let mut random = vec![0u8; 4096];
    getrandom::fill(&mut random).unwrap();
    random[0] = 0x42; // never the preface's first byte
    let client_hello = [
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x00, 0x01, 0x02, 0x03,
    ];
    let mut huge = bind_frame([1; NONCE_LEN]);
    huge.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10, 0, 0, 0, 0, 0, 0, 1]);
    let mut truncated = bind_frame([2; NONCE_LEN]);
    truncated.extend_from_slice(&[0, 0, 0, 40, 0x10, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3]);
    let mut unknown_type = bind_frame([3; NONCE_LEN]);
    unknown_type.extend_from_slice(&[0, 0, 0, 0, 0x55, 0, 0, 0, 0, 0, 0, 0]);
    vec![
        ("random bytes", random, ErrorCode::PROTOCOL_ERROR, "preface"),
        (
            "HTTP",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ErrorCode::PROTOCOL_ERROR,
            "HTTP",
        ),
        (
            "TLS ClientHello",
            client_hello.to_vec(),
            ErrorCode::PROTOCOL_ERROR,
            "TLS",
        ),
        (
            "length 0xFFFFFFFF",
            huge,
            ErrorCode::FRAME_TOO_LARGE,
            "4294967295",
        ),
        (
            "truncated frame then FIN",
            truncated,
            ErrorCode::PROTOCOL_ERROR,
            "middle of a frame",
        ),
        (
            "unknown frame type",
            unknown_type,
            ErrorCode::PROTOCOL_ERROR,
            "0x55",
        ),
    ]
}

/// Sends each of [`hostile_cases`] through `exchange` (bytes in, the server's frames out)
/// and checks its error, and after each that `still_serving` holds.
fn each_case_gets_its_error(exchange: impl Fn(&[u8]) -> Vec<Frame>, still_serving: impl Fn()) {
    for (what, bytes, code, needle) in hostile_cases() {
        let frames = exchange(&bytes);
        let (got, message) = connection_error(&frames);
        assert_eq!(got, code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        still_serving();
    }
}

fn garbage(backend: Backend) {
    let dir = TempDir::new("garbage");
    let server = start_server(backend, dir.path());
    let address = server.local_addr();
    each_case_gets_its_error(
        |bytes| exchange_raw(address, bytes, true),
        || still_serving(&server),
    );
    assert!(server.stats().protocol_errors >= 5);
}
both_backends!(garbage_gets_a_clear_error_and_the_server_goes_on, garbage);

fn traversal(backend: Backend) {
    let base = TempDir::new("traversal");
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(base.path().join("x"), b"secret").unwrap();
    std::os::unix::fs::symlink(base.path().join("x"), root.join("link")).unwrap();
    let server = start_server(backend, &root);
    let mut client = Client::connect(server.local_addr());
    for paradata in [
        "file:../x",
        "file:/etc/passwd",
        "file:link",
        "file:a/../../x",
    ] {
        let pulled = client.pull(paradata);
        assert_eq!(pulled.error().0, ErrorCode::PERMISSION_DENIED, "{paradata}");
        assert!(pulled.data.is_empty());
    }
    assert_eq!(client.pull("file:nothing").error().0, ErrorCode::NOT_FOUND);
    still_serving(&server);
}
both_backends!(path_traversal_is_refused, traversal);

fn slowloris(backend: Backend) {
    let dir = TempDir::new("slowloris");
    let mut config = test_config(backend, dir.path());
    config.protocol.timers.handshake_timeout = Duration::from_millis(800);
    let server = start_with(config, builtin_registry(dir.path()));
    let mut socket = TcpStream::connect(server.local_addr()).unwrap();
    let start = Instant::now();
    let bytes = bind_frame([7; NONCE_LEN]);
    // One byte every 100 ms: the connection must be closed at the deadline, not kept alive.
    let mut closed_early = false;
    for b in &bytes {
        if start.elapsed() > Duration::from_secs(5) || socket.write_all(&[*b]).is_err() {
            closed_early = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed_early, "the handshake dragged on past its deadline");
    let frames = read_frames_until_close(&mut socket);
    let elapsed = start.elapsed();
    let (code, message) = connection_error(&frames);
    assert_eq!(code, ErrorCode::TIMEOUT, "{message}");
    assert!(
        elapsed >= Duration::from_millis(800),
        "closed before the deadline: {elapsed:?}"
    );
    still_serving(&server);
}
both_backends!(slowloris_handshake_is_closed_at_the_deadline, slowloris);

fn authentication(backend: Backend) {
    let dir = TempDir::new("auth");
    let secret = b"correct horse battery staple".to_vec();
    let mut config = test_config(backend, dir.path());
    config.protocol.secret = Some(secret.clone());
    let server = start_with(config, builtin_registry(dir.path()));
    let address = server.local_addr();
    let with = |s: Option<&[u8]>| ClientSettings {
        secret: s.map(<[u8]>::to_vec),
        ..ClientSettings::default()
    };
    // Right secret: served.
    let mut good = Client::connect_with(address, with(Some(&secret))).unwrap();
    assert_eq!(good.pull("synthetic:1KiB").completion().bytes, 1024);
    // Wrong and missing secrets: auth_failed.
    let wrong = Client::connect_with(address, with(Some(b"hunter2")))
        .err()
        .unwrap();
    assert_eq!(wrong.code, ErrorCode::AUTH_FAILED, "{wrong:?}");
    let missing = Client::connect_with(address, with(None));
    match missing {
        Err(e) => assert_eq!(e.code, ErrorCode::AUTH_FAILED, "{e:?}"),
        Ok(mut c) => {
            let pulled = c.pull("synthetic:1KiB");
            panic!("an unauthenticated client was served: {:?}", pulled.outcome)
        }
    }
    // Replay: a proof valid on one connection is refused on the next (fresh server nonce).
    let client_nonce = [9u8; NONCE_LEN];
    let proof = {
        let mut socket = TcpStream::connect(address).unwrap();
        socket.write_all(&bind_frame(client_nonce)).unwrap();
        let accept = read_accept(&mut socket);
        let proof = auth::proof(
            &secret,
            accept.version,
            Role::Client,
            &client_nonce,
            &accept.nonce,
        );
        socket.write_all(&Frame::Auth { proof }.to_bytes()).unwrap();
        proof
    };
    let mut socket = TcpStream::connect(address).unwrap();
    socket.write_all(&bind_frame(client_nonce)).unwrap();
    read_accept(&mut socket);
    socket.write_all(&Frame::Auth { proof }.to_bytes()).unwrap();
    let (code, message) = connection_error(&read_frames_until_close(&mut socket));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert_eq!(good.pull("synthetic:1KiB").completion().bytes, 1024);
}
both_backends!(authentication_wrong_replayed_missing, authentication);

/// Reads the preface and ACCEPT from a raw socket.
fn read_accept(socket: &mut TcpStream) -> nexus_protocol::frame::Accept {
    use std::io::Read;
    socket
        .set_read_timeout(Some(nexus_testkit::PATIENCE))
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= PREFACE.len() {
            let mut rest = BytesMut::from(&buf[PREFACE.len()..]);
            if let Some(Frame::Accept(accept)) =
                nexus_protocol::frame::decode(&mut rest, 1 << 16).unwrap()
            {
                return accept;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before ACCEPT");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn connection_limit(backend: Backend) {
    let dir = TempDir::new("limit");
    let mut config = test_config(backend, dir.path());
    config.max_connections = 3;
    let server = start_with(config, builtin_registry(dir.path()));
    let address = server.local_addr();
    let held: Vec<Client> = (0..3).map(|_| Client::connect(address)).collect();
    let frames = exchange_raw(address, &bind_frame([5; NONCE_LEN]), false);
    assert_eq!(connection_error(&frames).0, ErrorCode::RESOURCE_EXHAUSTED);
    drop(held);
    nexus_testkit::wait_until("connections to close", || {
        server.stats().connections_open == 0
    });
    still_serving(&server);
}
both_backends!(connections_beyond_the_limit_are_refused, connection_limit);

#[test]
fn non_loopback_without_a_secret_is_refused() {
    let dir = TempDir::new("insecure");
    let mut config = test_config(Backend::Epoll, dir.path());
    config.bind = "0.0.0.0".parse().unwrap();
    let err = Server::start(config.clone(), builtin_registry(dir.path()))
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("burst.nexus.auth.secret") && message.contains("insecure"),
        "{message}"
    );
    config.insecure = true;
    let server = Server::start(config, builtin_registry(dir.path())).unwrap();
    assert!(server.local_addr().port() > 0);
}

/// A server with TLS on (a certificate for 127.0.0.1 from a test CA).
fn tls_server(backend: Backend, dir: &TempDir, pki: &Pki, handshake: Duration) -> Server {
    let cert = pki.server("server", &["127.0.0.1"], Validity::Current);
    let mut config = test_config(backend, dir.path());
    config.protocol.timers.handshake_timeout = handshake;
    config.tls = TlsSettings {
        mode: TlsMode::Tls,
        cert: Some(cert.cert),
        key: Some(cert.key),
        ..TlsSettings::default()
    };
    start_with(config, builtin_registry(dir.path()))
}

/// A TLS client still gets through the handshake and the server's ACCEPT.
fn still_serving_tls(server: &Server, pki: &Pki) {
    let frames = exchange_raw_tls(
        server.local_addr(),
        &pki.ca,
        &bind_frame([9; NONCE_LEN]),
        true,
    );
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Accept(_))),
        "{frames:?}"
    );
}

/// The hostile inputs of `garbage`, inside TLS: the same clear errors, and the server goes on.
fn garbage_inside_tls(backend: Backend) {
    let dir = TempDir::new("garbage-tls");
    let pki = Pki::new("garbage");
    let server = tls_server(backend, &dir, &pki, Duration::from_secs(10));
    each_case_gets_its_error(
        |bytes| exchange_raw_tls(server.local_addr(), &pki.ca, bytes, true),
        || still_serving_tls(&server, &pki),
    );
    assert!(server.stats().protocol_errors >= 5);
}
both_backends!(garbage_inside_tls_gets_the_same_errors, garbage_inside_tls);

/// Bytes that are not TLS on a TLS port close that connection (counted, no panic); a
/// handshake that stops half-way is closed at the handshake deadline; the server goes on.
fn not_tls_on_a_tls_port(backend: Backend) {
    let dir = TempDir::new("not-tls");
    let pki = Pki::new("not-tls");
    let deadline = Duration::from_millis(800);
    let server = tls_server(backend, &dir, &pki, deadline);
    let mut random = vec![0u8; 4096];
    getrandom::fill(&mut random).unwrap();
    random[0] = 0x42;
    let mut bad_record = vec![0x16, 0x03, 0x01, 0xFF, 0xFF];
    bad_record.extend_from_slice(&random[..100]);
    // What the server answers before it closes: nothing, or a TLS alert record (0x15).
    let answer = |socket: &mut TcpStream| {
        socket
            .set_read_timeout(Some(nexus_testkit::PATIENCE))
            .unwrap();
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(socket, &mut answer);
        assert!(answer.is_empty() || answer[0] == 0x15, "{answer:02x?}");
    };
    for bytes in [random, bad_record] {
        let mut socket = TcpStream::connect(server.local_addr()).unwrap();
        let _ = socket.write_all(&bytes);
        let _ = socket.shutdown(std::net::Shutdown::Write);
        answer(&mut socket);
        still_serving_tls(&server, &pki);
    }
    // Half a ClientHello, then silence.
    let mut socket = TcpStream::connect(server.local_addr()).unwrap();
    let start = Instant::now();
    socket
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01])
        .unwrap();
    answer(&mut socket);
    assert!(start.elapsed() >= deadline, "closed before the deadline");
    still_serving_tls(&server, &pki);
    assert_eq!(server.stats().tls_handshake_failures, 3);
}
both_backends!(
    not_tls_on_a_tls_port_is_closed_and_counted,
    not_tls_on_a_tls_port
);
