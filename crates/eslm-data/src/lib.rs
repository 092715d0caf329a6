//! eslm-data (in progress)
