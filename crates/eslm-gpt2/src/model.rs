//! The GPT-2 graph as a fixed, llm.c-style sequence of backend ops ([`crate::backend::Backend`]): embeddings → L
//! blocks (`x + attn(ln1(x))`, then `x + mlp(ln2(x))`) → final layer norm → tied LM head. Activations and gradient
//! buffers are allocated once for a maximum batch `(B_max, T_max)` and reused; each block's activations are a
//! `LayerActs` and its weights a [`LayerWeights`] view, named once (llm.c's `l_ln1w`, `dl_qkvw`).
//!
//! The backward walks the same sequence in reverse, carrying the output gradient as a [`RowSet`] plus a compact
//! buffer. It starts on the K kept rows of the loss; every op decides from the row set it receives how much
//! work to do, so the LM head, final layer norm and the last block's row-wise parts run on K rows and the first
//! attention backward densifies. Nothing in this file special-cases "the last block".

use crate::backend::{
    Affine, Backend, Cpu, Embeddings, HeadDims, LinearDims, LnSaved, LnStats, Logits, RowGrad,
};
use crate::config::GptConfig;
use crate::error::{Gpt2Error, Result};
use crate::loss_head::LossHead;
use crate::ops::attention::{self, AttnDims};
use crate::ops::{FlopCounter, RowSet};
use crate::params::{LayerWeights, ParamSet};
use crate::update::{OptShard, OptState};
use eslm_kernels::LogitsView;

/// The first `len` floats of `buf`, read-only.
fn rd<B: Backend>(buf: &B::Buf, len: usize) -> B::View<'_> {
    B::slice(B::view(buf), 0..len)
}

/// The first `len` floats of `buf`, mutable.
fn wr<B: Backend>(buf: &mut B::Buf, len: usize) -> B::ViewMut<'_> {
    B::slice_mut(B::view_mut(buf), 0..len)
}

/// A row-sparse gradient of `n` rows.
fn grad<V>(g: V, rows: &RowSet, n: usize) -> RowGrad<'_, V> {
    RowGrad { g, rows, n }
}

/// A linear layer's widths.
fn lin(d_in: usize, d_out: usize) -> LinearDims {
    LinearDims { d_in, d_out }
}

/// A mutable view passed on without giving it up.
fn re<'b, B: Backend>(v: &'b mut B::ViewMut<'_>) -> B::ViewMut<'b> {
    B::reborrow(v)
}

/// One block's forward activations for `N_max = B_max·T_max` rows (llm.c's per-layer activation pointers).
#[derive(Debug, Clone)]
pub(crate) struct LayerActs<B: Backend> {
    /// `[N, C]` first layer norm output.
    ln1: B::Buf,
    /// `[N]` its per-row mean.
    ln1_mean: B::Buf,
    /// `[N]` its per-row reciprocal std.
    ln1_rstd: B::Buf,
    /// `[N, 3C]` fused query/key/value.
    qkv: B::Buf,
    /// `[N, C]` attention output (before the projection).
    atty: B::Buf,
    /// `[B, H, T, T]` attention probabilities.
    att: B::Buf,
    /// `[N, C]` after the attention residual.
    residual2: B::Buf,
    /// `[N, C]` second layer norm output.
    ln2: B::Buf,
    /// `[N]` its per-row mean.
    ln2_mean: B::Buf,
    /// `[N]` its per-row reciprocal std.
    ln2_rstd: B::Buf,
    /// `[N, 4C]` MLP up-projection.
    fch: B::Buf,
    /// `[N, 4C]` its GELU.
    fch_gelu: B::Buf,
    /// `[N, C]` after the MLP residual (the block's output).
    residual3: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(be: &mut B, cfg: &GptConfig, b: usize, t: usize) -> Self {
        let (c, n, nh) = (cfg.n_embd, b * t, cfg.n_head);
        Self {
            ln1: be.alloc_act(n * c),
            ln1_mean: be.alloc(n),
            ln1_rstd: be.alloc(n),
            qkv: be.alloc_act(n * 3 * c),
            atty: be.alloc_act(n * c),
            att: be.alloc_act(b * nh * t * t),
            residual2: be.alloc_act(n * c),
            ln2: be.alloc_act(n * c),
            ln2_mean: be.alloc(n),
            ln2_rstd: be.alloc(n),
            fch: be.alloc_act(n * 4 * c),
            fch_gelu: be.alloc_act(n * 4 * c),
            residual3: be.alloc_act(n * c),
        }
    }
}

impl<B: Backend> LayerActs<B> {
    /// Keeps the activations of sequences `seqs` (strictly ascending) of a `[b, t]` batch, moved to the front in
    /// order (every buffer is sequence-major: `[B, T, ·]`, or `[B, H, T, T]` for the probabilities).
    fn compact(&mut self, be: &mut B, d: AttnDims, seqs: &[usize]) {
        let AttnDims { b, t, c, nh } = d;
        let n = b * t;
        let row_buffers: [(&mut B::Buf, usize); 13] = [
            (&mut self.ln1, c),
            (&mut self.ln1_mean, 1),
            (&mut self.ln1_rstd, 1),
            (&mut self.qkv, 3 * c),
            (&mut self.atty, c),
            (&mut self.att, nh * t),
            (&mut self.residual2, c),
            (&mut self.ln2, c),
            (&mut self.ln2_mean, 1),
            (&mut self.ln2_rstd, 1),
            (&mut self.fch, 4 * c),
            (&mut self.fch_gelu, 4 * c),
            (&mut self.residual3, c),
        ];
        for (buf, width) in row_buffers {
            be.compact_blocks(wr::<B>(buf, n * width), t * width, seqs);
        }
    }
}

