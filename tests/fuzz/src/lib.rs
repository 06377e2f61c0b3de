//! Checks shared by the fuzz targets and the seed generator.
//!
//! Each target is a thin `fuzz_target!` around one function here
//! (`frames::check`, `recovery::check`, `handshake::check`), so the
//! invariants are written once and a crash input can be replayed from a
//! plain test or a debugger. The input layouts are documented in those
//! modules and in `README.md`; the seed generator (`src/bin/make_seeds.rs`)
//! writes inputs in the same layouts.

pub mod frames;
pub mod handshake;
pub mod recovery;
