//! The engine's side of an optimizer step, as llm.c's last three calls: [`Gpt2::reduce_grads`] (sum over
//! data-parallel ranks through a [`Collective`]), [`Gpt2::grad_norm`], then [`Gpt2::clip_and_update`] (global-norm
//! clipping and the fused AdamW of [`crate::optim`]). The AdamW moments live with the parameters (allocated on
//! the first update or restore, so inference-only models such as teachers carry none).

use eslm_collective::Collective;

use crate::backend::{AdamWSlices, Backend};
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

/// The AdamW moments in backend buffers (flat, in the parameter layout) and the step count.
#[derive(Debug, Clone)]
pub(crate) struct OptState<B: Backend> {
    m: B::Buf,
    v: B::Buf,
    step: u64,
}

impl<B: Backend> Gpt2<B> {
    /// Sums the accumulated gradients over the ranks of `collective` (a no-op for one process). Every rank must
    /// call it once per optimizer step, after its last micro-batch's backward.
    pub fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        self.backend
            .all_reduce_sum(B::view_mut(self.grads.buf_mut()), collective)
    }

    /// The global L2 norm of the accumulated gradients (f64, reproducible).
    pub fn grad_norm(&self) -> f64 {
        self.backend.sum_squares(B::view(self.grads.buf())).sqrt()
    }

    /// Clips the gradients to global norm `grad_clip` (≤ 0: no clipping) and applies one AdamW update at `lr`.
    /// Returns the norm before clipping; when it is not finite the parameters and moments are left unchanged.
    ///
    /// # Errors
    /// An invalid `config` or a negative or non-finite `lr` (checked before anything changes).
    pub fn clip_and_update(&mut self, config: AdamWConfig, lr: f32, grad_clip: f64) -> Result<f64> {
        let norm = self.grad_norm();
        if !norm.is_finite() {
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
        let layout = self.params.layout().clone();
        {
            let mut p = B::view_mut(self.params.buf_mut());
            let mut g = B::view(self.grads.buf());
            let (mut m, mut v) = (B::view_mut(&mut opt.m), B::view_mut(&mut opt.v));
            for kind in ParamKind::ALL {
                let len = layout.range(kind).len();
                let (pk, p_rest) = B::split_mut(p, len);
                let (gk, g_rest) = B::split(g, len);
                let (mk, m_rest) = B::split_mut(m, len);
                let (vk, v_rest) = B::split_mut(v, len);
                (p, g, m, v) = (p_rest, g_rest, m_rest, v_rest);
                let slices = AdamWSlices {
                    p: pk,
                    g: gk,
                    m: mk,
                    v: vk,
                };
                self.backend.adamw(slices, kind.decays(), &constants);
            }
        }
        self.optimizer = Some(opt);
        self.invalidate_forward();
        // A device backend reports a failed launch of this step here (the one wait per optimizer step).
        self.backend.status()?;
        Ok(norm)
    }

    fn zero_optimizer(&mut self) -> OptState<B> {
        let len = self.params.len();
        OptState {
            m: self.backend.alloc(len),
            v: self.backend.alloc(len),
            step: 0,
        }
    }

    /// A host copy of the AdamW state (zeros and step 0 before the first update).
    pub fn optimizer_snapshot(&self) -> OptimizerSnapshot {
        let len = self.params.len();
        let mut snap = OptimizerSnapshot {
            m: vec![0.0; len],
            v: vec![0.0; len],
            step: 0,
        };
        if let Some(o) = &self.optimizer {
            self.backend.download(B::view(&o.m), &mut snap.m);
            self.backend.download(B::view(&o.v), &mut snap.v);
            snap.step = o.step;
        }
        snap
    }

    /// Restores [`Gpt2::optimizer_snapshot`]. The moments must have the parameters' length.
    pub fn restore_optimizer(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        let n = self.params.len();
        if snapshot.m.len() != n || snapshot.v.len() != n {
            return Err(Gpt2Error::Shape {
                what: "optimizer state",
                expected: format!("{n} values per moment"),
                got: format!("m {}, v {}", snapshot.m.len(), snapshot.v.len()),
            });
        }
        let mut opt = self.zero_optimizer();
        self.backend.upload(B::view_mut(&mut opt.m), &snapshot.m);
        self.backend.upload(B::view_mut(&mut opt.v), &snapshot.v);
        opt.step = snapshot.step;
        self.optimizer = Some(opt);
        Ok(())
    }
}
