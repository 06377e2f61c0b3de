//! (session: not yet built)
