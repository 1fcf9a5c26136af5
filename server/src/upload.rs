//! The `file:PATH[?replace=true]` sink: uploads into the upload root
//! (`burst.nexus.server.upload.root`), off unless that is set.
//!
//! Nothing half-written is ever visible at `PATH`. A push is written to a fresh file in the
//! root's `.nexus-partial/` directory; at the commit the file is synced, then linked into
//! place (create-only: `linkat` fails when `PATH` exists, atomically) or renamed over it (with
//! `replace=true`), and the directory is synced. A push that ends any other way removes its
//! partial file; partial files a crash left behind are removed when the sink starts.
//!
//! Paths are confined like the `file:` source's: relative, no `..`, and opened one component
//! at a time from the root held open, with `O_NOFOLLOW`, so no symlink is followed anywhere
//! in an upload path. Missing directories are created (mode 0755). Nothing under
//! `.nexus-partial/` can be named, by a push or by a pull.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nexus_protocol::ErrorCode;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::paradata::SourceError;
use crate::replica::{Chain, Forwarder, Replication, Route};
use crate::root;
use crate::sink::{self, BlockingConsumer, Consumer, PushRequest, Sink};

/// The directory under the upload root where pushes are written until they commit.
pub(crate) const PARTIAL_DIR: &str = ".nexus-partial";

/// What a push gets when uploads are off.
const DISABLED: &str = "uploads are disabled on this server; an operator enables them by \
    setting burst.nexus.server.upload.root (environment BURST_NEXUS_SERVER_UPLOAD_ROOT) to \
    the directory pushes may write into";

/// The `file:` sink. See the module documentation.
pub struct FileSink {
    upload: Option<Arc<UploadRoot>>,
    max_size: u64,
    depth: usize,
    forwarder: Option<Arc<dyn Forwarder>>,
}

struct UploadRoot {
    dir: OwnedFd,
    partial: OwnedFd,
}

static NEXT_PARTIAL: AtomicU64 = AtomicU64::new(0);

impl FileSink {
    /// Uploads are off: every push to `file:` gets `permission_denied` saying how to enable
    /// them.
    pub fn disabled() -> FileSink {
        FileSink {
            upload: None,
            max_size: 0,
            depth: 1,
            forwarder: None,
        }
    }

    /// Takes replicated pushes (`replicas=...`), forwarding them with `forwarder`. Without
    /// one, such a push is refused.
    pub fn with_forwarder(mut self, forwarder: Arc<dyn Forwarder>) -> FileSink {
        self.forwarder = Some(forwarder);
        self
    }

    /// Takes pushes into `root` (which must exist), at most `max_size` bytes each; `depth`
    /// chunks may wait for the writing thread. Removes what earlier runs left in
    /// `.nexus-partial/`, and says how much in the log.
    pub fn new(root: &Path, max_size: u64, depth: usize) -> std::io::Result<FileSink> {
        let dir = rustix::fs::openat(
            rustix::fs::CWD,
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        match rustix::fs::mkdirat(&dir, PARTIAL_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let partial = rustix::fs::openat(
            &dir,
            PARTIAL_DIR,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let removed = clean(&root.join(PARTIAL_DIR))?;
        if removed > 0 {
            tracing::info!(removed, root = %root.display(), "Removed the partial uploads an earlier run left behind.");
        }
        Ok(FileSink {
            upload: Some(Arc::new(UploadRoot { dir, partial })),
            max_size,
            depth,
            forwarder: None,
        })
    }
}

/// Removes every file in `dir`; returns how many.
fn clean(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Sink for FileSink {
    fn scheme(&self) -> &str {
        "file"
    }

    fn open(&self, request: &PushRequest<'_>) -> Result<Box<dyn Consumer>, SourceError> {
        let Some(upload) = &self.upload else {
            return Err(SourceError::new(ErrorCode::PERMISSION_DENIED, DISABLED));
        };
        let p = request.paradata;
        let mut replace = false;
        let mut chain = Chain::default();
        for (key, value) in &p.params {
            if chain.param(key, value)? {
                continue;
            }
            match (*key, *value) {
                ("replace", "true") => replace = true,
                ("replace", "false") => replace = false,
                ("replace", other) => {
                    return Err(SourceError::bad(format!(
                        "replace must be true or false, not {other:?}"
                    )))
                }
                (other, _) => {
                    return Err(SourceError::bad(format!(
                        "unknown parameter {other:?} for a file: push; known: replace, replicas, quorum"
                    )))
                }
            }
        }
        if let Some(size) = request.declared {
            if size > self.max_size {
                return Err(too_large(self.max_size));
            }
        }
        let relative = p.body;
        root::check_lexically(relative)?;
        let parts: Vec<&str> = relative
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(SourceError::bad(format!("{relative:?} names no file")));
        };
        let parent = open_parent(&upload.dir, relative, dirs)?;
        match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => {
                let kind = FileType::from_raw_mode(stat.st_mode);
                if kind == FileType::Directory {
                    return Err(SourceError::bad(format!("{relative:?} is a directory")));
                }
                if !replace {
                    return Err(exists(relative));
                }
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(failed(relative, e)),
        }
        let temp = format!(
            "{}-{}.part",
            std::process::id(),
            NEXT_PARTIAL.fetch_add(1, Ordering::Relaxed)
        );
        let fd = rustix::fs::openat(
            &upload.partial,
            temp.as_str(),
            // Read too: a replicated push may replay what it holds to a later replica.
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| failed(relative, e))?;
        let file = std::fs::File::from(fd);
        let replication = match (chain.replicas.is_empty(), &self.forwarder) {
            (true, _) => None,
            (false, None) => {
                return Err(denied(
                    relative,
                    "this server does not forward replicated pushes",
                ))
            }
            (false, Some(forwarder)) => {
                let copy = file.try_clone().map_err(|e| {
                    SourceError::new(ErrorCode::SINK_FAILED, format!("{relative:?}: {e}"))
                })?;
                let route = Route {
                    forwarder: Arc::clone(forwarder),
                    chain,
                    path: relative.to_string(),
                    replace,
                    declared: request.declared,
                    local: copy,
                };
                Some(Replication::start(route)?)
            }
        };
        let writer = FileWriter {
            upload: Arc::clone(upload),
            file,
            temp,
            parent,
            name: (*name).to_string(),
            relative: relative.to_string(),
            replace,
            written: 0,
            max_size: self.max_size,
            done: false,
            replication,
        };
        sink::threaded(writer, self.depth)
    }
}

/// Opens (creating what is missing) each directory of an upload path from the root, never
/// through a symlink.
fn open_parent(root: &OwnedFd, relative: &str, dirs: &[&str]) -> Result<OwnedFd, SourceError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current =
        rustix::fs::openat(root, ".", flags, Mode::empty()).map_err(|e| failed(relative, e))?;
    for part in dirs {
        match rustix::fs::mkdirat(&current, *part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(failed(relative, e)),
        }
        current = rustix::fs::openat(&current, *part, flags, Mode::empty()).map_err(|e| {
            let is_link = rustix::fs::statat(&current, *part, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink);
            match e {
                _ if is_link => denied(relative, "upload paths may not go through a symlink"),
                Errno::NOTDIR => {
                    SourceError::bad(format!("{relative:?}: {part:?} is not a directory"))
                }
                other => failed(relative, other),
            }
        })?;
    }
    Ok(current)
}

/// One push being written, on its sink thread.
struct FileWriter {
    upload: Arc<UploadRoot>,
    file: std::fs::File,
    temp: String,
    parent: OwnedFd,
    name: String,
    relative: String,
    replace: bool,
    written: u64,
    max_size: u64,
    /// Committed, or already removed.
    done: bool,
    /// The replicas behind this one, for a replicated push.
    replication: Option<Replication>,
}

impl FileWriter {
    fn io_error(&self, e: std::io::Error) -> SourceError {
        if e.raw_os_error() == Some(Errno::NOSPC.raw_os_error()) {
            return SourceError::new(
                ErrorCode::SINK_FAILED,
                format!(
                    "{:?}: no space left on the server's disk; nothing of the push was kept",
                    self.relative
                ),
            );
        }
        SourceError::new(
            ErrorCode::SINK_FAILED,
            format!("{:?}: {e}; nothing of the push was kept", self.relative),
        )
    }
}

impl BlockingConsumer for FileWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), SourceError> {
        self.written += data.len() as u64;
        if self.written > self.max_size {
            return Err(too_large(self.max_size));
        }
        self.file.write_all(data).map_err(|e| self.io_error(e))
    }

