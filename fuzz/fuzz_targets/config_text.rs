//! libFuzzer target: `exwatch::fuzz::config_text` on every input (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exwatch::fuzz::config_text(data));
