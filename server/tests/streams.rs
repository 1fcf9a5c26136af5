//! The stream engine through a real server, on both IO backends: fairness (pepper), exact
//! counts (spray), cancel, a client that dies, a slow consumer, source errors, the queue
//! adapter, and that every producer's cleanup runs exactly once.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nexus_protocol::{ClientEvent, ErrorCode, ItemCounts, Outcome, StreamId};
use nexus_server::{
    Backend, NextChunk, Opened, Producer, Registry, Server, Source, SourceError, StreamRequest,
};
use nexus_testkit::{
    both_backends, builtin_registry, start_with, test_config, wait_until, Client, TempDir, PATIENCE,
};

/// Counters shared by the test sources and the test.
#[derive(Default)]
struct Probe {
    /// Bytes handed to the engine by `counted:` producers.
    produced: AtomicU64,
    /// Producers dropped (cleanups run).
    dropped: AtomicU64,
    /// Queue-adapter producer threads that saw the stream closed.
    pipe_closed: AtomicU64,
}

/// `counted:SIZE` (zeros in chunks of the shard's chunk size, counting bytes produced),
/// `failing:N` (N chunks, then `source_failed`), `queue:N` (N chunks of 1000 bytes from a
/// thread through the queue adapter, then item counters).
struct TestSource(Arc<Probe>, &'static str);

struct Counted {
    probe: Arc<Probe>,
    left: u64,
    chunk: Bytes,
    fail_after: Option<u64>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.probe.dropped.fetch_add(1, SeqCst);
    }
}

impl Producer for Counted {
    fn next(&mut self, max: usize) -> NextChunk<'_> {
        let next = if self.fail_after == Some(0) {
            Some(Err(SourceError::new(
                ErrorCode::SOURCE_FAILED,
                "the disk is on fire",
            )))
        } else if self.left == 0 {
            None
        } else {
            let n = (self.chunk.len().min(max) as u64).min(self.left) as usize;
            self.left -= n as u64;
            self.fail_after = self.fail_after.map(|f| f - 1);
            self.probe.produced.fetch_add(n as u64, SeqCst);
            Some(Ok(self.chunk.slice(..n)))
        };
        Box::pin(std::future::ready(next))
    }
}

impl Source for TestSource {
    fn scheme(&self) -> &str {
        self.1
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let n = nexus_server::paradata::parse_size(request.paradata.body)?;
        let chunk = Bytes::from(vec![0u8; request.shard.chunk_size()]);
        match self.1 {
            "counted" => Ok(Opened {
                producer: Box::new(Counted {
                    probe: self.0.clone(),
                    left: n,
                    chunk,
                    fail_after: None,
                }),
                expected_bytes: Some(n),
            }),
            "failing" => Ok(Opened {
                producer: Box::new(Counted {
                    probe: self.0.clone(),
                    left: u64::MAX,
                    chunk,
                    fail_after: Some(n),
                }),
                expected_bytes: None,
            }),
            _ => {
                let (sender, producer) = nexus_server::pipe(request.shard.pipe_size());
                let probe = self.0.clone();
                std::thread::spawn(move || {
                    for i in 0..n {
                        if sender.send(Bytes::from(vec![i as u8; 1000])).is_err() {
                            probe.pipe_closed.fetch_add(1, SeqCst);
                            return;
                        }
                    }
                    let items = ItemCounts {
                        sent: n,
                        expected: n,
                        ..ItemCounts::default()
                    };
                    let _ = sender.finish(items);
                });
                Ok(Opened {
                    producer: Box::new(producer),
                    expected_bytes: Some(n * 1000),
                })
            }
        }
    }
}

struct Setup {
    server: Server,
    probe: Arc<Probe>,
    _dir: TempDir,
}

fn setup(backend: Backend, chunk_size: usize) -> Setup {
    let dir = TempDir::new("streams");
    let probe = Arc::new(Probe::default());
    let mut registry: Registry = builtin_registry(dir.path());
    for scheme in ["counted", "failing", "queue"] {
        registry.register(TestSource(probe.clone(), scheme));
    }
    let mut config = test_config(backend, dir.path());
    config.chunk_size = chunk_size;
    Setup {
        server: start_with(config, registry),
        probe,
        _dir: dir,
    }
}

fn settled(s: &Setup) {
    wait_until("no stream open on the server", || {
        s.server.stats().streams_open == 0
    });
}

