//! Arbitrary reads, half-closes and lookup ends through the sans-IO
//! handshake; see `switchboard_fuzz::handshake` for the layout and
//! invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| switchboard_fuzz::handshake::check(data));
