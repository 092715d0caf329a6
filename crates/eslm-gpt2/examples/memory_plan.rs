//! Prints the engine's memory plan (`eslm_gpt2::memory::MemoryPlan`, f32) for the GPT-2 sizes at a batch, as GiB
//! by kind and the total a CUDA device needs with f32 and with bf16 storage (without the CUDA context and cuBLAS
//! workspace).
//!
//! `cargo run --release -p eslm-gpt2 --example memory_plan -- [B] [T] [RANKS]` (default 16 1024 1; RANKS > 1
//! shards the optimizer state as `--shard-optimizer` does).

use eslm_gpt2::memory::MemoryPlan;
use eslm_gpt2::GptConfig;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map(|s| s.parse().expect("B, T and RANKS are positive integers"))
            .unwrap_or(default)
    };
    let (b, t, ranks) = (arg(1, 16), arg(2, 1024), arg(3, 1));
    let gib = |floats: usize| floats as f64 * 4.0 / (1u64 << 30) as f64;
    println!("f32 memory plan, B = {b}, T = {t}, optimizer sharded over {ranks} rank(s), GiB");
    println!(
        "| model | params+grads | AdamW | activations | attention P | logits+dlogits | backward buffers | CUDA scratch | CUDA total | CUDA total, bf16 storage |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let sizes = [
        ("124M", GptConfig::gpt2_124m()),
        ("350M", GptConfig::gpt2_350m()),
        ("774M", GptConfig::gpt2_774m()),
        ("1.5B", GptConfig::gpt2_1558m()),
    ];
    for (name, cfg) in sizes {
        let p = MemoryPlan::new(&cfg, b, t).sharded(ranks);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            gib(p.params + p.grads),
            gib(p.optimizer),
            gib(p.activations),
            gib(p.attention_probs),
            gib(p.logits + p.dlogits),
            gib(p.grad_buffers),
            gib(p.cuda_scratch),
            p.cuda_bytes(b * t) as f64 / (1u64 << 30) as f64,
            p.cuda_bytes_bf16(b * t) as f64 / (1u64 << 30) as f64
        );
    }
}
