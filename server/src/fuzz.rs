//! Fuzz entry point for paradata, the one string from the network that the server's sources
//! interpret. Driven by a property test and a seed corpus in CI (`tests/fuzz.rs`) and by
//! cargo-fuzz for long runs (`server/fuzz`).

use std::path::{Path, PathBuf};

use nexus_protocol::ErrorCode;

use crate::paradata::{parse_size, Paradata};
use crate::root::{Resolution, Root};

const SCHEMES: &[&str] = &["file", "synthetic"];

/// A root for [`paradata`]: `root/` with a file, a directory and a symlink out of the root
/// (to `outside`, beside it), under `base`. Idempotent.
pub fn make_root(base: &Path) -> std::io::Result<PathBuf> {
    let root = base.join("root");
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("sub/data.bin"), b"inside")?;
    std::fs::write(base.join("outside"), b"outside")?;
    let escape = root.join("escape");
    if escape.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(base.join("outside"), escape)?;
    }
    root.canonicalize()
}

/// Parses `data` as paradata the way the built-in sources do, against the canonical `root`
/// of [`make_root`], and opens its body as a path both ways a root resolves (`openat2`, and
/// the per-component walk). It must not panic, every refusal must carry a code a source may
/// send, and a path that opens must be the one file inside the root, never the one outside.
pub fn paradata(data: &[u8], root: &Path) {
    // The protocol hands sources valid UTF-8 only.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = match Paradata::parse(text, SCHEMES) {
        Ok(parsed) => parsed,
        Err(e) => {
            assert!(
                e.code == ErrorCode::UNKNOWN_SOURCE || e.code == ErrorCode::BAD_PARADATA,
                "{e}"
            );
            return;
        }
    };
    let allowed = ["offset", "length", "seed"];
    for key in allowed {
        if let Err(e) = parsed.size_param(key, &allowed) {
            assert_eq!(e.code, ErrorCode::BAD_PARADATA, "{e}");
        }
    }
    if let Err(e) = parse_size(parsed.body) {
        assert_eq!(e.code, ErrorCode::BAD_PARADATA, "{e}");
    }
    for resolution in [Resolution::Beneath, Resolution::Walk] {
        let Ok(root) = Root::open(root, true) else {
            return;
        };
        match root.with_resolution(resolution).open_file(parsed.body) {
            Ok(mut file) => {
                let mut content = Vec::new();
                let read = std::io::Read::read_to_end(&mut file, &mut content);
                assert!(read.is_ok(), "{text:?}: {read:?}");
                assert_eq!(content, b"inside", "{text:?} opened something else");
            }
            Err(e) => assert!(
                [
                    ErrorCode::BAD_PARADATA,
                    ErrorCode::NOT_FOUND,
                    ErrorCode::PERMISSION_DENIED,
                    ErrorCode::SOURCE_FAILED,
                ]
                .contains(&e.code),
                "{e}"
            ),
        }
    }
}
