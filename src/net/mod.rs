//! (net: not yet built)
