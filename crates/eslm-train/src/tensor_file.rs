//! A minimal binary file of f32 values for trainer-side state (optimizer moments of the test double, etc.):
//! magic `b"ESLMF32\0"`, a little-endian u64 count, the values little-endian, then a u64 FNV-1a checksum of the
//! value bytes. Written through [`crate::checkpoint::write_atomic`]; a truncated or corrupt file is an error.

use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};

const MAGIC: &[u8; 8] = b"ESLMF32\0";

/// FNV-1a 64-bit hash of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes `values` to `path` atomically.
pub fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + 4 * values.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
    let start = bytes.len();
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let sum = fnv1a(&bytes[start..]);
    bytes.extend_from_slice(&sum.to_le_bytes());
    write_atomic(path, &bytes)
}

/// Reads a file written by [`write_f32`].
pub fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bad = |m: &str| TrainError::Checkpoint(format!("{}: {m}", path.display()));
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return Err(bad("not an eslm f32 file (bad magic or too short)"));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[8..16]);
    let n = u64::from_le_bytes(n8) as usize;
    let expected = n
        .checked_mul(4)
        .and_then(|x| x.checked_add(24))
        .ok_or_else(|| bad("absurd length"))?;
    if bytes.len() != expected {
        return Err(bad(&format!(
            "expected {expected} bytes, found {}",
            bytes.len()
        )));
    }
    let body = &bytes[16..16 + 4 * n];
    n8.copy_from_slice(&bytes[16 + 4 * n..]);
    if fnv1a(body) != u64::from_le_bytes(n8) {
        return Err(bad("checksum mismatch (corrupt file)"));
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
