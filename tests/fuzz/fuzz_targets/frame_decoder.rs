//! Arbitrary bytes, limit and chunking through the wire deframer and
//! decoder; see `switchboard_fuzz::frames` for the layout and invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard_fuzz::frames::check(data));
