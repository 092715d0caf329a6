//! The memory plan (`eslm_gpt2::memory::MemoryPlan`) against what the CPU backend really allocates, for ragged
//! configurations: at construction (parameters, gradients, activations, logits, backward buffers), after the first
//! update (AdamW's moments) and after a CLM loss gradient (every row's `dlogits`).

mod common;

use eslm_gpt2::memory::MemoryPlan;
use eslm_gpt2::{AdamWConfig, Gpt2, GptConfig, Keep, ScoreSource};

#[test]
fn the_plan_counts_every_buffer_the_engine_allocates() {
    let cases = [
        (common::small_cfg(), 3, 5),
        (
            GptConfig {
                n_layer: 3,
                n_head: 4,
                n_embd: 32,
                vocab_size: 101,
                padded_vocab_size: 128,
                max_seq_len: 16,
            },
            2,
            16,
        ),
        (GptConfig::tiny(), 1, 1),
    ];
    for (cfg, b, t) in cases {
        let plan = MemoryPlan::new(&cfg, b, t);
        let mut model = Gpt2::new(cfg, b, t, 1).unwrap();
        // The CPU model takes its parameters over from the host initialisation (no `alloc`); a device backend
        // allocates them like every other buffer.
        let host_params = plan.params;
        let built =
            plan.grads + plan.activations + plan.attention_probs + plan.logits + plan.grad_buffers;
        assert_eq!(
            model.backend().allocated_floats(),
            built,
            "{cfg:?} B {b} T {t}: at construction"
        );
        let inputs = vec![1u32; b * t];
        let targets = vec![2i32; b * t];
        model.zero_grad();
        model.forward_stats(&inputs, &targets, b, t).unwrap();
        let k = model
            .select(ScoreSource::Loss, Keep::AllValid)
            .unwrap()
            .indices
            .len();
        assert_eq!(k, b * t);
        model.ce_grad(1.0 / k as f32).unwrap();
        model.backward_selected().unwrap();
        model
            .clip_and_update(AdamWConfig::default(), 1e-3, 1.0)
            .unwrap();
        assert_eq!(
            model.backend().allocated_floats(),
            plan.engine_floats() - host_params,
            "{cfg:?} B {b} T {t}: after a CLM step"
        );
    }
}

#[test]
fn sharding_divides_the_optimizer_state() {
    let cfg = GptConfig::gpt2_124m();
    let plan = MemoryPlan::new(&cfg, 16, 1024);
    assert_eq!(plan.sharded(1), plan);
    let eight = plan.sharded(8);
    assert_eq!(eight.optimizer, 2 * cfg.num_params().div_ceil(8));
    assert_eq!(
        eight.engine_floats(),
        plan.engine_floats() - plan.optimizer + eight.optimizer
    );
}

#[test]
fn bf16_storage_halves_everything_but_the_parameters_and_their_state() {
    let p = MemoryPlan::new(&GptConfig::gpt2_124m(), 16, 1024);
    let f32_state = 4 * (p.params + p.grads + p.optimizer) as u64;
    let tokens = 16 * 1024;
    let ids = 8 * tokens as u64;
    let rest_f32 = p.cuda_bytes(tokens) - f32_state - ids;
    let rest_bf16 = p.cuda_bytes_bf16(tokens) - f32_state - ids;
    assert_eq!(2 * rest_bf16, rest_f32);
    // The 124M target (B = 16, T = 1024, ≤ 40 GB) with room to spare under bf16 storage.
    assert!(
        p.cuda_bytes_bf16(tokens) < 16 << 30,
        "{}",
        p.cuda_bytes_bf16(tokens)
    );
}
