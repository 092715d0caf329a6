//! The device seam: a [`Backend`] owns the buffers (associated types) and runs the op set of one training step.
//! The model ([`crate::Gpt2<B>`]) is written once against this trait, llm.c style: a fixed graph of named
//! buffers, each op a call with explicit views and dimensions. Static dispatch (`Gpt2<B: Backend>`), no `dyn` in
//! the hot loop, no tensor type with autodiff: the backward is the model's own hand-written reverse pass.
//!
//! Compared with candle (a `BackendStorage` per device behind a `Storage` enum, shapes carried at run time) and
//! burn (a `Backend` with associated tensor types and an autodiff decorator), this is the smallest shape that
//! fits a fixed graph: one buffer type ([`Backend::Buf`], f32 semantics), borrowed views into it
//! ([`Backend::View`] / [`Backend::ViewMut`], cut by [`Backend::slice`] and [`Backend::split_mut`] so per-tensor
//! weights are views of the flat parameter buffer, as in llm.c), and one method per kernel launch.
//!
//! **What stays in the backend, what reaches the host.** Parameters, gradients, AdamW moments, activations,
//! logits `[N, Vp]` and their gradient `[K, Vp]` live in `Buf`s. The host hands over token ids and targets
//! ([`Backend::upload_tokens`], [`Backend::upload_targets`]) and gets back per-row vectors only
//! ([`TokenStats`], [`Selection`]) and scalars (losses, norms, FLOPs).
//!
//! **Row sparsity.** A backward receives its output gradient as a [`RowGrad`]: a compact buffer of the rows in a
//! host [`RowSet`] (`[K, width]`, or `[N, width]` when dense); row-wise ops do K rows of work (see
//! [`crate::ops`]). A device backend uploads the row list once per backward (it is an O(K) host vector).
//!
//! **Scratch** (gather buffers, uploaded row lists) lives in the backend value (`&mut self`), the model's
//! buffers in the model, so both can be borrowed at once.
//!
//! [`Cpu`] runs the [`crate::ops`] kernels (generic over [`crate::ops::Real`], checked against f64 finite
//! differences). A CUDA backend implements the same methods with kernels on a stream.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::Cpu;
#[cfg(feature = "cuda")]
pub use cuda::Cuda;

use std::fmt::Debug;
use std::ops::Range;

use eslm_collective::Collective;
use eslm_kernels::kd::KdParams;
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::TokenStats;

use crate::error::Result;
use crate::ops::attention::AttnDims;
use crate::ops::RowSet;
use crate::optim::AdamWStep;

/// A row-sparse gradient: the compact buffer `g` holds the rows of `rows` (`[K, width]`, or `[N, width]` for
/// [`RowSet::All`]) of a `[n, width]` tensor whose other rows are zero.
#[derive(Debug)]
pub struct RowGrad<'r, V> {
    /// Compact gradient rows.
    pub g: V,
    /// Which rows `g` holds.
    pub rows: &'r RowSet,
    /// Rows of the full tensor (`N = B·T`).
    pub n: usize,
}

impl<V: Copy> Clone for RowGrad<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V: Copy> Copy for RowGrad<'_, V> {}

/// A layer norm's or a linear layer's weight and bias (views, or their gradients).
#[derive(Debug, Clone, Copy)]
pub struct Affine<V> {
    /// Weight: `[C]` for a layer norm, `[out, in]` for a linear layer.
    pub w: V,
    /// Bias: `[C]` or `[out]`.
    pub b: V,
}

/// What a layer-norm forward saves for its backward: per-row mean and reciprocal standard deviation `[N]`.
#[derive(Debug, Clone, Copy)]
pub struct LnStats<V> {
    /// Per-row mean.
    pub mean: V,
    /// Per-row `1/√(var + eps)`.
    pub rstd: V,
}

/// The forward values a layer-norm backward reads.
#[derive(Debug, Clone, Copy)]
pub struct LnSaved<V> {
    /// The input `x [N, C]`.
    pub x: V,
    /// Its saved statistics.
    pub stats: LnStats<V>,
    /// The weight `[C]`.
    pub w: V,
}

