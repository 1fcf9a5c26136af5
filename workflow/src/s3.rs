//! S3 (feature `s3`), through `object_store`: the `s3` sensor, which lists a bucket's
//! prefix and raises what changed; the `s3:BUCKET/KEY` source, which streams an object; and
//! the `s3:BUCKET/KEY` sink, which writes a push into an object (multipart above one part).
//!
//! Each runs on a thread of its own with a current-thread tokio runtime for the HTTP client,
//! away from the shards: the source feeds its stream through a [`pipe`], the sink takes its
//! push through [`threaded`].
//!
//! The sensor's checkpoint (per key, in the state database) is `SIZE:LAST_MODIFIED_MS:ETAG`,
//! or `deleted`, as for the file sensor: at start it lists the prefix against them, so an
//! object created, overwritten or deleted while the process was down raises its event once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nexus_protocol::{ErrorCode, ItemCounts};
use nexus_server::sink::{threaded, BlockingConsumer, Consumer, PushRequest, Sink};
use nexus_server::{pipe, Opened, Source, SourceError, StreamRequest};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde_json::json;
use tokio::runtime::Runtime;

use crate::event::Event;
use crate::sensor::{raise, restarting};
use crate::spec::SensorKind;
use crate::{S3Config, Shared};

/// Chunks queued ahead of the client per `s3:` stream.
const DEPTH: usize = 8;

/// What the source gathers before it hands a chunk on: the HTTP body arrives in pieces of a
/// few KiB, a stream is faster in chunks of a MiB.
const CHUNK: usize = 1 << 20;

/// The part size of a multipart upload (more for a push declared too large for
/// [`MAX_PARTS`] of them); a push up to one part is one plain PUT.
const PART: u64 = 8 << 20;

/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;

/// S3's largest object.
const MAX_OBJECT: u64 = 5 << 40;

/// Bytes of parts uploaded at once per push (at least one part).
const IN_FLIGHT: u64 = 32 << 20;

/// The part size for a push of `declared` bytes: 8 MiB, or the whole MiBs that fit it in
/// [`MAX_PARTS`]. Unknown: 8 MiB, so such a push can reach 10,000 x 8 MiB (78 GiB).
fn part_size(declared: Option<u64>) -> u64 {
    let needed = declared.map_or(0, |d| d.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20);
    needed.max(PART)
}

/// A client for `bucket`. Building it does no IO.
pub fn store(config: &S3Config, bucket: &str) -> Result<AmazonS3, String> {
    // reqwest's TLS takes the process's rustls provider: ring, as everywhere in Nexus.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(&config.region);
    if !config.endpoint.is_empty() {
        builder = builder
            .with_endpoint(&config.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(config.endpoint.starts_with("http://"));
    }
    builder
        .build()
        .map_err(|e| format!("S3 bucket {bucket:?}: {e}"))
}

fn runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the S3 client's runtime: {e}"))
}

/// What the sensor knows of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    size: u64,
    modified_ms: i64,
    etag: String,
}

impl Seen {
    fn text(&self) -> String {
        format!("{}:{}:{}", self.size, self.modified_ms, self.etag)
    }

    /// A checkpoint's value; `None` for `deleted` (or what does not parse).
    fn parse(text: &str) -> Option<Seen> {
        let mut parts = text.splitn(3, ':');
        Some(Seen {
            size: parts.next()?.parse().ok()?,
            modified_ms: parts.next()?.parse().ok()?,
            etag: parts.next()?.to_string(),
        })
    }
}

/// Lists every object under `prefix`, page after page.
async fn list(store: &AmazonS3, prefix: &str) -> Result<BTreeMap<String, Seen>, String> {
    let prefix = (!prefix.is_empty()).then(|| Path::from(prefix));
    let mut stream = store.list(prefix.as_ref());
    let mut found = BTreeMap::new();
    while let Some(meta) = crate::next_item(&mut stream).await {
        let meta = meta.map_err(|e| e.to_string())?;
        let etag = meta.e_tag.unwrap_or_default();
        found.insert(
            meta.location.to_string(),
            Seen {
                size: meta.size,
                modified_ms: meta.last_modified.timestamp_millis(),
                etag: etag.trim_matches('"').to_string(),
            },
        );
    }
    Ok(found)
}

/// The `s3` sensor's thread: lists, raises the differences, waits `every`; on a failure,
/// starts again (from the checkpoints) after a backoff from 500 ms doubling to 60 s.
pub(crate) fn sensor(shared: &Shared, name: &str) {
    let Some(sensor) = shared.plan.sensors.get(name) else {
        return;
    };
    let SensorKind::S3 {
        bucket,
        prefix,
        every,
    } = &sensor.kind
    else {
        return;
    };
    restarting(shared, name, || {
        poll(shared, name, bucket, prefix, *every, sensor.timeout)
            .map_err(|e| format!("s3://{bucket}/{prefix}: {e}"))
    });
}

