//! S3 against a real S3 server (moto, started by each test on a free port): the `s3` sensor
//! (created, modified, deleted in order per key; listings of more than one page; a restart
//! that raises only what changed while down), and the `s3:` source and sink through a real
//! Nexus server and client (byte-exact both ways, multipart above one part, a cancelled push
//! keeps nothing, clear errors).
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use nexus_client::{Client, Ended, ErrorCode, Outcome, PushOptions, StreamOptions};
use nexus_server::{Backend, Registry};
use nexus_testkit::{
    digest, start_with, test_config, wait_until, Moto, TempDir, S3_KEY_ID, S3_SECRET,
};
use nexus_workflow::s3::{store, S3Sink, S3Source};
use nexus_workflow::{Event, State, Workflow, WorkflowConfig};
use object_store::aws::AmazonS3;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::Value;

const BUCKET: &str = "data";

fn s3_config(moto: &Moto) -> nexus_workflow::S3Config {
    // object_store takes the credentials from the environment, as nexus does in production;
    // every test here sets the same ones.
    std::env::set_var("AWS_ACCESS_KEY_ID", S3_KEY_ID);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET);
    nexus_workflow::S3Config {
        endpoint: moto.endpoint(),
        buckets: vec![BUCKET.into()],
        ..nexus_workflow::S3Config::default()
    }
}

/// A client of the bucket for the test's own puts and deletes, and a runtime to drive it.
struct Bucket {
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    fn new(moto: &Moto) -> Bucket {
        moto.create_bucket(BUCKET);
        Bucket {
            store: store(&s3_config(moto), BUCKET).unwrap(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn put(&self, key: &str, data: &[u8]) {
        let payload = PutPayload::from_bytes(Bytes::copy_from_slice(data));
        self.runtime
            .block_on(self.store.put(&Key::from(key), payload))
            .unwrap();
    }

    fn delete(&self, key: &str) {
        self.runtime
            .block_on(self.store.delete(&Key::from(key)))
            .unwrap();
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        match self.runtime.block_on(self.store.get(&Key::from(key))) {
            Ok(found) => Some(self.runtime.block_on(found.bytes()).unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }
}

mod common;

fn start(dir: &Path, moto: &Moto, rules: &str) -> Workflow {
    let config = WorkflowConfig {
        s3: s3_config(moto),
        ..common::config(dir)
    };
    common::start_with(config, rules)
}

/// A Nexus server with the `s3:` source and sink, and a client.
fn serve(moto: &Moto, dir: &Path) -> (nexus_server::Server, Client) {
    let server = start_with(test_config(Backend::Epoll, dir), registry(moto, dir));
    (server, common::client())
}

fn sensor_rules(extra: &str) -> String {
    format!(
        r#"
[sensors.bucket]
kind = "s3"
bucket = "{BUCKET}"
prefix = "in"
every = "100ms"
{extra}"#
    )
}

/// Every event of the sensor so far.
fn events(workflow: &Workflow) -> Vec<Event> {
    let mut all = Vec::new();
    let mut seq = None;
    loop {
        let found = workflow
            .events_after("bucket", None, seq, Duration::ZERO)
            .unwrap()
            .unwrap();
        if found.is_empty() {
            return all;
        }
        seq = found.last().map(|(s, _)| *s);
        all.extend(found.into_iter().map(|(_, e)| e));
    }
}

/// The changes raised for each key, in order.
fn changes(events: &[Event]) -> BTreeMap<String, Vec<String>> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let key = e.payload["key"].as_str().unwrap().to_string();
        let change = e.payload["change"].as_str().unwrap().to_string();
        by_key.entry(key).or_default().push(change);
    }
    by_key
}

fn wait_for_events(workflow: &Workflow, n: usize) -> Vec<Event> {
    wait_until(&format!("{n} events"), || events(workflow).len() >= n);
    events(workflow)
}

#[test]
fn the_sensor_raises_created_modified_and_deleted_in_order_per_key() {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto);
    let dir = TempDir::new("s3-sensor");
    let workflow = start(dir.path(), &moto, &sensor_rules(""));
    bucket.put("in/a.csv", b"one");
    bucket.put("in/sub/b.csv", b"two!");
    bucket.put("elsewhere/c.csv", b"not watched");
    wait_for_events(&workflow, 2);
    bucket.put("in/a.csv", b"one, changed");
    wait_for_events(&workflow, 3);
    bucket.delete("in/a.csv");
    let all = wait_for_events(&workflow, 4);
    let by_key = changes(&all);
    assert_eq!(by_key["in/a.csv"], ["created", "modified", "deleted"]);
    assert_eq!(by_key["in/sub/b.csv"], ["created"]);
    assert_eq!(by_key.len(), 2, "{by_key:?}");
    let of = |key: &str, change: &str| -> &Value {
        &all.iter()
            .find(|e| e.payload["key"] == key && e.payload["change"] == change)
            .unwrap()
            .payload
    };
    let created = of("in/a.csv", "created");
    assert_eq!(created["size"], 3);
    assert_eq!(created["bucket"], BUCKET);
    assert_eq!(created["relative"], "a.csv");
    let modified = of("in/a.csv", "modified");
    assert_eq!(modified["size"], 12);
    assert_ne!(modified["etag"], created["etag"]);
    // A deleted object carries what was last known of it.
    assert_eq!(of("in/a.csv", "deleted")["etag"], modified["etag"]);
    assert_eq!(of("in/sub/b.csv", "created")["relative"], "sub/b.csv");
    // Nothing more comes of what did not change: once a later object is seen, a listing
    // has passed over all of them again.
    let all = quiet_then_marker(&workflow, &bucket, all.len());
    assert_eq!(changes(&all).len(), 3);
}

/// Puts a marker object and waits for its event: the listings after `seen` events raised
/// nothing else. Returns every event.
fn quiet_then_marker(workflow: &Workflow, bucket: &Bucket, seen: usize) -> Vec<Event> {
    bucket.put("in/zz-marker", b"m");
    let all = wait_for_events(workflow, seen + 1);
    assert_eq!(all.len(), seen + 1, "{all:?}");
    assert_eq!(all[seen].payload["key"], "in/zz-marker", "{all:?}");
    all
}

#[test]
fn the_sensor_pages_through_more_keys_than_one_listing_returns() {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto);
    // S3 returns at most 1000 keys a page.
    let n = 1234;
    for i in 0..n {
        bucket.put(&format!("in/{i:05}"), b"x");
    }
    let dir = TempDir::new("s3-pages");
    let workflow = start(dir.path(), &moto, &sensor_rules(""));
    let all = wait_for_events(&workflow, n);
    let by_key = changes(&all);
    assert_eq!(by_key.len(), n);
    assert!(by_key.values().all(|c| c == &["created"]));
}

#[test]
fn a_restart_raises_what_changed_while_down_and_nothing_twice() {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto);
    let dir = TempDir::new("s3-restart");
    // A rule, so that each event's run ends and moves the checkpoint.
    let rules = sensor_rules(
        r#"
[rules.take]
on = "bucket"

[[rules.take.steps]]
name = "ok"
command = { run = ["true"] }
"#,
    );
    bucket.put("in/a", b"a");
    bucket.put("in/b", b"b");
    let workflow = start(dir.path(), &moto, &rules);
    wait_for_events(&workflow, 2);
    wait_until("both runs to succeed", || {
        let runs = workflow.runs(None, None, 100).unwrap();
        runs.len() == 2 && runs.iter().all(|r| r.state == State::Success)
    });
    workflow.stop();
    drop(workflow);

