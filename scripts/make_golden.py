#!/usr/bin/env python3
"""Writes the HF-parity golden files for crates/eslm-gpt2/tests/hf_parity.rs.

A tiny random GPT2LMHeadModel (L=2, H=2, C=32, V=100, n_positions=16, tanh GELU, no dropout, LN eps 1e-5) is
built in transformers with a fixed seed; every parameter is re-drawn with larger, non-trivial values (layer-norm
weights around 1, non-zero biases) so that every gradient path is exercised. Then:

  tests/golden/gpt2-tiny/                  the model as transformers' save_pretrained writes it (config.json +
                                           model.safetensors, f32, tied lm_head omitted): the HF loader test input.
  tests/golden/gpt2-tiny-batch.safetensors one batch (B=2, T=8) with EXPLICIT inputs and targets (no HF label
                                           shift): inputs/targets (I32 [B, T]), logits (F32 [B, T, V]), loss (F32
                                           [1], mean cross-entropy over all B*T positions, computed here from the
                                           logits) and the gradient of that loss w.r.t. every parameter under
                                           "grad." + its HF name (HF layout, Conv1D weights [in, out]; the grad of
                                           the tied transformer.wte.weight includes the LM-head contribution).

The forward and backward run in float64 on the f32-rounded weights, so the stored references carry only the final
f32 rounding. Run:  "$(scripts/setup-python.sh | tail -1)" scripts/make_golden.py
"""

import json
import os
import pathlib
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "eslm-gpt2" / "tests" / "golden"
SEED = 20240326
B, T = 2, 8


def main() -> None:
    torch.manual_seed(SEED)
    cfg = GPT2Config(
        vocab_size=100,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "LM head must be tied"

    model_dir = OUT / "gpt2-tiny"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir, safe_serialization=True)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        gen.unlink()

    inputs = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))

    model = model.double()
    model.zero_grad()
    logits = model(input_ids=inputs).logits  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
    loss.backward()

    tensors = {
        "inputs": inputs.to(torch.int32).contiguous(),
        "targets": targets.to(torch.int32).contiguous(),
        "logits": logits.detach().float().contiguous(),
        "loss": loss.detach().float().reshape(1).contiguous(),
    }
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.detach().float().contiguous()
    meta = {
        "n_layer": str(cfg.n_layer),
        "n_head": str(cfg.n_head),
        "n_embd": str(cfg.n_embd),
        "vocab_size": str(cfg.vocab_size),
        "n_positions": str(cfg.n_positions),
        "B": str(B),
        "T": str(T),
        "seed": str(SEED),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    save_file(tensors, str(OUT / "gpt2-tiny-batch.safetensors"), metadata=meta)
    sizes = {p.name: os.path.getsize(p) for p in sorted(OUT.rglob("*")) if p.is_file()}
    print(json.dumps({"loss": loss.item(), "files": sizes, **meta}, indent=1))


if __name__ == "__main__":
    main()
