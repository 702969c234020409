//! `cargo +nightly fuzz run ingest_body`: see fuzz/README.md.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ingest_body(data));