/// Forward activations outside the blocks, and the blocks'. Activations and the logits come from
/// [`Backend::alloc_act`] (bf16 on a CUDA backend with bf16 storage), the layer-norm statistics from
/// [`Backend::alloc`] (f32 always).
#[derive(Debug, Clone)]
pub(crate) struct Activations<B: Backend> {
    /// `[N, C]` embeddings (the first block's input).
    encoded: B::Buf,
    /// One per block.
    layers: Vec<LayerActs<B>>,
    /// `[N, C]` final layer norm output.
    lnf: B::Buf,
    /// `[N]` its per-row mean.
    lnf_mean: B::Buf,
    /// `[N]` its per-row reciprocal std.
    lnf_rstd: B::Buf,
    /// `[N, Vp]` logits.
    pub(crate) logits: B::Buf,
    /// `[N, C]` scratch for projection outputs.
    proj: B::Buf,
}

impl<B: Backend> Activations<B> {
    fn new(be: &mut B, cfg: &GptConfig, b: usize, t: usize) -> Self {
        let (c, n) = (cfg.n_embd, b * t);
        Self {
            encoded: be.alloc_act(n * c),
            layers: (0..cfg.n_layer)
                .map(|_| LayerActs::new(be, cfg, b, t))
                .collect(),
            lnf: be.alloc_act(n * c),
            lnf_mean: be.alloc(n),
            lnf_rstd: be.alloc(n),
            logits: be.alloc_act(n * cfg.padded_vocab_size),
            proj: be.alloc_act(n * c),
        }
    }
}

/// The output of block `depth − 1` (the embeddings for depth 0), `[len]` floats.
fn block_output<'a, B: Backend>(
    encoded: &'a B::Buf,
    layers: &'a [LayerActs<B>],
    depth: usize,
    len: usize,
) -> B::View<'a> {
    match depth.checked_sub(1) {
        None => rd::<B>(encoded, len),
        Some(l) => rd::<B>(&layers[l].residual3, len),
    }
}

/// Gradient work buffers (compact gradients of at most `N_max` rows), activations like the forward's
/// ([`Backend::alloc_act`]).
#[derive(Debug, Clone)]
pub(crate) struct GradBuffers<B: Backend> {
    /// `[N, C]` each: the residual stream's gradient and three temporaries.
    g: [B::Buf; 4],
    /// `[N, 4C]` each: the MLP's hidden gradients.
    g4: [B::Buf; 2],
    /// `[N, 3C]`: the fused query/key/value gradient.
    gqkv: B::Buf,
}

impl<B: Backend> GradBuffers<B> {
    fn new(be: &mut B, cfg: &GptConfig, n: usize) -> Self {
        let c = cfg.n_embd;
        Self {
            g: [
                be.alloc_act(n * c),
                be.alloc_act(n * c),
                be.alloc_act(n * c),
                be.alloc_act(n * c),
            ],
            g4: [be.alloc_act(n * 4 * c), be.alloc_act(n * 4 * c)],
            gqkv: be.alloc_act(n * 3 * c),
        }
    }
}

/// Backward FLOPs by kind, summed in op order.
#[derive(Debug, Default)]
struct BackwardFlops {
    row_sparse: f64,
    dense: f64,
}

impl BackwardFlops {
    fn add(&mut self, rows: &RowSet, f: f64) {
        if rows.is_all() {
            self.dense += f
        } else {
            self.row_sparse += f
        }
    }
}

/// What one block's backward reads: its activations, its input, its weights, and the batch dimensions.
struct BlockSaved<'a, B: Backend> {
    acts: &'a LayerActs<B>,
    /// The block's input `[N, C]` (the previous block's output).
    x: B::View<'a>,
    w: LayerWeights<B::View<'a>>,
    d: AttnDims,
}

/// One block's forward: `residual2 = x + attproj(attn(qkv(ln1(x))))`, `residual3 = residual2 +
/// fcproj(gelu(fc(ln2(residual2))))`. `proj [N, C]` is scratch. Returns FLOPs.
fn block_forward<B: Backend>(
    be: &mut B,
    a: &mut LayerActs<B>,
    x: B::View<'_>,
    w: LayerWeights<B::View<'_>>,
    proj: &mut B::Buf,
    d: AttnDims,
) -> f64 {
    let AttnDims { b, t, c, nh } = d;
    let n = b * t;
    let ln1_stats = LnStats {
        mean: wr::<B>(&mut a.ln1_mean, n),
        rstd: wr::<B>(&mut a.ln1_rstd, n),
    };
    let ln1_p = Affine {
        w: w.ln1w,
        b: w.ln1b,
    };
    be.layernorm_forward(wr::<B>(&mut a.ln1, n * c), ln1_stats, x, ln1_p, n, c);
    let qkv_p = Affine {
        w: w.qkvw,
        b: w.qkvb,
    };
    let mut flops = be.linear_forward(
        wr::<B>(&mut a.qkv, n * 3 * c),
        rd::<B>(&a.ln1, n * c),
        qkv_p,
        n,
        lin(c, 3 * c),
    );
    flops += be.attention_forward(
        wr::<B>(&mut a.atty, n * c),
        wr::<B>(&mut a.att, b * nh * t * t),
        rd::<B>(&a.qkv, n * 3 * c),
        d,
    );
    let attproj_p = Affine {
        w: w.attprojw,
        b: w.attprojb,
    };
    flops += be.linear_forward(
        wr::<B>(proj, n * c),
        rd::<B>(&a.atty, n * c),
        attproj_p,
        n,
        lin(c, c),
    );
    be.residual_forward(wr::<B>(&mut a.residual2, n * c), x, rd::<B>(proj, n * c));
    let ln2_stats = LnStats {
        mean: wr::<B>(&mut a.ln2_mean, n),
        rstd: wr::<B>(&mut a.ln2_rstd, n),
    };
    let ln2_p = Affine {
        w: w.ln2w,
        b: w.ln2b,
    };
    be.layernorm_forward(
        wr::<B>(&mut a.ln2, n * c),
        ln2_stats,
        rd::<B>(&a.residual2, n * c),
        ln2_p,
        n,
        c,
    );
    let fc_p = Affine { w: w.fcw, b: w.fcb };
    flops += be.linear_gelu_forward(
        wr::<B>(&mut a.fch, n * 4 * c),
        wr::<B>(&mut a.fch_gelu, n * 4 * c),
        rd::<B>(&a.ln2, n * c),
        fc_p,
        n,
        lin(c, 4 * c),
    );
    let fcproj_p = Affine {
        w: w.fcprojw,
        b: w.fcprojb,
    };
    flops += be.linear_forward(
        wr::<B>(proj, n * c),
        rd::<B>(&a.fch_gelu, n * 4 * c),
        fcproj_p,
        n,
        lin(4 * c, c),
    );
    be.residual_forward(
        wr::<B>(&mut a.residual3, n * c),
        rd::<B>(&a.residual2, n * c),
        rd::<B>(proj, n * c),
    );
    flops
}

