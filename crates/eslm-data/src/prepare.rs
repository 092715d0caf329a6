//! Text → train/val shards (in progress).
