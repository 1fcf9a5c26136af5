//! What a new user meets with `nexus pull`, as real processes: failures named for what they
//! are (a missing or wrong secret, an unreachable server, an HTTP port), retries that outlast
//! a restart, and the habits of curl and rsync (`-o -`, `-q`, a summary line, a progress bar
//! that never shows "0 B/0 B", NO_COLOR, `--continue`, `--keep-partial`, `--keep-going`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nexus_testkit::{
    entry_states, free_port, json_stdout as report, run_pull, scrape_sample, spawn_serve,
    stderr_of as stderr, write_pattern_file, Served, TempDir,
};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

fn serve(root: &Path, env: &[(&str, &str)]) -> Served {
    let mut all = vec![("BURST_NEXUS_SERVER_ROOT", root.to_str().unwrap())];
    all.extend_from_slice(env);
    spawn_serve(Path::new(NEXUS), &all)
}

fn pull(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_pull(Path::new(NEXUS), args, env)
}

fn scrape(server: &Served, series: &str) -> f64 {
    scrape_sample(server.admin.unwrap(), series)
}

/// A missing or a wrong secret is said as such, exits 6, and is not retried: the server sees
/// exactly one failed handshake per pull.
#[test]
fn a_missing_or_wrong_secret_is_named_and_not_retried() {
    let dir = TempDir::new("fc-secret");
    let server = serve(dir.path(), &[("BURST_NEXUS_AUTH_SECRET", "s3cret")]);
    let address = server.address.to_string();
    let out = pull(&[&address, "synthetic:1KiB", "-o", "/dev/null"], &[]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("auth_failed")
            && err.contains("requires a shared secret")
            && err.contains("burst.nexus.auth.secret"),
        "{err}"
    );
    let out = pull(
        &[&address, "synthetic:1KiB", "-o", "/dev/null"],
        &[("BURST_NEXUS_AUTH_SECRET", "wrong")],
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused our authentication"),
        "{}",
        stderr(&out)
    );
    nexus_testkit::wait_until("both failures in the scrape", || {
        scrape(
            &server,
            "nexus_protocol_errors_total{reason=\"auth_failed\"}",
        ) >= 2.0
    });
    // Give a retry that should not happen every chance to show up: one more good pull.
    let out = pull(
        &[&address, "synthetic:1KiB", "-o", "/dev/null"],
        &[("BURST_NEXUS_AUTH_SECRET", "s3cret")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        scrape(
            &server,
            "nexus_protocol_errors_total{reason=\"auth_failed\"}"
        ),
        2.0,
        "one handshake per failed pull"
    );
}

/// A refused connect is `unreachable` (not a lost connection), exits 3, and is retried with
/// a growing wait: two retries take at least 100 + 200 ms.
#[test]
fn an_unreachable_server_is_retried_with_backoff_then_named() {
    let port = free_port().to_string();
    let endpoint = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let out = pull(
        &[
            &endpoint,
            "synthetic:1KiB",
            "-o",
            "/dev/null",
            "--retries",
            "2",
        ],
        &[],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("unreachable") && err.contains("cannot connect") && err.contains("2 retries"),
        "{err}"
    );
    assert!(!err.contains("connection_lost"), "{err}");
    assert!(
        took >= Duration::from_millis(300),
        "retried within {took:?}"
    );
}

/// A server that comes up 1.5 s after the pull started (a restart) is waited for.
#[test]
fn a_pull_outlasts_a_server_restart() {
    let dir = TempDir::new("fc-restart");
    let data = write_pattern_file(&dir.path().join("f.bin"), 3 << 20, 9);
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let out_path = dir.path().join("out.bin");
    let puller = {
        let (endpoint, out_path) = (endpoint.clone(), out_path.clone());
        std::thread::spawn(move || {
            pull(
                &[&endpoint, "file:f.bin", "-o", out_path.to_str().unwrap()],
                &[],
            )
        })
    };
    // The outage this test is about: the server is down for 1.5 s.
    std::thread::sleep(Duration::from_millis(1500));
    let _server = serve(
        dir.path(),
        &[("BURST_NEXUS_SERVER_PORT", &port.to_string())],
    );
    let out = puller.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(&out_path).unwrap() == data);
}

/// Pointed at an HTTP port, `nexus pull` says so at once instead of waiting out a timeout.
#[test]
fn an_http_port_is_named_as_http() {
    let dir = TempDir::new("fc-http");
    let server = serve(dir.path(), &[]);
    let admin = server.admin.unwrap().to_string();
    let started = Instant::now();
    let out = pull(&[&admin, "synthetic:1KiB", "-o", "/dev/null"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("looks like HTTP"), "{}", stderr(&out));
    // Not a speed check: the other way to fail is waiting out the 60 s stream timeout.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited for a timeout instead of reading the HTTP answer"
    );
}

