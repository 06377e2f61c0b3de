//! (metrics: not yet built)