    fn write_bytes(&mut self, data: bytes::Bytes) -> Result<(), SourceError> {
        self.write(&data)?;
        match &mut self.replication {
            Some(replication) => replication.write(data),
            None => Ok(()),
        }
    }

    fn commit(&mut self) -> Result<Option<String>, SourceError> {
        // The replicas behind commit first: whatever fails there, this copy is not yet
        // visible, and (without a quorum) never becomes so.
        let report = match &mut self.replication {
            Some(replication) => Some(replication.finish()?),
            None => None,
        };
        self.commit_here()?;
        Ok(report)
    }

    fn abort(&mut self) {
        if !self.done {
            self.done = true;
            let _ =
                rustix::fs::unlinkat(&self.upload.partial, self.temp.as_str(), AtFlags::empty());
        }
    }
}

impl FileWriter {
    fn commit_here(&mut self) -> Result<(), SourceError> {
        self.file.sync_all().map_err(|e| self.io_error(e))?;
        let (partial, parent) = (self.upload.partial.as_fd(), self.parent.as_fd());
        let placed = match self.replace {
            true => rustix::fs::renameat(partial, self.temp.as_str(), parent, self.name.as_str()),
            false => rustix::fs::linkat(
                partial,
                self.temp.as_str(),
                parent,
                self.name.as_str(),
                AtFlags::empty(),
            ),
        };
        match placed {
            Ok(()) => {}
            Err(Errno::EXIST) => return Err(exists(&self.relative)),
            Err(e) => return Err(self.io_error(e.into())),
        }
        self.done = true;
        if !self.replace {
            // The data is in place under its name; the partial name goes. A crash between
            // the two leaves a partial file, removed at the next start.
            let _ = rustix::fs::unlinkat(partial, self.temp.as_str(), AtFlags::empty());
        }
        // The new name is durable once its directory is.
        rustix::fs::fsync(parent).map_err(|e| self.io_error(e.into()))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

fn too_large(max: u64) -> SourceError {
    SourceError::new(
        ErrorCode::RESOURCE_EXHAUSTED,
        format!(
            "the push is larger than the {max} bytes burst.nexus.server.upload.max.size allows; \
             nothing of it was kept"
        ),
    )
}

fn exists(relative: &str) -> SourceError {
    SourceError::new(
        ErrorCode::ALREADY_EXISTS,
        format!("{relative:?} exists; push with ?replace=true to replace it"),
    )
}

fn denied(relative: &str, why: &str) -> SourceError {
    SourceError::new(ErrorCode::PERMISSION_DENIED, format!("{relative:?}: {why}"))
}

fn failed(relative: &str, e: Errno) -> SourceError {
    SourceError::new(
        ErrorCode::SINK_FAILED,
        format!("{relative:?}: {}", std::io::Error::from(e)),
    )
}
