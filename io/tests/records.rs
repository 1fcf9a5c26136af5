//! The TLS record layer against rustls's own, over real loopback sockets on both backends:
//! bytes go both ways intact across many key updates, started by either side (ours after a
//! few records, forced low; rustls's on request), and close_notify ends the stream cleanly.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nexus_io::tls::{self, Mode, ServerFiles};
use nexus_io::{block_on, Backend, Connection};

/// A CA and a server certificate for 127.0.0.1, as PEM files under `dir`; returns the
/// server's files and the CA's certificate.
fn certificates(dir: &Path) -> (ServerFiles, std::path::PathBuf) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let files = ServerFiles {
        mode: Mode::Tls,
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        client_ca: None,
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    (files, ca_path)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Our server end echoes what a rustls client sends, both sides updating keys all the time.
fn echo_across_key_updates(backend: Backend) {
    let dir = std::env::temp_dir().join(format!("nexus-records-{}-{backend}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (files, ca) = certificates(&dir);
    let identity = tls::server_config(&files).unwrap();
    // Ours: a key update every 3 records (this test's process only).
    tls::set_records_per_key(3);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let sent = pattern((3 << 20) + 777, 5);

    let peer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates({
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                roots
            })
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
            let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
            let mut stream =
                rustls::StreamOwned::new(conn, std::net::TcpStream::connect(address).unwrap());
            // Writes in pieces, asking for a key update (with update_requested) between them.
            for piece in sent.chunks(100_003) {
                stream.write_all(piece).unwrap();
                stream.conn.refresh_traffic_keys().unwrap();
            }
            stream.flush().unwrap();
            let mut echoed = vec![0u8; sent.len()];
            stream.read_exact(&mut echoed).unwrap();
            stream.conn.send_close_notify();
            stream.flush().unwrap();
            // Then our close_notify: a clean end, not a cut.
            let mut rest = Vec::new();
            let end = stream.read_to_end(&mut rest);
            (echoed, end.map(|_| rest.len()))
        })
    };

    let (socket, _) = listener.accept().unwrap();
    block_on(backend, 64, async move {
        let connection = Connection::from_std(backend, socket)
            .unwrap()
            .server_tls(identity.config)
            .unwrap();
        connection.handshake().await.unwrap();
        let mut received = BytesMut::new();
        while received.len() < sent.len() {
            let (n, buf) = connection.read(received).await;
            received = buf;
            assert!(n.unwrap() > 0, "early end at {}", received.len());
        }
        assert_eq!(&received[..], &sent[..]);
        // Echo it in uneven segments, as the driver gathers frames.
        let segments: Vec<Bytes> = sent.chunks(70_001).map(Bytes::copy_from_slice).collect();
        let (result, _) = connection.write_all(segments).await;
        result.unwrap();
        // The peer's close_notify reads as the end.
        let (n, _) = connection.read(BytesMut::with_capacity(1024)).await;
        assert_eq!(n.unwrap(), 0);
        connection.shutdown_write().await;
    })
    .unwrap();
    let (echoed, end) = peer.join().unwrap();
    assert!(echoed == pattern((3 << 20) + 777, 5), "the echo differs");
    assert_eq!(end.unwrap(), 0, "a clean close_notify, nothing after");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn echo_across_key_updates_io_uring() {
    echo_across_key_updates(Backend::IoUring);
}

#[test]
fn echo_across_key_updates_epoll() {
    echo_across_key_updates(Backend::Epoll);
}

/// A reader that waits for the rest of a frame (the driver's low-water mark) while part of
/// it sits read but not yet opened in the session still gets all of it: the mark the kernel
/// sees leaves out what the session holds. (It did not, once: a stream hung 1 MiB short.)
fn low_water_mark_counts_what_the_session_holds(backend: Backend) {
    let dir = std::env::temp_dir().join(format!("nexus-lowat-{}-{backend}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (files, ca) = certificates(&dir);
    let identity = tls::server_config(&files).unwrap();
    let client = tls::client_config(&tls::ClientFiles {
        ca,
        cert: None,
        key: None,
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let total = (8 << 20) + 3;
    let server = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        block_on(backend, 64, async move {
            let connection = Connection::from_std(backend, socket)
                .unwrap()
                .server_tls(identity.config)
                .unwrap();
            connection.handshake().await.unwrap();
            let (result, _) = connection
                .write_all(vec![Bytes::from(pattern(total, 1))])
                .await;
            result.unwrap();
            // Stays open (no FIN) until the client has it all: a FIN would end any wait.
            let (n, _) = connection.read(BytesMut::with_capacity(64)).await;
            assert_eq!(n.unwrap(), 0);
        })
        .unwrap();
    });
    block_on(backend, 64, async move {
        let name = tls::server_name("127.0.0.1").unwrap();
        let connection = Connection::connect(backend, address)
            .await
            .unwrap()
            .client_tls(client, name)
            .unwrap();
        connection.handshake().await.unwrap();
        let mut got = BytesMut::with_capacity(total);
        while got.len() < total {
            // As the driver does: wait for the rest of the frame, at most 1 MiB of it, and
            // read in small pieces.
            connection
                .set_recv_lowat((total - got.len()).min(1 << 20))
                .unwrap();
            let read = connection.read_up_to(got, 64 << 10);
            let (n, buf) = tokio::time::timeout(std::time::Duration::from_secs(30), read)
                .await
                .expect("a read waited for bytes that had already come");
            got = buf;
            assert!(n.unwrap() > 0);
        }
        assert!(got[..] == pattern(total, 1)[..]);
        connection.shutdown_write().await;
    })
    .unwrap();
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn low_water_mark_counts_what_the_session_holds_io_uring() {
    low_water_mark_counts_what_the_session_holds(Backend::IoUring);
}

#[test]
fn low_water_mark_counts_what_the_session_holds_epoll() {
    low_water_mark_counts_what_the_session_holds(Backend::Epoll);
}
