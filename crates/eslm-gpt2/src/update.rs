//! The engine's side of an optimizer step, as llm.c's last three calls: [`Gpt2::reduce_grads`] (sum over
//! data-parallel ranks through a [`Collective`]), [`Gpt2::grad_norm`], then [`Gpt2::clip_and_update`] (global-norm
//! clipping and the fused AdamW of [`crate::optim`]). The AdamW moments live with the parameters (allocated on
//! the first update or restore, so inference-only models such as teachers carry none).

use eslm_collective::Collective;

use crate::error::{Gpt2Error, Result};
use crate::model::Gpt2;
use crate::optim::{clip_coefficient, slice_norm, AdamW, AdamWConfig};

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

impl Gpt2 {
    /// Sums the accumulated gradients over the ranks of `collective` (a no-op for one process). Every rank must
    /// call it once per optimizer step, after its last micro-batch's backward.
    pub fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        collective
            .all_reduce_sum_f32(self.grads_mut().as_mut_slice())
            .map_err(|e| Gpt2Error::Collective(e.to_string()))
    }

    /// The global L2 norm of the accumulated gradients (f64, reproducible).
    pub fn grad_norm(&self) -> f64 {
        slice_norm(self.grads().as_slice())
    }

    /// Clips the gradients to global norm `grad_clip` (≤ 0: no clipping) and applies one AdamW update at `lr`.
    /// Returns the norm before clipping; when it is not finite the parameters and moments are left unchanged.
    pub fn clip_and_update(&mut self, config: AdamWConfig, lr: f32, grad_clip: f64) -> Result<f64> {
        let norm = self.grad_norm();
        if !norm.is_finite() {
            return Ok(norm);
        }
        if let Some(s) = clip_coefficient(norm, grad_clip) {
            self.grads_mut().as_mut_slice().iter_mut().for_each(|g| *g *= s);
        }
        let mut opt = match self.optimizer.take() {
            Some(o) => o,
            None => AdamW::new(config, self.params())?,
        };
        opt.config = config;
        let (params, grads) = self.params_and_grads_mut();
        let out = opt.update(params, grads, lr);
        self.optimizer = Some(opt);
        out.map(|()| norm)
    }

    /// A host copy of the AdamW state (zeros and step 0 before the first update).
    pub fn optimizer_snapshot(&self) -> OptimizerSnapshot {
        match &self.optimizer {
            Some(o) => OptimizerSnapshot {
                m: o.m.as_slice().to_vec(),
                v: o.v.as_slice().to_vec(),
                step: o.step,
            },
            None => OptimizerSnapshot {
                m: vec![0.0; self.params().len()],
                v: vec![0.0; self.params().len()],
                step: 0,
            },
        }
    }

    /// Restores [`Gpt2::optimizer_snapshot`]. The moments must have the parameters' length.
    pub fn restore_optimizer(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        let n = self.params().len();
        if snapshot.m.len() != n || snapshot.v.len() != n {
            return Err(Gpt2Error::Shape {
                what: "optimizer state",
                expected: format!("{n} values per moment"),
                got: format!("m {}, v {}", snapshot.m.len(), snapshot.v.len()),
            });
        }
        let mut opt = AdamW::new(AdamWConfig::default(), self.params())?;
        opt.m.as_mut_slice().copy_from_slice(&snapshot.m);
        opt.v.as_mut_slice().copy_from_slice(&snapshot.v);
        opt.step = snapshot.step;
        self.optimizer = Some(opt);
        Ok(())
    }
}
