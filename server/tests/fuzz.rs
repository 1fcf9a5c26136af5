//! The paradata fuzz entry point, driven by arbitrary and by paradata-shaped strings and by
//! the committed seed corpus. `cargo fuzz` runs it for longer (see server/fuzz/README.md).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use nexus_server::fuzz;
use nexus_testkit::TempDir;
use proptest::prelude::*;

fn root() -> &'static PathBuf {
    static ROOT: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    let (_, root) = ROOT.get_or_init(|| {
        let dir = TempDir::new("fuzz-root");
        let root = fuzz::make_root(dir.path()).unwrap();
        (dir, root)
    });
    root
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzz::paradata(&data, root());
    }

    #[test]
    fn paradata_shaped_strings_never_escape_the_root(
        text in "(file|synthetic|s3|)(:)?(\\.\\./|\\./|/|sub/|escape|data\\.bin|outside|[a-z]{0,3}){0,5}(\\?((offset|length|seed|x)(=[0-9KMGTiB]{0,6})?&?){0,3})?"
    ) {
        fuzz::paradata(text.as_bytes(), root());
    }
}

#[test]
fn seed_corpus_replays_cleanly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        fuzz::paradata(&std::fs::read(entry.unwrap().path()).unwrap(), root());
        count += 1;
    }
    assert!(count >= 10, "only {count} seeds");
}
