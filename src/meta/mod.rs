//! (meta: not yet built)