    bucket.delete("in/a");
    bucket.put("in/b", b"b, changed");
    bucket.put("in/c", b"c");
    let workflow = start(dir.path(), &moto, &rules);
    let all = wait_for_events(&workflow, 5);
    wait_until("all five runs to succeed", || {
        let runs = workflow.runs(None, None, 100).unwrap();
        runs.len() == 5 && runs.iter().all(|r| r.state == State::Success)
    });
    assert_eq!(all.len(), 5, "{all:?}");
    let by_key = changes(&quiet_then_marker(&workflow, &bucket, 5));
    assert_eq!(by_key["in/a"], ["created", "deleted"]);
    assert_eq!(by_key["in/b"], ["created", "modified"]);
    assert_eq!(by_key["in/c"], ["created"]);
}

fn registry(moto: &Moto, root: &Path) -> Registry {
    let config = s3_config(moto);
    let mut registry = nexus_testkit::builtin_registry(root);
    registry
        .register(S3Source::new(config.clone()))
        .register_sink(S3Sink::new(config));
    registry
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8)
        .collect()
}

fn pull(client: &Client, server: &nexus_server::Server, paradata: &str) -> (Vec<u8>, Ended) {
    let mut got = Vec::new();
    let mut stream = client.initiate(server.local_addr(), paradata, StreamOptions::default());
    let ended = stream.for_each_chunk(|b| got.extend_from_slice(b));
    (got, ended)
}

