//! llm.c model checkpoints (`gpt2_124M.bin`, written by llm.c's `train_gpt2.py` / read by `train_gpt2.c`).
//!
//! Layout: a header of 256 little-endian `i32`:
//! `[0] = 20240326` (magic), `[1] = version` (3: fp32 parameters, 5: bf16), `[2] = maxT`, `[3] = V`, `[4] = L`,
//! `[5] = H`, `[6] = C`, `[7] = Vp`, the rest zero; then every parameter, little-endian, in llm.c's order — which is
//! exactly our [`ParamSet`] storage order (`wte [Vp, C]` with padded rows, `wpe`, `ln1w`, …, `lnfb`). So a file
//! is `1024 + 4·P` bytes (version 3) with `P = Vp·C + maxT·C + L·(12·C² + 13·C) + 2·C`.
//!
//! Writing produces version 3 (fp32). Reading accepts versions 3 and 5 (bf16 converted to f32), checks the header
//! and the exact file length before allocating, and streams the parameters straight into the [`ParamSet`].

use std::io::{Read, Write};
use std::path::Path;

use super::{io_err, CheckpointError, Result};
use crate::config::GptConfig;
use crate::params::ParamSet;

/// The header magic number.
pub const MAGIC: i32 = 20240326;
/// Version of an fp32 parameter file.
pub const VERSION_FP32: i32 = 3;
/// Version of a bf16 parameter file (llm.c's CUDA trainer).
pub const VERSION_BF16: i32 = 5;
/// Header length in `i32` words.
pub const HEADER_WORDS: usize = 256;
/// Header length in bytes.
pub const HEADER_BYTES: usize = HEADER_WORDS * 4;

/// The header for `cfg` (version 3). Fails if a dimension does not fit in `i32`.
pub fn header(cfg: &GptConfig) -> Result<[i32; HEADER_WORDS]> {
    let word = |x: usize, what: &str| {
        i32::try_from(x).map_err(|_| {
            CheckpointError::Config(format!("{what} = {x} does not fit the llm.c header"))
        })
    };
    let mut h = [0i32; HEADER_WORDS];
    h[0] = MAGIC;
    h[1] = VERSION_FP32;
    h[2] = word(cfg.max_seq_len, "max_seq_len")?;
    h[3] = word(cfg.vocab_size, "vocab_size")?;
    h[4] = word(cfg.n_layer, "n_layer")?;
    h[5] = word(cfg.n_head, "n_head")?;
    h[6] = word(cfg.n_embd, "n_embd")?;
    h[7] = word(cfg.padded_vocab_size, "padded_vocab_size")?;
    Ok(h)
}

/// Parses a header: magic, version, and a valid config. Returns `(config, version)`.
pub fn parse_header(h: &[i32; HEADER_WORDS]) -> Result<(GptConfig, i32)> {
    if h[0] != MAGIC {
        return Err(CheckpointError::BadMagic {
            got: h[0],
            expected: MAGIC,
        });
    }
    if h[1] != VERSION_FP32 && h[1] != VERSION_BF16 {
        return Err(CheckpointError::UnsupportedVersion(h[1]));
    }
    let dim = |i: usize, what: &str| {
        usize::try_from(h[i])
            .ok()
            .filter(|&x| x > 0)
            .ok_or_else(|| {
                CheckpointError::Config(format!("llm.c header: {what} = {} must be positive", h[i]))
            })
    };
    let cfg = GptConfig {
        max_seq_len: dim(2, "maxT")?,
        vocab_size: dim(3, "V")?,
        n_layer: dim(4, "L")?,
        n_head: dim(5, "NH")?,
        n_embd: dim(6, "C")?,
        padded_vocab_size: dim(7, "Vp")?,
    };
    cfg.validate()?;
    Ok((cfg, h[1]))
}

/// Exact parameter count for `cfg`, with overflow checks (a corrupt header must not wrap around).
fn checked_num_params(cfg: &GptConfig) -> Option<u64> {
    let (l, c, vp, t) = (
        cfg.n_layer as u64,
        cfg.n_embd as u64,
        cfg.padded_vocab_size as u64,
        cfg.max_seq_len as u64,
    );
    let per_layer = c
        .checked_mul(c)?
        .checked_mul(12)?
        .checked_add(c.checked_mul(13)?)?;
    vp.checked_mul(c)?
        .checked_add(t.checked_mul(c)?)?
        .checked_add(l.checked_mul(per_layer)?)?
        .checked_add(c.checked_mul(2)?)
}

