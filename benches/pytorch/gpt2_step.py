#!/usr/bin/env python3
"""PyTorch eager CPU baseline for benches/train_step.rs: one GPT-2 training step (forward + backward + AdamW).

Same model and batch as the Rust benchmark: GPT-2 (tied LM head, tanh GELU, pre-LN, no dropout, f32), inputs
token[i] = (i*7919 + 13) % V and targets (i*104729 + 5) % V over the flat B*T batch, AdamW (decay 0.1 on >=2-D
tensors only, fused on CPU when available, else foreach), 2 threads by default.

  config T: L=4,  H=4,  C=256, V=50257, B=8, T=128
  config S: L=12, H=12, C=768, V=50257, B=4, T=64   (GPT-2 124M)

Modes: "clm" (mean cross-entropy over all tokens) and "eslm" (naive masked-loss ESLM: per-token loss, keep the
top 30 % by loss (threshold = k-th largest, k = ceil(0.3*N)), mean over kept, dense autograd backward).
CLM and ESLM steps alternate. Prints one JSON object: per config and mode the median step time and tokens/s.

Run: "$(scripts/setup-python.sh | tail -1)" benches/pytorch/gpt2_step.py [--configs T,S] [--steps 5] [--warmup 2]
"""

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {
    "T": dict(n_layer=4, n_head=4, n_embd=256, vocab=50257, max_t=1024, b=8, t=128),
    "S": dict(n_layer=12, n_head=12, n_embd=768, vocab=50257, max_t=1024, b=4, t=64),
}


class Block(nn.Module):
    def __init__(self, c: int, h: int):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(c, eps=1e-5)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c, eps=1e-5)
        self.fc = nn.Linear(c, 4 * c)
        self.fcproj = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab: int, max_t: int, **_):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(max_t, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.lnf = nn.LayerNorm(n_embd, eps=1e-5)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        return self.lnf(x) @ self.wte.weight.T  # tied LM head, [B, T, V]


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        return opt, "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, foreach=True), "foreach"


def step(model, opt, inputs, targets, mode: str, keep: float) -> float:
    opt.zero_grad(set_to_none=True)
    logits = model(inputs)
    v = logits.shape[-1]
    per_token = F.cross_entropy(logits.view(-1, v), targets.view(-1), reduction="none")
    if mode == "clm":
        loss = per_token.mean()
    else:
        n = per_token.numel()
        k = math.ceil(keep * n)
        with torch.no_grad():
            thr = torch.topk(per_token, k).values[-1]
            mask = (per_token >= thr).float()
        loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    opt.step()
    return loss.item()


def bench(name: str, steps: int, warmup: int, keep: float) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT2(**cfg)
    opt, opt_kind = make_optimizer(model)
    b, t, v = cfg["b"], cfg["t"], cfg["vocab"]
    n = b * t
    inputs = torch.tensor([(i * 7919 + 13) % v for i in range(n)], dtype=torch.long).view(b, t)
    targets = torch.tensor([(i * 104729 + 5) % v for i in range(n)], dtype=torch.long).view(b, t)
    out = {"B": b, "T": t, "optimizer": opt_kind}
    times = {"clm": [], "eslm": []}
    # CLM and ESLM steps alternate, so that load changes on a shared machine hit both alike.
    for i in range(warmup + steps):
        for mode in ("clm", "eslm"):
            t0 = time.perf_counter()
            step(model, opt, inputs, targets, mode, keep)
            if i >= warmup:
                times[mode].append(time.perf_counter() - t0)
    for mode, ts in times.items():
        med = statistics.median(ts)
        out[mode] = {"median_s": med, "tokens_per_s": n / med, "times_s": ts}
    out["eslm_over_clm"] = out["eslm"]["median_s"] / out["clm"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="T,S")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {
        "engine": "pytorch-eager",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep": args.keep,
        "machine": platform.processor() or platform.machine(),
        "configs": {},
    }
    for name in args.configs.split(","):
        res["configs"][name] = bench(name.strip(), args.steps, args.warmup, args.keep)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
