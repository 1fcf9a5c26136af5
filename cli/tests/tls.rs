//! TLS through the binaries, as an operator sets it up: `nexus serve` and `nexus pull` as
//! real processes configured by environment variables, certificates made by the test. A
//! pull by host name, the expiry metric on a real scrape, the refusal a plaintext client
//! reads (and the server's log line), a SIGHUP reload, and the admin endpoint over https.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use nexus_testkit::{
    https_get, run_pull, spawn_serve, stderr_of, synthetic_bytes, try_https_get, wait_until,
    CertFiles, Pki, TempDir, Validity,
};

fn nexus() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nexus"))
}

fn install(files: &CertFiles, live: &CertFiles) {
    for (from, to) in [(&files.cert, &live.cert), (&files.key, &live.key)] {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
}

#[test]
fn serve_and_pull_over_tls_by_environment() {
    let first = Pki::new("cli-first");
    let second = Pki::new("cli-second");
    let dir = TempDir::new("cli-tls");
    let live = CertFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server-key.pem"),
    };
    install(&first.server("a", &["localhost"], Validity::Current), &live);
    let admin_cert = first.server("admin", &["localhost"], Validity::Current);
    let (cert, key) = (live.cert.to_str().unwrap(), live.key.to_str().unwrap());
    let served = spawn_serve(
        nexus(),
        &[
            ("BURST_NEXUS_SERVER_ROOT", dir.path().to_str().unwrap()),
            ("BURST_NEXUS_SERVER_TLS_MODE", "tls"),
            ("BURST_NEXUS_SERVER_TLS_CERT", cert),
            ("BURST_NEXUS_SERVER_TLS_KEY", key),
            // Only SIGHUP reloads in this test.
            ("BURST_NEXUS_SERVER_TLS_RELOAD_MS", "3600000"),
            // The admin endpoint over https, with its own copy of the first certificate.
            (
                "BURST_NEXUS_ADMIN_TLS_CERT",
                admin_cert.cert.to_str().unwrap(),
            ),
            (
                "BURST_NEXUS_ADMIN_TLS_KEY",
                admin_cert.key.to_str().unwrap(),
            ),
        ],
    );
    let endpoint = format!("localhost:{}", served.address.port());
    let out = dir.path().join("out.bin");
    let pull = |ca: &Path| {
        run_pull(
            nexus(),
            &[&endpoint, "synthetic:3MiB", "-o", out.to_str().unwrap()],
            &[
                ("BURST_NEXUS_CLIENT_TLS", "true"),
                ("BURST_NEXUS_CLIENT_TLS_CA", ca.to_str().unwrap()),
                ("BURST_NEXUS_CLIENT_RETRY_MAX", "0"),
            ],
        )
    };

    // By host name: the certificate holds `localhost`, not the address.
    let pulled = pull(&first.ca);
    assert!(pulled.status.success(), "{}", stderr_of(&pulled));
    assert_eq!(std::fs::read(&out).unwrap(), synthetic_bytes(0, 3 << 20));

    // The certificate is valid until 4000: the metric says so, scraped over https (a
    // plain http request gets no answer from the https port).
    let admin = served.admin.unwrap();
    let scrape = |series: &str| {
        let (status, body) = https_get(admin, &first.ca, "/metrics");
        assert_eq!(status, 200, "{body}");
        nexus_testkit::prometheus_sample(&body, series).unwrap_or(0.0)
    };
    let expiry = scrape("nexus_server_tls_certificate_expiry_seconds");
    assert!(expiry > 60.0 * 365.0 * 86_400.0 * 19.0, "{expiry}");
    assert!(nexus_testkit::http_get(admin, "/metrics").map_or(true, |(status, _)| status != 200));

    // A plaintext client reads why it is refused; the server logs it.
    let plain = run_pull(
        nexus(),
        &[&endpoint, "synthetic:10", "-o", out.to_str().unwrap()],
        &[("BURST_NEXUS_CLIENT_RETRY_MAX", "0")],
    );
    assert!(!plain.status.success());
    assert!(
        stderr_of(&plain).contains("this port requires TLS"),
        "{}",
        stderr_of(&plain)
    );
    wait_until("the server's log line", || {
        served
            .log
            .lock()
            .iter()
            .any(|l| l.contains("TLS handshake failed") && l.contains("plaintext Nexus client"))
    });
    assert_eq!(scrape("nexus_server_tls_handshake_failures_total"), 1.0);

    // SIGHUP: the second CA's certificate for new connections.
    install(
        &second.server("b", &["localhost"], Validity::Current),
        &live,
    );
    let pid = served.child.0.id() as i32;
    // SAFETY: kill(2) with a live child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_until("the reload", || {
        scrape("nexus_server_tls_reloads_total{outcome=\"ok\"}") == 1.0
    });
    let refused = pull(&first.ca);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("UnknownIssuer"),
        "{}",
        stderr_of(&refused)
    );
    let pulled = pull(&second.ca);
    assert!(pulled.status.success(), "{}", stderr_of(&pulled));
    // The same SIGHUP reloaded the admin endpoint's files too (unchanged here).
    let (_, body) = https_get(admin, &first.ca, "/metrics");
    assert_eq!(
        nexus_testkit::prometheus_sample(&body, "nexus_admin_tls_reloads_total{outcome=\"ok\"}"),
        Some(1.0),
        "{body}"
    );
}

