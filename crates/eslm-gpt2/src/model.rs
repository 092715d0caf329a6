//! The GPT-2 graph as a fixed, llm.c-style sequence of ops (see [`crate::ops`]): embeddings → L blocks
//! (`x + attn(ln1(x))`, then `x + mlp(ln2(x))`) → final layer norm → tied LM head. Activations and gradient
//! buffers are allocated once for a maximum batch `(B_max, T_max)` and reused.
//!
//! The backward walks the same sequence in reverse, carrying the output gradient as a [`RowSet`] plus a compact
//! buffer. It starts on the K kept rows of the loss; every op decides from the row set it receives how much
//! work to do, so the LM head, final layer norm and the last block's row-wise parts run on K rows and the first
//! attention backward densifies. Nothing in this file special-cases "the last block".

use crate::config::GptConfig;
use crate::error::{Gpt2Error, Result};
use crate::loss_head::LossHead;
use crate::ops::attention::{self, AttnDims};
use crate::ops::{encoder, gelu, layernorm, linear, residual, FlopCounter, RowSet};
use crate::optim::AdamW;
use crate::params::{layer, layer_mut, ParamSet};
use eslm_kernels::LogitsView;

/// Forward activations for `B_max·T_max` rows (per-layer tensors stacked over L, each `N_max` rows).
#[derive(Debug, Clone)]
struct Activations {
    encoded: Vec<f32>,   // [N, C]
    ln1: Vec<f32>,       // [L, N, C]
    ln1_mean: Vec<f32>,  // [L, N]
    ln1_rstd: Vec<f32>,  // [L, N]
    qkv: Vec<f32>,       // [L, N, 3C]
    atty: Vec<f32>,      // [L, N, C]
    att: Vec<f32>,       // [L, B, H, T, T]
    residual2: Vec<f32>, // [L, N, C]
    ln2: Vec<f32>,       // [L, N, C]
    ln2_mean: Vec<f32>,  // [L, N]
    ln2_rstd: Vec<f32>,  // [L, N]
    fch: Vec<f32>,       // [L, N, 4C]
    fch_gelu: Vec<f32>,  // [L, N, 4C]
    residual3: Vec<f32>, // [L, N, C]
    lnf: Vec<f32>,       // [N, C]
    lnf_mean: Vec<f32>,  // [N]
    lnf_rstd: Vec<f32>,  // [N]
    logits: Vec<f32>,    // [N, Vp]
    proj: Vec<f32>,      // [N, C] scratch for projection outputs
}

impl Activations {
    fn new(cfg: &GptConfig, b: usize, t: usize) -> Self {
        let (l, c, n, nh) = (cfg.n_layer, cfg.n_embd, b * t, cfg.n_head);
        let z = |len: usize| vec![0.0f32; len];
        Self {
            encoded: z(n * c),
            ln1: z(l * n * c),
            ln1_mean: z(l * n),
            ln1_rstd: z(l * n),
            qkv: z(l * n * 3 * c),
            atty: z(l * n * c),
            att: z(l * b * nh * t * t),
            residual2: z(l * n * c),
            ln2: z(l * n * c),
            ln2_mean: z(l * n),
            ln2_rstd: z(l * n),
            fch: z(l * n * 4 * c),
            fch_gelu: z(l * n * 4 * c),
            residual3: z(l * n * c),
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * cfg.padded_vocab_size),
            proj: z(n * c),
        }
    }
}

/// Gradient work buffers (compact gradients of at most `N_max` rows).
#[derive(Debug, Clone)]
struct GradBuffers {
    g: [Vec<f32>; 4],  // [N, C] each
    g4: [Vec<f32>; 2], // [N, 4C] each
    gqkv: Vec<f32>,    // [N, 3C]
    scratch: Vec<f32>, // [N, 4C] gathers
}

impl GradBuffers {
    fn new(cfg: &GptConfig, n: usize) -> Self {
        let c = cfg.n_embd;
        let z = |len: usize| vec![0.0f32; len];
        Self {
            g: [z(n * c), z(n * c), z(n * c), z(n * c)],
            g4: [z(n * 4 * c), z(n * 4 * c)],
            gqkv: z(n * 3 * c),
            scratch: z(n * 4 * c),
        }
    }
}

/// A GPT-2 model with its parameters, gradients and reusable activation buffers.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    config: GptConfig,
    params: ParamSet,
    grads: ParamSet,
    b_max: usize,
    t_max: usize,
    acts: Activations,
    gbuf: GradBuffers,
    inputs: Vec<u32>,
    /// `(B, T)` of the last full forward, if its activations are still valid for a backward.
    last_forward: Option<(usize, usize)>,
    /// `(B, T)` of the logits currently in the logits buffer.
    last_logits: Option<(usize, usize)>,
    flops: FlopCounter,
    /// Targets, statistics, selection and kept-row gradient of the last forward ([`crate::loss_head`]).
    pub(crate) head: LossHead,
    /// AdamW state ([`crate::update`]); `None` until the first update or restore.
    pub(crate) optimizer: Option<AdamW>,
}