fn pepper(backend: Backend) {
    // One 10,000-chunk stream; three waves of 4 small (50-chunk) streams start while it runs,
    // a third of the way apart. The small ones must finish while the big one still runs.
    let s = setup(backend, 16 << 10);
    let mut client = Client::connect(s.server.local_addr());
    let big = client.initiate(&format!("synthetic:{}", 10_000 * (16 << 10)));
    let mut big_chunks = 0u64;
    let mut small_open: Vec<StreamId> = Vec::new();
    let mut small_done = 0;
    let mut waves = 0;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let event = client.next_event(deadline).expect("pepper timed out");
        match event {
            ClientEvent::Chunk { stream, data } => {
                client.consume(stream, data.len());
                if stream == big {
                    big_chunks += 1;
                    if waves < 3 && big_chunks == 1 + waves * 3000 {
                        waves += 1;
                        for _ in 0..4 {
                            let small = client.initiate(&format!("synthetic:{}", 50 * (16 << 10)));
                            small_open.push(small);
                        }
                    }
                }
            }
            ClientEvent::StreamEnd {
                stream, outcome, ..
            } => {
                let Outcome::Complete(c) = outcome else {
                    panic!("stream {stream:?} ended with {outcome:?}")
                };
                if stream == big {
                    assert_eq!(c.chunks, 10_000);
                    break;
                }
                assert_eq!(c.chunks, 50);
                small_open.retain(|x| *x != stream);
                small_done += 1;
                assert!(
                    big_chunks < 10_000,
                    "a small stream finished only after the big one had everything"
                );
            }
            _ => {}
        }
    }
    assert_eq!(waves, 3);
    assert_eq!(
        (small_done, small_open.len()),
        (12, 0),
        "small streams outlived the big one"
    );
    settled(&s);
}
both_backends!(pepper_small_streams_do_not_wait_for_a_big_one, pepper);

fn spray(backend: Backend) {
    let s = setup(backend, 4 << 10);
    let mut client = Client::connect(s.server.local_addr());
    let counts = nexus_testkit::spray_counts();
    let paradata: Vec<String> = counts
        .iter()
        .map(|n| format!("synthetic:{}?seed={n}", n * (4 << 10)))
        .collect();
    for (n, pulled) in counts.iter().zip(client.pull_all(&paradata)) {
        let c = pulled.completion();
        assert_eq!(
            (c.chunks, c.bytes),
            (*n, n * (4 << 10)),
            "counts {counts:?}"
        );
        assert_eq!(pulled.chunks as u64, *n);
    }
    settled(&s);
    assert_eq!(s.server.stats().streams_complete, 10);
}
both_backends!(spray_exact_counts, spray);

fn cancel(backend: Backend) {
    let s = setup(backend, 64 << 10);
    let mut client = Client::connect(s.server.local_addr());
    let stream = client.initiate("counted:100GiB");
    let deadline = Instant::now() + PATIENCE;
    let mut received = 0;
    while received < (8 << 20) {
        if let Some(ClientEvent::Chunk { data, .. }) = client.next_event(deadline) {
            received += data.len();
            client.consume(stream, data.len());
        }
    }
    client.cancel(stream);
    let outcome = loop {
        match client
            .next_event(deadline)
            .expect("no cancel acknowledgement")
        {
            ClientEvent::StreamEnd { outcome, .. } => break outcome,
            ClientEvent::Chunk { .. } => panic!("a chunk was delivered after cancel"),
            _ => {}
        }
    };
    assert_eq!(outcome, Outcome::Cancelled);
    settled(&s);
    let stats = s.server.stats();
    assert_eq!((stats.streams_cancelled, stats.producers_dropped), (1, 1));
    assert_eq!(s.probe.dropped.load(SeqCst), 1);
    // The producer stopped: within the window (which may have grown from 4 MiB up to its
    // maximum while this reader kept up) and one chunk of what was consumed.
    let window = u64::from(nexus_protocol::ClientSettings::default().max_window);
    let produced = s.probe.produced.load(SeqCst);
    assert!(
        produced <= received as u64 + window + (64 << 10),
        "{produced}"
    );
    // The connection is still good.
    assert_eq!(client.pull("synthetic:1MiB").completion().bytes, 1 << 20);
}
both_backends!(cancel_stops_the_producer_and_is_acknowledged, cancel);

