//! TLS on the data port, library to library: a real server and a real client on both IO
//! backends, certificates made by the test (`nexus_testkit::Pki`). Byte-exact pulls and
//! pushes over TLS and mutual TLS, every refusal with its message, and a certificate
//! reload under a running stream.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use nexus_client::{Client, ClientConfig, ErrorCode, Outcome, PushOptions, StreamOptions};
use nexus_server::{Backend, Server, ServerConfig, TlsMode, TlsSettings};
use nexus_testkit::{
    both_backends, digest, push_registry, start_with, synthetic_bytes, test_config,
    write_pattern_file, CertFiles, Pki, TempDir, Validity,
};

fn server_tls(mode: TlsMode, cert: &CertFiles, client_ca: Option<&Path>) -> TlsSettings {
    TlsSettings {
        mode,
        cert: Some(cert.cert.clone()),
        key: Some(cert.key.clone()),
        client_ca: client_ca.map(Path::to_path_buf),
        ..TlsSettings::default()
    }
}

fn serve(backend: Backend, root: &TempDir, tls: TlsSettings) -> Server {
    let upload = root.path().join("up");
    std::fs::create_dir_all(&upload).unwrap();
    let config = ServerConfig {
        tls,
        ..test_config(backend, root.path())
    };
    start_with(config, push_registry(root.path(), &upload, 1 << 40))
}

fn client_tls(ca: &Path, cert: Option<&CertFiles>) -> nexus_client::TlsSettings {
    nexus_client::TlsSettings {
        enabled: true,
        ca: Some(ca.to_path_buf()),
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        server_name: None,
    }
}

fn client(backend: Backend, tls: nexus_client::TlsSettings) -> Client {
    Client::new(ClientConfig {
        threads: 1,
        backend: backend.into(),
        tls,
        ..ClientConfig::default()
    })
    .unwrap()
}

/// Pulls `paradata` to its end: the bytes, or the error.
fn pull(client: &Client, at: SocketAddr, paradata: &str) -> Result<Vec<u8>, (ErrorCode, String)> {
    let mut stream = client.initiate(at, paradata, StreamOptions::default());
    let mut data = Vec::new();
    let end = stream.for_each_chunk(|chunk| data.extend_from_slice(chunk));
    match end.outcome {
        Outcome::Complete(c) => {
            assert_eq!(c.bytes, data.len() as u64);
            assert_eq!(c.digest, digest(&data));
            Ok(data)
        }
        Outcome::Error { code, message } => Err((code, message)),
        other => panic!("{paradata}: {other:?}"),
    }
}

fn error_of(result: Result<Vec<u8>, (ErrorCode, String)>) -> (ErrorCode, String) {
    match result {
        Ok(data) => panic!("expected a refusal, got {} bytes", data.len()),
        Err(e) => {
            eprintln!("refused: {}: {}", e.0, e.1);
            e
        }
    }
}

/// Pulls and a push, byte-exact, over TLS (`mutual`: with client certificates).
fn byte_exact(backend: Backend, mutual: bool) {
    let pki = Pki::new("exact");
    let server_cert = pki.server("server", &["localhost", "127.0.0.1"], Validity::Current);
    let client_cert = pki.client("client", "puller", Validity::Current);
    let root = TempDir::new("tls-exact");
    let file = write_pattern_file(&root.path().join("data.bin"), (5 << 20) + 4321, 7);
    let (mode, ca, cert) = match mutual {
        true => (TlsMode::Mutual, Some(pki.ca.as_path()), Some(&client_cert)),
        false => (TlsMode::Tls, None, None),
    };
    let server = serve(backend, &root, server_tls(mode, &server_cert, ca));
    let client = client(backend, client_tls(&pki.ca, cert));
    let at = server.local_addr();
    assert_eq!(pull(&client, at, "file:data.bin").unwrap(), file);
    assert_eq!(
        pull(&client, at, "synthetic:20MiB").unwrap(),
        synthetic_bytes(0, 20 << 20)
    );
    // Small streams one after the other, on the pooled TLS connection.
    for _ in 0..20 {
        assert_eq!(pull(&client, at, "synthetic:1000").unwrap().len(), 1000);
    }
    let data = synthetic_bytes(9, (3 << 20) + 17);
    let options = PushOptions {
        size: Some(data.len() as u64),
        ..PushOptions::default()
    };
    let mut push = client.push(at, "file:pushed.bin", options);
    for piece in data.chunks(300_001) {
        push.write(Bytes::copy_from_slice(piece)).unwrap();
    }
    match push.finish().outcome {
        Outcome::Complete(c) => assert_eq!(c.digest, digest(&data)),
        other => panic!("push: {other:?}"),
    }
    assert_eq!(
        std::fs::read(root.path().join("up/pushed.bin")).unwrap(),
        data
    );
    assert_eq!(client.pool_stats().created, 1, "one pooled connection");
    assert_eq!(server.stats().tls_handshake_failures, 0);
}

