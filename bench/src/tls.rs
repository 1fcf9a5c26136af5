//! TLS scenarios: Nexus over TLS against Nexus in plaintext (single stream, mux16) and
//! against nginx over https + curl (one page-cached file), interleaved run by run.
//! Certificates come from a test CA made at the start (`nexus_testkit::Pki`); both sides
//! use TLS 1.3 with AES-128-GCM.

use std::net::SocketAddr;

use nexus_testkit::{Pki, Validity};
use serde_json::json;

use crate::baselines::{self, Https};
use crate::procs::{nexus_pull, nexus_server_with};
use crate::report::{Record, Side};
use crate::{data_file, log_pair, synthetic, Options, GIB, MIB};

/// The server's environment and the client's arguments for TLS.
struct Setup {
    _pki: Pki,
    server_env: Vec<(&'static str, String)>,
    client_args: Vec<String>,
    https: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
}

fn setup() -> Setup {
    let pki = Pki::new("bench");
    let cert = pki.server("server", &["localhost", "127.0.0.1"], Validity::Current);
    let path = |p: &std::path::Path| p.display().to_string();
    Setup {
        server_env: vec![
            ("BURST_NEXUS_SERVER_TLS_MODE", "tls".to_string()),
            ("BURST_NEXUS_SERVER_TLS_CERT", path(&cert.cert)),
            ("BURST_NEXUS_SERVER_TLS_KEY", path(&cert.key)),
        ],
        client_args: vec![
            "-D".into(),
            "burst.nexus.client.tls=true".into(),
            "-D".into(),
            format!("burst.nexus.client.tls.ca={}", path(&pki.ca)),
        ],
        https: (cert.cert, cert.key, pki.ca.clone()),
        _pki: pki,
    }
}

/// One Nexus run, with TLS or without.
fn run(options: &Options, setup: Option<&Setup>, paradata: &[String], bytes: u64) -> Side {
    let env: Vec<(&str, &str)> = setup
        .map(|s| s.server_env.iter().map(|(k, v)| (*k, v.as_str())).collect())
        .unwrap_or_default();
    let (server, address): (_, SocketAddr) =
        nexus_server_with(&options.backend, &options.scratch, &env);
    let args: Vec<&str> = setup
        .map(|s| s.client_args.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let pulled = nexus_pull(address, paradata, &options.backend, &args, &options.scratch);
    Side {
        bytes,
        seconds: pulled.seconds,
        server: server.usage(),
        client: pulled.usage,
    }
}

pub(crate) fn tls(options: &Options) -> Vec<Record> {
    let setup = setup();
    let mut records = Vec::new();
    let single = options.size(8 * GIB, GIB);
    let each = options.size(512 * MIB, 64 * MIB);
    for (name, paradata, bytes) in [
        ("tls-single", synthetic(1, single), single),
        ("tls-mux16", synthetic(16, each), 16 * each),
    ] {
        let mut pairs = Vec::new();
        for round in 1..=options.runs {
            let secure = run(options, Some(&setup), &paradata, bytes);
            let plain = run(options, None, &paradata, bytes);
            log_pair(name, round, &secure, Some(&plain));
            pairs.push((secure, Some(plain)));
        }
        records.push(Record {
            scenario: name.into(),
            baseline: Some("Nexus in plaintext".into()),
            pairs,
            extra: json!({"streams": paradata.len(), "cipher": "TLS13_AES_128_GCM_SHA256",
                          "provider": "rustls 0.23 + ring", "backend": options.backend}),
            note: None,
        });
    }

    let len = options.size(4 * GIB, GIB);
    data_file(options, "file.bin", len, |offset, out| {
        nexus_server::synthetic::fill(7, offset, out)
    });
    let have_nginx =
        baselines::ensure_apt("nginx", "nginx") && baselines::ensure_apt("curl", "curl");
    let (cert, key, ca) = &setup.https;
    let https = Https { cert, key, ca };
    let paradata = vec!["file:file.bin".to_string()];
    let mut pairs = Vec::new();
    for round in 1..=options.runs {
        let secure = run(options, Some(&setup), &paradata, len);
        let nginx = have_nginx
            .then(|| {
                baselines::nginx_curl_over(
                    &options.scratch,
                    "file.bin",
                    &options.scratch,
                    Some(&https),
                )
            })
            .flatten();
        log_pair(
            "tls-file vs nginx https + curl",
            round,
            &secure,
            nginx.as_ref(),
        );
        pairs.push((secure, nginx));
    }
    records.push(Record {
        scenario: "tls-file".into(),
        baseline: Some("nginx https + curl".into()),
        pairs,
        extra: json!({"file_bytes": len, "page_cache": true, "cipher": "TLS13_AES_128_GCM_SHA256"}),
        note: (!have_nginx).then(|| "nginx or curl could not be installed".into()),
    });
    records
}
