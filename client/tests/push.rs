//! Push streams end to end, library to library: a real server (both IO backends) with the
//! built-in sinks, a real client, real sockets and real files.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use nexus_client::{Client, ClientConfig, ErrorCode, Outcome, PushOptions};
use nexus_protocol::ServerSettings;
use nexus_server::sink::{threaded, BlockingConsumer, Consumer, PushRequest, Sink};
use nexus_server::{Backend, ServerConfig, SourceError};
use nexus_testkit::{
    both_backends, builtin_registry, digest, partial_uploads as partial_files, push_registry,
    start_with, test_config, wait_until, TempDir,
};

fn client(backend: Backend) -> Client {
    Client::new(ClientConfig {
        threads: 1,
        backend: backend.into(),
        ..ClientConfig::default()
    })
    .unwrap()
}

fn sized(size: usize) -> PushOptions {
    PushOptions {
        size: Some(size as u64),
        ..PushOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn error_of(outcome: &Outcome) -> (ErrorCode, String) {
    match outcome {
        Outcome::Error { code, message } => (*code, message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn byte_exact_sizes(backend: Backend) {
    let dir = TempDir::new("push-sizes");
    let upload = dir.path().join("up");
    std::fs::create_dir(&upload).unwrap();
    let server = start_with(
        test_config(backend, dir.path()),
        push_registry(dir.path(), &upload, 1 << 40),
    );
    let client = client(backend);
    let chunk = 1 << 20;
    for (i, len) in [0usize, 1, chunk + 1, 3 * chunk + 12345]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u8);
        let name = format!("sub/dir/f{i}.bin");
        let mut push = client.push(server.local_addr(), &format!("file:{name}"), sized(len));
        // Three ways in, each in uneven pieces, so chunks and writes do not line up: writes,
        // a reader, an iterator of Bytes.
        match i % 3 {
            0 => {
                for piece in data.chunks(300_001) {
                    push.write(Bytes::copy_from_slice(piece)).unwrap();
                }
            }
            1 => assert_eq!(push.copy_from(&data[..], 70_001).unwrap(), len as u64),
            _ => push
                .send_all(data.chunks(123_457).map(Bytes::copy_from_slice))
                .unwrap(),
        }
        let end = push.finish();
        match &end.outcome {
            Outcome::Complete(c) => {
                assert_eq!(c.bytes, len as u64);
                assert_eq!(c.digest, digest(&data));
            }
            other => panic!("push of {len} bytes: {other:?}"),
        }
        assert_eq!(
            std::fs::read(upload.join(&name)).unwrap(),
            data,
            "{len} bytes"
        );
    }
    assert_eq!(partial_files(&upload), 0);
    let stats = server.stats();
    assert_eq!(stats.pushes_complete, 4);
    assert_eq!(stats.sink_bytes, stats.push_bytes);
}
both_backends!(pushes_are_byte_exact, byte_exact_sizes);

fn create_only_unless_replace(backend: Backend) {
    let dir = TempDir::new("push-replace");
    let server = start_with(
        test_config(backend, dir.path()),
        push_registry(dir.path(), dir.path(), 1 << 40),
    );
    let client = client(backend);
    let push = |paradata: &str, data: &'static [u8]| {
        let mut push = client.push(server.local_addr(), paradata, sized(data.len()));
        // A refused push may end before its data goes: that is the answer.
        let _ = push.write(Bytes::from_static(data));
        push.finish()
    };
    assert!(push("file:a.txt", b"first").is_complete());
    let again = push("file:a.txt", b"second");
    let (code, message) = error_of(&again.outcome);
    assert_eq!(code, ErrorCode::ALREADY_EXISTS);
    assert!(message.contains("replace=true"), "{message}");
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"first");
    assert!(push("file:a.txt?replace=true", b"second").is_complete());
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"second");
    // The partial uploads cannot be pulled or pushed to.
    let (code, _) = error_of(&push("file:.nexus-partial/x", b"x").outcome);
    assert_eq!(code, ErrorCode::PERMISSION_DENIED);
    let end = client
        .initiate(
            server.local_addr(),
            "file:.nexus-partial/x",
            Default::default(),
        )
        .for_each_chunk(|_| {});
    assert_eq!(end.error_code(), Some(ErrorCode::PERMISSION_DENIED));
}
both_backends!(
    create_only_unless_replace_is_asked,
    create_only_unless_replace
);

