//! The built-in sources: `file:PATH[?offset=N&length=M]` and `synthetic:SIZE[?seed=S]`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use nexus_protocol::file_range::FileRange;
use nexus_protocol::ErrorCode;

use crate::io;
use crate::paradata::{parse_size, SourceError};
use crate::root::{Resolution, Root};
use crate::shard::ShardContext;
use crate::source::{NextChunk, Opened, Producer, Source, StreamRequest};
use crate::synthetic;

/// `file:PATH[?offset=N&length=M]`: a regular file under the server root, read in chunks of
/// the configured size into buffers of the shard's pool (io_uring reads on that backend).
/// Paths are opened relative to the root held open, with the kernel refusing to leave it
/// (see [`Root`]).
pub struct FileSource {
    root: Arc<Root>,
}

impl FileSource {
    /// Serves files under `root`, following symlinks that stay under it.
    pub fn new(root: impl AsRef<Path>) -> std::io::Result<Self> {
        FileSource::with_symlinks(root, true)
    }

    /// Serves files under `root`; with `follow_symlinks` off, a path through any symlink is
    /// `permission_denied` (`burst.nexus.server.follow.symlinks`).
    pub fn with_symlinks(root: impl AsRef<Path>, follow_symlinks: bool) -> std::io::Result<Self> {
        let root = Root::open(root.as_ref(), follow_symlinks)?;
        if root.resolution() == Resolution::Walk {
            tracing::warn!("The kernel refuses openat2: file: paths are opened one component at a time, and no symlink is followed.");
        }
        Ok(FileSource {
            root: Arc::new(root),
        })
    }
}

impl Source for FileSource {
    fn scheme(&self) -> &str {
        "file"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let p = request.paradata;
        let range = FileRange::parse(request.text).map_err(|e| SourceError::bad(e.0))?;
        let (offset, length) = (range.offset, range.length);
        let failed = |e: std::io::Error| {
            SourceError::new(ErrorCode::SOURCE_FAILED, format!("{:?}: {e}", p.body))
        };
        let file = self.root.open_file(p.body)?;
        // A second handle on the same open file, for the change checks (fstat).
        let watch = file.try_clone().map_err(failed)?;
        let identity = Identity::of(&watch.metadata().map_err(failed)?);
        let size = identity.size;
        if offset > size {
            return Err(SourceError::bad(format!(
                "offset {offset} is beyond the end of {:?} ({size} bytes)",
                p.body
            )));
        }
        let length = match length {
            Some(n) if n > size - offset => {
                return Err(SourceError::bad(format!(
                    "range {offset}+{n} is beyond the end of {:?} ({size} bytes)",
                    p.body
                )))
            }
            Some(n) => n,
            None => size - offset,
        };
        Ok(Opened {
            producer: Box::new(FileProducer {
                file: io::File::from_std(request.shard.backend(), file),
                watch,
                identity,
                root: Arc::clone(&self.root),
                name: p.body.to_string(),
                shard: Rc::clone(request.shard),
                offset,
                remaining: length,
            }),
            expected_bytes: Some(length),
        })
    }
}

/// What identifies the content of a file: checked at every chunk and at the end, so a file
/// rewritten, truncated or replaced while it is read fails with `source_changed` instead of
/// arriving as a verified copy that matches no version of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

struct FileProducer {
    file: io::File,
    /// The same open file, for fstat.
    watch: std::fs::File,
    identity: Identity,
    root: Arc<Root>,
    /// The path as the paradata gave it, for messages and the final check.
    name: String,
    shard: Rc<ShardContext>,
    offset: u64,
    remaining: u64,
}

impl FileProducer {
    /// `source_changed` if the open file's size or times differ from when it was opened.
    fn check_unchanged(&self) -> Result<(), SourceError> {
        let now = self.watch.metadata().map(|m| Identity::of(&m));
        match now {
            Ok(now) if now == self.identity => Ok(()),
            Ok(now) => Err(changed(
                &self.name,
                if now.size != self.identity.size {
                    "its size changed"
                } else {
                    "it was modified"
                },
            )),
            Err(e) => Err(SourceError::new(
                ErrorCode::SOURCE_FAILED,
                format!("{:?}: {e}", self.name),
            )),
        }
    }

    /// At the end: the content did not change, and the path still names the file read.
    fn check_at_end(&self) -> Result<(), SourceError> {
        self.check_unchanged()?;
        let same = self
            .root
            .open_file(&self.name)
            .and_then(|f| f.metadata().map_err(|_| changed(&self.name, "")))
            .is_ok_and(|m| (m.dev(), m.ino()) == (self.identity.dev, self.identity.ino));
        if !same {
            return Err(changed(&self.name, "the path now names another file"));
        }
        Ok(())
    }
}

fn changed(name: &str, why: &str) -> SourceError {
    SourceError::new(
        ErrorCode::SOURCE_CHANGED,
        format!("{name:?} changed while it was being read ({why}); pull it again"),
    )
}

impl Producer for FileProducer {
    fn next(&mut self, _max: usize) -> NextChunk<'_> {
        Box::pin(async move {
            if self.remaining == 0 {
                return self.check_at_end().err().map(Err);
            }
            // Read a whole chunk even when the window is smaller: the engine sends the rest
            // when credit comes, and big reads are what makes file IO cheap.
            let want = (self.shard.chunk_size() as u64).min(self.remaining) as usize;
            let buf = self.shard.buffer();
            let (result, buf) = self.file.read_at(buf, self.offset, want).await;
            match result {
                Ok(0) => Some(Err(changed(
                    &self.name,
                    &format!("it ended {} bytes early", self.remaining),
                ))),
                Ok(n) => {
                    if let Err(e) = self.check_unchanged() {
                        return Some(Err(e));
                    }
                    let data = buf.freeze();
                    debug_assert_eq!(data.len(), n);
                    self.offset += data.len() as u64;
                    self.remaining -= data.len() as u64;
                    Some(Ok(data))
                }
                Err(e) => Some(Err(SourceError::new(
                    ErrorCode::SOURCE_FAILED,
                    format!("read failed at offset {}: {e}", self.offset),
                ))),
            }
        })
    }
}

/// `synthetic:SIZE[?seed=S]`: SIZE deterministic pseudo-random bytes (see
/// [`synthetic`](crate::synthetic)), sent as zero-copy slices of the shard's one tile.
pub struct SyntheticSource;

impl Source for SyntheticSource {
    fn scheme(&self) -> &str {
        "synthetic"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let p = request.paradata;
        let size = parse_size(p.body)?;
        let seed = p.size_param("seed", &["seed"])?.unwrap_or(0);
        Ok(Opened {
            producer: Box::new(SyntheticProducer {
                tile: request.shard.synthetic_tile(),
                seed,
                chunk: request.shard.chunk_size().min(synthetic::MAX_CHUNK),
                offset: 0,
                size,
            }),
            expected_bytes: Some(size),
        })
    }
}

struct SyntheticProducer {
    tile: Bytes,
    seed: u64,
    chunk: usize,
    offset: u64,
    size: u64,
}

impl Producer for SyntheticProducer {
    fn next(&mut self, max: usize) -> NextChunk<'_> {
        let left = self.size - self.offset;
        let chunk = (left > 0).then(|| {
            let len = (max.min(self.chunk) as u64).min(left) as usize;
            let start = synthetic::tile_offset(self.seed, self.offset);
            self.offset += len as u64;
            Ok(self.tile.slice(start..start + len))
        });
        Box::pin(std::future::ready(chunk))
    }
}
