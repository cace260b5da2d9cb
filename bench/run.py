"""Benchmarks of the study, each a ratio against a baseline measured in the same run.

Written to bench/results.md with the machine's description. Not a test: CI times nothing.

- pretraining: tokens/s of emlab.train.pretrain's step on the default toy model, and model
  FLOP utilisation (MFU) against the fp32 matmul rate measured on this machine just before.

Usage: python bench/run.py [--steps N] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from emlab.config import make_config
from emlab.model import build_tokenizer, build_toy_model
from emlab.train import lm_loss
from emlab.world import load_world


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s (median of repeats) on square n x n matrices."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        rates.append(4 * 2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters (without position embeddings) + attention."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters()) - c.n_positions * c.n_embd
    return 6 * n_params + 12 * c.n_layer * c.n_embd * seq_len


def pretrain_rate(cfg, steps: int, seq_len: int = 128) -> tuple[float, float]:
    """Pretraining tokens/s (median over steps after warm-up) and FLOPs per token."""
    tok = build_tokenizer([" ".join(sorted(load_world().words()))])
    model = build_toy_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, len(tok), (cfg.pretrain_batch, seq_len))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = lm_loss(model, {"input_ids": x, "labels": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    tokens = cfg.pretrain_batch * seq_len
    return tokens / statistics.median(times), model_flops_per_token(model, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = make_config({})
    peak = matmul_flops()
    tps, fpt = pretrain_rate(cfg, args.steps)
    mfu = tps * fpt / peak
    lines = [
        "# Benchmarks", "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}.", "",
        "| benchmark | measured | baseline (same run) | ratio |", "|---|---|---|---|",
        f"| pretraining, default toy model (d={cfg.d_model}, L={cfg.n_layer}, batch {cfg.pretrain_batch}x128) "
        f"| {tps:,.0f} tokens/s = {tps * fpt / 1e9:.1f} GFLOP/s | fp32 matmul 1024^3: {peak / 1e9:.1f} GFLOP/s "
        f"| MFU {mfu:.1%} |",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
