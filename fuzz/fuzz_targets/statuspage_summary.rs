//! libFuzzer target: `exwatch::fuzz::statuspage_summary` on every input (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exwatch::fuzz::statuspage_summary(data));