/// Polls until stopped (`Ok`) or until something fails.
fn poll(
    shared: &Shared,
    name: &str,
    bucket: &str,
    prefix: &str,
    every: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let runtime = runtime()?;
    let store = store(&shared.config.s3, bucket)?;
    let mut known: HashMap<String, String> =
        shared.store.checkpoints(name).map_err(|e| e.to_string())?;
    known.extend(shared.store.open_cursors(name).map_err(|e| e.to_string())?);
    loop {
        let listing = runtime
            .block_on(async { tokio::time::timeout(timeout, list(&store, prefix)).await })
            .map_err(|_| {
                format!(
                    "listing s3://{bucket}/{prefix} took longer than the sensor's timeout ({} ms)",
                    timeout.as_millis()
                )
            })??;
        // Every key listed now or known before (and not already known as deleted), in order.
        let keys: BTreeSet<&String> = listing
            .keys()
            .chain(
                known
                    .iter()
                    .filter(|(_, v)| *v != "deleted")
                    .map(|(k, _)| k),
            )
            .collect();
        let mut changes = Vec::new();
        for key in keys {
            let now = listing.get(key);
            let before = known.get(key).and_then(|v| Seen::parse(v));
            let change = match (&before, now) {
                (None, Some(_)) => "created",
                (Some(b), Some(n)) if b != n => "modified",
                (Some(_), None) => "deleted",
                _ => continue,
            };
            let Some(seen) = now.or(before.as_ref()).cloned() else {
                continue;
            };
            changes.push((key.clone(), change, seen, now.is_some()));
        }
        for (key, change, seen, exists) in changes {
            let relative = key
                .strip_prefix(prefix)
                .map_or(key.as_str(), |r| r.trim_start_matches('/'));
            let payload = json!({"change": change, "bucket": bucket, "key": key,
                                 "relative": relative, "etag": seen.etag, "size": seen.size,
                                 "last_modified_ms": seen.modified_ms});
            let id = format!(
                "{change}:{key}:{}:{}:{}",
                seen.size, seen.modified_ms, seen.etag
            );
            let value = if exists {
                seen.text()
            } else {
                "deleted".to_string()
            };
            if !raise(shared, Event::now(name, id, payload), Some((&key, &value))) {
                return Err(format!("the event of {key:?} was not recorded"));
            }
            known.insert(key, value);
        }
        if shared.stop.wait(every) {
            return Ok(());
        }
    }
}

/// `s3:BUCKET/KEY` → (bucket, key), for a bucket in `burst.nexus.s3.buckets`.
fn target<'a>(
    config: &S3Config,
    body: &'a str,
    params: &[(&str, &str)],
) -> Result<(&'a str, Path), SourceError> {
    if let Some((key, _)) = params.first() {
        return Err(SourceError::bad(format!(
            "unknown parameter {key:?} for s3:; it takes none"
        )));
    }
    let (bucket, key) = body
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| SourceError::bad(format!("s3:{body}: write s3:BUCKET/KEY")))?;
    if !config.buckets.iter().any(|b| b == bucket) {
        return Err(SourceError::new(
            ErrorCode::PERMISSION_DENIED,
            format!("bucket {bucket:?} is not in burst.nexus.s3.buckets"),
        ));
    }
    let path = Path::parse(key).map_err(|e| SourceError::bad(format!("s3 key {key:?}: {e}")))?;
    Ok((bucket, path))
}

/// The error a failed S3 call gives a stream.
fn failure(bucket: &str, path: &Path, e: object_store::Error) -> SourceError {
    match e {
        object_store::Error::NotFound { .. } => SourceError::new(
            ErrorCode::NOT_FOUND,
            format!("s3://{bucket}/{path} does not exist"),
        ),
        e => SourceError::new(
            ErrorCode::SOURCE_FAILED,
            format!("s3://{bucket}/{path}: {e}"),
        ),
    }
}

/// The `s3:BUCKET/KEY` source: the object's bytes, for a bucket in `burst.nexus.s3.buckets`.
pub struct S3Source {
    config: S3Config,
}

impl S3Source {
    /// Serves the buckets `config` lists.
    pub fn new(config: S3Config) -> S3Source {
        S3Source { config }
    }
}

