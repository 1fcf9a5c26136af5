#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte picks whether the fuzzer starts after a valid handshake.
    if let Some((first, rest)) = data.split_first() {
        nexus_protocol::fuzz::server(rest, first & 1 == 1);
    }
});