fn byte_exact_tls(backend: Backend) {
    byte_exact(backend, false);
}
both_backends!(pulls_and_pushes_are_byte_exact_over_tls, byte_exact_tls);

fn byte_exact_mutual(backend: Backend) {
    byte_exact(backend, true);
}
both_backends!(
    pulls_and_pushes_are_byte_exact_over_mutual_tls,
    byte_exact_mutual
);

/// Each refusal, on one server per mode, says its cause on the client's side.
fn refusals(backend: Backend) {
    let pki = Pki::new("refusals");
    let stranger = Pki::new("stranger");
    let good = pki.server("server", &["localhost", "127.0.0.1"], Validity::Current);
    let root = TempDir::new("tls-refusals");
    let tls = serve(backend, &root, server_tls(TlsMode::Tls, &good, None));
    let at = tls.local_addr();

    // A plaintext client on the TLS port reads the server's plaintext refusal.
    let plain = Client::new(ClientConfig {
        threads: 1,
        backend: backend.into(),
        ..ClientConfig::default()
    })
    .unwrap();
    let (code, message) = error_of(pull(&plain, at, "synthetic:10"));
    assert!(
        message.contains("this port requires TLS"),
        "{code}: {message}"
    );

    // A CA the client does not trust.
    let (code, message) = error_of(pull(
        &client(backend, client_tls(&stranger.ca, None)),
        at,
        "synthetic:10",
    ));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert!(
        message.contains("UnknownIssuer") && message.contains("burst.nexus.client.tls.ca"),
        "{message}"
    );

    // A name the certificate does not hold.
    let mut renamed = client_tls(&pki.ca, None);
    renamed.server_name = Some("elsewhere.example".into());
    let (code, message) = error_of(pull(&client(backend, renamed), at, "synthetic:10"));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert!(
        message.contains("not valid for name") && message.contains("server.name"),
        "{message}"
    );
    drop(tls);

    // An expired server certificate.
    let old = pki.server("old", &["127.0.0.1"], Validity::Expired);
    let expired = serve(backend, &root, server_tls(TlsMode::Tls, &old, None));
    let tls_client = client(backend, client_tls(&pki.ca, None));
    let (code, message) = error_of(pull(&tls_client, expired.local_addr(), "synthetic:10"));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert!(message.contains("expired"), "{message}");
    drop(expired);

    // A TLS client on a plaintext port.
    let plaintext = serve(backend, &root, TlsSettings::default());
    let (code, message) = error_of(pull(&tls_client, plaintext.local_addr(), "synthetic:10"));
    assert_eq!(code, ErrorCode::PROTOCOL_ERROR, "{message}");
    assert!(message.contains("answered in plaintext"), "{message}");
    drop(plaintext);

    // Mutual TLS: no client certificate, then one from a CA the server does not trust.
    let mutual = serve(
        backend,
        &root,
        server_tls(TlsMode::Mutual, &good, Some(&pki.ca)),
    );
    let at = mutual.local_addr();
    let (code, message) = error_of(pull(&tls_client, at, "synthetic:10"));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert!(
        message.contains("requires a client certificate")
            && message.contains("burst.nexus.client.tls.cert"),
        "{message}"
    );
    let outsider = stranger.client("outsider", "outsider", Validity::Current);
    let (code, message) = error_of(pull(
        &client(backend, client_tls(&pki.ca, Some(&outsider))),
        at,
        "synthetic:10",
    ));
    assert_eq!(code, ErrorCode::AUTH_FAILED, "{message}");
    assert!(
        message.contains("does not trust our certificate"),
        "{message}"
    );
    // The server counts a refusal after its alert is out: the client may read it first.
    nexus_testkit::wait_until("the server to count both refusals", || {
        mutual.stats().tls_handshake_failures >= 2
    });
}
both_backends!(each_tls_refusal_says_why, refusals);

