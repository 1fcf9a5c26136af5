//! `nexus_client::transfer` without the CLI, against real servers on both backends: a file
//! resumed across cut connections, split into ranges written in place, continued from an
//! existing output; a manifest whose failure stops the rest, or not.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nexus_client::transfer::{Entry, EntryState, Output, RetryPolicy, Transfer, TransferOptions};
use nexus_client::{Client, ClientConfig};
use nexus_server::{Backend, ServerConfig};
use nexus_testkit::{
    both_backends, builtin_registry, start_with, test_config, write_pattern_file, Proxy, TempDir,
};

fn client(backend: Backend) -> Client {
    Client::new(ClientConfig {
        threads: 1,
        backend: backend.into(),
        ..ClientConfig::default()
    })
    .unwrap()
}

fn options() -> TransferOptions {
    TransferOptions {
        retry: RetryPolicy {
            first_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..TransferOptions::default()
    }
}

fn resume_and_split(backend: Backend) {
    let root = TempDir::new("transfer");
    let data = write_pattern_file(&root.path().join("f.bin"), (12 << 20) + 777, 5);
    let config = ServerConfig {
        chunk_size: 256 << 10,
        ..test_config(backend, root.path())
    };
    let server = start_with(config, builtin_registry(root.path()));
    let client = client(backend);

    // Every connection is cut after 5 MiB: the file arrives in three or four tries.
    let proxy = Proxy::start(server.local_addr());
    proxy.cut_after(5 << 20);
    let out = root.path().join("resumed.bin");
    let entry = Entry {
        endpoint: proxy.address(),
        paradata: "file:f.bin".into(),
        output: Output::File(out.clone()),
    };
    let transfer = Transfer::new(&client, options()).unwrap();
    let report = transfer.pull(std::slice::from_ref(&entry));
    let done = &report.entries[0];
    assert_eq!(done.state, EntryState::Complete, "{report:?}");
    assert!(done.retries >= 2, "{report:?}");
    assert!(std::fs::read(&out).unwrap() == data);

    // Split into 4 ranges, written in place.
    let split = root.path().join("split.bin");
    let entry = Entry {
        endpoint: server.local_addr(),
        paradata: "file:f.bin".into(),
        output: Output::File(split.clone()),
    };
    let transfer = Transfer::new(&client, options()).unwrap();
    let report = transfer.pull_split(&entry, 4).unwrap();
    assert_eq!(report.entries[0].state, EntryState::Complete, "{report:?}");
    assert_eq!(report.entries[0].streams, 4);
    assert_eq!(report.bytes, data.len() as u64);
    assert!(std::fs::read(&split).unwrap() == data);

    // Continue an output that holds the first 3 MiB.
    let continued = root.path().join("continued.bin");
    std::fs::write(&continued, &data[..3 << 20]).unwrap();
    let transfer = Transfer::new(
        &client,
        TransferOptions {
            resume_output: true,
            ..options()
        },
    )
    .unwrap();
    let report = transfer.pull(&[Entry {
        output: Output::File(continued.clone()),
        ..entry.clone()
    }]);
    assert_eq!(report.entries[0].continued_from_bytes, 3 << 20);
    assert_eq!(report.bytes, (data.len() - (3 << 20)) as u64);
    assert!(std::fs::read(&continued).unwrap() == data);
}
both_backends!(a_transfer_resumes_splits_and_continues, resume_and_split);

fn manifest_policy(backend: Backend) {
    let root = TempDir::new("transfer-many");
    for i in 0..4 {
        write_pattern_file(&root.path().join(format!("in{i}")), 100_000, i);
    }
    let server = start_with(
        test_config(backend, root.path()),
        builtin_registry(root.path()),
    );
    let client = client(backend);
    let entries: Vec<Entry> = ["in0", "missing", "in2", "in3"]
        .iter()
        .enumerate()
        .map(|(i, name)| Entry {
            endpoint: server.local_addr(),
            paradata: format!("file:{name}"),
            output: Output::File(root.path().join(format!("out{i}"))),
        })
        .collect();
    let one_at_a_time = TransferOptions {
        parallel: 1,
        ..options()
    };
    let report = Transfer::new(&client, one_at_a_time.clone())
        .unwrap()
        .pull(&entries);
    let states: Vec<EntryState> = report.entries.iter().map(|e| e.state).collect();
    use EntryState::*;
    assert_eq!(states, [Complete, Failed, Skipped, Skipped]);
    assert_eq!(report.entries[1].error.as_ref().unwrap().code, "not_found");
    assert!(
        !root.path().join("out1").exists(),
        "a failed output is removed"
    );
    let report = Transfer::new(
        &client,
        TransferOptions {
            keep_going: true,
            ..one_at_a_time
        },
    )
    .unwrap()
    .pull(&entries);
    let states: Vec<EntryState> = report.entries.iter().map(|e| e.state).collect();
    assert_eq!(states, [Complete, Failed, Complete, Complete]);
    assert!(!report.ok);
}
both_backends!(
    a_manifest_stops_at_a_failure_unless_told_to_keep_going,
    manifest_policy
);