/// Input and output widths of a linear layer `y [N, out] = x [N, in]·Wᵀ + b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

/// Dimensions of the tied LM head: width `C`, vocabulary `V`, padded row stride `Vp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDims {
    /// Width C.
    pub c: usize,
    /// Real vocabulary V.
    pub v: usize,
    /// Padded vocabulary Vp (the logits' row stride).
    pub vp: usize,
}

/// The token and position embeddings (views, or their gradients).
#[derive(Debug, Clone, Copy)]
pub struct Embeddings<V> {
    /// Token embedding `[Vp, C]` (also the tied LM head).
    pub wte: V,
    /// Position embedding `[maxT, C]`.
    pub wpe: V,
}

/// A logits buffer `[rows, Vp]` whose first `V` columns are real.
#[derive(Debug, Clone, Copy)]
pub struct Logits<V> {
    /// The buffer (at least `rows·Vp`).
    pub z: V,
    /// Rows N.
    pub rows: usize,
    /// Vocabulary and stride.
    pub dims: HeadDims,
}

/// The kept rows of a loss gradient and the targets of the batch.
#[derive(Debug)]
pub struct KeptTargets<'a, T> {
    /// Targets `[N]` (negative = ignored), on the device.
    pub targets: &'a T,
    /// Kept rows, strictly ascending, each with a valid target.
    pub kept: &'a [u32],
    /// `kept` is the host copy of this backend's own last [`Backend::select`] result (over the statistics of its
    /// last [`Backend::token_stats`] call): a device backend then reads its device copy and uploads nothing.
    pub own_selection: bool,
}

/// One of the per-row statistics a backend computed in its last [`Backend::token_stats`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnStat {
    /// The token loss `lse − z_y`.
    Loss,
    /// The predictive entropy.
    Entropy,
}

/// Per-row scores for [`Backend::select`]: the host values, and which of the backend's own statistics of its
/// last [`Backend::token_stats`] call they are, if any (a device backend then ranks its device copy: the
/// statistics never travel back to the device).
#[derive(Debug, Clone, Copy)]
pub struct RowScores<'a> {
    /// One score per row of the last forward.
    pub host: &'a [f32],
    /// `Some` when `host` is the host copy of that statistic.
    pub own: Option<OwnStat>,
}

impl<T> Clone for KeptTargets<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for KeptTargets<'_, T> {}

/// Fused AdamW over one parameter tensor: parameters, gradient and the two moments (same range of each flat
/// buffer).
#[derive(Debug)]
pub struct AdamWSlices<VM, V> {
    /// Parameters (updated).
    pub p: VM,
    /// Gradient.
    pub g: V,
    /// First moment (updated).
    pub m: VM,
    /// Second moment (updated).
    pub v: VM,
}

/// A device: its buffers and the op set of a GPT-2 training step. See the module docs.
///
/// Every op takes views of exactly the length its dimensions imply (`[n, width]` ⇒ `n·width` elements) unless
/// documented otherwise. Ops that return `f64` return the FLOPs they ran (multiply-add = 2).
pub trait Backend: Sized + Send {
    /// An owned buffer of f32 values on the device (`Vec<f32>` on the CPU).
    type Buf: Clone + Debug + Send + Sync;
    /// A borrowed read-only range of a [`Backend::Buf`] (`&[f32]` on the CPU).
    type View<'a>: Copy
    where
        Self: 'a;
    /// A borrowed mutable range of a [`Backend::Buf`] (`&mut [f32]` on the CPU).
    type ViewMut<'a>
    where
        Self: 'a;
    /// Token ids `[N]` on the device.
    type Tokens: Clone + Debug + Send + Sync;
    /// Targets `[N]` (i32, negative = ignored) on the device.
    type Targets: Clone + Debug + Send + Sync;

    // ---- buffers and views ----

