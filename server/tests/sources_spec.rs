//! SOURCES.md is normative: its synthetic test vectors are what a real server sends, and its
//! `file:` rules are what the file source does.
#![allow(clippy::unwrap_used)]

use nexus_protocol::ErrorCode;
use nexus_server::Backend;
use nexus_testkit::{start_server, write_pattern_file, Client, TempDir};

fn spec() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../SOURCES.md")).unwrap()
}

/// The cells of every table row of SOURCES.md that starts with `first`'s shape.
fn rows(spec: &str) -> Vec<Vec<String>> {
    spec.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn synthetic_bytes_are_the_spec_vectors() {
    let spec = spec();
    let mut checked = 0;
    for row in rows(&spec) {
        let [seed, rotation, hex] = &row[..] else {
            continue;
        };
        let Ok(seed) = seed.parse::<u64>() else {
            continue;
        };
        assert_eq!(
            nexus_server::synthetic::rotation(seed).to_string(),
            *rotation
        );
        let mut first = [0u8; 16];
        nexus_server::synthetic::stream_bytes(seed, 0, &mut first);
        let got: String = first.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, *hex, "seed {seed}");
        checked += 1;
    }
    assert!(checked >= 3, "SOURCES.md lists the seed vectors");
}

#[test]
fn a_real_server_sends_the_spec_digests() {
    let root = TempDir::new("sources-spec");
    let server = start_server(Backend::Epoll, root.path());
    let mut client = Client::connect(server.local_addr());
    let spec = spec();
    let mut checked = 0;
    for row in rows(&spec) {
        let [paradata, digest] = &row[..] else {
            continue;
        };
        if !paradata.starts_with("synthetic:") {
            continue;
        }
        let want = u64::from_str_radix(digest.trim_start_matches("0x"), 16).unwrap();
        let pulled = client.pull(paradata);
        assert_eq!(pulled.completion().digest, want, "{paradata}");
        checked += 1;
    }
    assert!(checked >= 3, "SOURCES.md lists the digest vectors");
}

#[test]
fn file_ranges_behave_as_specified() {
    let root = TempDir::new("sources-file");
    let data = write_pattern_file(&root.path().join("f.bin"), 10_000, 3);
    std::fs::create_dir(root.path().join("dir")).unwrap();
    let server = start_server(Backend::Epoll, root.path());
    let mut client = Client::connect(server.local_addr());
    // Ranges, units, the empty stream at the end and with length=0.
    assert_eq!(
        client.pull("file:f.bin?offset=1000&length=2KB").data,
        data[1000..3000]
    );
    assert_eq!(client.pull("file:f.bin?offset=9000").data, data[9000..]);
    for empty in ["file:f.bin?offset=10000", "file:f.bin?offset=5&length=0"] {
        let pulled = client.pull(empty);
        let done = pulled.completion();
        assert_eq!(
            (done.bytes, done.chunks, done.digest),
            (0, 0, 0x2d06800538d394c2)
        );
        assert_eq!(pulled.expected_bytes, Some(0));
    }
    for (paradata, code) in [
        ("file:", ErrorCode::BAD_PARADATA),
        ("file:/etc/passwd", ErrorCode::PERMISSION_DENIED),
        ("file:../x", ErrorCode::PERMISSION_DENIED),
        ("file:missing", ErrorCode::NOT_FOUND),
        ("file:dir", ErrorCode::BAD_PARADATA),
        ("file:f.bin?offset=10001", ErrorCode::BAD_PARADATA),
        (
            "file:f.bin?offset=9000&length=1001",
            ErrorCode::BAD_PARADATA,
        ),
        ("file:f.bin?offset=1.5KB", ErrorCode::BAD_PARADATA),
        ("file:f.bin?offset=1kb", ErrorCode::BAD_PARADATA),
        ("file:f.bin?size=1", ErrorCode::BAD_PARADATA),
        ("file:f.bin?offset=1&offset=2", ErrorCode::BAD_PARADATA),
        ("file:f.bin?offset", ErrorCode::BAD_PARADATA),
        ("nofile", ErrorCode::UNKNOWN_SOURCE),
        ("s3:bucket/key", ErrorCode::UNKNOWN_SOURCE),
        ("synthetic:1GiB?seed=1&speed=2", ErrorCode::BAD_PARADATA),
    ] {
        assert_eq!(client.pull(paradata).error().0, code, "{paradata}");
    }
}