/// The admin endpoint's certificate is rotated by replacing its files: new connections get
/// the new one; files that do not make a certificate are refused and the old one stays.
#[test]
fn the_admin_certificate_is_reloaded_when_its_files_change() {
    let first = Pki::new("admin-first");
    let second = Pki::new("admin-second");
    let dir = TempDir::new("admin-reload");
    let live = CertFiles {
        cert: dir.path().join("admin.pem"),
        key: dir.path().join("admin-key.pem"),
    };
    install(&first.server("a", &["localhost"], Validity::Current), &live);
    let served = spawn_serve(
        nexus(),
        &[
            ("BURST_NEXUS_SERVER_ROOT", dir.path().to_str().unwrap()),
            ("BURST_NEXUS_ADMIN_TLS_CERT", live.cert.to_str().unwrap()),
            ("BURST_NEXUS_ADMIN_TLS_KEY", live.key.to_str().unwrap()),
            ("BURST_NEXUS_ADMIN_TLS_RELOAD_MS", "50"),
        ],
    );
    let admin = served.admin.unwrap();
    let (status, body) = https_get(admin, &first.ca, "/metrics");
    assert_eq!(status, 200, "{body}");
    let expiry =
        nexus_testkit::prometheus_sample(&body, "nexus_admin_tls_certificate_expiry_seconds");
    assert!(expiry.unwrap() > 60.0 * 365.0 * 86_400.0 * 19.0, "{body}");

    install(
        &second.server("b", &["localhost"], Validity::Current),
        &live,
    );
    wait_until("the new admin certificate", || {
        try_https_get(admin, &second.ca, "/healthz").is_ok()
    });
    let refused = try_https_get(admin, &first.ca, "/healthz").unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    let ok = "nexus_admin_tls_reloads_total{outcome=\"ok\"}";
    let failed = "nexus_admin_tls_reloads_total{outcome=\"failed\"}";
    let sample = |series: &str| {
        let (_, body) = https_get(admin, &second.ca, "/metrics");
        nexus_testkit::prometheus_sample(&body, series).unwrap_or(0.0)
    };
    assert!(sample(ok) >= 1.0);

    // A broken certificate file: the reload fails, says so, and the second certificate stays.
    // (A reload between the two renames above may have failed already, on a key that did
    // not fit the certificate: the count is compared with what it was before.)
    let failures = sample(failed);
    std::fs::write(&live.cert, "not a certificate").unwrap();
    wait_until("the failed reload", || sample(failed) > failures);
    wait_until("its log line", || {
        served.log.lock().iter().any(|l| {
            l.contains("TLS reload failed")
                && l.contains("admin endpoint")
                && l.contains("burst.nexus.admin.tls.cert")
        })
    });
    let (status, _) = https_get(admin, &second.ca, "/healthz");
    assert_eq!(status, 200);
}
