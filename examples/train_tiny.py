"""Train a tiny two-layer transformer whose attention is attncc's: a sliding window with a
learnable per-head ALiBi slope. Runs a few AdamW steps eagerly and under
`torch.compile(fullgraph=True)`, prints the losses and checks that both decrease.

    python examples/train_tiny.py                       # CPU: the reference path, a few seconds
    python examples/train_tiny.py --compile-backend inductor

The task: each sequence repeats a random block of `period` tokens; predicting the next token
needs the token `period` positions back, inside the window. On CUDA the kernels run; on the CPU
the PyTorch reference runs (backend="reference", no warning since it is asked for).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import attncc
import attncc.nn


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, backend: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attncc.nn.MultiHeadAttention(
            dim, heads, mask=attncc.sliding_window(window),
            score=attncc.alibi(torch.full((heads,), 0.1)), learnable=["alibi_slopes"],
            backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, window: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, window, backend) for _ in range(2))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def batch(gen: torch.Generator, B: int, L: int, vocab: int, period: int, device: str):
    block = torch.randint(0, vocab, (B, period), generator=gen)
    seq = block.repeat(1, L // period + 2)[:, :L + 1].to(device)
    return seq[:, :-1], seq[:, 1:]


def train(model: nn.Module, step_fn, steps: int, args, device: str) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(steps):
        x, y = batch(gen, args.batch, args.length, args.vocab, args.period, device)
        loss = nn.functional.cross_entropy(step_fn(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--period", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--compile-backend", default="aot_eager",
                   help="torch.compile backend (inductor needs a C++ compiler on the CPU)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "auto" if device == "cuda" else "reference"
    if device == "cpu":  # tiny ops: OpenMP threads only contend (40x slower on 2 busy cores)
        torch.set_num_threads(1)
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = TinyLM(args.vocab, 32, 4, args.window, backend).to(device)
        step_fn = (model if mode == "eager" else
                   torch.compile(model, fullgraph=True, backend=args.compile_backend))
        t0 = time.perf_counter()
        losses = train(model, step_fn, args.steps, args, device)
        slopes = model.layers[0].attn.attn.alibi_slopes.detach().cpu()
        print(f"{mode:8s} losses {' '.join(f'{x:.3f}' for x in losses[::5])} ... "
              f"{losses[-1]:.3f}  ({time.perf_counter() - t0:.1f} s; layer-0 ALiBi slopes "
              f"{[round(s, 3) for s in slopes.tolist()]})")
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.7 * first, f"{mode}: loss did not decrease ({first:.3f} -> {last:.3f})"


if __name__ == "__main__":
    main()
