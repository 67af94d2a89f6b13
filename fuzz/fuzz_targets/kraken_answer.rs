//! libFuzzer target: `exwatch::fuzz::kraken_answer` on every input (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exwatch::fuzz::kraken_answer(data));
