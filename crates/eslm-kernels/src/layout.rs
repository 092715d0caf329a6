//! Logits layout: `rows` rows of `vocab` logits, each row starting `stride ≥ vocab` elements after the previous
//! one. Padded columns `vocab..stride` (e.g. V = 50257 stored in a stride of 50304) are never read.

use crate::error::{KernelError, Result};

/// A logits element the kernels accept: `f32` or `half::bf16`. Arithmetic is always in f32.
pub trait LogitElem: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// Converts to f32 (exact for both types).
    fn to_f32(self) -> f32;
}

impl LogitElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl LogitElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// A checked, read-only view of a `[rows, vocab]` logits matrix with row stride `stride`.
#[derive(Debug, Clone, Copy)]
pub struct LogitsView<'a, T> {
    data: &'a [T],
    rows: usize,
    vocab: usize,
    stride: usize,
}

impl<'a, T: LogitElem> LogitsView<'a, T> {
    /// Wraps `data` as `rows` rows of `vocab` logits spaced `stride` apart.
    ///
    /// Requires `vocab ≥ 1`, `stride ≥ vocab` and `data.len() ≥ (rows − 1)·stride + vocab` (the last row's padding
    /// may be absent). `rows = 0` is allowed here; kernels that need rows report it themselves.
    pub fn new(data: &'a [T], rows: usize, vocab: usize, stride: usize) -> Result<Self> {
        check_logits_shape(data.len(), rows, vocab, stride)?;
        Ok(Self {
            data,
            rows,
            vocab,
            stride,
        })
    }

    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of real columns (vocabulary size).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Distance in elements between the starts of consecutive rows.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The `vocab` real logits of row `i` (padding excluded). Panics if `i ≥ rows` (an internal invariant).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        let start = i * self.stride;
        &self.data[start..start + self.vocab]
    }

    /// The underlying storage.
    pub fn data(&self) -> &'a [T] {
        self.data
    }
}

/// Elements a `[rows, vocab]` matrix of row stride `stride` needs (the last row's padding may be absent).
pub(crate) fn logits_len(rows: usize, vocab: usize, stride: usize) -> Result<usize> {
    if vocab == 0 || stride < vocab {
        return Err(KernelError::Shape {
            what: "logits",
            expected: "1 <= vocab <= stride".into(),
            got: format!("vocab {vocab}, stride {stride}"),
        });
    }
    if rows == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(vocab))
        .ok_or_else(|| KernelError::Shape {
            what: "logits",
            expected: "a size that fits in memory".into(),
            got: format!("{rows} rows of stride {stride}"),
        })
}

/// The one logits shape check, shared by the CPU view and the CUDA view: `1 ≤ vocab ≤ stride` and a buffer of
/// `len` elements holding `rows` rows.
pub(crate) fn check_logits_shape(
    len: usize,
    rows: usize,
    vocab: usize,
    stride: usize,
) -> Result<()> {
    let needed = logits_len(rows, vocab, stride)?;
    if len < needed {
        return Err(KernelError::Shape {
            what: "logits",
            expected: format!(
                "at least {needed} elements ({rows} rows, vocab {vocab}, stride {stride})"
            ),
            got: format!("{len} elements"),
        });
    }
    Ok(())
}
