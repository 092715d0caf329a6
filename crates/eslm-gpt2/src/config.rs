//! GPT-2 model configuration: depth `L`, heads `H`, width `C`, vocabulary `V` (padded to `Vp` for the kernels and
//! the LM-head GEMM), maximum sequence length. Presets for the four GPT-2 sizes and small configs for tests and
//! CPU experiments. Parameter count (tied embeddings, padded rows counted as llm.c does):
//! `Vp·C + maxT·C + L·(12·C² + 13·C) + 2·C`.

use crate::error::{Gpt2Error, Result};

/// Hyper-parameters of a GPT-2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GptConfig {
    /// Number of transformer blocks `L`.
    pub n_layer: usize,
    /// Number of attention heads `H` (must divide `n_embd`).
    pub n_head: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Real vocabulary size `V` (50257 for GPT-2).
    pub vocab_size: usize,
    /// Padded vocabulary `Vp ≥ V` (50304 for GPT-2): the row stride of the logits and the number of rows of `wte`.
    /// Rows `V..Vp` of `wte` are zero and never affect results.
    pub padded_vocab_size: usize,
    /// Maximum sequence length `maxT` (rows of `wpe`).
    pub max_seq_len: usize,
}

/// The GPT-2 vocabulary size.
pub const GPT2_VOCAB: usize = 50257;
/// The GPT-2 vocabulary padded to a multiple of 128 (llm.c's choice).
pub const GPT2_PADDED_VOCAB: usize = 50304;

/// Rounds `v` up to a multiple of `multiple` (≥ 1).
pub fn pad_vocab(v: usize, multiple: usize) -> usize {
    let m = multiple.max(1);
    v.div_ceil(m) * m
}

impl GptConfig {
    /// A config with vocabulary padded to a multiple of 128, validated.
    pub fn new(
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        vocab_size: usize,
        max_seq_len: usize,
    ) -> Result<Self> {
        let c = Self {
            n_layer,
            n_head,
            n_embd,
            vocab_size,
            padded_vocab_size: pad_vocab(vocab_size, 128),
            max_seq_len,
        };
        c.validate()?;
        Ok(c)
    }

    fn gpt2(n_layer: usize, n_head: usize, n_embd: usize) -> Self {
        Self {
            n_layer,
            n_head,
            n_embd,
            vocab_size: GPT2_VOCAB,
            padded_vocab_size: GPT2_PADDED_VOCAB,
            max_seq_len: 1024,
        }
    }

    /// GPT-2 small (124M): L=12, H=12, C=768.
    pub fn gpt2_124m() -> Self {
        Self::gpt2(12, 12, 768)
    }

    /// GPT-2 medium (350M): L=24, H=16, C=1024.
    pub fn gpt2_350m() -> Self {
        Self::gpt2(24, 16, 1024)
    }

    /// GPT-2 large (774M): L=36, H=20, C=1280.
    pub fn gpt2_774m() -> Self {
        Self::gpt2(36, 20, 1280)
    }

    /// GPT-2 XL (1558M): L=48, H=25, C=1600.
    pub fn gpt2_1558m() -> Self {
        Self::gpt2(48, 25, 1600)
    }

    /// Benchmark config T: L=4, H=4, C=256, GPT-2 vocabulary, maxT=1024.
    pub fn config_t() -> Self {
        Self::gpt2(4, 4, 256)
    }

    /// Benchmark config S: GPT-2 124M (same as [`GptConfig::gpt2_124m`]).
    pub fn config_s() -> Self {
        Self::gpt2_124m()
    }

    /// A tiny config for unit tests: L=2, H=2, C=16, V=97 (padded to 128), maxT=16.
    pub fn tiny() -> Self {
        Self {
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            vocab_size: 97,
            padded_vocab_size: 128,
            max_seq_len: 16,
        }
    }

    /// Head size `C / H`.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks every field: all positive, `H | C`, `V ≤ Vp`.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Gpt2Error::InvalidConfig(m));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 {
            return bad(format!(
                "n_layer, n_head, n_embd must be positive (got {}, {}, {})",
                self.n_layer, self.n_head, self.n_embd
            ));
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.vocab_size == 0 || self.max_seq_len == 0 {
            return bad("vocab_size and max_seq_len must be positive".into());
        }
        if self.padded_vocab_size < self.vocab_size {
            return bad(format!(
                "padded_vocab_size {} < vocab_size {}",
                self.padded_vocab_size, self.vocab_size
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad("vocab_size must fit in u32".into());
        }
        Ok(())
    }

    /// Total number of parameters (the length of the flat parameter vector, padded `wte` rows included).
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total()
    }

    /// Parameters excluding the padded `wte` rows (what HF reports: 124,439,808 for GPT-2 small).
    pub fn num_params_unpadded(&self) -> usize {
        self.num_params() - (self.padded_vocab_size - self.vocab_size) * self.n_embd
    }
}