fn install(files: &CertFiles, into: &Path) -> CertFiles {
    let live = CertFiles {
        cert: into.join("server.pem"),
        key: into.join("server-key.pem"),
    };
    // Each file replaced whole by a rename, as an operator's tooling (or a Secret volume) does.
    for (from, to) in [(&files.cert, &live.cert), (&files.key, &live.key)] {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    live
}

/// A reload (asked, then by the file watcher) changes what new connections get; a stream
/// running across it completes, byte-exact, on the session it started with.
fn reload(backend: Backend) {
    let first = Pki::new("first");
    let second = Pki::new("second");
    let third = Pki::new("third");
    let root = TempDir::new("tls-reload");
    let live_dir = root.path().join("live");
    std::fs::create_dir(&live_dir).unwrap();
    let names = ["127.0.0.1"];
    let live = install(&first.server("a", &names, Validity::Current), &live_dir);
    let mut tls = server_tls(TlsMode::Tls, &live, None);
    tls.reload_interval = Duration::from_secs(3600);
    let server = serve(backend, &root, tls);
    let at = server.local_addr();

    let old_client = client(backend, client_tls(&first.ca, None));
    let mut running = old_client.initiate(at, "synthetic:48MiB", StreamOptions::default());
    let mut data = Vec::new();
    match running.recv() {
        Some(nexus_client::Item::Chunk(chunk)) => data.extend_from_slice(&chunk),
        other => panic!("the stream should be running: {other:?}"),
    }

    install(&second.server("b", &names, Validity::Current), &live_dir);
    server.reload_tls().unwrap();
    assert_eq!(
        pull(
            &client(backend, client_tls(&second.ca, None)),
            at,
            "synthetic:1000"
        )
        .unwrap()
        .len(),
        1000,
        "a new connection gets the new certificate"
    );
    let (_, message) = error_of(pull(
        &client(backend, client_tls(&first.ca, None)),
        at,
        "synthetic:10",
    ));
    assert!(message.contains("UnknownIssuer"), "{message}");

    let end = running.for_each_chunk(|chunk| data.extend_from_slice(chunk));
    match end.outcome {
        Outcome::Complete(c) => assert_eq!(c.digest, digest(&data)),
        other => panic!("the stream across the reload: {other:?}"),
    }
    assert_eq!(data, synthetic_bytes(0, 48 << 20));

    // A broken file keeps the identity in use.
    std::fs::write(&live.key, "not a key").unwrap();
    assert!(server
        .reload_tls()
        .unwrap_err()
        .contains("burst.nexus.server.tls.key"));
    assert!(pull(
        &client(backend, client_tls(&second.ca, None)),
        at,
        "synthetic:10"
    )
    .is_ok());
    drop(server);

    // The watcher notices changed files by itself.
    let live = install(&second.server("c", &names, Validity::Current), &live_dir);
    let mut tls = server_tls(TlsMode::Tls, &live, None);
    tls.reload_interval = Duration::from_millis(20);
    let server = serve(backend, &root, tls);
    install(&third.server("d", &names, Validity::Current), &live_dir);
    nexus_testkit::wait_until("the watcher to load the third CA's certificate", || {
        pull(
            &client(backend, client_tls(&third.ca, None)),
            server.local_addr(),
            "synthetic:10",
        )
        .is_ok()
    });
}
both_backends!(
    a_reload_keeps_running_streams_and_serves_the_new_certificate,
    reload
);

/// The expiry the metric reports is the certificate's notAfter.
#[test]
fn the_expiry_is_read_from_the_certificate() {
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new("expiry");
    for (validity, year) in [(Validity::Current, 4000), (Validity::Expired, 2021)] {
        let files = pki.server("s", &["localhost"], validity);
        let der = rustls::pki_types::CertificateDer::from_pem_file(&files.cert).unwrap();
        let not_after = nexus_io::tls::not_after(&der).unwrap();
        let seconds = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // January 1st of `year`, 00:00 UTC.
        let days = (1970..year)
            .map(|y| {
                if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                    366
                } else {
                    365
                }
            })
            .sum::<u64>();
        assert_eq!(seconds, days * 86_400, "{validity:?}");
    }
}
