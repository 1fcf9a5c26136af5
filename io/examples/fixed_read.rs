//! Does io_uring's registered-buffer read pay off for the `file:` source? Reads a file that
//! is in the page cache in 1 MiB pieces, alternating plain `read_at` into one reused buffer
//! and `read_fixed_at` into one registered buffer, and prints GB/s for each round.
//!
//! `cargo run --release -p nexus-io --example fixed_read -- FILE [ROUNDS]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // A measuring tool: fail loudly, print.

use std::time::Instant;

use tokio_uring::buf::fixed::FixedBufRegistry;
use tokio_uring::buf::BoundedBuf;

const PIECE: usize = 1 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: fixed_read FILE [ROUNDS]");
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("ROUNDS"));
    tokio_uring::start(async move {
        let file = tokio_uring::fs::File::open(&path).await.unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let registry = FixedBufRegistry::new([vec![0u8; PIECE]]);
        registry.register().unwrap();
        let mut plain = Vec::with_capacity(PIECE);
        for round in 1..=rounds {
            let start = Instant::now();
            let mut at = 0;
            while at < size {
                let (n, buf) = file.read_at(plain.slice(0..PIECE), at).await;
                at += n.unwrap() as u64;
                plain = buf.into_inner();
            }
            let plain_gbps = size as f64 / start.elapsed().as_secs_f64() / 1e9;
            let start = Instant::now();
            let mut at = 0;
            let mut fixed = registry.check_out(0).unwrap();
            while at < size {
                let (n, buf) = file.read_fixed_at(fixed.slice(0..PIECE), at).await;
                at += n.unwrap() as u64;
                fixed = buf.into_inner();
            }
            drop(fixed);
            let fixed_gbps = size as f64 / start.elapsed().as_secs_f64() / 1e9;
            println!(
                "round {round}: read_at {plain_gbps:.2} GB/s, read_fixed_at {fixed_gbps:.2} GB/s"
            );
        }
    });
}
