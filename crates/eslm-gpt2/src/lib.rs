//! # eslm-gpt2
//!
//! A minimal GPT-2 training engine (f32) with a hand-written reverse pass whose backward is **row-sparse by
//! construction**: when the loss keeps only K of the N token positions, the gradient carries "non-zero on these K
//! rows" ([`ops::RowSet`]) through every row-wise op (LM head, final layer norm, the last block's MLP, attention
//! output projection and residual adds), which then do K rows of work; attention mixes rows and densifies.
//!
//! The model [`Gpt2<B>`](Gpt2) is written once against the [`Backend`] trait (buffers and op set of a device);
//! [`Cpu`] is the default backend. The loss head ([`loss_head`]) and the optimizer step ([`update`]) run inside
//! the engine: callers see per-row vectors and scalars only.
//!
//! See `docs/engine.md` for the design, the op set and the FLOP accounting.

#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod init;
pub mod loss_head;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod step;
pub mod update;

#[cfg(feature = "cuda")]
pub use backend::Cuda;
pub use backend::{Backend, Cpu, MatmulPrecision};
pub use config::GptConfig;
pub use decode::KvCache;
pub use error::{Gpt2Error, Result};
pub use loss_head::{Keep, ScoreSource};
pub use model::Gpt2;
pub use ops::{FlopCounter, RowSet};
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig, Decay, LrSchedule};
pub use params::{LayerWeights, ModelWeights, ParamKind, ParamLayout, ParamSet};
pub use step::{Selector, StepReport, StepWorkspace, TokenScore};
pub use update::OptimizerSnapshot;
