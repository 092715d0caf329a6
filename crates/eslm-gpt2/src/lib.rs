//! eslm-gpt2 (in progress)
