//! `cargo +nightly fuzz run amqp_headers`: see fuzz/README.md.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::amqp_headers(data));