impl Source for S3Source {
    fn scheme(&self) -> &str {
        "s3"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let (bucket, path) = target(
            &self.config,
            request.paradata.body,
            &request.paradata.params,
        )?;
        let bucket = bucket.to_string();
        let config = self.config.clone();
        let (sender, producer) = pipe(DEPTH);
        std::thread::Builder::new()
            .name("nexus-s3-get".into())
            .spawn(move || {
                let fetched = runtime().and_then(|r| Ok((r, store(&config, &bucket)?)));
                let (runtime, store) = match fetched {
                    Ok(pair) => pair,
                    Err(e) => {
                        let _ = sender.fail(SourceError::new(ErrorCode::SOURCE_FAILED, e));
                        return;
                    }
                };
                let result = runtime.block_on(async {
                    let mut body = store
                        .get(&path)
                        .await
                        .map_err(|e| failure(&bucket, &path, e))?
                        .into_stream();
                    let mut gathered = BytesMut::new();
                    while let Some(piece) = crate::next_item(&mut body).await {
                        let piece = piece.map_err(|e| failure(&bucket, &path, e))?;
                        gathered.extend_from_slice(&piece);
                        if gathered.len() >= CHUNK
                            && sender.send(gathered.split().freeze()).is_err()
                        {
                            return Ok(false);
                        }
                    }
                    if !gathered.is_empty() && sender.send(gathered.freeze()).is_err() {
                        return Ok(false);
                    }
                    Ok(true)
                });
                match result {
                    Ok(true) => {
                        let _ = sender.finish(ItemCounts::NOT_COUNTED);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let _ = sender.fail(e);
                    }
                }
            })
            .map_err(|e| SourceError::new(ErrorCode::INTERNAL, e.to_string()))?;
        Ok(Opened {
            producer: Box::new(producer),
            expected_bytes: None,
        })
    }
}

/// The `s3:BUCKET/KEY` sink: a push becomes the object, visible only once the push's data
/// has all arrived and matched its digest. Up to one part it is one PUT at the commit;
/// beyond, a multipart upload (8 MiB parts, 4 at once), aborted if the push does not finish.
pub struct S3Sink {
    config: S3Config,
}

impl S3Sink {
    /// Takes pushes into the buckets `config` lists.
    pub fn new(config: S3Config) -> S3Sink {
        S3Sink { config }
    }
}

impl Sink for S3Sink {
    fn scheme(&self) -> &str {
        "s3"
    }

    fn open(&self, request: &PushRequest<'_>) -> Result<Box<dyn Consumer>, SourceError> {
        let (bucket, path) = target(
            &self.config,
            request.paradata.body,
            &request.paradata.params,
        )?;
        if request.declared.is_some_and(|d| d > MAX_OBJECT) {
            return Err(SourceError::new(
                ErrorCode::RESOURCE_EXHAUSTED,
                "an S3 object is at most 5 TiB",
            ));
        }
        let part = part_size(request.declared);
        threaded(
            Upload {
                config: self.config.clone(),
                bucket: bucket.to_string(),
                path,
                live: None,
                buffer: BytesMut::new(),
                writer: None,
                bytes: 0,
                part,
            },
            DEPTH,
        )
    }
}

struct Upload {
    config: S3Config,
    bucket: String,
    path: Path,
    /// The runtime and the client, made on the sink's thread at the first write.
    live: Option<(Runtime, Arc<AmazonS3>)>,
    /// What came before the multipart upload started.
    buffer: BytesMut,
    writer: Option<WriteMultipart>,
    bytes: u64,
    /// The part size.
    part: u64,
}

impl Upload {
    fn failed(&self, e: object_store::Error) -> SourceError {
        SourceError::new(
            ErrorCode::SINK_FAILED,
            format!("s3://{}/{}: {e}", self.bucket, self.path),
        )
    }

    fn live(&mut self) -> Result<(), SourceError> {
        if self.live.is_none() {
            let sink_failed = |e: String| SourceError::new(ErrorCode::SINK_FAILED, e);
            let runtime = runtime().map_err(sink_failed)?;
            let store = store(&self.config, &self.bucket).map_err(sink_failed)?;
            self.live = Some((runtime, Arc::new(store)));
        }
        Ok(())
    }
}

impl BlockingConsumer for Upload {
    fn write(&mut self, data: &[u8]) -> Result<(), SourceError> {
        self.write_bytes(Bytes::copy_from_slice(data))
    }

