//! The built-in sources: `file:PATH[?offset=N&length=M]` and `synthetic:SIZE[?seed=S]`.

use std::path::PathBuf;
use std::rc::Rc;

use bytes::Bytes;
use nexus_protocol::ErrorCode;

use crate::io;
use crate::paradata::{parse_size, SourceError};
use crate::root;
use crate::shard::ShardContext;
use crate::source::{NextChunk, Opened, Producer, Source, StreamRequest};
use crate::synthetic;

/// `file:PATH[?offset=N&length=M]`: a regular file under the server root, read in chunks of
/// the configured size into buffers of the shard's pool (io_uring reads on that backend).
pub struct FileSource {
    root: PathBuf,
}

impl FileSource {
    /// Serves files under `root`, which is canonicalised here.
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        Ok(FileSource {
            root: root.into().canonicalize()?,
        })
    }
}

impl Source for FileSource {
    fn scheme(&self) -> &str {
        "file"
    }

    fn open(&self, request: &StreamRequest<'_>) -> Result<Opened, SourceError> {
        let p = request.paradata;
        let offset = p.size_param("offset", &["offset", "length"])?.unwrap_or(0);
        let length = p.size_param("length", &["offset", "length"])?;
        let path = root::resolve(&self.root, p.body)?;
        let failed = |e: std::io::Error| {
            SourceError::new(ErrorCode::SOURCE_FAILED, format!("{:?}: {e}", p.body))
        };
        let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => SourceError::new(
                ErrorCode::PERMISSION_DENIED,
                format!("{:?}: not readable", p.body),
            ),
            _ => failed(e),
        })?;
        let size = file.metadata().map_err(failed)?.len();
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
                shard: Rc::clone(request.shard),
                offset,
                remaining: length,
            }),
            expected_bytes: Some(length),
        })
    }
}

struct FileProducer {
    file: io::File,
    shard: Rc<ShardContext>,
    offset: u64,
    remaining: u64,
}

impl Producer for FileProducer {
    fn next(&mut self, _max: usize) -> NextChunk<'_> {
        Box::pin(async move {
            if self.remaining == 0 {
                return None;
            }
            // Read a whole chunk even when the window is smaller: the engine sends the rest
            // when credit comes, and big reads are what makes file IO cheap.
            let want = (self.shard.chunk_size() as u64).min(self.remaining) as usize;
            let buf = self.shard.buffer();
            let (result, buf) = self.file.read_at(buf, self.offset, want).await;
            match result {
                Ok(0) => Some(Err(SourceError::new(
                    ErrorCode::SOURCE_FAILED,
                    format!(
                        "the file ended {} bytes early (truncated while being read?)",
                        self.remaining
                    ),
                ))),
                Ok(n) => {
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