fn refusals(backend: Backend) {
    let dir = TempDir::new("push-refusals");
    let outside = TempDir::new("push-outside");
    let upload = dir.path().join("up");
    std::fs::create_dir(&upload).unwrap();
    std::os::unix::fs::symlink(outside.path(), upload.join("link")).unwrap();
    // Uploads off: the server of `builtin_registry` plus a disabled file sink.
    let mut registry = builtin_registry(dir.path());
    registry.register_sink(nexus_server::FileSink::disabled());
    let off = start_with(test_config(backend, dir.path()), registry);
    let on = start_with(
        test_config(backend, dir.path()),
        push_registry(dir.path(), &upload, 100),
    );
    let client = client(backend);
    let push = |server: &nexus_server::Server, paradata: &str, len: usize| {
        let mut push = client.push(server.local_addr(), paradata, PushOptions::default());
        let _ = push.write(Bytes::from(vec![7u8; len]));
        push.finish()
    };
    let (code, message) = error_of(&push(&off, "file:a.bin", 10).outcome);
    assert_eq!(code, ErrorCode::PERMISSION_DENIED);
    assert!(
        message.contains("BURST_NEXUS_SERVER_UPLOAD_ROOT"),
        "says how to enable uploads: {message}"
    );
    for escape in ["file:../a.bin", "file:/tmp/a.bin", "file:link/a.bin"] {
        let (code, message) = error_of(&push(&on, escape, 10).outcome);
        assert_eq!(code, ErrorCode::PERMISSION_DENIED, "{escape}: {message}");
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // Over the size limit, declared or not: nothing kept.
    let mut declared = client.push(on.local_addr(), "file:big1.bin", sized(101));
    let (code, _) = error_of(
        &declared
            .write(Bytes::from(vec![1u8; 101]))
            .unwrap_err()
            .outcome,
    );
    assert_eq!(code, ErrorCode::RESOURCE_EXHAUSTED);
    let (code, message) = error_of(&push(&on, "file:big2.bin", 101).outcome);
    assert_eq!(code, ErrorCode::RESOURCE_EXHAUSTED, "{message}");
    assert!(message.contains("upload.max.size"), "{message}");
    assert!(!upload.join("big1.bin").exists() && !upload.join("big2.bin").exists());
    wait_until("the partial files are removed", || {
        partial_files(&upload) == 0
    });
    // An unknown sink scheme names the known ones.
    let (code, message) = error_of(&push(&on, "nosuch:x", 1).outcome);
    assert_eq!(code, ErrorCode::UNKNOWN_SOURCE);
    assert!(
        message.contains("discard") && message.contains("file"),
        "{message}"
    );
}
both_backends!(pushes_are_refused_clearly, refusals);

fn cancel_keeps_nothing(backend: Backend) {
    let dir = TempDir::new("push-cancel");
    let server = start_with(
        test_config(backend, dir.path()),
        push_registry(dir.path(), dir.path(), 1 << 40),
    );
    let client = client(backend);
    let mut push = client.push(server.local_addr(), "file:c.bin", PushOptions::default());
    push.write(Bytes::from(vec![3u8; 5 << 20])).unwrap();
    wait_until("the server receives data", || server.stats().push_bytes > 0);
    push.cancel();
    let end = push.finish();
    assert_eq!(end.outcome, Outcome::Cancelled);
    wait_until("the push is counted as cancelled", || {
        server.stats().pushes_cancelled == 1
    });
    wait_until("its partial file is removed", || {
        partial_files(dir.path()) == 0
    });
    assert!(!dir.path().join("c.bin").exists());
}
both_backends!(a_cancelled_push_keeps_nothing, cancel_keeps_nothing);

/// A sink that takes nothing until the test opens its gate.
struct GatedSink(Arc<AtomicBool>);

struct GatedWriter(Arc<AtomicBool>);

impl BlockingConsumer for GatedWriter {
    fn write(&mut self, _data: &[u8]) -> Result<(), SourceError> {
        while !self.0.load(Ordering::Acquire) {
            std::thread::park_timeout(std::time::Duration::from_millis(5));
        }
        Ok(())
    }
    fn commit(&mut self) -> Result<Option<String>, SourceError> {
        Ok(None)
    }
    fn abort(&mut self) {}
}

impl Sink for GatedSink {
    fn scheme(&self) -> &str {
        "gated"
    }
    fn open(&self, _request: &PushRequest<'_>) -> Result<Box<dyn Consumer>, SourceError> {
        threaded(GatedWriter(Arc::clone(&self.0)), 1)
    }
}

fn slow_sink(backend: Backend) {
    let dir = TempDir::new("push-slow");
    let open = Arc::new(AtomicBool::new(false));
    let mut registry = builtin_registry(dir.path());
    registry.register_sink(GatedSink(Arc::clone(&open)));
    let window = 1 << 20;
    let config = ServerConfig {
        protocol: ServerSettings {
            push_window: window,
            ..ServerSettings::default()
        },
        ..test_config(backend, dir.path())
    };
    let server = start_with(config, registry);
    let client = client(backend);
    let total = 64 << 20;
    let mut push = client.push(server.local_addr(), "gated:", sized(total));
    let pusher = std::thread::spawn(move || {
        for _ in 0..64 {
            push.write(Bytes::from(vec![9u8; 1 << 20])).unwrap();
        }
        push.finish()
    });
    // The sink holds one write, one waits in its queue: the rest of the window fills and the
    // pusher stops there.
    wait_until("the window fills", || {
        server.stats().push_bytes >= u64::from(window)
    });
    let held = server.stats();
    assert!(
        held.push_bytes <= u64::from(window),
        "the client sent past its window: {held:?}"
    );
    assert!(
        held.memory_held <= u64::from(window),
        "server memory beyond the push window: {held:?}"
    );
    assert!(!pusher.is_finished());
    open.store(true, Ordering::Release);
    let end = pusher.join().unwrap();
    assert!(end.is_complete(), "{end:?}");
    assert_eq!(server.stats().sink_bytes, total as u64);
}
both_backends!(a_slow_sink_slows_the_pusher, slow_sink);

fn version_1_server(backend: Backend) {
    let dir = TempDir::new("push-v1");
    std::fs::write(dir.path().join("r.txt"), b"readable").unwrap();
    let config = ServerConfig {
        protocol: ServerSettings {
            max_version: 1,
            ..ServerSettings::default()
        },
        ..test_config(backend, dir.path())
    };
    let server = start_with(config, push_registry(dir.path(), dir.path(), 1 << 40));
    let client = client(backend);
    let mut push = client.push(server.local_addr(), "discard:", sized(3));
    let end = match push.write(Bytes::from_static(b"abc")) {
        Err(end) => end,
        Ok(()) => push.finish(),
    };
    let (code, message) = error_of(&end.outcome);
    assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(message.contains("upgrade the server"), "{message}");
    let mut data = Vec::new();
    let end = client
        .initiate(server.local_addr(), "file:r.txt", Default::default())
        .for_each_chunk(|c| data.extend_from_slice(c));
    assert!(end.is_complete());
    assert_eq!(data, b"readable");
}
both_backends!(a_version_1_server_still_serves_pulls, version_1_server);

fn unreachable_server(backend: Backend) {
    // Nothing listens on this port: the push ends with `unreachable`, and a writer waiting
    // for window is released rather than left waiting forever.
    let address: std::net::SocketAddr = ([127, 0, 0, 1], nexus_testkit::free_port()).into();
    let client = client(backend);
    let mut push = client.push(address, "discard:", PushOptions::default());
    let written = push.write(Bytes::from(vec![1u8; 1 << 20]));
    let end = match written {
        Err(end) => end,
        Ok(()) => push.finish(),
    };
    assert_eq!(error_of(&end.outcome).0, ErrorCode::UNREACHABLE);
}

both_backends!(a_push_to_nowhere_ends_unreachable, unreachable_server);
