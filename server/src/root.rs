//! Confinement of `file:` paths to the server's root: absolute paths, `..` and symlinks that
//! lead out of the root are `permission_denied`; a missing file is `not_found`.

use std::path::{Component, Path, PathBuf};

use nexus_protocol::ErrorCode;

use crate::paradata::SourceError;

/// Resolves `relative` inside `root` (which must be canonical). Returns the canonical path of
/// an existing regular file that lies under `root` after every symlink is followed.
pub fn resolve(root: &Path, relative: &str) -> Result<PathBuf, SourceError> {
    let denied =
        |why: &str| SourceError::new(ErrorCode::PERMISSION_DENIED, format!("{relative:?}: {why}"));
    if relative.is_empty() {
        return Err(SourceError::bad("file: needs a path"));
    }
    let path = Path::new(relative);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(denied("`..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(denied(
                    "absolute paths are not allowed; paths are relative to the server root",
                ))
            }
        }
    }
    let joined = root.join(path);
    let canonical = match joined.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::new(
                ErrorCode::NOT_FOUND,
                format!("{relative:?} does not exist"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(denied("not readable"))
        }
        Err(e) => {
            return Err(SourceError::new(
                ErrorCode::SOURCE_FAILED,
                format!("{relative:?}: {e}"),
            ))
        }
    };
    if !canonical.starts_with(root) {
        return Err(denied("it leads out of the server root through a symlink"));
    }
    if !canonical.is_file() {
        return Err(SourceError::bad(format!(
            "{relative:?} is not a regular file"
        )));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("nexus-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/data.bin"), b"inside").unwrap();
        std::fs::write(base.join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/data.bin"), root.join("alias")).unwrap();
        (root.canonicalize().unwrap(), base)
    }

    #[test]
    fn confinement() {
        let (root, base) = tree();
        assert_eq!(
            resolve(&root, "sub/data.bin").unwrap(),
            root.join("sub/data.bin")
        );
        assert_eq!(
            resolve(&root, "./alias").unwrap(),
            root.join("sub/data.bin")
        );
        for (path, code) in [
            ("../secret", ErrorCode::PERMISSION_DENIED),
            ("sub/../../secret", ErrorCode::PERMISSION_DENIED),
            ("/etc/passwd", ErrorCode::PERMISSION_DENIED),
            ("escape", ErrorCode::PERMISSION_DENIED),
            ("missing.bin", ErrorCode::NOT_FOUND),
            ("sub", ErrorCode::BAD_PARADATA),
            ("", ErrorCode::BAD_PARADATA),
        ] {
            assert_eq!(resolve(&root, path).unwrap_err().code, code, "{path}");
        }
        std::fs::remove_dir_all(base).unwrap();
    }
}
