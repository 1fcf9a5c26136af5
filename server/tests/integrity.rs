//! No stream lost, no short success, through a real server on both IO backends: COMPLETE
//! without credit after a full window, files changed under the reader, sources that break
//! their announced size, PROGRESS while a stream waits for credit.
#![allow(clippy::unwrap_used)]

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexus_protocol::{
    ClientEvent, ClientSettings, ErrorCode, ItemCounts, Outcome, StreamId, UNKNOWN,
};
use nexus_server::{
    Backend, NextChunk, Opened, Producer, Registry, ServerConfig, Source, SourceError,
    StreamRequest,
};
use nexus_testkit::{
    both_backends, builtin_registry, start_with, test_config, write_pattern_file, Client, TempDir,
    PATIENCE,
};

const WINDOW: u32 = 1 << 20;

fn settings(window: u32) -> ClientSettings {
    ClientSettings {
        initial_window: window,
        max_window: window,
        ..ClientSettings::default()
    }
}

fn config(backend: Backend, root: &TempDir) -> ServerConfig {
    let mut config = ServerConfig {
        chunk_size: 256 << 10,
        ..test_config(backend, root.path())
    };
    // A server that waited for credit it will never get would fail with `timeout` quickly.
    config.protocol.timers.stream_timeout = Duration::from_secs(2);
    config
}

/// Reads `stream` to its end, granting credit only for bytes still to come: the window
/// never reaches past the stream's last byte, as a client that credits exactly would do.
fn pull_crediting_exactly(client: &mut Client, stream: StreamId, total: u64) -> (Outcome, Vec<u8>) {
    let deadline = Instant::now() + PATIENCE;
    let mut data = Vec::new();
    loop {
        match client
            .next_event(deadline)
            .expect("the stream ends in time")
        {
            ClientEvent::Chunk { stream: s, data: d } if s == stream => {
                data.extend_from_slice(&d);
                if data.len() as u64 + u64::from(WINDOW) <= total {
                    client.consume(stream, d.len());
                }
            }
            ClientEvent::StreamEnd {
                stream: s, outcome, ..
            } if s == stream => return (outcome, data),
            _ => {}
        }
    }
}

fn complete_at_a_full_window(backend: Backend) {
    let root = TempDir::new("full-window");
    let four = write_pattern_file(&root.path().join("four.bin"), 4 * WINDOW as usize, 1);
    let one = write_pattern_file(&root.path().join("one.bin"), WINDOW as usize, 2);
    let server = start_with(config(backend, &root), builtin_registry(root.path()));
    let mut client = Client::connect_with(server.local_addr(), settings(WINDOW)).unwrap();
    // Four windows' worth, credited exactly: the last chunk empties the window.
    let s = client.initiate("file:four.bin");
    let (outcome, data) = pull_crediting_exactly(&mut client, s, four.len() as u64);
    assert!(matches!(outcome, Outcome::Complete(_)), "{outcome:?}");
    assert!(data == four);
    // One window, never credited at all.
    let s = client.initiate("file:one.bin");
    let (outcome, data) = pull_crediting_exactly(&mut client, s, one.len() as u64);
    assert!(matches!(outcome, Outcome::Complete(_)), "{outcome:?}");
    assert!(data == one);
}
both_backends!(
    complete_arrives_when_the_last_chunk_empties_the_window,
    complete_at_a_full_window
);

/// Pulls `file:big.bin`, calling `change` once the first chunk has arrived (with the rest of
/// the file still to read), then reads on; returns how the stream ended.
fn pull_while_changing(backend: Backend, change: impl FnOnce(&std::path::Path)) -> Outcome {
    let root = TempDir::new("torn");
    let path = root.path().join("big.bin");
    write_pattern_file(&path, 16 << 20, 3);
    // An old modification time, so that any write is seen whatever the clock's granularity.
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let server = start_with(config(backend, &root), builtin_registry(root.path()));
    let mut client = Client::connect_with(server.local_addr(), settings(WINDOW)).unwrap();
    let s = client.initiate("file:big.bin");
    let deadline = Instant::now() + PATIENCE;
    let mut change = Some(change);
    loop {
        match client
            .next_event(deadline)
            .expect("the stream ends in time")
        {
            ClientEvent::Chunk { stream, data } if stream == s => {
                if let Some(change) = change.take() {
                    change(&path);
                }
                client.consume(s, data.len());
            }
            ClientEvent::StreamEnd {
                stream, outcome, ..
            } if stream == s => return outcome,
            _ => {}
        }
    }
}

fn assert_changed(outcome: Outcome) {
    match outcome {
        Outcome::Error { code, message } => {
            assert_eq!(code, ErrorCode::SOURCE_CHANGED, "{message}");
            assert!(
                message.contains("changed while it was being read"),
                "{message}"
            );
        }
        other => panic!("a file changed under the reader must fail, got {other:?}"),
    }
}