    fn write_bytes(&mut self, data: Bytes) -> Result<(), SourceError> {
        self.live()?;
        let Some((runtime, store)) = &self.live else {
            return Ok(());
        };
        self.bytes += data.len() as u64;
        if self.bytes > self.part * MAX_PARTS {
            return Err(SourceError::new(
                ErrorCode::RESOURCE_EXHAUSTED,
                format!(
                    "s3://{}/{}: more than {MAX_PARTS} parts of {} MiB; declare the push's size \
                     (nexus push does for a file) and the parts grow to fit",
                    self.bucket,
                    self.path,
                    self.part >> 20
                ),
            ));
        }
        if self.writer.is_none() {
            self.buffer.extend_from_slice(&data);
            if self.buffer.len() as u64 <= self.part {
                return Ok(());
            }
            let upload = runtime
                .block_on(store.put_multipart(&self.path))
                .map_err(|e| self.failed(e))?;
            let part = usize::try_from(self.part).unwrap_or(usize::MAX);
            let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
            let _inside = runtime.enter();
            writer.put(self.buffer.split().freeze());
            self.writer = Some(writer);
            return Ok(());
        }
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        let in_flight = usize::try_from((IN_FLIGHT / self.part).max(1)).unwrap_or(1);
        let waited = runtime.block_on(writer.wait_for_capacity(in_flight));
        if let Err(e) = waited {
            return Err(self.failed(e));
        }
        let _inside = runtime.enter();
        writer.put(data);
        Ok(())
    }

    fn commit(&mut self) -> Result<Option<String>, SourceError> {
        self.live()?;
        let Some((runtime, store)) = &self.live else {
            return Ok(None);
        };
        let done = match self.writer.take() {
            Some(writer) => runtime.block_on(writer.finish()),
            None => {
                let payload = PutPayload::from_bytes(self.buffer.split().freeze());
                runtime.block_on(store.put(&self.path, payload))
            }
        };
        let done = done.map_err(|e| self.failed(e))?;
        let etag = done.e_tag.unwrap_or_default();
        Ok(Some(
            json!({"bucket": self.bucket, "key": self.path.to_string(),
                   "etag": etag.trim_matches('"'), "bytes": self.bytes})
            .to_string(),
        ))
    }

    fn abort(&mut self) {
        if let (Some(writer), Some((runtime, _))) = (self.writer.take(), &self.live) {
            if let Err(e) = runtime.block_on(writer.abort()) {
                tracing::warn!(bucket = %self.bucket, key = %self.path, error = %e,
                               "Cannot abort the multipart upload of a push that did not finish; the bucket's lifecycle rule must remove its parts.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_value_reads_back_and_deleted_is_none() {
        let seen = Seen {
            size: 12,
            modified_ms: 1_796_294_106_222,
            etag: "9b2cf535f27731c974343645a3985328-3".into(),
        };
        assert_eq!(Seen::parse(&seen.text()), Some(seen));
        assert_eq!(Seen::parse("deleted"), None);
        // An ETag may hold a colon: only the first two split.
        assert_eq!(
            Seen::parse("1:2:a:b").map(|s| s.etag),
            Some("a:b".to_string())
        );
    }

    #[test]
    fn parts_grow_to_fit_a_declared_size_in_ten_thousand() {
        assert_eq!(part_size(None), 8 << 20);
        assert_eq!(part_size(Some(1 << 30)), 8 << 20);
        // 78.125 GiB fit in 10,000 parts of 8 MiB; one byte more needs 9 MiB parts.
        assert_eq!(part_size(Some(10_000 * (8 << 20))), 8 << 20);
        assert_eq!(part_size(Some(10_000 * (8 << 20) + 1)), 9 << 20);
        let largest = part_size(Some(MAX_OBJECT));
        assert!(largest * MAX_PARTS >= MAX_OBJECT && largest <= 5 << 30);
        assert_eq!(largest % (1 << 20), 0);
    }

    #[test]
    fn only_listed_buckets_and_well_formed_targets_are_served() {
        let config = S3Config {
            buckets: vec!["data".into()],
            ..S3Config::default()
        };
        let (bucket, path) = target(&config, "data/in/a.csv", &[]).unwrap();
        assert_eq!((bucket, path.as_ref()), ("data", "in/a.csv"));
        let denied = target(&config, "other/a", &[]).unwrap_err();
        assert_eq!(denied.code, ErrorCode::PERMISSION_DENIED);
        assert!(
            denied.message.contains("burst.nexus.s3.buckets"),
            "{}",
            denied.message
        );
        for bad in ["data", "data/", "/a", ""] {
            let e = target(&config, bad, &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::BAD_PARADATA, "{bad}");
        }
        let e = target(&config, "data/a", &[("offset", "1")]).unwrap_err();
        assert_eq!(e.code, ErrorCode::BAD_PARADATA);
        let e = target(&config, "data/a/../b", &[]).unwrap_err();
        assert_eq!(e.code, ErrorCode::BAD_PARADATA, "{}", e.message);
    }
}
