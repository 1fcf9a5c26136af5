#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let root = ROOT.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("nexus-fuzz-{}", std::process::id()));
        nexus_server::fuzz::make_root(&base).expect("fuzz root")
    });
    nexus_server::fuzz::paradata(data, root);
});
