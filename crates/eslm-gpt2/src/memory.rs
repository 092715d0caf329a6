//! How much memory training a model takes: every buffer [`crate::Gpt2`] allocates for batches up to `B × T`, by
//! kind, in f32 elements (the engine stores everything in f32). `tests/memory.rs` checks the plan against what the
//! CPU backend really allocates; the CUDA backend allocates the same buffers plus the scratch listed in
//! [`MemoryPlan::cuda_scratch`].
//!
//! Per block and token, the activations kept for the backward are `16·C + 4` floats (layer-norm outputs and
//! statistics, `qkv`, attention output, both residuals, the MLP's `4C` pre- and post-GELU) plus the attention
//! probabilities, `H·T` per token (`[B, H, T, T]`): at `T = 1024` and 12 heads they are 12 288 floats per token and
//! layer, as much as the rest (12 292 at `C = 768`) — what a flash-attention kernel would remove.

use crate::config::GptConfig;

/// The f32 elements of each kind of buffer of a model trained on batches up to `b × t` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Parameters (padded vocabulary rows included).
    pub params: usize,
    /// Their gradients.
    pub grads: usize,
    /// AdamW's two moments (divided over the ranks under ZeRO-1: [`MemoryPlan::sharded`]).
    pub optimizer: usize,
    /// Activations kept for the backward, without the attention probabilities and the logits.
    pub activations: usize,
    /// Attention probabilities `[L, B, H, T, T]`.
    pub attention_probs: usize,
    /// Logits `[B·T, Vp]`.
    pub logits: usize,
    /// Backward work buffers (residual-stream, MLP and `qkv` gradients).
    pub grad_buffers: usize,
    /// The kept rows' loss gradient `[K, Vp]`, at most `[B·T, Vp]` (CLM).
    pub dlogits: usize,
    /// The CUDA backend's own scratch at its largest: one layer's `dP`/`dS` `[B, H, T, T]`, gathered rows (up to
    /// `[B·T, 4C]`, also the attention backward's dense `dY`), column-sum partials (`⌈B·T / 64⌉ × 4C`), the
    /// uploaded `lse` (`B·T`).
    pub cuda_scratch: usize,
}

impl MemoryPlan {
    /// The plan for `config` at batches up to `b × t`.
    pub fn new(config: &GptConfig, b: usize, t: usize) -> Self {
        let (c, l, h, vp) = (
            config.n_embd,
            config.n_layer,
            config.n_head,
            config.padded_vocab_size,
        );
        let n = b * t;
        let params = config.num_params();
        // Per block: ln1, qkv, atty, residual2, ln2, fch, fch_gelu, residual3 (1+3+1+1+1+4+4+1 = 16 C per token)
        // and four per-row layer-norm statistics; outside the blocks: the embeddings, the final layer norm and
        // its statistics, and the projection scratch.
        let per_layer = n * (16 * c + 4);
        let activations = l * per_layer + n * (3 * c + 2);
        Self {
            params,
            grads: params,
            optimizer: 2 * params,
            activations,
            attention_probs: l * b * h * t * t,
            logits: n * vp,
            // Four [N, C], two [N, 4C], one [N, 3C].
            grad_buffers: n * (4 * c + 8 * c + 3 * c),
            dlogits: n * vp,
            cuda_scratch: b * h * t * t + 4 * n * c + n.div_ceil(64) * 4 * c + n,
        }
    }

    /// The plan with the optimizer state sharded over `ranks` ranks (ZeRO-1; the largest shard).
    pub fn sharded(mut self, ranks: usize) -> Self {
        let ranks = ranks.max(1);
        self.optimizer = 2 * self.params.div_ceil(ranks);
        self
    }

    /// Elements of every buffer the engine allocates itself (every field but [`MemoryPlan::cuda_scratch`]).
    pub fn engine_floats(&self) -> usize {
        self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.attention_probs
            + self.logits
            + self.grad_buffers
            + self.dlogits
    }

    /// Bytes on a CUDA device: the engine's buffers and the backend's scratch, in f32, plus the token ids and
    /// targets (4 bytes per token each); without cuBLAS workspace and the CUDA context (≈ 0.5–1 GB).
    pub fn cuda_bytes(&self, tokens: usize) -> u64 {
        4 * (self.engine_floats() + self.cuda_scratch) as u64 + 8 * tokens as u64
    }

    /// [`MemoryPlan::cuda_bytes`] under bf16 storage (`Cuda::set_activation_dtype`): the activations, attention
    /// probabilities, logits, gradient work buffers, the logits' gradient and the scratch at 2 bytes; parameters,
    /// gradients and AdamW state at 4. A slight under-estimate: the layer-norm statistics and the column-sum
    /// partials stay f32, and neither the bf16 copy of the largest converted weight nor cuBLASLt's 32 MiB workspace
    /// is counted.
    pub fn cuda_bytes_bf16(&self, tokens: usize) -> u64 {
        let f32s = self.params + self.grads + self.optimizer;
        let bf16s = self.engine_floats() - f32s + self.cuda_scratch;
        4 * f32s as u64 + 2 * bf16s as u64 + 8 * tokens as u64
    }
}
