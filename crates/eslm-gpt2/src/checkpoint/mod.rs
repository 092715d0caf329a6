//! Checkpoints: the model's flat parameter vector ([`ParamSet`](crate::ParamSet), llm.c's layout) to and from
//! two on-disk formats.
//!
//! - [`hf`]: safetensors with HuggingFace `GPT2LMHeadModel` names and layouts (`Conv1D` weights stored
//!   `[in, out]`, i.e. transposed with respect to our `[out, in]`), plus an HF-style `config.json`, so a directory
//!   written here loads with `GPT2LMHeadModel.from_pretrained(dir)` and an HF GPT-2 checkpoint loads here.
//! - [`llmc`]: llm.c's fp32 checkpoint (`gpt2_124M.bin`): a header of 256 little-endian `i32` (magic 20240326,
//!   version 3, maxT, V, L, H, C, Vp) followed by every parameter in exactly our storage order.
//!
//! Every malformed input (wrong names, shapes, dtypes, truncated or corrupt files, inconsistent configs) is
//! reported as a [`CheckpointError`]; nothing here panics on file contents.

pub mod hf;
pub mod llmc;

use std::path::{Path, PathBuf};

use crate::error::Gpt2Error;

/// Errors from reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Opening, reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file (bad header, offsets, or truncated data).
    #[error(
        "invalid safetensors data: {0}; HINT: the file may be truncated or not a safetensors file"
    )]
    SafeTensors(String),
    /// A tensor the model needs is absent.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// HF name of the missing tensor.
        name: String,
    },
    /// A tensor whose name is not part of a GPT-2 checkpoint.
    #[error("unexpected tensor `{name}`; HINT: only GPT2LMHeadModel / GPT2Model checkpoints are supported")]
    UnexpectedTensor {
        /// The unknown name.
        name: String,
    },
    /// A tensor with the wrong shape for the config.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Name of the tensor.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A tensor with a dtype other than f32, bf16 or f16.
    #[error(
        "tensor `{name}` has unsupported dtype {dtype}; HINT: f32, bf16 and f16 are supported"
    )]
    UnsupportedDtype {
        /// Name of the tensor.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// `lm_head.weight` is present but differs from the token embedding: the model is not tied.
    #[error(
        "`lm_head.weight` differs from `transformer.wte.weight`; only tied LM heads are supported"
    )]
    UntiedLmHead,
    /// The model configuration (config.json, llm.c header, or the shapes in the file) is missing or inconsistent.
    #[error("invalid checkpoint config: {0}")]
    Config(String),
    /// The llm.c header does not start with the magic number 20240326.
    #[error("bad llm.c checkpoint magic {got} (expected {expected}); HINT: is this an llm.c model file?")]
    BadMagic {
        /// The first header word found.
        got: i32,
        /// The expected magic.
        expected: i32,
    },
    /// The llm.c checkpoint version is not supported (3 = fp32, 5 = bf16 are).
    #[error("unsupported llm.c checkpoint version {0} (supported: 3 = fp32, 5 = bf16)")]
    UnsupportedVersion(i32),
    /// The file is shorter than the header says.
    #[error("checkpoint truncated: expected {expected} bytes, found {got}")]
    Truncated {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// The file is longer than the header says.
    #[error("checkpoint has trailing data: expected {expected} bytes, found more")]
    TrailingData {
        /// Bytes the header implies.
        expected: u64,
    },
    /// The model rejected the config or parameters.
    #[error(transparent)]
    Model(#[from] Gpt2Error),
}

/// `Result` with [`CheckpointError`].
pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Wraps an I/O error with the path it concerns.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Side of the square tiles [`transpose`] moves: 32 × 32 f32 = 4 KiB read and written per tile, in L1.
const TILE: usize = 32;

/// Converts a row-major `[rows, cols]` matrix to `[cols, rows]`, tile by tile (the element-wise loop strides
/// through `dst` a whole column apart on every write; tiles keep both sides in cache: 124M's matrices ≈ 4× faster).
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), rows * cols, "transpose source");
    assert_eq!(dst.len(), rows * cols, "transpose destination");
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &src[r * cols..(r + 1) * cols];
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = row[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_transpose_matches_the_definition_on_ragged_shapes() {
        for (rows, cols) in [
            (1, 1),
            (1, 70),
            (70, 1),
            (33, 65),
            (64, 32),
            (TILE + 1, 3 * TILE - 1),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "[{rows}, {cols}] at ({r}, {c})"
                    );
                }
            }
        }
    }
}