/// The MLP half of a block's backward. In: `g[0]` = d(residual3) on `rows`. Out: `g[3]` = d(residual2) (the
/// skip plus the MLP branch) on the returned row set (the same rows).
fn mlp_backward<B: Backend>(
    be: &mut B,
    s: &BlockSaved<'_, B>,
    dw: &mut LayerWeights<B::ViewMut<'_>>,
    gb: &mut GradBuffers<B>,
    rows: &RowSet,
    fl: &mut BackwardFlops,
) -> RowSet {
    let (a, w, c) = (s.acts, s.w, s.d.c);
    let n = s.d.b * s.d.t;
    let GradBuffers {
        g: [g0, g1, g2, g3],
        g4: [g4a, g4b],
        ..
    } = gb;
    let dfcproj = Affine {
        w: re::<B>(&mut dw.fcprojw),
        b: re::<B>(&mut dw.fcprojb),
    };
    let f = be.linear_backward(
        Some(wr::<B>(g4a, n * 4 * c)),
        dfcproj,
        grad(rd::<B>(g0, n * c), rows, n),
        rd::<B>(&a.fch_gelu, n * 4 * c),
        w.fcprojw,
        lin(4 * c, c),
    );
    fl.add(rows, f);
    be.gelu_backward(
        wr::<B>(g4b, n * 4 * c),
        grad(rd::<B>(g4a, n * 4 * c), rows, n),
        rd::<B>(&a.fch, n * 4 * c),
        4 * c,
    );
    let dfc = Affine {
        w: re::<B>(&mut dw.fcw),
        b: re::<B>(&mut dw.fcb),
    };
    let f = be.linear_backward(
        Some(wr::<B>(g1, n * c)),
        dfc,
        grad(rd::<B>(g4b, n * 4 * c), rows, n),
        rd::<B>(&a.ln2, n * c),
        w.fcw,
        lin(c, 4 * c),
    );
    fl.add(rows, f);
    let dln2 = Affine {
        w: re::<B>(&mut dw.ln2w),
        b: re::<B>(&mut dw.ln2b),
    };
    let ln2_saved = LnSaved {
        x: rd::<B>(&a.residual2, n * c),
        stats: LnStats {
            mean: rd::<B>(&a.ln2_mean, n),
            rstd: rd::<B>(&a.ln2_rstd, n),
        },
        w: w.ln2w,
    };
    be.layernorm_backward(
        wr::<B>(g2, n * c),
        dln2,
        grad(rd::<B>(g1, n * c), rows, n),
        ln2_saved,
        c,
    );
    be.residual_merge(
        wr::<B>(g3, n * c),
        grad(rd::<B>(g0, n * c), rows, n),
        grad(rd::<B>(g2, n * c), rows, n),
        c,
    )
}

