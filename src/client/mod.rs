//! (client: not yet built)
