//! libFuzzer target: `exwatch::fuzz::websocket_frame` on every input (see fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exwatch::fuzz::websocket_frame(data));
