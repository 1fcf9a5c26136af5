//! The `nexus` command: `serve`, `pull`, `config`.
//!
//! The protocol has landed (PROTOCOL.md, `nexus-protocol`); the server and client it drives
//! are the next issues. Until then each subcommand says so and exits with status 2, so that a
//! script relying on it fails loudly instead of silently doing nothing.

// A command-line tool reports on stdout by design.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

const USAGE: &str = "usage: nexus <serve|pull|config|version>";

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    match command.as_deref() {
        Some("version") | Some("--version") => {
            println!(
                "nexus {} (protocol versions {}..={})",
                env!("CARGO_PKG_VERSION"),
                nexus_protocol::VERSION_MIN,
                nexus_protocol::VERSION_MAX
            );
            ExitCode::SUCCESS
        }
        Some(cmd @ ("serve" | "pull" | "config")) => {
            eprintln!(
                "nexus {cmd}: not available yet: the {} lands with its own issue; the wire \
                 protocol it will speak is specified in PROTOCOL.md",
                if cmd == "pull" { "client" } else { "server" }
            );
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
