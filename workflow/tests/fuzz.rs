//! The HTTP sensor's fuzz entry point, driven by arbitrary and by request-shaped inputs and by
//! the committed seed corpus. `cargo fuzz` runs it for longer (see workflow/fuzz/README.md).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use nexus_workflow::fuzz;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzz::http_door(&data);
    }

    #[test]
    fn request_shaped_inputs_keep_their_promises(
        query in "((rule|state|limit|x)(=(success|failed|skipped|queued|0|1|10000|10001|-1|r|))?&?){0,4}",
        key in "[ -~]{0,3}|[a-z?&]{0,210}",
        body in r#"\{("file": ("[a-z./A-Z]{0,8}"|3|null)(, "size": -?[0-9]{1,3})?(, "kind": "[a-c]")?(, "meta": \{"n": ("x"|1)\})?(, "other": 1)?)?\}"#,
    ) {
        let mut data = query.into_bytes();
        data.push(0);
        data.extend_from_slice(key.as_bytes());
        data.push(0);
        data.extend_from_slice(body.as_bytes());
        fuzz::http_door(&data);
    }
}

#[test]
fn seed_corpus_replays_cleanly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        fuzz::http_door(&std::fs::read(entry.unwrap().path()).unwrap());
        count += 1;
    }
    assert!(count >= 10, "only {count} seeds");
}
