//! A minimal binary file of f32 values for trainer-side state (the AdamW moments, the bigram test double's
//! weights): an 8-byte magic, a little-endian u64 count, the values little-endian, then a little-endian u64
//! checksum of the value bytes. Two versions are read:
//!
//! - `b"ESLMF32\x01"` (written by this build): CRC-32 (IEEE), zero-extended to 64 bits;
//! - `b"ESLMF32\0"` (eslm 0.1): FNV-1a 64, byte by byte (≈ 1 GB/s; CRC-32 runs at memory speed).
//!
//! Both directions stream in chunks of `IO_CHUNK` bytes (4 MiB): no second copy of the values in memory (a 1.5B
//! model's moments are 6 GB each). Writes go through [`write_atomic_with`]; a truncated or corrupt file is an
//! error naming it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use crate::checkpoint::{write_atomic_with, IO_CHUNK};
use crate::error::{Result, TrainError};

/// Magic of eslm 0.1's files (FNV-1a 64 checksum).
const MAGIC_FNV: &[u8; 8] = b"ESLMF32\0";
/// Magic of the files this build writes (CRC-32 checksum).
const MAGIC_CRC: &[u8; 8] = b"ESLMF32\x01";

/// The checksum of a file's value bytes, fed chunk by chunk.
enum Checksum {
    Fnv1a(u64),
    Crc32(crc32fast::Hasher),
}

impl Checksum {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Checksum::Fnv1a(h) => *h = fnv1a_update(*h, bytes),
            Checksum::Crc32(c) => c.update(bytes),
        }
    }
    fn finish(self) -> u64 {
        match self {
            Checksum::Fnv1a(h) => h,
            Checksum::Crc32(c) => c.finalize() as u64,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 continued from state `h` over `bytes`.
fn fnv1a_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes `values` to `path` atomically (CRC-32 format).
pub fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    write_atomic_with(path, |w| {
        w.write_all(MAGIC_CRC)?;
        w.write_all(&(values.len() as u64).to_le_bytes())?;
        let mut crc = crc32fast::Hasher::new();
        let mut le = Vec::new();
        for chunk in values.chunks(IO_CHUNK / 4) {
            let bytes = le_bytes(chunk, &mut le);
            crc.update(bytes);
            w.write_all(bytes)?;
        }
        w.write_all(&(crc.finalize() as u64).to_le_bytes())
    })
}

/// The little-endian bytes of `values`: the values' own memory on a little-endian machine, else converted into
/// `scratch`.
fn le_bytes<'a>(values: &'a [f32], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(values)
    } else {
        scratch.clear();
        scratch.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        scratch
    }
}

/// Whether `path` is an f32 state file in eslm 0.1's format (its magic; false for a missing or short file).
pub fn is_eslm_0_1_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path).is_ok_and(|mut f| f.read_exact(&mut magic).is_ok()) && &magic == MAGIC_FNV
}

/// Reads a file written by [`write_f32`] (either version).
pub fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bad = |m: &str| TrainError::Checkpoint(format!("{}: {m}", path.display()));
    let io = |e| TrainError::io(path, e);
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len < 24 {
        return Err(bad("not an eslm f32 file (too short)"));
    }
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(io)?;
    let mut sum = match &head[..8] {
        m if m == MAGIC_CRC => Checksum::Crc32(crc32fast::Hasher::new()),
        m if m == MAGIC_FNV => Checksum::Fnv1a(FNV_OFFSET),
        _ => return Err(bad("not an eslm f32 file (bad magic)")),
    };
    let n = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let expected = n
        .checked_mul(4)
        .and_then(|x| x.checked_add(24))
        .filter(|&x| usize::try_from(x).is_ok())
        .ok_or_else(|| bad("absurd length"))?;
    if len != expected {
        return Err(bad(&format!("expected {expected} bytes, found {len}")));
    }
    let mut values = vec![0f32; n as usize];
    for chunk in bytemuck::cast_slice_mut::<f32, u8>(&mut values).chunks_mut(IO_CHUNK) {
        f.read_exact(chunk).map_err(io)?;
        sum.update(chunk);
    }
    let mut tail = [0u8; 8];
    f.read_exact(&mut tail).map_err(io)?;
    if sum.finish() != u64::from_le_bytes(tail) {
        return Err(bad("checksum mismatch (corrupt file)"));
    }
    if cfg!(target_endian = "big") {
        values
            .iter_mut()
            .for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect()
    }

    #[test]
    fn round_trips_ragged_lengths_bitwise() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, 7, IO_CHUNK / 4, IO_CHUNK / 4 + 3] {
            let path = dir.path().join(format!("v{n}.bin"));
            let mut x = values(n);
            if n > 2 {
                x[1] = f32::NAN;
                x[2] = f32::NEG_INFINITY;
            }
            write_f32(&path, &x).unwrap();
            let y = read_f32(&path).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&y), "n {n}");
            assert_eq!(&std::fs::read(&path).unwrap()[..8], MAGIC_CRC);
        }
    }

    #[test]
    fn eslm_0_1_files_read_with_their_fnv_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let x = values(1000);
        let body: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut file = MAGIC_FNV.to_vec();
        file.extend_from_slice(&(x.len() as u64).to_le_bytes());
        file.extend_from_slice(&body);
        file.extend_from_slice(&fnv1a_update(FNV_OFFSET, &body).to_le_bytes());
        let path = dir.path().join("old.bin");
        std::fs::write(&path, &file).unwrap();
        assert_eq!(read_f32(&path).unwrap(), x);
        // A flipped value byte is caught by the FNV checksum too.
        file[100] ^= 1;
        std::fs::write(&path, &file).unwrap();
        let e = read_f32(&path).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn corruption_truncation_and_bad_magic_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        write_f32(&path, &values(5000)).unwrap();
        let good = std::fs::read(&path).unwrap();
        let n = good.len();
        let damaged = |at: usize| {
            let mut b = good.clone();
            b[at] ^= 0x10;
            b
        };
        let cases = [
            ("checksum mismatch", damaged(3000)),
            ("checksum mismatch", damaged(n - 1)),
            ("expected", good[..n - 4].to_vec()),
            ("bad magic", damaged(0)),
        ];
        for (want, b) in cases {
            std::fs::write(&path, &b).unwrap();
            let e = read_f32(&path).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("m.bin"), "{want}: {e}");
        }
        std::fs::write(&path, &good[..10]).unwrap();
        assert!(read_f32(&path)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        write_f32(&path, &values(10)).unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(read_f32(&path).unwrap(), values(10));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["m.bin"]);
    }
}