/// The attention half of a block's backward. In: `g[3]` = d(residual2) on `rows2`. Out: `g[0]` = d(block input)
/// (the skip plus the attention branch) on the returned row set (dense: attention mixes rows).
fn attention_backward<B: Backend>(
    be: &mut B,
    s: &BlockSaved<'_, B>,
    dw: &mut LayerWeights<B::ViewMut<'_>>,
    gb: &mut GradBuffers<B>,
    rows2: &RowSet,
    fl: &mut BackwardFlops,
) -> RowSet {
    let (a, w, d) = (s.acts, s.w, s.d);
    let AttnDims { b, t, c, nh } = d;
    let n = b * t;
    let GradBuffers {
        g: [g0, g1, g2, g3],
        gqkv,
        ..
    } = gb;
    let dense = RowSet::All;
    let dattproj = Affine {
        w: re::<B>(&mut dw.attprojw),
        b: re::<B>(&mut dw.attprojb),
    };
    let f = be.linear_backward(
        Some(wr::<B>(g1, n * c)),
        dattproj,
        grad(rd::<B>(g3, n * c), rows2, n),
        rd::<B>(&a.atty, n * c),
        w.attprojw,
        lin(c, c),
    );
    fl.add(rows2, f);
    let f = be.attention_backward(
        wr::<B>(gqkv, n * 3 * c),
        grad(rd::<B>(g1, n * c), rows2, n),
        rd::<B>(&a.qkv, n * 3 * c),
        rd::<B>(&a.att, b * nh * t * t),
        d,
    );
    fl.add(&dense, f);
    let dqkv = Affine {
        w: re::<B>(&mut dw.qkvw),
        b: re::<B>(&mut dw.qkvb),
    };
    let f = be.linear_backward(
        Some(wr::<B>(g2, n * c)),
        dqkv,
        grad(rd::<B>(gqkv, n * 3 * c), &dense, n),
        rd::<B>(&a.ln1, n * c),
        w.qkvw,
        lin(c, 3 * c),
    );
    fl.add(&dense, f);
    let dln1 = Affine {
        w: re::<B>(&mut dw.ln1w),
        b: re::<B>(&mut dw.ln1b),
    };
    let ln1_saved = LnSaved {
        x: s.x,
        stats: LnStats {
            mean: rd::<B>(&a.ln1_mean, n),
            rstd: rd::<B>(&a.ln1_rstd, n),
        },
        w: w.ln1w,
    };
    be.layernorm_backward(
        wr::<B>(g1, n * c),
        dln1,
        grad(rd::<B>(g2, n * c), &dense, n),
        ln1_saved,
        c,
    );
    be.residual_merge(
        wr::<B>(g0, n * c),
        grad(rd::<B>(g3, n * c), rows2, n),
        grad(rd::<B>(g1, n * c), &dense, n),
        c,
    )
}

/// The logits `[rows, Vp]` of the last forward as a backend view.
pub(crate) fn logits_of<'a, B: Backend>(
    buf: &'a B::Buf,
    last: Option<usize>,
    cfg: &GptConfig,
) -> Result<Logits<B::View<'a>>> {
    let rows = last.ok_or(Gpt2Error::NoForward)?;
    let dims = HeadDims {
        c: cfg.n_embd,
        v: cfg.vocab_size,
        vp: cfg.padded_vocab_size,
    };
    Ok(Logits {
        z: rd::<B>(buf, rows * dims.vp),
        rows,
        dims,
    })
}

/// A GPT-2 model on backend `B` (the CPU by default): parameters, gradients and reusable activation buffers,
/// all in backend buffers.
#[derive(Debug, Clone)]
pub struct Gpt2<B: Backend = Cpu> {
    pub(crate) config: GptConfig,
    /// The device and its scratch.
    pub(crate) backend: B,
    pub(crate) params: ParamSet<B>,
    pub(crate) grads: ParamSet<B>,
    b_max: usize,
    t_max: usize,
    pub(crate) acts: Activations<B>,
    gbuf: GradBuffers<B>,
    /// `[N]` token ids of the last forward.
    inputs: B::Tokens,
    /// `(B, T)` of the last full forward, if its activations are still valid for a backward.
    last_forward: Option<(usize, usize)>,
    /// Rows of the logits currently in the logits buffer (`B·T`, or K after [`Gpt2::forward_train_rows`]).
    pub(crate) last_logits: Option<usize>,
    flops: FlopCounter,
    /// Targets, statistics, selection and kept-row gradient of the last forward ([`crate::loss_head`]).
    pub(crate) head: LossHead<B>,
    /// AdamW state ([`crate::update`]); `None` until the first update or restore.
    pub(crate) optimizer: Option<OptState<B>>,
    /// ZeRO-1: the ranks the optimizer state is sharded over ([`Gpt2::shard_optimizer`]); `None`: unsharded.
    pub(crate) shard: Option<OptShard>,
    /// The batch whose first blocks' activations are kept after [`Gpt2::forward_prefix_stats`] (hierarchical
    /// ESLM continues them for the sequences it keeps); cleared by every other forward.
    prefix: Option<Prefix>,
}

/// A forward through the first `exit_layer` blocks of a `[b, t]` batch with its activations kept.
#[derive(Debug, Clone)]
struct Prefix {
    b: usize,
    t: usize,
    exit_layer: usize,
    inputs: Vec<u32>,
}

impl Gpt2<Cpu> {
    /// A GPT-2-initialised model (see [`crate::init`]) on the CPU with buffers for batches up to `b_max × t_max`.
    ///
    /// ```
    /// use eslm_gpt2::{Gpt2, GptConfig};
    /// let mut model = Gpt2::new(GptConfig::tiny(), 2, 8, 42).unwrap();
    /// let logits = model.forward(&[1u32; 16], 2, 8).unwrap();
    /// assert_eq!(logits.rows(), 16);
    /// ```
    pub fn new(config: GptConfig, b_max: usize, t_max: usize, seed: u64) -> Result<Self> {
        config.validate()?;
        Self::from_params(crate::init::gpt2_init(&config, seed), b_max, t_max)
    }

    /// A CPU model with the given parameters (e.g. loaded from a checkpoint) and buffers for `b_max × t_max`.
    pub fn from_params(params: ParamSet, b_max: usize, t_max: usize) -> Result<Self> {
        Self::build(Cpu::new(), params, b_max, t_max)
    }

    /// The parameters.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// The parameters, mutable (e.g. to load a checkpoint in place). Invalidates pending activations.
    pub fn params_mut(&mut self) -> &mut ParamSet {
        self.last_forward = None;
        &mut self.params
    }

    /// The accumulated gradients (same layout as the parameters).
    pub fn grads(&self) -> &ParamSet {
        &self.grads
    }

    /// The accumulated gradients, mutable (e.g. for clipping).
    pub fn grads_mut(&mut self) -> &mut ParamSet {
        &mut self.grads
    }

