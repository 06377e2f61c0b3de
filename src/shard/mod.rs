//! (shard: not yet built)