fn torn_files(backend: Backend) {
    // Rewritten in place, behind and ahead of the reader, same size.
    assert_changed(pull_while_changing(backend, |path| {
        let mut f = std::fs::File::options().write(true).open(path).unwrap();
        f.write_all(&vec![0xAB; 16 << 20]).unwrap();
    }));
    // Rewritten in one place ahead of the reader.
    assert_changed(pull_while_changing(backend, |path| {
        let mut f = std::fs::File::options().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(12 << 20)).unwrap();
        f.write_all(b"changed").unwrap();
    }));
    // Truncated.
    assert_changed(pull_while_changing(backend, |path| {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_len(4 << 20).unwrap();
    }));
    // Replaced under its name by another file.
    assert_changed(pull_while_changing(backend, |path| {
        let other = path.with_extension("new");
        write_pattern_file(&other, 16 << 20, 4);
        std::fs::rename(&other, path).unwrap();
    }));
    // Untouched: complete.
    let outcome = pull_while_changing(backend, |_| {});
    assert!(matches!(outcome, Outcome::Complete(_)), "{outcome:?}");
}
both_backends!(
    a_file_changed_while_it_is_read_fails_with_source_changed,
    torn_files
);

/// `lying:ANNOUNCED:PRODUCED`: announces one size and produces another.
struct Lying;

struct LyingProducer {
    left: u64,
}

impl Source for Lying {
    fn scheme(&self) -> &str {
        "lying"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let (announced, produced) = request.paradata.body.split_once(':').unwrap();
        Ok(Opened {
            producer: Box::new(LyingProducer {
                left: produced.parse().unwrap(),
            }),
            expected_bytes: Some(announced.parse().unwrap()),
        })
    }
}

impl Producer for LyingProducer {
    fn next(&mut self, max: usize) -> NextChunk<'_> {
        let n = (max as u64).min(self.left).min(64 << 10) as usize;
        self.left -= n as u64;
        let chunk = (n > 0).then(|| Ok(Bytes::from(vec![7u8; n])));
        Box::pin(std::future::ready(chunk))
    }
}

fn lying_sources(backend: Backend) {
    let root = TempDir::new("lying");
    let mut registry = builtin_registry(root.path());
    registry.register(Lying);
    let server = start_with(config(backend, &root), registry);
    let mut client = Client::connect(server.local_addr());
    for paradata in ["lying:3000000:1500000", "lying:1500000:3000000"] {
        let pulled = client.pull(paradata);
        let (code, message) = pulled.error();
        assert_eq!(code, ErrorCode::SOURCE_FAILED, "{paradata}: {message}");
        assert!(message.contains("announced"), "{message}");
        assert!(pulled.data.len() as u64 <= 3_000_000 && pulled.data.len() < 3_000_000);
    }
    let honest = client.pull("lying:100000:100000");
    assert_eq!(honest.completion().bytes, 100_000);
}
both_backends!(a_source_that_breaks_its_announced_size_fails, lying_sources);

fn progress_while_waiting(backend: Backend) {
    let root = TempDir::new("progress");
    let mut config = config(backend, &root);
    config.protocol.timers.stream_timeout = Duration::from_secs(60);
    config.protocol.progress_interval = Duration::from_millis(50);
    let _registry: Registry = builtin_registry(root.path());
    let server = start_with(config, builtin_registry(root.path()));
    let mut client = Client::connect_with(server.local_addr(), settings(256 << 10)).unwrap();
    let s = client.initiate("synthetic:4MiB");
    // Read nothing: the stream sits at a full window, and PROGRESS still comes.
    let deadline = Instant::now() + PATIENCE;
    let mut received = 0u64;
    let mut reports = Vec::new();
    while reports.len() < 3 {
        match client
            .next_event(deadline)
            .expect("PROGRESS while waiting for credit")
        {
            ClientEvent::Chunk { data, .. } => received += data.len() as u64,
            ClientEvent::Progress { stream, progress } if stream == s => reports.push(progress),
            _ => {}
        }
    }
    let last = reports.last().unwrap();
    assert_eq!(last.bytes_sent, 256 << 10, "the whole window, no more");
    assert_eq!(last.items, ItemCounts::NOT_COUNTED);
    client.consume(s, received as usize);
    let pulled = client.finish(&[s]).remove(&s).unwrap();
    let items = pulled.completion().items;
    assert_eq!((items.sent, items.expected), (0, UNKNOWN));
}
both_backends!(
    progress_comes_while_a_stream_waits_for_credit,
    progress_while_waiting
);