#[test]
fn dash_o_dash_is_stdout_quiet_is_quiet_and_success_says_so() {
    let dir = TempDir::new("fc-stdout");
    let data = write_pattern_file(&dir.path().join("f.bin"), 100_000, 1);
    let server = serve(dir.path(), &[]);
    let address = server.address.to_string();
    let out = pull(&[&address, "file:f.bin", "-o", "-"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout == data);
    assert!(!Path::new("-").exists(), "no file named -");
    let summary = stderr(&out);
    assert!(
        summary.starts_with("nexus pull: ")
            && summary.contains("xxh3")
            && summary.contains("verified"),
        "{summary}"
    );
    let quiet = pull(&[&address, "file:f.bin", "-o", "-", "-q"], &[]);
    assert_eq!(quiet.status.code(), Some(0));
    assert!(quiet.stderr.is_empty(), "{}", stderr(&quiet));
    assert!(quiet.stdout == data);
}

/// `nexus pull` on a terminal (a pseudo-terminal from `script`): the progress bar never shows
/// an empty total, and NO_COLOR keeps escape sequences off the logs.
fn on_a_terminal(command: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn on_a_terminal_the_bar_never_shows_an_empty_total_and_no_color_is_honoured() {
    let dir = TempDir::new("fc-tty");
    let server = serve(dir.path(), &[]);
    let command = format!(
        "{NEXUS} pull {} synthetic:300MiB -o /dev/null",
        server.address
    );
    let shown = on_a_terminal(&command, &[]);
    assert!(!shown.contains("0 B/0 B"), "{shown:?}");
    assert!(shown.contains("nexus pull: 300.00 MiB"), "{shown:?}");
    // A warning on a terminal is coloured, unless NO_COLOR is set.
    let warn = format!(
        "{NEXUS} pull 127.0.0.1:{} synthetic:1 --retries 1 -o /dev/null",
        free_port()
    );
    assert!(has_colour(&on_a_terminal(&warn, &[])));
    let plain = on_a_terminal(&warn, &[("NO_COLOR", "1")]);
    assert!(!has_colour(&plain), "{plain:?}");
}

/// Whether `text` holds an SGR (colour or style) sequence, `ESC [ ... m`. The bar's own line
/// clearing (`ESC [2K`) is cursor control, not colour.
fn has_colour(text: &str) -> bool {
    text.split('\x1b').skip(1).any(|rest| {
        rest.strip_prefix('[').is_some_and(|params| {
            let end = params.find(|c: char| !c.is_ascii_digit() && c != ';');
            end.is_some_and(|i| params[i..].starts_with('m'))
        })
    })
}

/// `--continue` appends the rest of a file to what an earlier pull left; `--keep-partial`
/// keeps what a failed pull got.
#[test]
fn continue_and_keep_partial() {
    let dir = TempDir::new("fc-continue");
    let data = write_pattern_file(&dir.path().join("f.bin"), 5_000_000, 4);
    let server = serve(dir.path(), &[]);
    let address = server.address.to_string();
    let out_path = dir.path().join("out.bin");
    std::fs::write(&out_path, &data[..1_234_567]).unwrap();
    let out = pull(
        &[
            &address,
            "file:f.bin",
            "-o",
            out_path.to_str().unwrap(),
            "--continue",
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(&out_path).unwrap() == data);
    let json = report(&out);
    assert_eq!(json["entries"][0]["continued_from_bytes"], 1_234_567);
    assert_eq!(json["entries"][0]["bytes"], 5_000_000 - 1_234_567);

    // A connection cut after 3 MiB, no retry: the partial output stays with --keep-partial.
    let proxy = nexus_testkit::Proxy::start(server.address);
    proxy.cut_after(3 << 20);
    let partial = dir.path().join("partial.bin");
    let target = proxy.address().to_string();
    let args = [
        &target[..],
        "file:f.bin",
        "-o",
        partial.to_str().unwrap(),
        "--retries",
        "0",
    ];
    let out = pull(&[&args[..], &["--keep-partial"]].concat(), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let kept = std::fs::read(&partial).unwrap();
    assert!(!kept.is_empty() && kept.len() < data.len() && kept[..] == data[..kept.len()]);
    let out = pull(&args, &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        !partial.exists(),
        "without --keep-partial a failed output is removed"
    );
}

/// A manifest with a bad line in the middle: by default the failure stops the rest (and
/// every entry is listed with its state); with --keep-going the others complete.
#[test]
fn a_manifest_lists_every_entry_and_keep_going_goes_on() {
    let dir = TempDir::new("fc-manifest");
    for i in 0..3 {
        write_pattern_file(&dir.path().join(format!("in{i}.bin")), 2_000_000, i);
    }
    let server = serve(dir.path(), &[]);
    let manifest = dir.path().join("manifest.txt");
    let line = |name: &str, i: usize| {
        format!(
            "{} file:{name} {}\n",
            server.address,
            dir.path().join(format!("out{i}")).display()
        )
    };
    let text = [
        line("in0.bin", 0),
        line("missing.bin", 1),
        line("in2.bin", 2),
    ]
    .concat();
    std::fs::write(&manifest, text).unwrap();
    let base = [
        "--manifest",
        manifest.to_str().unwrap(),
        "--parallel",
        "1",
        "--json",
    ];
    let out = pull(&base, &[]);
    assert_eq!(out.status.code(), Some(1));
    let json = report(&out);
    let states = entry_states(&json);
    assert_eq!(states, ["complete", "failed", "skipped"], "{json}");
    assert_eq!(json["entries"][1]["error"]["code"], "not_found");
    let out = pull(&[&base[..], &["--keep-going"]].concat(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let json = report(&out);
    let states = entry_states(&json);
    assert_eq!(states, ["complete", "failed", "complete"], "{json}");
    assert!(dir.path().join("out2").exists());
}

#[test]
fn serve_binds_a_host_name() {
    let dir = TempDir::new("fc-bind");
    let mut child = Command::new(NEXUS)
        .args(["serve", "--bind", "localhost", "--port", "0", "--admin", ""])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = nexus_testkit::ChildGuard(child);
    let listening = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map(|l| l.unwrap())
        .find(|l| l.contains("Listening.") || l.contains("nexus:"))
        .unwrap();
    let address: SocketAddr = listening
        .split("address=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{listening}"))
        .parse()
        .unwrap();
    assert!(address.ip().is_loopback());
    let _ = dir;
}

fn config(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(NEXUS)
        .arg("config")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `nexus config` checks what it prints: a bad value, or values that contradict each other,
/// exit 2 naming the variable and the value. Sizes take units.
#[test]
fn nexus_config_validates_and_sizes_take_units() {
    let out = config(&[("BURST_NEXUS_SERVER_PORT", "70000")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("BURST_NEXUS_SERVER_PORT") && stderr(&out).contains("70000"));
    let out = config(&[("BURST_NEXUS_STREAM_CHUNK_SIZE", "8MiB")], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("burst.nexus.stream.chunk.size (8388608)")
            && err.contains("burst.nexus.server.max.frame.size (4194304)"),
        "{err}"
    );
    let out = config(&[("BURST_NEXUS_STREAM_CHUNK_SIZE", "256KiB")], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("burst.nexus.stream.chunk.size=256KiB"));
}

/// What `nexus config` prints, fed back through `--config`, starts the server with the same
/// values (unset ones and secrets are comments, not empty or redacted values).
#[test]
fn nexus_config_output_fed_back_starts_the_server() {
    let dir = TempDir::new("fc-config");
    let env = [
        ("BURST_NEXUS_AUTH_SECRET", "s3cret"),
        ("BURST_NEXUS_STREAM_CHUNK_SIZE", "512KiB"),
    ];
    let out = config(&env, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("s3cret"));
    let file = dir.path().join("nexus.properties");
    std::fs::write(&file, &printed).unwrap();
    let again = config(&[], &["--config", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let shown = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(
        shown.contains(
            "(file; BURST_NEXUS_STREAM_CHUNK_SIZE)\nburst.nexus.stream.chunk.size=512KiB"
        ),
        "{shown}"
    );
    let mut child = Command::new(NEXUS)
        .args([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--port",
            "0",
            "--admin",
            "",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = nexus_testkit::ChildGuard(child);
    let first = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map(|l| l.unwrap())
        .find(|l| l.contains("Listening.") || l.starts_with("nexus:"))
        .unwrap();
    assert!(first.contains("Listening."), "{first}");
}

/// `nexus config | head -1`: the output stops quietly when the reader goes.
#[test]
fn printing_into_a_closed_pipe_is_quiet() {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("{NEXUS} config | head -1 >/dev/null; {NEXUS} config --markdown | true"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        stderr(&out)
    );
}

/// The README's set-up commands, as a new user runs them: the server command names the
/// binary (`--bin nexus`: explicit, though `nexus` is the default members' only binary), and each first-pull
/// line works against a server whose working directory is the repository root.
#[test]
fn the_readmes_first_commands_work() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let setup = &readme[readme.find("## Set up").unwrap()..];
    // The section only: later sections have examples of their own.
    let setup = &setup[..setup[3..].find("\n## ").map_or(setup.len(), |end| end + 3)];
    let commands: Vec<&str> = setup
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .flat_map(str::lines)
        .collect();
    assert!(
        commands[0].starts_with("cargo run --release --bin nexus -- serve"),
        "{commands:?}"
    );
    let server = serve(&repo, &[]);
    let pulls: Vec<&&str> = commands
        .iter()
        .filter(|c| c.starts_with("target/release/nexus pull"))
        .collect();
    assert!(pulls.len() >= 2, "{commands:?}");
    let dir = TempDir::new("fc-readme");
    for line in pulls {
        let args: Vec<String> = line
            .split_whitespace()
            .skip(2)
            .map(|a| match a {
                "localhost" => format!("localhost:{}", server.address.port()),
                "/tmp/README.copy" => dir.path().join("copy").to_str().unwrap().to_string(),
                other => other.to_string(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pull(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{line}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read(dir.path().join("copy")).unwrap(),
        readme.as_bytes()
    );
}
