//! eslm-train (in progress)
