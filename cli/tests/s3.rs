//! S3 end to end, as real processes against a real S3 server (moto): `nexus push` writes a
//! 1 GiB file into an object through the `s3:` sink (a multipart upload), the `s3` sensor of
//! a `nexus serve --rules` sees it, and its rule pulls `s3:BUCKET/KEY` through the same
//! server into a file, byte-exact.
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nexus_testkit::{
    digest, free_port, json_stdout, spawn_serve_with, stderr_of, write_pattern_file, Moto, TempDir,
};
use serde_json::Value;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// A GiB through a Python S3 server, twice, on a loaded 2-core machine: minutes, not
/// seconds.
const PATIENCE: Duration = Duration::from_secs(600);

fn nexus(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    Command::new(NEXUS)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_rule_moves_a_gib_object_from_s3_to_a_file_through_nexus() {
    let moto = Moto::start();
    moto.create_bucket("data");
    // The source and the output GiB: in memory when there is room (moto spools its copy
    // there too), as free disk varies between machines.
    let dir = TempDir::in_memory("s3-gib", 2 << 30);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let port = free_port();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            r#"
[sensors.bucket]
kind = "s3"
bucket = "data"
prefix = "in"
every = "200ms"
timeout = "60s"

[rules.fetch]
on = "bucket"
filter = {{ change = "created" }}

[[rules.fetch.steps]]
name = "get"
retries = 0
pull = {{ endpoint = "127.0.0.1:{port}", paradata = "s3:{{{{ event.payload.bucket }}}}/{{{{ event.payload.key }}}}", output = "{out}/" }}
"#,
            out = out.display()
        ),
    )
    .unwrap();
    let db = dir.path().join("state.db");
    let mut env = moto.env("data");
    env.push(("BURST_NEXUS_SERVER_PORT", port.to_string()));
    env.push(("BURST_NEXUS_WORKFLOW_STATE", db.display().to_string()));
    env.push(("BURST_NEXUS_SERVER_ROOT", dir.path().display().to_string()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _server = spawn_serve_with(
        Path::new(NEXUS),
        &["--rules", rules.to_str().unwrap()],
        &env_refs,
    );

    let len = 1usize << 30;
    let source = dir.path().join("big.bin");
    let expected = digest(&write_pattern_file(&source, len, 7));
    let pushed = nexus(
        &[
            "push",
            source.to_str().unwrap(),
            &format!("127.0.0.1:{port}"),
            "s3:data/in/big.bin",
            "--json",
        ],
        &[],
    );
    assert_eq!(pushed.status.code(), Some(0), "{}", stderr_of(&pushed));
    let report = json_stdout(&pushed);
    let text = report.to_string();
    // 128 parts of 8 MiB: the object went up as a multipart upload.
    assert!(text.contains("-128"), "a multipart ETag in {text}");

    let deadline = Instant::now() + PATIENCE;
    let run = loop {
        let listed = nexus(&["runs", "--json", "--db", db.to_str().unwrap()], &[]);
        assert_eq!(listed.status.code(), Some(0), "{}", stderr_of(&listed));
        let runs = json_stdout(&listed);
        let done = runs.as_array().and_then(|r| {
            r.iter()
                .find(|r| r["state"] == "success" || r["state"] == "failed")
                .cloned()
        });
        if let Some(run) = done {
            break run;
        }
        assert!(Instant::now() < deadline, "no run ended: {runs}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(run["state"], "success", "{run}");
    let got = std::fs::read(out.join("big.bin")).unwrap();
    assert_eq!(got.len(), len);
    assert_eq!(digest(&got), expected);
    let step: &Value = &run["steps"][0]["result"];
    assert_eq!(run["steps"][0]["name"], "get", "{run}");
    assert_eq!(step["bytes"], len as u64, "{run}");
    assert_eq!(step["digest"], format!("{expected:016x}"), "{run}");
}
