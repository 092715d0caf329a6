//! # eslm-train
//!
//! The trainer behind the `eslm-train` binary: GPT-2 pretraining with selective language modeling.
//! A step forwards every token, scores each one from the model's own logits (or a reference / teacher model),
//! keeps the tokens at or above the value-at-risk threshold and back-propagates the kept rows only.
//!
//! Modules, in the order a step uses them: [`config`] (flags + TOML), [`data`] (shards or the synthetic corpus),
//! [`model`] (the engine seam) with [`engine`] (eslm-gpt2) and [`bigram`] (a test double), [`policy`] (one module
//! per selection policy), [`trainer`] (the loop), [`metrics`] (metrics.jsonl), [`checkpoint`] (atomic
//! checkpoints, exact resume), [`eval_tasks`] (HellaSwag / LAMBADA / ARC scoring), [`sample`] (generation),
//! [`plot`] (run comparison charts), [`guard`] (divergence detection), [`outdir`] (the run-directory lock),
//! [`distributed`] (data-parallel ranks over MPI). `docs/trainer.md` documents every command.

#![warn(missing_docs)]

pub mod baseline;
pub mod bigram;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod eval_cmd;
pub mod eval_tasks;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod models;
pub mod outdir;
pub mod plot;
pub mod policy;
pub mod run;
pub mod sample;
pub mod tensor_file;
pub mod trainer;

pub use config::{PolicyKind, QuantileScope, RunConfig, TrainArgs};
pub use error::{Result, TrainError};
pub use model::{LanguageModel, OptimStep};
pub use policy::SelectionPolicy;
pub use trainer::{EvalResult, TrainSummary, Trainer};