/// Writes `params` as an llm.c version-3 (fp32) checkpoint.
pub fn write<W: Write>(params: &ParamSet, mut w: W) -> std::io::Result<()> {
    let h = header(params.config())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let hb: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.write_all(&hb)?;
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in params.as_slice().chunks(1 << 14) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        w.write_all(&buf)?;
    }
    w.flush()
}

/// Writes `params` to `path` as an llm.c version-3 (fp32) checkpoint.
pub fn save(params: &ParamSet, path: &Path) -> Result<()> {
    header(params.config())?;
    let f = std::fs::File::create(path).map_err(io_err(path))?;
    write(params, std::io::BufWriter::new(f)).map_err(io_err(path))
}

/// Reads an llm.c checkpoint from `r`. `len`, when known (a file's size), is checked against the header before
/// the parameters are allocated; either way a short stream gives [`CheckpointError::Truncated`] and extra bytes
/// [`CheckpointError::TrailingData`].
pub fn read<R: Read>(mut r: R, len: Option<u64>) -> Result<ParamSet> {
    let eof_or = |got: u64, expected: u64| {
        move |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CheckpointError::Truncated { expected, got }
            } else {
                CheckpointError::Io {
                    path: "<stream>".into(),
                    source: e,
                }
            }
        }
    };
    let mut hb = [0u8; HEADER_BYTES];
    r.read_exact(&mut hb)
        .map_err(eof_or(len.unwrap_or(0), HEADER_BYTES as u64))?;
    let mut h = [0i32; HEADER_WORDS];
    for (w, b) in h.iter_mut().zip(hb.chunks_exact(4)) {
        *w = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let (cfg, version) = parse_header(&h)?;
    let Some(len) = len else {
        // Unknown length: read what the stream holds first (bounded by the data, not by the header's claims),
        // then check it against the header like a file.
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).map_err(|e| CheckpointError::Io {
            path: "<stream>".into(),
            source: e,
        })?;
        let total = HEADER_BYTES as u64 + rest.len() as u64;
        return read((&hb[..]).chain(rest.as_slice()), Some(total));
    };
    let elem = if version == VERSION_FP32 { 4u64 } else { 2u64 };
    let expected = checked_num_params(&cfg)
        .and_then(|p| p.checked_mul(elem))
        .and_then(|b| b.checked_add(HEADER_BYTES as u64))
        .ok_or_else(|| CheckpointError::Config("llm.c header: parameter count overflows".into()))?;
    if len < expected {
        return Err(CheckpointError::Truncated { expected, got: len });
    }
    if len > expected {
        return Err(CheckpointError::TrailingData { expected });
    }
    if usize::try_from(expected).is_err() {
        return Err(CheckpointError::Config(
            "llm.c header: model too large for this platform".into(),
        ));
    }
    let mut params = ParamSet::zeros(&cfg);
    let mut buf = vec![0u8; (1 << 14) * elem as usize];
    let mut done: u64 = HEADER_BYTES as u64;
    for chunk in params.as_mut_slice().chunks_mut(1 << 14) {
        let bytes = &mut buf[..chunk.len() * elem as usize];
        r.read_exact(bytes).map_err(eof_or(done, expected))?;
        done += bytes.len() as u64;
        if elem == 4 {
            for (x, b) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            for (x, b) in chunk.iter_mut().zip(bytes.chunks_exact(2)) {
                *x = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => Ok(params),
        Ok(_) => Err(CheckpointError::TrailingData { expected }),
        Err(e) => Err(CheckpointError::Io {
            path: "<stream>".into(),
            source: e,
        }),
    }
}

/// Reads an llm.c checkpoint file (version 3 fp32 or version 5 bf16).
pub fn load(path: &Path) -> Result<ParamSet> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    read(std::io::BufReader::new(f), Some(len)).map_err(|e| match e {
        CheckpointError::Io { source, .. } => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for cfg in [GptConfig::tiny(), GptConfig::gpt2_124m()] {
            let h = header(&cfg).ok();
            let parsed = h.as_ref().map(parse_header).and_then(|r| r.ok());
            assert_eq!(parsed, Some((cfg, VERSION_FP32)));
        }
    }

    #[test]
    fn num_params_matches_layout() {
        for cfg in [
            GptConfig::tiny(),
            GptConfig::gpt2_124m(),
            GptConfig::config_t(),
        ] {
            assert_eq!(checked_num_params(&cfg), Some(cfg.num_params() as u64));
        }
        // llm.c prints 124475904 for GPT-2 small (padded wte included).
        assert_eq!(
            checked_num_params(&GptConfig::gpt2_124m()),
            Some(124_475_904)
        );
    }
}
