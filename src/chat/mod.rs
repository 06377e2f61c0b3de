//! (chat: not yet built)