#[test]
fn pushes_into_s3_and_pulls_out_of_it_are_byte_exact() {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto);
    let dir = TempDir::new("s3-stream");
    let (server, client) = serve(&moto, dir.path());
    // One PUT (under a part), and a multipart upload of three parts, the last one short.
    for (key, len) in [
        ("small.bin", 100_000usize),
        ("big.bin", (20 << 20) + 12_345),
    ] {
        let data = pattern(len);
        let mut push = client.push(
            server.local_addr(),
            &format!("s3:{BUCKET}/{key}"),
            PushOptions::default(),
        );
        for piece in data.chunks(700_001) {
            push.write(Bytes::copy_from_slice(piece)).unwrap();
        }
        let end = push.finish();
        assert!(end.is_complete(), "{key}: {:?}", end.outcome);
        let report: Value = serde_json::from_str(end.report.as_deref().unwrap()).unwrap();
        assert_eq!(report["bytes"], len as u64, "{report}");
        assert_eq!(report["key"], key);
        // Over one part (8 MiB) it went up in parts: S3 gives such an object the ETag
        // `MD5-PARTS`.
        let parts = report["etag"]
            .as_str()
            .unwrap()
            .rsplit_once('-')
            .map(|(_, n)| n.to_string());
        assert_eq!(parts.as_deref(), (len > 8 << 20).then_some("3"), "{report}");
        let stored = bucket.get(key).unwrap();
        assert_eq!(digest(&stored), digest(&data), "{key} as stored");
        let (pulled, ended) = pull(&client, &server, &format!("s3:{BUCKET}/{key}"));
        assert!(ended.is_complete(), "{key}: {:?}", ended.outcome);
        assert_eq!(pulled.len(), len);
        assert_eq!(digest(&pulled), digest(&data), "{key} as pulled");
    }
    // An empty object both ways.
    let end = client
        .push(
            server.local_addr(),
            &format!("s3:{BUCKET}/empty"),
            PushOptions::default(),
        )
        .finish();
    assert!(end.is_complete(), "{:?}", end.outcome);
    assert_eq!(bucket.get("empty").unwrap().len(), 0);
    let (pulled, ended) = pull(&client, &server, &format!("s3:{BUCKET}/empty"));
    assert!(ended.is_complete(), "{:?}", ended.outcome);
    assert_eq!(pulled.len(), 0);
}

#[test]
fn a_cancelled_push_leaves_no_object_and_mistakes_get_clear_errors() {
    let moto = Moto::start();
    let bucket = Bucket::new(&moto);
    let dir = TempDir::new("s3-errors");
    let (server, client) = serve(&moto, dir.path());
    // Past one part, so a multipart upload is under way when the push is cancelled.
    let mut push = client.push(
        server.local_addr(),
        &format!("s3:{BUCKET}/cancelled"),
        PushOptions::default(),
    );
    push.write(Bytes::from(pattern(12 << 20))).unwrap();
    wait_until("the server takes the data", || {
        server.stats().push_bytes >= 12 << 20
    });
    push.cancel();
    assert_eq!(push.finish().outcome, Outcome::Cancelled);
    wait_until("the push is counted as cancelled", || {
        server.stats().pushes_cancelled == 1
    });
    assert!(bucket.get("cancelled").is_none());
    // ...and its multipart upload was aborted, parts and all.
    wait_until("the multipart upload to be aborted", || {
        let (status, body) = nexus_testkit::http_get(moto.address, "/data?uploads").unwrap();
        assert_eq!(status, 200, "{body}");
        !body.contains("<Upload>")
    });

    let error = |outcome: Outcome| match outcome {
        Outcome::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    };
    let (code, message) = error(
        pull(&client, &server, &format!("s3:{BUCKET}/nothing"))
            .1
            .outcome,
    );
    assert_eq!(code, ErrorCode::NOT_FOUND);
    assert!(message.contains("s3://data/nothing"), "{message}");
    let (code, message) = error(pull(&client, &server, "s3:secrets/key").1.outcome);
    assert_eq!(code, ErrorCode::PERMISSION_DENIED);
    assert!(message.contains("burst.nexus.s3.buckets"), "{message}");
    // Above S3's largest object, refused before any data.
    let mut huge = client.push(
        server.local_addr(),
        &format!("s3:{BUCKET}/huge"),
        PushOptions {
            size: Some(6 << 40),
            ..PushOptions::default()
        },
    );
    let _ = huge.write(Bytes::from_static(b"x"));
    let (code, message) = error(huge.finish().outcome);
    assert_eq!(code, ErrorCode::RESOURCE_EXHAUSTED);
    assert!(message.contains("5 TiB"), "{message}");
    let mut denied = client.push(
        server.local_addr(),
        "s3:secrets/key",
        PushOptions::default(),
    );
    let _ = denied.write(Bytes::from_static(b"x"));
    let (code, _) = error(denied.finish().outcome);
    assert_eq!(code, ErrorCode::PERMISSION_DENIED);
}
