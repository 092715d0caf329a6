#!/usr/bin/env python3
"""Checks that GPT-2 checkpoints move both ways between eslm and HuggingFace transformers.

1. eslm -> HF: `cargo run --example hf_roundtrip export DIR` writes a model with checkpoint::hf::save_pretrained
   plus eslm's logits for fixed inputs; transformers loads DIR with GPT2LMHeadModel.from_pretrained and its logits
   must match eslm's (max abs diff / max abs <= 1e-4).
2. HF -> eslm: transformers saves a random model (save_pretrained, and an "old-style" file holding every state-dict
   key: lm_head.weight and the attn.bias / attn.masked_bias mask buffers, without the transformer. prefix, in
   bf16); `cargo run --example hf_roundtrip import DIR` loads each with checkpoint::hf::load_pretrained and its
   logits must match transformers' (f32: <= 1e-4; bf16 weights: both sides see the same rounded weights).

Run: "$(scripts/setup-python.sh | tail -1)" scripts/check_hf_roundtrip.py   (needs cargo; uses CARGO_TARGET_DIR)
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-4


def cargo_example(*args: str) -> None:
    cmd = ["cargo", "run", "-q", "--release", "-p", "eslm-gpt2", "--example", "hf_roundtrip", "--", *args]
    subprocess.run(cmd, cwd=ROOT, check=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def hf_logits(model_dir: pathlib.Path, inputs: torch.Tensor) -> torch.Tensor:
    model = GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        return model(input_ids=inputs.long()).logits


def eslm_to_hf(tmp: pathlib.Path) -> float:
    d = tmp / "eslm_export"
    cargo_example("export", str(d))
    ours = load_file(str(d / "eslm_logits.safetensors"))
    theirs = hf_logits(d, ours["inputs"])
    return rel(theirs, ours["logits"])


def hf_to_eslm(tmp: pathlib.Path) -> dict:
    torch.manual_seed(5)
    cfg = GPT2Config(vocab_size=259, n_positions=24, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = torch.randint(0, cfg.vocab_size, (3, 11), dtype=torch.int32)
    results = {}

    # (a) save_pretrained as is.
    d = tmp / "hf_save_pretrained"
    model.save_pretrained(d)
    save_file({"inputs": inputs}, str(d / "inputs.safetensors"))
    cargo_example("import", str(d))
    with torch.no_grad():
        ref = model(input_ids=inputs.long()).logits
    results["save_pretrained_f32"] = rel(load_file(str(d / "eslm_logits.safetensors"))["logits"], ref)

    # (b) old-style full state dict in bf16: lm_head.weight present, mask buffers present, no "transformer." prefix.
    d = tmp / "hf_old_style_bf16"
    d.mkdir()
    (d / "config.json").write_text((tmp / "hf_save_pretrained" / "config.json").read_text())
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.removeprefix("transformer.")] = v.to(torch.bfloat16).clone().contiguous()
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    C, T = cfg.n_embd, cfg.n_positions
    for i in range(cfg.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T).to(torch.bfloat16)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4).to(torch.bfloat16)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_file({"inputs": inputs}, str(d / "inputs.safetensors"))
    cargo_example("import", str(d))
    bf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in bf.named_parameters():
            p.copy_(model.state_dict()[name].to(torch.bfloat16).float())
        ref = bf(input_ids=inputs.long()).logits
    results["old_style_bf16"] = rel(load_file(str(d / "eslm_logits.safetensors"))["logits"], ref)
    return results


def main() -> int:
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        out = {"eslm_to_hf": eslm_to_hf(tmp), **{"hf_to_eslm_" + k: v for k, v in hf_to_eslm(tmp).items()}}
    out["torch"] = torch.__version__
    import transformers

    out["transformers"] = transformers.__version__
    ok = all(v <= TOL for k, v in out.items() if isinstance(v, float))
    out["ok"] = ok
    print(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
