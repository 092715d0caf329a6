//! The engine's side of an optimizer step, as llm.c's last three calls: [`Gpt2::reduce_grads`] (sum over
//! data-parallel ranks through a [`Collective`]), [`Gpt2::grad_norm`], then [`Gpt2::clip_and_update`] (global-norm
//! clipping and the fused AdamW of [`crate::optim`]). The AdamW moments live with the parameters (allocated on
//! the first update or restore, so inference-only models such as teachers carry none).
//!
//! **Sharded optimizer (ZeRO-1)**, after [`Gpt2::shard_optimizer`]: rank `r` of `R` owns the contiguous
//! [`eslm_collective::shard_range`] of the flat parameter vector and keeps the AdamW moments of that range only
//! (a 1/R share of the optimizer memory). [`Gpt2::reduce_grads`] becomes a reduce-scatter (each rank gets the
//! summed gradients of its shard), the squared gradient norm is the sum over ranks of the shards' sums, AdamW
//! updates the shard (the decay mask is applied per parameter kind, whose ranges cut across shards), and an
//! all-gather gives every rank every updated shard. The update of each element is the same arithmetic as
//! unsharded, so the parameters differ from an unsharded run only through the norm's summation order (the clip
//! coefficient). Checkpoints keep the unsharded format: [`Gpt2::optimizer_snapshot`] gathers the moments.

use std::ops::Range;
use std::sync::Arc;

use eslm_collective::Collective;

use crate::backend::{AdamWSlices, Backend, CollectiveOp};
use crate::error::{Gpt2Error, Result};
use crate::model::Gpt2;
use crate::optim::{clip_coefficient, AdamWConfig, AdamWStep};
use crate::params::ParamKind;

/// A host copy of the optimizer state, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerSnapshot {
    /// First moment, flat in the parameter layout.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
    /// Steps taken.
    pub step: u64,
}

/// The AdamW moments in backend buffers (flat, over the parameter range this rank updates: all of it, or its
/// shard under ZeRO-1) and the step count.
#[derive(Debug, Clone)]
pub(crate) struct OptState<B: Backend> {
    m: B::Buf,
    v: B::Buf,
    step: u64,
}

/// ZeRO-1: the ranks the optimizer state is sharded over and this rank's range of the flat parameters.
#[derive(Clone)]
pub(crate) struct OptShard {
    collective: Arc<dyn Collective>,
    range: Range<usize>,
}

impl std::fmt::Debug for OptShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OptShard {{ rank {} of {}, {:?} }}",
            self.collective.rank(),
            self.collective.world_size(),
            self.range
        )
    }
}

impl<B: Backend> Gpt2<B> {
    /// Connects the backend to the ranks of `collective` for [`Gpt2::reduce_grads`] (the CUDA backend opens an
    /// NCCL communicator; the CPU needs nothing). Every rank calls it once, before training.
    pub fn connect(&mut self, collective: &dyn Collective) -> Result<()> {
        self.backend.connect(collective)
    }

    /// Sets the backend's matrix-product precision ([`crate::Backend::set_matmul_precision`]).
    pub fn set_matmul_precision(&mut self, precision: crate::MatmulPrecision) -> Result<()> {
        self.backend.set_matmul_precision(precision)
    }

    /// Shards the AdamW state over the ranks of `collective` (ZeRO-1, see the module documentation); existing
    /// moments (restored or trained) keep their values. Every rank must call it, with the same world.
    pub fn shard_optimizer(&mut self, collective: Arc<dyn Collective>) -> Result<()> {
        let full = self.optimizer_snapshot()?;
        let range = eslm_collective::shard_range(
            self.params.len(),
            collective.world_size(),
            collective.rank(),
        );
        self.shard = Some(OptShard { collective, range });
        if self.optimizer.is_some() {
            self.restore_optimizer(&full)?;
        }
        Ok(())
    }

    /// Whether the optimizer state is sharded over ranks ([`Gpt2::shard_optimizer`]): then
    /// [`Gpt2::optimizer_snapshot`] is a collective every rank must call.
    pub fn optimizer_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// The range of the flat parameters this rank updates: all of them, or its shard under ZeRO-1.
    fn update_range(&self) -> Range<usize> {
        match &self.shard {
            Some(s) => s.range.clone(),
            None => 0..self.params.len(),
        }
    }