    /// Parameters and gradients at once (parameters mutable), for the optimizer.
    pub fn params_and_grads_mut(&mut self) -> (&mut ParamSet, &ParamSet) {
        self.last_forward = None;
        (&mut self.params, &self.grads)
    }

    /// The logits of the last forward (any kind), `[B·T, V]` in row stride `Vp`.
    pub fn logits(&self) -> Result<LogitsView<'_, f32>> {
        let l = logits_of::<Cpu>(&self.acts.logits, self.last_logits, &self.config)?;
        Ok(LogitsView::new(l.z, l.rows, l.dims.v, l.dims.vp)?)
    }

    /// Full forward of `B·T` tokens (`inputs` row-major `[B, T]`, ids `< V`): returns the logits `[B·T, V]`
    /// (row stride `Vp`; padded columns are zero and outside the view) and keeps every activation for a
    /// backward.
    pub fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<LogitsView<'_, f32>> {
        self.forward_train(inputs, b, t)?;
        self.logits()
    }

    /// Shallow forward for scoring (hierarchical ESLM): the first `exit_layer` blocks (1 ≤ E ≤ L), then the final
    /// layer norm and the LM head. Keeps no activations for a backward (a later `backward_*` needs a new
    /// [`Gpt2::forward`]). Does not touch [`Gpt2::realized_flops`]; returns its own FLOPs via
    /// [`Gpt2::forward_shallow_flops`].
    pub fn forward_shallow(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<LogitsView<'_, f32>> {
        self.forward_no_grad(inputs, b, t, exit_layer)?;
        self.logits()
    }

    /// Full-depth forward for evaluation or as a reference/teacher model: like [`Gpt2::forward`] but keeps no
    /// activations for a backward.
    pub fn forward_inference(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
    ) -> Result<LogitsView<'_, f32>> {
        let l = self.config.n_layer;
        self.forward_shallow(inputs, b, t, l)
    }

    /// Dense backward of the last [`Gpt2::forward`]: `dlogits [B·T, Vp]` (columns `V..Vp` ignored).
    /// Accumulates into the gradients. Same as [`Gpt2::backward_sparse`] with every row kept.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        let (b, t) = self.last_forward.ok_or(Gpt2Error::NoForward)?;
        let kept: Vec<u32> = (0..(b * t) as u32).collect();
        self.backward_sparse(&kept, dlogits)
    }

    /// Row-sparse backward of the last [`Gpt2::forward`]: the loss gradient is non-zero only on the rows `kept`
    /// (strictly ascending flat indices `< B·T`, K ≥ 1), given compact as host `dlogits_kv [K, Vp]` (at least
    /// `K·Vp` floats; columns `V..Vp` ignored). Accumulates into the gradients ([`Gpt2::zero_grad`] first for a
    /// fresh step). The LM head and every row-wise op up to the last block's attention do K rows of work.
    pub fn backward_sparse(&mut self, kept: &[u32], dlogits_kv: &[f32]) -> Result<()> {
        let vp = self.config.padded_vocab_size;
        let k = kept.len();
        if dlogits_kv.len() < k * vp {
            return Err(Gpt2Error::Shape {
                what: "dlogits",
                expected: format!("at least {} floats ([K={k}, Vp={vp}])", k * vp),
                got: format!("{} floats", dlogits_kv.len()),
            });
        }
        self.backward_rows(kept, &dlogits_kv[..k * vp])
    }
}

impl<B: Backend> Gpt2<B> {
    /// A GPT-2-initialised model (see [`crate::init`]) on `backend`.
    pub fn new_on(
        backend: B,
        config: GptConfig,
        b_max: usize,
        t_max: usize,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        Self::from_host_params(
            backend,
            &crate::init::gpt2_init(&config, seed),
            b_max,
            t_max,
        )
    }

    /// A model on `backend` with the host parameters `params` (uploaded) and buffers for `b_max × t_max`.
    pub fn from_host_params(
        mut backend: B,
        params: &ParamSet,
        b_max: usize,
        t_max: usize,
    ) -> Result<Self> {
        let mut on_device = ParamSet::zeros_on(&mut backend, params.config());
        backend.upload(B::view_mut(on_device.buf_mut()), params.as_slice());
        Self::build(backend, on_device, b_max, t_max)
    }

    fn build(mut backend: B, params: ParamSet<B>, b_max: usize, t_max: usize) -> Result<Self> {
        let config = *params.config();
        config.validate()?;
        if b_max == 0 || t_max == 0 || t_max > config.max_seq_len {
            return Err(Gpt2Error::InvalidConfig(format!(
                "max batch {b_max}x{t_max} must be positive with T_max <= max_seq_len {}",
                config.max_seq_len
            )));
        }
        // The largest buffers (f32): logits [N, Vp], attention probabilities [L·H, N, T], MLP [L, N, 4C].
        let fits = |dims: [usize; 4]| {
            dims.iter()
                .try_fold(4usize, |acc, &d| acc.checked_mul(d))
                .is_some_and(|bytes| bytes <= isize::MAX as usize)
        };
        let (l, h, c) = (config.n_layer, config.n_head, config.n_embd);
        let ok = fits([b_max, t_max, config.padded_vocab_size, 1])
            && fits([l * h, b_max, t_max, t_max])
            && fits([l, b_max, t_max, 4 * c]);
        if !ok {
            return Err(Gpt2Error::InvalidConfig(format!(
                "buffers for a {b_max}x{t_max} batch do not fit in memory"
            )));
        }
        let n_max = b_max * t_max;
        backend.register_params(B::view(params.buf()));
        let grads = ParamSet::zeros_on(&mut backend, &config);
        let acts = Activations::new(&mut backend, &config, b_max, t_max);
        let gbuf = GradBuffers::new(&mut backend, &config, n_max);
        let inputs = backend.alloc_tokens(n_max);
        let head = LossHead::new(&mut backend, n_max);
        // A device backend reports a failed allocation or upload here (the CPU's cannot fail).
        backend.status()?;
        Ok(Self {
            acts,
            gbuf,
            inputs,
            head,
            config,
            params,
            grads,
            b_max,
            t_max,
            last_forward: None,
            last_logits: None,
            flops: FlopCounter::default(),
            optimizer: None,
            shard: None,
            prefix: None,
            backend,
        })
    }

