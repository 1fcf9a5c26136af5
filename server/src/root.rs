//! Opening `file:` paths inside the server's root, with the kernel refusing to leave it.
//!
//! The root is held open as a directory descriptor, and every path is opened relative to it
//! in one step, so there is no gap between checking a path and opening it that a symlink or
//! a rename could slip through (a resolved path opened again by name can be swapped in
//! between):
//!
//! - where the kernel has `openat2` (Linux 5.6+), with `RESOLVE_BENEATH` and
//!   `RESOLVE_NO_MAGICLINKS`: symlinks are followed only while they stay under the root, and
//!   with `follow_symlinks` off (`RESOLVE_NO_SYMLINKS`) not at all;
//! - elsewhere (an old kernel, or a seccomp profile that blocks `openat2`), one component at a
//!   time with `O_NOFOLLOW`: no symlink is ever followed.
//!
//! Files are opened non-blocking, so a FIFO or a device swapped in never blocks the shard,
//! and the descriptor actually opened must be a regular file (`fstat`); then the non-blocking
//! flag is cleared, since io_uring would answer a non-blocking read of a cold file with
//! `EAGAIN` instead of reading it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use nexus_protocol::ErrorCode;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::paradata::SourceError;

/// How paths are opened under a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// `openat2` with `RESOLVE_BENEATH`.
    Beneath,
    /// A walk of `openat(O_NOFOLLOW)` calls, one per component: symlinks are refused.
    Walk,
}

/// The served directory, held open.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    follow_symlinks: bool,
    resolution: Resolution,
}

impl Root {
    /// Opens `path` as the root. With `follow_symlinks`, symlinks that stay under the root
    /// are followed (where the kernel can check that); without, none is. Uses `openat2`
    /// when the kernel allows it, the per-component walk otherwise.
    pub fn open(path: &Path, follow_symlinks: bool) -> std::io::Result<Root> {
        // openat, not open: the legacy `open` call is absent from strict seccomp profiles.
        let dir = rustix::fs::openat(
            rustix::fs::CWD,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // Probe openat2 on the root itself: ENOSYS on old kernels, EPERM under seccomp.
        let probe = rustix::fs::openat2(
            &dir,
            ".",
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH,
        );
        let resolution = match probe {
            Ok(_) => Resolution::Beneath,
            Err(_) => Resolution::Walk,
        };
        Ok(Root {
            dir,
            follow_symlinks,
            resolution,
        })
    }

    /// The same root, resolving the other way (tests and fuzzing exercise both).
    pub fn with_resolution(mut self, resolution: Resolution) -> Root {
        self.resolution = resolution;
        self
    }

    /// How this root opens paths.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// Whether symlinks under the root may be followed.
    pub fn follows_symlinks(&self) -> bool {
        self.follow_symlinks && self.resolution == Resolution::Beneath
    }

    /// Opens `relative` for reading: a regular file under the root. Absolute paths, `..`,
    /// and symlinks that lead out (or any symlink, when they are not followed) are
    /// `permission_denied`; a missing file is `not_found`; anything but a regular file is
    /// `bad_paradata`.
    pub fn open_file(&self, relative: &str) -> Result<std::fs::File, SourceError> {
        check_lexically(relative)?;
        let fd = match self.resolution {
            Resolution::Beneath => self.open_beneath(relative),
            Resolution::Walk => self.open_walking(relative),
        }?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| failed(relative, e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(SourceError::bad(format!(
                "{relative:?} is not a regular file"
            )));
        }
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| failed(relative, e))?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|e| failed(relative, e))?;
        Ok(std::fs::File::from(fd))
    }

    fn open_beneath(&self, relative: &str) -> Result<OwnedFd, SourceError> {
        let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        if !self.follow_symlinks {
            resolve |= ResolveFlags::NO_SYMLINKS;
        }
        rustix::fs::openat2(&self.dir, relative, read_flags(), Mode::empty(), resolve).map_err(
            |e| match e {
                Errno::XDEV => denied(relative, "it leads out of the server root"),
                Errno::LOOP if !self.follow_symlinks => denied(
                    relative,
                    "it goes through a symlink, and burst.nexus.server.follow.symlinks is off",
                ),
                other => open_error(relative, other),
            },
        )
    }

    fn open_walking(&self, relative: &str) -> Result<OwnedFd, SourceError> {
        let parts: Vec<&str> = relative
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let Some((last, dirs)) = parts.split_last() else {
            return Err(SourceError::bad(format!("{relative:?} names no file")));
        };
        let mut current: Option<OwnedFd> = None;
        for part in dirs {
            let at = current.as_ref().map_or(self.dir.as_fd(), |fd| fd.as_fd());
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next = rustix::fs::openat(at, *part, flags, Mode::empty())
                .map_err(|e| walk_error(relative, at, part, e))?;
            current = Some(next);
        }
        let at = current.as_ref().map_or(self.dir.as_fd(), |fd| fd.as_fd());
        rustix::fs::openat(at, *last, read_flags() | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| walk_error(relative, at, last, e))
    }
}

