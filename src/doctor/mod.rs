//! (doctor: not yet built)