    /// The model config.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Maximum batch `(B_max, T_max)` the buffers hold.
    pub fn max_batch(&self) -> (usize, usize) {
        (self.b_max, self.t_max)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, for its own settings (e.g. `Cuda::set_fused_epilogues`); the model's buffers stay the
    /// model's.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The parameters in the backend's buffer.
    pub fn device_params(&self) -> &ParamSet<B> {
        &self.params
    }

    /// The backend's first recorded failure, if any, after waiting for queued work (a device backend fills
    /// failed downloads with NaN: check this after [`Gpt2::params_to_host`] before writing them anywhere).
    pub fn status(&self) -> Result<()> {
        self.backend.status()
    }

    /// A host copy of the parameters (for checkpoints).
    pub fn params_to_host(&self) -> ParamSet {
        let mut host = ParamSet::zeros(&self.config);
        self.backend
            .download(B::view(self.params.buf()), host.as_mut_slice());
        host
    }

    /// A host copy of the accumulated gradients (tests, debugging; the step never needs it).
    pub fn grads_to_host(&self) -> ParamSet {
        let mut host = ParamSet::zeros(&self.config);
        self.backend
            .download(B::view(self.grads.buf()), host.as_mut_slice());
        host
    }

    /// Replaces the parameters by the host set `params` (same config). Invalidates pending activations.
    pub fn load_params(&mut self, params: &ParamSet) -> Result<()> {
        if params.layout() != self.params.layout() {
            return Err(Gpt2Error::Shape {
                what: "parameters",
                expected: format!("{} floats for {:?}", self.params.len(), self.config),
                got: format!("{} floats for {:?}", params.len(), params.config()),
            });
        }
        self.last_forward = None;
        self.backend
            .upload(B::view_mut(self.params.buf_mut()), params.as_slice());
        Ok(())
    }

    /// Marks the activations stale (the parameters changed): a backward needs a new forward.
    pub(crate) fn invalidate_forward(&mut self) {
        self.last_forward = None;
    }

    /// Sets all gradients to zero.
    pub fn zero_grad(&mut self) {
        self.backend.fill_zero(B::view_mut(self.grads.buf_mut()));
    }

    /// FLOPs of the ops run since the last full forward (its forward plus any backward).
    pub fn realized_flops(&self) -> FlopCounter {
        self.flops
    }

    /// Paper-convention FLOPs for `tokens` tokens at kept fraction `rho`: `2·P` forward + `4·P·ρ` backward per
    /// token, `P` = parameters excluding padded rows (see `docs/engine.md`).
    pub fn paper_flops(&self, tokens: usize, rho: f64) -> f64 {
        let p = self.config.num_params_unpadded() as f64;
        tokens as f64 * (2.0 * p + 4.0 * p * rho)
    }

    /// FLOPs of a shallow forward of `b·t` tokens exiting after `exit_layer` blocks (what the ops count:
    /// linear layers, blocked causal attention, LM head).
    pub fn forward_shallow_flops(&self, b: usize, t: usize, exit_layer: usize) -> f64 {
        let (c, v, nh) = (
            self.config.n_embd,
            self.config.vocab_size,
            self.config.n_head,
        );
        let n = (b * t) as f64;
        let per_layer =
            n * 24.0 * (c * c) as f64 + attention::forward_flops(AttnDims { b, t, c, nh });
        exit_layer as f64 * per_layer + 2.0 * n * (c * v) as f64
    }

    fn check_batch(&self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 || b > self.b_max || t > self.t_max {
            return Err(Gpt2Error::BatchTooLarge {
                b,
                t,
                b_max: self.b_max,
                t_max: self.t_max,
            });
        }
        crate::error::check_len("inputs", inputs.len(), b * t)?;
        let v = self.config.vocab_size;
        if let Some((pos, &token)) = inputs.iter().enumerate().find(|(_, &x)| x as usize >= v) {
            return Err(Gpt2Error::TokenOutOfRange {
                pos,
                token,
                vocab: v,
            });
        }
        Ok(())
    }

    /// Training forward: every block, activations kept for a backward; resets [`Gpt2::realized_flops`].
    pub(crate) fn forward_train(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        self.check_batch(inputs, b, t)?;
        self.flops = FlopCounter::default();
        self.flops.forward = self.run_forward(inputs, b, t, self.config.n_layer);
        self.last_forward = Some((b, t));
        Ok(())
    }

    /// No-grad forward through the first `exit_layer` blocks (1 ≤ E ≤ L).
    pub(crate) fn forward_no_grad(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<()> {
        self.check_batch(inputs, b, t)?;
        if exit_layer == 0 || exit_layer > self.config.n_layer {
            return Err(Gpt2Error::InvalidConfig(format!(
                "exit layer {exit_layer} must be in 1..={}",
                self.config.n_layer
            )));
        }
        self.last_forward = None;
        self.run_forward(inputs, b, t, exit_layer);
        Ok(())
    }

    /// Training forward whose LM head runs on `rows` only (strictly ascending, `< b·t`): every block and the
    /// final layer norm on all rows (attention mixes them), then the logits `[K, Vp]` of the kept rows, compact.
    /// For policies whose rows are chosen without the model's logits (random keys), this skips `2·C·V` FLOPs
    /// per dropped token on top of the backward's saving.
    pub(crate) fn forward_train_rows(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<()> {
        self.check_batch(inputs, b, t)?;
        validate_kept(rows, b * t)?;
        self.flops = FlopCounter::default();
        let head_rows = RowSet::from_kept(rows, b * t);
        self.flops.forward = self.run_forward_rows(inputs, b, t, self.config.n_layer, &head_rows);
        self.last_forward = Some((b, t));
        Ok(())
    }

    /// Uploads the tokens, runs embeddings, `depth` blocks, final LN and LM head. Returns FLOPs.
    fn run_forward(&mut self, inputs: &[u32], b: usize, t: usize, depth: usize) -> f64 {
        self.run_forward_rows(inputs, b, t, depth, &RowSet::All)
    }

    /// [`Gpt2::run_forward`] with the LM head on `head_rows` only (their logits compact).
    fn run_forward_rows(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        depth: usize,
        head_rows: &RowSet,
    ) -> f64 {
        self.prefix = None;
        let (c, n) = (self.config.n_embd, b * t);
        self.backend.upload_tokens(&mut self.inputs, inputs);
        {
            let w = self.params.weights();
            let emb = Embeddings {
                wte: w.wte,
                wpe: w.wpe,
            };
            self.backend.encoder_forward(
                wr::<B>(&mut self.acts.encoded, n * c),
                &self.inputs,
                emb,
                n,
                t,
                c,
            );
        }
        self.run_blocks(b, t, 0..depth) + self.run_head(b, t, depth, head_rows)
    }

    /// Blocks `layers` of a `[b, t]` batch whose input (the embeddings, or the previous block's output) is in
    /// place. Returns FLOPs.
    fn run_blocks(&mut self, b: usize, t: usize, layers: std::ops::Range<usize>) -> f64 {
        let (c, nh) = (self.config.n_embd, self.config.n_head);
        let n = b * t;
        let (be, a) = (&mut self.backend, &mut self.acts);
        let w = self.params.weights();
        let d = AttnDims { b, t, c, nh };
        let mut flops = 0.0;
        for l in layers {
            let (done, rest) = a.layers.split_at_mut(l);
            let x = match done.last() {
                None => rd::<B>(&a.encoded, n * c),
                Some(prev) => rd::<B>(&prev.residual3, n * c),
            };
            flops += block_forward(be, &mut rest[0], x, w.layers[l], &mut a.proj, d);
        }
        flops
    }

    /// The final layer norm on the output of block `depth − 1`, then the LM head on `head_rows` (their logits
    /// compact). Returns FLOPs.
    fn run_head(&mut self, b: usize, t: usize, depth: usize, head_rows: &RowSet) -> f64 {
        let cfg = self.config;
        let c = cfg.n_embd;
        let n = b * t;
        let (be, a) = (&mut self.backend, &mut self.acts);
        let w = self.params.weights();
        let x = block_output::<B>(&a.encoded, &a.layers, depth, n * c);
        let lnf_stats = LnStats {
            mean: wr::<B>(&mut a.lnf_mean, n),
            rstd: wr::<B>(&mut a.lnf_rstd, n),
        };
        let lnf_p = Affine {
            w: w.lnfw,
            b: w.lnfb,
        };
        be.layernorm_forward(wr::<B>(&mut a.lnf, n * c), lnf_stats, x, lnf_p, n, c);
        let head = HeadDims {
            c,
            v: cfg.vocab_size,
            vp: cfg.padded_vocab_size,
        };
        let k = head_rows.count(n);
        let h = if head_rows.is_all() {
            rd::<B>(&a.lnf, n * c)
        } else {
            // The projection scratch is free after the blocks: gather the kept rows of lnf into it.
            be.gather_rows(
                wr::<B>(&mut a.proj, k * c),
                rd::<B>(&a.lnf, n * c),
                head_rows,
                c,
            );
            rd::<B>(&a.proj, k * c)
        };
        let flops = be.lm_head_forward(wr::<B>(&mut a.logits, k * head.vp), h, w.wte, k, head);
        self.last_logits = Some(k);
        flops
    }

    /// Training forward through the first `exit_layer` blocks (1 ≤ E ≤ L) with their activations kept, then the
    /// final layer norm and the LM head on block E's output (the shallow scores). No backward can follow
    /// ([`Gpt2::forward_train_sequences`] continues it); resets [`Gpt2::realized_flops`] to its FLOPs.
    pub(crate) fn forward_train_prefix(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<()> {
        self.forward_no_grad(inputs, b, t, exit_layer)?;
        self.flops = FlopCounter::default();
        self.flops.forward = self.forward_shallow_flops(b, t, exit_layer);
        self.prefix = Some(Prefix {
            b,
            t,
            exit_layer,
            inputs: inputs.to_vec(),
        });
        Ok(())
    }

    /// Training forward of the sequences `seqs` (strictly ascending) of the batch of the last
    /// [`Gpt2::forward_train_prefix`], whose ids `inputs` (`[seqs.len(), t]`) repeats: the kept sequences'
    /// activations of the first E blocks are moved to the front of their buffers and the remaining blocks, the
    /// final layer norm and the LM head run on them only — the first E blocks are not recomputed. Returns
    /// `false` (and does nothing) when no prefix of this batch is kept; the caller then runs
    /// [`Gpt2::forward_train`]. Resets [`Gpt2::realized_flops`] to the continuation's FLOPs.
    pub(crate) fn forward_train_sequences(
        &mut self,
        seqs: &[usize],
        inputs: &[u32],
        t: usize,
    ) -> Result<bool> {
        let Some(p) = self.prefix.take() else {
            return Ok(false);
        };
        let b2 = seqs.len();
        let same = p.t == t
            && b2 > 0
            && seqs.windows(2).all(|w| w[0] < w[1])
            && seqs.last().is_some_and(|&s| s < p.b)
            && inputs.len() == b2 * t
            && seqs
                .iter()
                .zip(inputs.chunks(t))
                .all(|(&s, ids)| p.inputs[s * t..(s + 1) * t] == *ids);
        if !same {
            return Ok(false);
        }
        let (c, nh) = (self.config.n_embd, self.config.n_head);
        let d = AttnDims { b: p.b, t, c, nh };
        self.backend.upload_tokens(&mut self.inputs, inputs);
        self.backend
            .compact_blocks(wr::<B>(&mut self.acts.encoded, p.b * t * c), t * c, seqs);
        for layer in &mut self.acts.layers[..p.exit_layer] {
            layer.compact(&mut self.backend, d, seqs);
        }
        self.flops = FlopCounter::default();
        self.flops.forward = self.run_blocks(b2, t, p.exit_layer..self.config.n_layer)
            + self.run_head(b2, t, self.config.n_layer, &RowSet::All);
        self.last_forward = Some((b2, t));
        Ok(true)
    }

    /// Row-sparse backward of the last training forward from the compact loss gradient `dz [K, Vp]` of the
    /// rows `kept` (validated here); accumulates into the gradients.
    pub(crate) fn backward_rows(&mut self, kept: &[u32], dz: B::View<'_>) -> Result<()> {
        let (b, t) = self.last_forward.ok_or(Gpt2Error::NoForward)?;
        let cfg = self.config;
        let n = b * t;
        validate_kept(kept, n)?;
        let (nl, c, nh) = (cfg.n_layer, cfg.n_embd, cfg.n_head);
        let head = HeadDims {
            c,
            v: cfg.vocab_size,
            vp: cfg.padded_vocab_size,
        };
        let d = AttnDims { b, t, c, nh };
        let w = self.params.weights();
        let mut dw = self.grads.weights_mut();
        let (be, a, gb) = (&mut self.backend, &self.acts, &mut self.gbuf);
        let mut rows = RowSet::from_kept(kept, n);
        let mut fl = BackwardFlops::default();

        // LM head (tied): dh_K = dZ_K·Wte, dWte += dZ_Kᵀ·h_K, into g[1].
        let f_head = be.lm_head_backward(
            wr::<B>(&mut gb.g[1], n * c),
            re::<B>(&mut dw.wte),
            RowGrad {
                g: dz,
                rows: &rows,
                n,
            },
            rd::<B>(&a.lnf, n * c),
            w.wte,
            head,
        );
        // Final layer norm: g[0] = d(residual3 of the last block) on `rows`.
        let lnf_saved = LnSaved {
            x: block_output::<B>(&a.encoded, &a.layers, nl, n * c),
            stats: LnStats {
                mean: rd::<B>(&a.lnf_mean, n),
                rstd: rd::<B>(&a.lnf_rstd, n),
            },
            w: w.lnfw,
        };
        let dlnf = Affine {
            w: re::<B>(&mut dw.lnfw),
            b: re::<B>(&mut dw.lnfb),
        };
        let [g0, g1, ..] = &mut gb.g;
        let dh = RowGrad {
            g: rd::<B>(g1, n * c),
            rows: &rows,
            n,
        };
        be.layernorm_backward(wr::<B>(g0, n * c), dlnf, dh, lnf_saved, c);
        for l in (0..nl).rev() {
            let saved = BlockSaved {
                acts: &a.layers[l],
                x: block_output::<B>(&a.encoded, &a.layers, l, n * c),
                w: w.layers[l],
                d,
            };
            let dl = &mut dw.layers[l];
            let rows2 = mlp_backward(be, &saved, dl, gb, &rows, &mut fl);
            rows = attention_backward(be, &saved, dl, gb, &rows2, &mut fl);
        }
        let demb = Embeddings {
            wte: re::<B>(&mut dw.wte),
            wpe: re::<B>(&mut dw.wpe),
        };
        let dx = RowGrad {
            g: rd::<B>(&gb.g[0], n * c),
            rows: &rows,
            n,
        };
        be.encoder_backward(demb, dx, &self.inputs, t, c);
        self.flops.backward_head = f_head;
        self.flops.backward_row_sparse = fl.row_sparse;
        self.flops.backward_dense = fl.dense;
        Ok(())
    }
}

/// Checks that `kept` is non-empty, strictly ascending and `< n`.
pub(crate) fn validate_kept(kept: &[u32], n: usize) -> Result<()> {
    if kept.is_empty() {
        return Err(Gpt2Error::InvalidKept(
            "no kept rows (K must be >= 1)".into(),
        ));
    }
    if let Some(w) = kept.windows(2).find(|w| w[0] >= w[1]) {
        return Err(Gpt2Error::InvalidKept(format!(
            "not strictly ascending: {} then {}",
            w[0], w[1]
        )));
    }
    let last = kept[kept.len() - 1] as usize;
    if last >= n {
        return Err(Gpt2Error::InvalidKept(format!(
            "row {last} outside the batch of {n} rows"
        )));
    }
    Ok(())
}