/// Read-only, non-blocking (a FIFO must not block the shard), no controlling terminal.
fn read_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY
}

/// The checks that need no file system: a path, relative, without `..`, and not into the
/// partial uploads of an upload root (`.nexus-partial`), whether pulled or pushed.
pub(crate) fn check_lexically(relative: &str) -> Result<(), SourceError> {
    if relative.is_empty() {
        return Err(SourceError::bad("file: needs a path"));
    }
    if relative.contains('\0') {
        return Err(SourceError::bad("a path cannot contain a NUL byte"));
    }
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(name) if name == crate::upload::PARTIAL_DIR => {
                return Err(denied(relative, "partial uploads cannot be named"))
            }
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(denied(relative, "`..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(denied(
                    relative,
                    "absolute paths are not allowed; paths are relative to the server root",
                ))
            }
        }
    }
    Ok(())
}

/// A failed step of the walk: a symlink where it stopped is refused by name.
fn walk_error(relative: &str, at: impl AsFd, part: &str, e: Errno) -> SourceError {
    let is_link = rustix::fs::statat(at, part, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink);
    if is_link {
        return denied(
            relative,
            "it goes through a symlink, and this kernel cannot check where symlinks lead",
        );
    }
    open_error(relative, e)
}

fn open_error(relative: &str, e: Errno) -> SourceError {
    match e {
        Errno::NOENT | Errno::NOTDIR => {
            SourceError::new(ErrorCode::NOT_FOUND, format!("{relative:?} does not exist"))
        }
        Errno::ACCESS | Errno::PERM => denied(relative, "not readable"),
        Errno::LOOP => SourceError::bad(format!("{relative:?}: too many levels of symlinks")),
        Errno::NXIO | Errno::NODEV => {
            SourceError::bad(format!("{relative:?} is not a regular file"))
        }
        other => failed(relative, other),
    }
}

fn denied(relative: &str, why: &str) -> SourceError {
    SourceError::new(ErrorCode::PERMISSION_DENIED, format!("{relative:?}: {why}"))
}

fn failed(relative: &str, e: Errno) -> SourceError {
    SourceError::new(
        ErrorCode::SOURCE_FAILED,
        format!("{relative:?}: {}", std::io::Error::from(e)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (std::path::PathBuf, std::path::PathBuf) {
        let base = std::env::temp_dir().join(format!(
            "nexus-root-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/data.bin"), b"inside").unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/data.bin", root.join("alias")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink(&base, root.join("outdir")).unwrap();
        (root, base)
    }

    fn code(root: &Root, path: &str) -> ErrorCode {
        root.open_file(path).unwrap_err().code
    }

    fn read(root: &Root, path: &str) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        root.open_file(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn confinement_both_ways() {
        let (path, base) = tree();
        for resolution in [Resolution::Beneath, Resolution::Walk] {
            let root = Root::open(&path, true).unwrap().with_resolution(resolution);
            assert_eq!(read(&root, "sub/data.bin"), b"inside");
            assert_eq!(read(&root, "./sub//data.bin"), b"inside");
            for (p, c) in [
                ("../secret", ErrorCode::PERMISSION_DENIED),
                ("sub/../../secret", ErrorCode::PERMISSION_DENIED),
                ("/etc/passwd", ErrorCode::PERMISSION_DENIED),
                ("escape", ErrorCode::PERMISSION_DENIED),
                ("outdir/secret", ErrorCode::PERMISSION_DENIED),
                ("sub/up/secret", ErrorCode::PERMISSION_DENIED),
                ("missing.bin", ErrorCode::NOT_FOUND),
                ("sub/missing/x", ErrorCode::NOT_FOUND),
                ("sub/data.bin/x", ErrorCode::NOT_FOUND),
                ("sub", ErrorCode::BAD_PARADATA),
                ("", ErrorCode::BAD_PARADATA),
                ("a\0b", ErrorCode::BAD_PARADATA),
            ] {
                assert_eq!(code(&root, p), c, "{p} ({resolution:?})");
            }
            // A symlink that stays inside: followed by openat2, refused by the walk.
            match resolution {
                Resolution::Beneath => assert_eq!(read(&root, "alias"), b"inside"),
                Resolution::Walk => assert_eq!(code(&root, "alias"), ErrorCode::PERMISSION_DENIED),
            }
        }
        let strict = Root::open(&path, false).unwrap();
        assert_eq!(code(&strict, "alias"), ErrorCode::PERMISSION_DENIED);
        assert_eq!(read(&strict, "sub/data.bin"), b"inside");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (path, base) = tree();
        let fifo = path.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");
        for resolution in [Resolution::Beneath, Resolution::Walk] {
            let root = Root::open(&path, true).unwrap().with_resolution(resolution);
            assert_eq!(code(&root, "fifo"), ErrorCode::BAD_PARADATA);
        }
        std::fs::remove_dir_all(base).unwrap();
    }
}
