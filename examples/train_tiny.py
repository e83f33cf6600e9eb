"""A few training steps of a tiny transformer block with lntune's LayerNorm, against torch's.

    python examples/train_tiny.py [--steps 30] [--hidden 256]

Uses CUDA when a GPU is visible, else the CPU. The lntune model is torch's, patched in place
(`lntune.torch.patch`): its LayerNorm kernels come from lntune's per-user cache, exported on first
use. Prints the loss of both models step by step (same data, same initial weights) and the median
time per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import lntune.torch


class Block(nn.Module):
    """Pre-norm attention + MLP; `norm` builds each LayerNorm."""

    def __init__(self, hidden: int, heads: int, norm) -> None:
        super().__init__()
        self.ln1, self.ln2 = norm(hidden), norm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    theirs = Block(args.hidden, 4, nn.LayerNorm).to(device)
    ours = lntune.torch.patch(copy.deepcopy(theirs))
    data = torch.randn(args.batch, args.seq, args.hidden, device=device)
    target_values = torch.sin(data.sum(-1))
    runs = {"lntune": ours, "torch": theirs}
    optims = {name: torch.optim.Adam(model.parameters(), lr=1e-3) for name, model in runs.items()}
    times = {name: [] for name in runs}
    print(f"device {device}, hidden {args.hidden}, {args.batch}x{args.seq} tokens")
    for step in range(args.steps):
        losses = {}
        for name, model in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = nn.functional.mse_loss(model(data), target_values)
            optims[name].zero_grad()
            loss.backward()
            optims[name].step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss lntune {losses['lntune']:.4f}  torch {losses['torch']:.4f}")
    for name in runs:
        print(f"{name:>6}: {statistics.median(times[name][1:]) * 1e3:.2f} ms per step (median)")


if __name__ == "__main__":
    main()