    /// A zero-filled buffer of `len` floats.
    fn alloc(&mut self, len: usize) -> Self::Buf;
    /// A zero-filled buffer of `len` activations (activations, their gradients, the logits and their gradient):
    /// f32 like [`Backend::alloc`] by default; a device backend may store them narrower (the CUDA backend's bf16
    /// storage). Its values still read and write as f32 through [`Backend::upload`] / [`Backend::download`].
    fn alloc_act(&mut self, len: usize) -> Self::Buf {
        self.alloc(len)
    }
    /// An empty token buffer with room for `len` ids.
    fn alloc_tokens(&mut self, len: usize) -> Self::Tokens;
    /// An empty target buffer with room for `len` targets.
    fn alloc_targets(&mut self, len: usize) -> Self::Targets;
    /// Copies host `src` into the first `src.len()` elements of `dst`.
    fn upload(&mut self, dst: Self::ViewMut<'_>, src: &[f32]);
    /// Copies `src` to the host slice `dst` (same length). Synchronous.
    fn download(&self, src: Self::View<'_>, dst: &mut [f32]);
    /// Replaces the ids in `dst` by `src` (`src.len()` ≤ its capacity).
    fn upload_tokens(&mut self, dst: &mut Self::Tokens, src: &[u32]);
    /// Replaces the targets in `dst` by `src` (`src.len()` ≤ its capacity).
    fn upload_targets(&mut self, dst: &mut Self::Targets, src: &[i32]);
    /// Number of floats in `buf`.
    fn len(buf: &Self::Buf) -> usize;
    /// The whole buffer, read-only.
    fn view(buf: &Self::Buf) -> Self::View<'_>;
    /// The whole buffer, mutable.
    fn view_mut(buf: &mut Self::Buf) -> Self::ViewMut<'_>;
    /// A sub-range of a view.
    fn slice<'a>(v: Self::View<'a>, range: Range<usize>) -> Self::View<'a>;
    /// A sub-range of a mutable view.
    fn slice_mut<'a>(v: Self::ViewMut<'a>, range: Range<usize>) -> Self::ViewMut<'a>;
    /// Splits a view at `at` into `[0, at)` and `[at, len)`.
    fn split<'a>(v: Self::View<'a>, at: usize) -> (Self::View<'a>, Self::View<'a>);
    /// Splits a mutable view at `at` into two disjoint views.
    fn split_mut<'a>(v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>);
    /// A shorter-lived copy of a mutable view (so it can be passed to an op and used again).
    fn reborrow<'b>(v: &'b mut Self::ViewMut<'_>) -> Self::ViewMut<'b>;
    /// A read-only copy of a mutable view.
    fn freeze<'b>(v: &'b Self::ViewMut<'_>) -> Self::View<'b>;
    /// Sets every element to zero.
    fn fill_zero(&mut self, v: Self::ViewMut<'_>);

    // ---- the model's forward and backward ops ([`crate::ops`]) ----

    /// `out [n, C] = wte[tokens] + wpe[pos]` for the first `n` tokens (positions `i mod t`).
    fn encoder_forward(
        &mut self,
        out: Self::ViewMut<'_>,
        tokens: &Self::Tokens,
        emb: Embeddings<Self::View<'_>>,
        n: usize,
        t: usize,
        c: usize,
    );
    /// Accumulates `dwte[token] += dout`, `dwpe[pos] += dout` on the rows of `dout`.
    fn encoder_backward(
        &mut self,
        demb: Embeddings<Self::ViewMut<'_>>,
        dout: RowGrad<'_, Self::View<'_>>,
        tokens: &Self::Tokens,
        t: usize,
        c: usize,
    );
    /// Layer norm of `x [n, C]` into `y`, saving the per-row statistics `[n]`.
    fn layernorm_forward(
        &mut self,
        y: Self::ViewMut<'_>,
        stats: LnStats<Self::ViewMut<'_>>,
        x: Self::View<'_>,
        p: Affine<Self::View<'_>>,
        n: usize,
        c: usize,
    );
    /// Layer-norm backward on the rows of `dy`: writes compact `dx`, accumulates the weight and bias gradients.
    fn layernorm_backward(
        &mut self,
        dx: Self::ViewMut<'_>,
        dp: Affine<Self::ViewMut<'_>>,
        dy: RowGrad<'_, Self::View<'_>>,
        saved: LnSaved<Self::View<'_>>,
        c: usize,
    );
    /// `y [n, out] = x [n, in]·Wᵀ + b`.
    fn linear_forward(
        &mut self,
        y: Self::ViewMut<'_>,
        x: Self::View<'_>,
        p: Affine<Self::View<'_>>,
        n: usize,
        d: LinearDims,
    ) -> f64;
    /// The MLP's first layer and its activation: `pre [n, out] = x·Wᵀ + b`, `post = GELU(pre)`. By default
    /// [`Backend::linear_forward`] then [`Backend::gelu_forward`]; the CUDA backend fuses both into one
    /// cuBLASLt product (the bias and the GELU in its epilogue).
    fn linear_gelu_forward(
        &mut self,
        mut pre: Self::ViewMut<'_>,
        post: Self::ViewMut<'_>,
        x: Self::View<'_>,
        p: Affine<Self::View<'_>>,
        n: usize,
        d: LinearDims,
    ) -> f64 {
        let flops = self.linear_forward(Self::reborrow(&mut pre), x, p, n, d);
        self.gelu_forward(post, Self::freeze(&pre));
        flops
    }
    /// Linear backward on the rows of `dy`: compact `dx = dy·W` (if given), `dW += dyᵀ·x_R` (the rows of `x`
    /// gathered), `db += Σ dy`.
    fn linear_backward(
        &mut self,
        dx: Option<Self::ViewMut<'_>>,
        dp: Affine<Self::ViewMut<'_>>,
        dy: RowGrad<'_, Self::View<'_>>,
        x: Self::View<'_>,
        w: Self::View<'_>,
        d: LinearDims,
    ) -> f64;
    /// Tied LM head `z [n, 0..V] = h·Wteᵀ` into rows of stride `Vp` (padded columns untouched).
    fn lm_head_forward(
        &mut self,
        z: Self::ViewMut<'_>,
        h: Self::View<'_>,
        wte: Self::View<'_>,
        n: usize,
        d: HeadDims,
    ) -> f64;
    /// LM-head backward on the rows of `dz` (`[K, Vp]`): compact `dh = dz·Wte`, `dWte += dzᵀ·h_R`.
    fn lm_head_backward(
        &mut self,
        dh: Self::ViewMut<'_>,
        dwte: Self::ViewMut<'_>,
        dz: RowGrad<'_, Self::View<'_>>,
        h: Self::View<'_>,
        wte: Self::View<'_>,
        d: HeadDims,
    ) -> f64;
    /// Elementwise GELU (tanh form).
    fn gelu_forward(&mut self, y: Self::ViewMut<'_>, x: Self::View<'_>);
    /// GELU backward on the rows of `dy` (row width `width`): compact `dx`.
    fn gelu_backward(
        &mut self,
        dx: Self::ViewMut<'_>,
        dy: RowGrad<'_, Self::View<'_>>,
        x: Self::View<'_>,
        width: usize,
    );
    /// Causal attention on `qkv [B·T, 3C]`: `y [B·T, C]`, probabilities `att [B, H, T, T]`.
    fn attention_forward(
        &mut self,
        y: Self::ViewMut<'_>,
        att: Self::ViewMut<'_>,
        qkv: Self::View<'_>,
        d: AttnDims,
    ) -> f64;
    /// Attention backward from the query rows of `dy`: the dense `dqkv [B·T, 3C]` (overwritten).
    fn attention_backward(
        &mut self,
        dqkv: Self::ViewMut<'_>,
        dy: RowGrad<'_, Self::View<'_>>,
        qkv: Self::View<'_>,
        att: Self::View<'_>,
        d: AttnDims,
    ) -> f64;
    /// Residual add `out = a + b`.
    fn residual_forward(&mut self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);
    /// Sums two compact gradients of one `[n, width]` tensor into `out`, compact over the union of their rows
    /// (returned).
    fn residual_merge(
        &mut self,
        out: Self::ViewMut<'_>,
        a: RowGrad<'_, Self::View<'_>>,
        b: RowGrad<'_, Self::View<'_>>,
        width: usize,
    ) -> RowSet;
    /// Moves the blocks `seqs` (strictly ascending) of `block` floats each to the front of `x`, in order:
    /// block `seqs[i]` becomes block `i` (hierarchical ESLM keeps the activations of the sequences it trains).
    /// The blocks after `seqs.len()` are left unspecified.
    fn compact_blocks(&mut self, x: Self::ViewMut<'_>, block: usize, seqs: &[usize]);
    /// Gathers the rows `rows` of the dense `[n, width]` `src` into compact `dst`.
    fn gather_rows(
        &mut self,
        dst: Self::ViewMut<'_>,
        src: Self::View<'_>,
        rows: &RowSet,
        width: usize,
    );
    /// Adds the compact rows of `g` into the dense `[n, width]` `dst`.
    fn scatter_add_rows(
        &mut self,
        dst: Self::ViewMut<'_>,
        g: RowGrad<'_, Self::View<'_>>,
        width: usize,
    );

    // ---- the loss head (eslm-kernels) ----

    /// Per-row `lse`, `loss`, `entropy`, `valid` of `logits` against `targets` (negative = ignored), written
    /// to the host vectors of `out`.
    fn token_stats(
        &mut self,
        logits: Logits<Self::View<'_>>,
        targets: &Self::Targets,
        out: &mut TokenStats,
    ) -> Result<()>;
    /// VaR / top-k selection over per-row `scores` among the `valid` rows ([`eslm_kernels::select::select`]);
    /// `valid` is the host copy of the last [`Backend::token_stats`] call's flags.
    fn select(
        &mut self,
        scores: RowScores<'_>,
        valid: &[bool],
        rule: SelectRule,
        out: &mut Selection,
    ) -> Result<()>;
    /// Sparse cross-entropy gradient of the kept rows, compact `dlogits [K, Vp]`; `lse` is the host copy of the
    /// last [`Backend::token_stats`] call's (a device backend reads its device copy). Returns the mean loss over
    /// the kept rows.
    fn sparse_ce(
        &mut self,
        logits: Logits<Self::View<'_>>,
        rows: KeptTargets<'_, Self::Targets>,
        lse: &[f32],
        scale: f32,
        dlogits: Self::ViewMut<'_>,
    ) -> Result<f32>;
    /// Distillation gradient of the kept rows against a teacher's logits ([`eslm_kernels::kd`]), compact
    /// `dlogits [K, Vp]`. Returns the mean KD loss over the kept rows.
    fn kd_grad(
        &mut self,
        student: Logits<Self::View<'_>>,
        teacher: Logits<Self::View<'_>>,
        rows: KeptTargets<'_, Self::Targets>,
        kd: KdParams,
        scale: f32,
        dlogits: Self::ViewMut<'_>,
    ) -> Result<f32>;

    // ---- the optimizer step ----

    /// The fused AdamW update of one tensor ([`crate::optim::adamw_update_slice`]); `decays` applies the
    /// decoupled weight decay.
    fn adamw(
        &mut self,
        t: AdamWSlices<Self::ViewMut<'_>, Self::View<'_>>,
        decays: bool,
        step: &AdamWStep,
    );
    /// `Σ x²` in f64, reproducibly (fixed chunking, chunk sums added in order).
    fn sum_squares(&self, x: Self::View<'_>) -> f64;
    /// Row `i` of the compact `[K, width]` buffer `x` times `weights[i]` (`K = weights.len()`, a per-row host
    /// vector: importance weights of kept rows).
    fn scale_rows(&mut self, x: Self::ViewMut<'_>, width: usize, weights: &[f32]);
    /// The model's flat parameter buffer on this backend (the model calls it once, when it is built). A device
    /// backend may keep a derived copy (the CUDA backend's bf16 weights for bf16 products), which its own ops mark
    /// stale whenever they write into this buffer. A no-op by default.
    fn register_params(&mut self, params: Self::View<'_>) {
        let _ = params;
    }
    /// Sets the precision of the matrix products. Every backend supports [`MatmulPrecision::F32`] (the default);
    /// the CUDA backend also [`MatmulPrecision::Tf32`] and [`MatmulPrecision::Bf16`].
    ///
    /// # Errors
    /// [`crate::Gpt2Error::Unsupported`] for a precision this backend does not have.
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        match precision {
            MatmulPrecision::F32 => Ok(()),
            other => Err(crate::error::Gpt2Error::Unsupported(format!(
                "matmul precision {other:?} on this backend (only F32)"
            ))),
        }
    }
    /// Prepares this backend for [`Backend::collective`] over the ranks of `collective` (every rank calls it
    /// once, before training): the CUDA backend opens its NCCL communicator. A no-op by default.
    fn connect(&mut self, collective: &dyn Collective) -> Result<()> {
        let _ = collective;
        Ok(())
    }
    /// Runs `op` over the ranks of `collective` on `x` in place (the CPU passes the slice; the CUDA backend
    /// uses NCCL after [`Backend::connect`], else stages through the host).
    fn collective(
        &mut self,
        op: CollectiveOp,
        x: Self::ViewMut<'_>,
        collective: &dyn Collective,
    ) -> Result<()>;

    /// The first error an op without a `Result` (allocation, upload, a kernel launch) met since the backend was
    /// made; device backends keep it (sticky, like CUDA's own errors) and skip later launches. Waits for queued
    /// work. The CPU backend has none (its ops cannot fail).
    fn status(&self) -> Result<()> {
        Ok(())
    }
}

/// A collective operation on a flat f32 buffer ([`Backend::collective`]): the gradient all-reduce, or ZeRO-1's
/// reduce-scatter of gradients and all-gather of parameters over the [`eslm_collective::shard_range`] layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveOp {
    /// Element-wise sum over ranks, on every rank.
    AllReduceSum,
    /// Element-wise sum over ranks, into this rank's shard only.
    ReduceScatterSum,
    /// Every rank's shard, from its owner, on every rank.
    AllGather,
}

impl CollectiveOp {
    /// Runs the operation on a host buffer.
    pub fn run_on_host(self, collective: &dyn Collective, x: &mut [f32]) -> Result<()> {
        match self {
            CollectiveOp::AllReduceSum => collective.all_reduce_sum_f32(x),
            CollectiveOp::ReduceScatterSum => collective.reduce_scatter_sum_f32(x),
            CollectiveOp::AllGather => collective.all_gather_f32(x),
        }
        .map_err(|e| crate::error::Gpt2Error::Collective(e.to_string()))
    }
}

/// Precision of the matrix products ([`Backend::set_matmul_precision`]); the storage is separate (f32, or the
/// CUDA backend's bf16 activations: `Cuda::set_activation_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MatmulPrecision {
    /// IEEE f32 products with f32 accumulation.
    #[default]
    F32,
    /// TF32 tensor-core products (inputs rounded to a 10-bit mantissa, f32 accumulation): several times the f32
    /// throughput on Ampere and Hopper GPUs, with ≈ 1e-3 relative error per product.
    Tf32,
    /// bf16 tensor-core products: both operands of each product converted to bf16 (8-bit mantissa, round to
    /// nearest even) and multiplied with f32 accumulation into the f32 result, as `torch.autocast(bfloat16)` does
    /// for matmuls; with f32 storage the activations, weights and gradients stay f32 (llm.c's full recipe is
    /// this plus bf16 activation storage).
    Bf16,
}