impl Gpt2 {
    /// A GPT-2-initialised model (see [`crate::init`]) with buffers for batches up to `b_max × t_max`.
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

    /// A model with the given parameters (e.g. loaded from a checkpoint) and buffers for `b_max × t_max`.
    pub fn from_params(params: ParamSet, b_max: usize, t_max: usize) -> Result<Self> {
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
        let grads = ParamSet::zeros(&config);
        Ok(Self {
            acts: Activations::new(&config, b_max, t_max),
            gbuf: GradBuffers::new(&config, b_max * t_max),
            inputs: Vec::with_capacity(b_max * t_max),
            config,
            params,
            grads,
            b_max,
            t_max,
            last_forward: None,
            last_logits: None,
            flops: FlopCounter::default(),
            head: LossHead::default(),
            optimizer: None,
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

    /// Sets all gradients to zero.
    pub fn zero_grad(&mut self) {
        self.grads.fill_zero();
    }

    /// FLOPs of the ops run since the last full [`Gpt2::forward`] (its forward plus any backward).
    pub fn realized_flops(&self) -> FlopCounter {
        self.flops
    }

    /// Paper-convention FLOPs for `tokens` tokens at kept fraction `rho`: `2·P` forward + `4·P·ρ` backward per
    /// token, `P` = parameters excluding padded rows (see `docs/engine.md`).
    pub fn paper_flops(&self, tokens: usize, rho: f64) -> f64 {
        let p = self.config.num_params_unpadded() as f64;
        tokens as f64 * (2.0 * p + 4.0 * p * rho)
    }

    /// The logits of the last forward (any kind), `[B·T, V]` in row stride `Vp`.
    pub fn logits(&self) -> Result<LogitsView<'_, f32>> {
        let (b, t) = self.last_logits.ok_or(Gpt2Error::NoForward)?;
        Ok(LogitsView::new(
            &self.acts.logits[..b * t * self.config.padded_vocab_size],
            b * t,
            self.config.vocab_size,
            self.config.padded_vocab_size,
        )?)
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

    /// Full forward of `B·T` tokens (`inputs` row-major `[B, T]`, ids `< V`): returns the logits `[B·T, V]`
    /// (row stride `Vp`; padded columns are zero and outside the view) and keeps every activation for a
    /// backward.
    pub fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<LogitsView<'_, f32>> {
        self.check_batch(inputs, b, t)?;
        self.flops = FlopCounter::default();
        self.flops.forward = self.run_forward(inputs, b, t, self.config.n_layer);
        self.inputs.clear();
        self.inputs.extend_from_slice(inputs);
        self.last_forward = Some((b, t));
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
        self.check_batch(inputs, b, t)?;
        if exit_layer == 0 || exit_layer > self.config.n_layer {
            return Err(Gpt2Error::InvalidConfig(format!(
                "exit layer {exit_layer} must be in 1..={}",
                self.config.n_layer
            )));
        }
        self.last_forward = None;
        self.run_forward(inputs, b, t, exit_layer);
        self.logits()
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

    /// Runs embeddings, `depth` blocks, final LN and LM head. Returns FLOPs.
    fn run_forward(&mut self, inputs: &[u32], b: usize, t: usize, depth: usize) -> f64 {
        let cfg = self.config;
        let (nl, c, nh) = (cfg.n_layer, cfg.n_embd, cfg.n_head);
        let n = b * t;
        let nmax = self.b_max * self.t_max;
        let p = self.params.views();
        let a = &mut self.acts;
        let mut flops = 0.0;
        encoder::forward(&mut a.encoded[..n * c], inputs, p.wte, p.wpe, t, c);
        let d = AttnDims { b, t, c, nh };
        for l in 0..depth {
            let (prev3, cur3) = a.residual3.split_at_mut(l * nmax * c);
            let res_in: &[f32] = if l == 0 {
                &a.encoded[..n * c]
            } else {
                &prev3[(l - 1) * nmax * c..][..n * c]
            };
            let at = |w: usize| l * nmax * w..l * nmax * w + n * w;
            let (r_c, r_n, r_3c, r_4c) = (at(c), at(1), at(3 * c), at(4 * c));
            layernorm::forward(
                &mut a.ln1[r_c.clone()],
                Some(&mut a.ln1_mean[r_n.clone()]),
                Some(&mut a.ln1_rstd[r_n.clone()]),
                res_in,
                layer(p.ln1w, nl, l),
                layer(p.ln1b, nl, l),
                n,
                c,
            );
            flops += linear::forward(
                &mut a.qkv[r_3c.clone()],
                &a.ln1[r_c.clone()],
                layer(p.qkvw, nl, l),
                Some(layer(p.qkvb, nl, l)),
                n,
                c,
                3 * c,
            );
            let att_len = self.b_max * nh * self.t_max * self.t_max;
            flops += attention::forward(
                &mut a.atty[r_c.clone()],
                &mut a.att[l * att_len..l * att_len + b * nh * t * t],
                &a.qkv[r_3c.clone()],
                d,
            );
            flops += linear::forward(
                &mut a.proj[..n * c],
                &a.atty[r_c.clone()],
                layer(p.attprojw, nl, l),
                Some(layer(p.attprojb, nl, l)),
                n,
                c,
                c,
            );
            residual::forward(&mut a.residual2[r_c.clone()], res_in, &a.proj[..n * c]);
            layernorm::forward(
                &mut a.ln2[r_c.clone()],
                Some(&mut a.ln2_mean[r_n.clone()]),
                Some(&mut a.ln2_rstd[r_n.clone()]),
                &a.residual2[r_c.clone()],
                layer(p.ln2w, nl, l),
                layer(p.ln2b, nl, l),
                n,
                c,
            );
            flops += linear::forward(
                &mut a.fch[r_4c.clone()],
                &a.ln2[r_c.clone()],
                layer(p.fcw, nl, l),
                Some(layer(p.fcb, nl, l)),
                n,
                c,
                4 * c,
            );
            gelu::forward(&mut a.fch_gelu[r_4c.clone()], &a.fch[r_4c.clone()]);
            flops += linear::forward(
                &mut a.proj[..n * c],
                &a.fch_gelu[r_4c.clone()],
                layer(p.fcprojw, nl, l),
                Some(layer(p.fcprojb, nl, l)),
                n,
                4 * c,
                c,
            );
            residual::forward(&mut cur3[..n * c], &a.residual2[r_c], &a.proj[..n * c]);
        }
        let last = if depth == 0 {
            &a.encoded[..n * c]
        } else {
            &a.residual3[(depth - 1) * nmax * c..][..n * c]
        };
        layernorm::forward(
            &mut a.lnf[..n * c],
            Some(&mut a.lnf_mean[..n]),
            Some(&mut a.lnf_rstd[..n]),
            last,
            p.lnfw,
            p.lnfb,
            n,
            c,
        );
        let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size);
        flops +=
            linear::lm_head_forward(&mut a.logits[..n * vp], &a.lnf[..n * c], p.wte, n, c, v, vp);
        self.last_logits = Some((b, t));
        flops
    }

    /// Dense backward of the last [`Gpt2::forward`]: `dlogits [B·T, Vp]` (columns `V..Vp` ignored).
    /// Accumulates into the gradients. Same as [`Gpt2::backward_sparse`] with every row kept.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        let (b, t) = self.last_forward.ok_or(Gpt2Error::NoForward)?;
        let kept: Vec<u32> = (0..(b * t) as u32).collect();
        self.backward_sparse(&kept, dlogits)
    }

    /// Row-sparse backward of the last [`Gpt2::forward`]: the loss gradient is non-zero only on the rows `kept`
    /// (strictly ascending flat indices `< B·T`, K ≥ 1), given compact as `dlogits_kv [K, Vp]` (at least `K·Vp`
    /// floats; columns `V..Vp` ignored). Accumulates into the gradients ([`Gpt2::zero_grad`] first for a fresh
    /// step). The LM head and every row-wise op up to the last block's attention do K rows of work.
    pub fn backward_sparse(&mut self, kept: &[u32], dlogits_kv: &[f32]) -> Result<()> {
        let (b, t) = self.last_forward.ok_or(Gpt2Error::NoForward)?;
        let cfg = self.config;
        let n = b * t;
        validate_kept(kept, n)?;
        let (nl, c, nh, v, vp) = (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.padded_vocab_size,
        );
        let k = kept.len();
        if dlogits_kv.len() < k * vp {
            return Err(Gpt2Error::Shape {
                what: "dlogits",
                expected: format!("at least {} floats ([K={k}, Vp={vp}])", k * vp),
                got: format!("{} floats", dlogits_kv.len()),
            });
        }
        let nmax = self.b_max * self.t_max;
        let p = self.params.views();
        let gr = self.grads.views_mut();
        let a = &self.acts;
        let GradBuffers {
            g,
            g4,
            gqkv,
            scratch,
        } = &mut self.gbuf;
        let [g0, g1, g2, g3] = g;
        let [g4a, g4b] = g4;
        let mut rows = RowSet::from_kept(kept, n);
        let (mut f_sparse, mut f_dense) = (0.0, 0.0);
        let mut add = |rows: &RowSet, f: f64| {
            if rows.is_all() {
                f_dense += f
            } else {
                f_sparse += f
            }
        };

        // LM head (tied): dh_K = dZ_K·Wte, dWte += dZ_Kᵀ·h_K.
        let f_head = linear::lm_head_backward(
            g1,
            gr.wte,
            &dlogits_kv[..k * vp],
            &a.lnf[..n * c],
            p.wte,
            &rows,
            n,
            c,
            v,
            vp,
            scratch,
        );
        let last = &a.residual3[(nl - 1) * nmax * c..][..n * c];
        layernorm::backward(
            g0,
            gr.lnfw,
            gr.lnfb,
            g1,
            last,
            &a.lnf_mean,
            &a.lnf_rstd,
            p.lnfw,
            &rows,
            n,
            c,
        );
        // `g0` holds d(residual3[L-1]) on `rows`.
        for l in (0..nl).rev() {
            let r_c = l * nmax * c..l * nmax * c + n * c;
            let r_n = l * nmax..l * nmax + n;
            let r_4c = l * nmax * 4 * c..l * nmax * 4 * c + n * 4 * c;
            let r_3c = l * nmax * 3 * c..l * nmax * 3 * c + n * 3 * c;
            let res_in = if l == 0 {
                &a.encoded[..n * c]
            } else {
                &a.residual3[(l - 1) * nmax * c..][..n * c]
            };
            // MLP branch: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))).
            let f = linear::backward(
                Some(g4a),
                layer_mut(gr.fcprojw, nl, l),
                Some(layer_mut(gr.fcprojb, nl, l)),
                g0,
                c,
                &a.fch_gelu[r_4c.clone()],
                layer(p.fcprojw, nl, l),
                &rows,
                n,
                4 * c,
                c,
                scratch,
            );
            add(&rows, f);
            gelu::backward(g4b, g4a, &a.fch[r_4c.clone()], &rows, n, 4 * c);
            let f = linear::backward(
                Some(g1),
                layer_mut(gr.fcw, nl, l),
                Some(layer_mut(gr.fcb, nl, l)),
                g4b,
                4 * c,
                &a.ln2[r_c.clone()],
                layer(p.fcw, nl, l),
                &rows,
                n,
                c,
                4 * c,
                scratch,
            );
            add(&rows, f);
            layernorm::backward(
                g2,
                layer_mut(gr.ln2w, nl, l),
                layer_mut(gr.ln2b, nl, l),
                g1,
                &a.residual2[r_c.clone()],
                &a.ln2_mean[r_n.clone()],
                &a.ln2_rstd[r_n.clone()],
                layer(p.ln2w, nl, l),
                &rows,
                n,
                c,
            );
            let rows2 = residual::merge(g3, &rows, g0, &rows, g2, n, c);
            // Attention branch: residual2 = res_in + attproj(attn(qkv(ln1(res_in)))).
            let f = linear::backward(
                Some(g1),
                layer_mut(gr.attprojw, nl, l),
                Some(layer_mut(gr.attprojb, nl, l)),
                g3,
                c,
                &a.atty[r_c.clone()],
                layer(p.attprojw, nl, l),
                &rows2,
                n,
                c,
                c,
                scratch,
            );
            add(&rows2, f);
            let att_len = self.b_max * nh * self.t_max * self.t_max;
            let f = attention::backward(
                gqkv,
                g1,
                &a.qkv[r_3c.clone()],
                &a.att[l * att_len..l * att_len + b * nh * t * t],
                &rows2,
                AttnDims { b, t, c, nh },
            );
            add(&RowSet::All, f);
            let dense = RowSet::All;
            let f = linear::backward(
                Some(g2),
                layer_mut(gr.qkvw, nl, l),
                Some(layer_mut(gr.qkvb, nl, l)),
                gqkv,
                3 * c,
                &a.ln1[r_c.clone()],
                layer(p.qkvw, nl, l),
                &dense,
                n,
                c,
                3 * c,
                scratch,
            );
            add(&dense, f);
            layernorm::backward(
                g1,
                layer_mut(gr.ln1w, nl, l),
                layer_mut(gr.ln1b, nl, l),
                g2,
                res_in,
                &a.ln1_mean[r_n.clone()],
                &a.ln1_rstd[r_n],
                layer(p.ln1w, nl, l),
                &dense,
                n,
                c,
            );
            rows = residual::merge(g0, &rows2, g3, &dense, g1, n, c);
        }
        encoder::backward(gr.wte, gr.wpe, g0, &self.inputs, &rows, n, t, c);
        self.flops.backward_head = f_head;
        self.flops.backward_row_sparse = f_sparse;
        self.flops.backward_dense = f_dense;
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
