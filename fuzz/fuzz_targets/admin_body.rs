//! libFuzzer target: `exwatch::fuzz::admin_body` on every input (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exwatch::fuzz::admin_body(data));