fn client_dies(backend: Backend) {
    let s = setup(backend, 64 << 10);
    let mut client = Client::connect(s.server.local_addr());
    let streams: Vec<StreamId> = (0..3).map(|_| client.initiate("counted:100GiB")).collect();
    client.initiate("queue:1000000");
    let deadline = Instant::now() + PATIENCE;
    let mut chunks = 0;
    while chunks < 50 {
        if let Some(ClientEvent::Chunk { stream, data }) = client.next_event(deadline) {
            chunks += 1;
            if streams.contains(&stream) {
                client.consume(stream, data.len());
            }
        }
    }
    drop(client); // the socket closes mid-stream, as when the process dies
    wait_until("the server to free everything", || {
        let st = s.server.stats();
        st.connections_open == 0 && st.streams_open == 0
    });
    assert_eq!(s.probe.dropped.load(SeqCst), 3, "each cleanup exactly once");
    assert_eq!(s.server.stats().producers_dropped, 4);
    wait_until("the queue producer thread to see the stream closed", || {
        s.probe.pipe_closed.load(SeqCst) == 1
    });
}
both_backends!(a_dead_client_frees_everything, client_dies);

fn slow_consumer(backend: Backend) {
    // One stream consumed at about 1 MiB/s, one consumed at full speed on the same
    // connection. The slow one never pins more than its window plus one chunk on the server,
    // and the fast one finishes 256 MiB while the slow one has moved only a few MiB.
    let chunk = 64 << 10;
    let s = setup(backend, chunk);
    let mut client = Client::connect(s.server.local_addr());
    let slow = client.initiate("counted:1GiB");
    let fast = client.initiate("synthetic:256MiB");
    let start = Instant::now();
    let deadline = start + PATIENCE;
    let (mut slow_received, mut slow_consumed, mut fast_bytes) = (0u64, 0u64, 0u64);
    let window = 4u64 << 20;
    loop {
        // Give back slow-stream credit at 1 MiB/s.
        let allowed = (start.elapsed().as_secs_f64() * (1 << 20) as f64) as u64;
        if slow_received > slow_consumed && allowed > slow_consumed {
            let n = (slow_received - slow_consumed).min(allowed - slow_consumed);
            client.consume(slow, n as usize);
            slow_consumed += n;
        }
        let produced = s.probe.produced.load(SeqCst);
        assert!(
            produced <= slow_consumed + window + chunk as u64,
            "server holds {} bytes for the slow stream",
            produced - slow_consumed
        );
        let wake = (Instant::now() + Duration::from_millis(50)).min(deadline);
        match client.next_event(wake) {
            Some(ClientEvent::Chunk { stream, data }) if stream == slow => {
                slow_received += data.len() as u64
            }
            Some(ClientEvent::Chunk { stream, data }) => {
                fast_bytes += data.len() as u64;
                client.consume(stream, data.len());
            }
            Some(ClientEvent::StreamEnd {
                stream, outcome, ..
            }) => {
                assert_eq!(stream, fast);
                assert!(matches!(outcome, Outcome::Complete(_)), "{outcome:?}");
                break;
            }
            Some(_) => {}
            None => assert!(Instant::now() < deadline, "the fast stream stalled"),
        }
    }
    assert_eq!(fast_bytes, 256 << 20);
    assert!(slow_received < (64 << 20), "the slow stream was not slow");
    client.cancel(slow);
    settled(&s);
}
both_backends!(
    a_slow_consumer_is_bounded_and_slows_only_itself,
    slow_consumer
);

fn source_errors(backend: Backend) {
    let s = setup(backend, 4 << 10);
    let mut client = Client::connect(s.server.local_addr());
    let failed = client.pull("failing:3");
    assert_eq!(failed.chunks, 3);
    assert_eq!(
        failed.error(),
        (ErrorCode::SOURCE_FAILED, "the disk is on fire")
    );
    let unknown = client.pull("ftp:somewhere");
    let (code, message) = unknown.error();
    assert_eq!(code, ErrorCode::UNKNOWN_SOURCE);
    assert!(
        message.contains("counted") && message.contains("file") && message.contains("synthetic"),
        "{message}"
    );
    let bad = client.pull("synthetic:12 parsecs");
    let (code, message) = bad.error();
    assert_eq!(code, ErrorCode::BAD_PARADATA, "{message}");
    let (code, _) = client.pull("file:missing.bin").error();
    assert_eq!(code, ErrorCode::NOT_FOUND);
    let queued = client.pull("queue:500");
    let c = queued.completion();
    assert_eq!(
        (c.bytes, c.items.sent, c.items.expected),
        (500_000, 500, 500)
    );
    settled(&s);
    assert_eq!(s.probe.dropped.load(SeqCst), 1);
    let stats = s.server.stats();
    assert_eq!(
        (
            stats.streams_error,
            stats.streams_rejected,
            stats.streams_complete
        ),
        (1, 3, 1)
    );
}
both_backends!(source_errors_reach_the_client, source_errors);