    /// Sums the accumulated gradients over the ranks of `collective` (a no-op for one process): an all-reduce,
    /// or under ZeRO-1 a reduce-scatter into this rank's shard. Every rank must call it once per optimizer step,
    /// after its last micro-batch's backward.
    pub fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let op = match &self.shard {
            Some(s) if s.collective.world_size() != collective.world_size() => {
                return Err(Gpt2Error::Collective(format!(
                    "gradients reduced over {} ranks, optimizer sharded over {}",
                    collective.world_size(),
                    s.collective.world_size()
                )))
            }
            Some(_) => CollectiveOp::ReduceScatterSum,
            None => CollectiveOp::AllReduceSum,
        };
        self.backend
            .collective(op, B::view_mut(self.grads.buf_mut()), collective)
    }

    /// The global L2 norm of the accumulated gradients (f64, reproducible). Under ZeRO-1 after
    /// [`Gpt2::reduce_grads`] only this rank's shard holds summed gradients: [`Gpt2::clip_and_update`] computes
    /// the norm over the shards instead.
    pub fn grad_norm(&self) -> f64 {
        self.backend.sum_squares(B::view(self.grads.buf())).sqrt()
    }

    /// The global gradient norm as the update sees it: over every parameter, or the shards' squared sums added
    /// over ranks.
    fn update_grad_norm(&self) -> Result<f64> {
        let Some(s) = &self.shard else {
            return Ok(self.grad_norm());
        };
        let local = self
            .backend
            .sum_squares(B::slice(B::view(self.grads.buf()), s.range.clone()));
        let total = s
            .collective
            .sum_f64(local)
            .map_err(|e| Gpt2Error::Collective(e.to_string()))?;
        Ok(total.sqrt())
    }

    /// Clips the gradients to global norm `grad_clip` (≤ 0: no clipping) and applies one AdamW update at `lr`.
    /// Returns the norm before clipping; when it is not finite the parameters and moments are left unchanged.
    ///
    /// # Errors
    /// An invalid `config` or a negative or non-finite `lr` (checked before anything changes).
    pub fn clip_and_update(&mut self, config: AdamWConfig, lr: f32, grad_clip: f64) -> Result<f64> {
        let norm = self.update_grad_norm()?;
        if !norm.is_finite() {
            // A device backend's recorded failure also reads as a NaN norm: report it, not a skipped step.
            self.backend.status()?;
            return Ok(norm);
        }
        config.validate()?;
        if !lr.is_finite() || lr < 0.0 {
            return Err(Gpt2Error::InvalidHyperParameter(format!(
                "learning rate {lr}"
            )));
        }
        // Clipping is fused into the update: the gradients are scaled as AdamW reads them (no extra pass).
        let clip = clip_coefficient(norm, grad_clip).unwrap_or(1.0);
        let mut opt = match self.optimizer.take() {
            Some(o) => o,
            None => self.zero_optimizer(),
        };
        opt.step += 1;
        let constants = AdamWStep::new(&config, lr, opt.step).with_grad_scale(clip);
        self.adamw_over_range(&mut opt, &constants);
        self.optimizer = Some(opt);
        if let Some(s) = &self.shard {
            let collective = s.collective.clone();
            self.backend.collective(
                CollectiveOp::AllGather,
                B::view_mut(self.params.buf_mut()),
                collective.as_ref(),
            )?;
        }
        self.invalidate_forward();
        // A device backend reports a failed launch of this step here (the one wait per optimizer step).
        self.backend.status()?;
        Ok(norm)
    }

    /// One AdamW update of the parameters in [`Self::update_range`] (moments `opt` cover that range), with the
    /// decay mask of each parameter kind whose range overlaps it.
    fn adamw_over_range(&mut self, opt: &mut OptState<B>, constants: &AdamWStep) {
        let range = self.update_range();
        let layout = self.params.layout().clone();
        let mut p = B::slice_mut(B::view_mut(self.params.buf_mut()), range.clone());
        let mut g = B::slice(B::view(self.grads.buf()), range.clone());
        let (mut m, mut v) = (B::view_mut(&mut opt.m), B::view_mut(&mut opt.v));
        // The kinds are laid out in order, so their overlaps with `range` follow each other.
        for kind in ParamKind::ALL {
            let k = layout.range(kind);
            let len = k
                .end
                .min(range.end)
                .saturating_sub(k.start.max(range.start));
            let (pk, p_rest) = B::split_mut(p, len);
            let (gk, g_rest) = B::split(g, len);
            let (mk, m_rest) = B::split_mut(m, len);
            let (vk, v_rest) = B::split_mut(v, len);
            (p, g, m, v) = (p_rest, g_rest, m_rest, v_rest);
            if len > 0 {
                let slices = AdamWSlices {
                    p: pk,
                    g: gk,
                    m: mk,
                    v: vk,
                };
                self.backend.adamw(slices, kind.decays(), constants);
            }
        }
    }

    fn zero_optimizer(&mut self) -> OptState<B> {
        let len = self.update_range().len();
        OptState {
            m: self.backend.alloc(len),
            v: self.backend.alloc(len),
            step: 0,
        }
    }

    /// A host copy of the AdamW state over every parameter (zeros and step 0 before the first update). Under
    /// ZeRO-1 the shards are gathered from every rank: every rank must call it.
    pub fn optimizer_snapshot(&self) -> Result<OptimizerSnapshot> {
        let len = self.params.len();
        let range = self.update_range();
        let mut snap = OptimizerSnapshot {
            m: vec![0.0; len],
            v: vec![0.0; len],
            step: 0,
        };
        if let Some(o) = &self.optimizer {
            self.backend
                .download(B::view(&o.m), &mut snap.m[range.clone()]);
            self.backend.download(B::view(&o.v), &mut snap.v[range]);
            snap.step = o.step;
            // A failed download reads as NaN: report the failure instead of checkpointing it.
            self.backend.status()?;
        }
        if let Some(s) = &self.shard {
            for moment in [&mut snap.m, &mut snap.v] {
                CollectiveOp::AllGather.run_on_host(s.collective.as_ref(), moment)?;
            }
        }
        Ok(snap)
    }

    /// Restores [`Gpt2::optimizer_snapshot`] (under ZeRO-1, this rank's shard of it). The moments must have the
    /// parameters' length.
    pub fn restore_optimizer(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        let n = self.params.len();
        if snapshot.m.len() != n || snapshot.v.len() != n {
            return Err(Gpt2Error::Shape {
                what: "optimizer state",
                expected: format!("{n} values per moment"),
                got: format!("m {}, v {}", snapshot.m.len(), snapshot.v.len()),
            });
        }
        let range = self.update_range();
        let mut opt = self.zero_optimizer();
        self.backend
            .upload(B::view_mut(&mut opt.m), &snapshot.m[range.clone()]);
        self.backend
            .upload(B::view_mut(&mut opt.v), &snapshot.v[range]);
        opt.step = snapshot.step;
        self.optimizer = Some(opt);
        Ok(())
    }
}
