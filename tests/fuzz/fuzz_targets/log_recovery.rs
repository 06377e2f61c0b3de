//! Arbitrary segment bytes through the store's recovery and `inspect`; see
//! `switchboard_fuzz::recovery` for the layouts and invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard_fuzz::recovery::check(data));
