"""Titans-style neural memory [L6 as a test-time-learned memory, K4 persistent memory tokens]
(Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time"; docs/catalog.md).

Titans' long-term memory is a model M trained online, at inference, on the associative loss
    l(M; x_t) = || M(k_t) - v_t ||^2,
with a data-dependent forgetting gate alpha_t and learning rate theta_t (both in (0, 1), from
x_t). For a LINEAR memory M(k) = M^T k (M in R^{dk x dv}) and no momentum, one step is
    M_t = (1 - alpha_t) M_{t-1} - theta_t grad_M l(M_{t-1}; x_t),
and the layer reads y_t = M_t^T q_t. Writing grad = 2 k (M^T k - v)^T,
    M_t = (1 - alpha_t) M_{t-1} - 2 theta_t k k^T M_{t-1} + 2 theta_t k v^T,
which is the gated delta rule (L6) S_t = e^{g} (I - beta k k^T) S_{t-1} + beta k v'^T with
    g = log(1 - alpha_t),  beta = 2 theta_t / (1 - alpha_t),  v' = (1 - alpha_t) v_t
(an exact reparametrisation, no approximation). The attention branch (Titans' MAG variant) is
sliding-window softmax over the segment with Np learned persistent memory tokens prepended,
visible to every query (K4: `attncc.persistent(Np)`), and MAG gates the two branches:
o = y_attn * sigmoid(y_mem) (the paper leaves the gate's exact form open; this is the example's
choice, computed in PyTorch).

Not expressible in attncc's IR (so run here with them off, and said): Titans' momentum
("past surprise" S_t = eta_t S_{t-1} - theta_t grad, M_t = (1 - alpha_t) M_{t-1} + S_t) needs a
second state that feeds the first, which no linear rule L1-L7 has; a deep (MLP) memory is not a
linear state at all.

The independent check: the memory trained by torch.autograd on the loss above, one token at a
time, and the attention as a dense masked softmax over [persistent tokens; segment], in fp64.
Exit status 1 on any mismatch (`--perturb` changes one input of the independent computation,
to show the check can fail).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, RUNS_ON, perturbed, report, result

import attncc

B, H, L, D = 1, 2, 64, 16
PERSISTENT, WINDOW = 4, 16
TOL = 1e-4  # fp32 kernels against fp64, of max(|expected|, 1)


def paper_memory(q, k, v, alpha, theta) -> tuple[torch.Tensor, torch.Tensor]:
    """Titans' linear memory, learned at test time by gradient steps (autograd), no momentum."""
    out = torch.zeros_like(v)
    M = torch.zeros(B, H, D, D, dtype=q.dtype)
    for t in range(L):
        M = M.detach().requires_grad_(True)
        recall = (M * k[:, :, t, :, None]).sum(-2)  # M^T k
        loss = ((recall - v[:, :, t]) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, M)
        with torch.no_grad():
            M = (1 - alpha[:, :, t, None, None]) * M - theta[:, :, t, None, None] * grad
            out[:, :, t] = (M * q[:, :, t, :, None]).sum(-2)  # y_t = M_t^T q_t
    return out, M.detach()


def paper_persistent_window(q, k, v, mem_k, mem_v) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = torch.cat([torch.ones(L, PERSISTENT, dtype=torch.bool),
                         (j <= i) & (i - j < WINDOW)], 1)
    keys = torch.cat([mem_k.expand(B, H, PERSISTENT, D), k], 2)
    vals = torch.cat([mem_v.expand(B, H, PERSISTENT, D), v], 2)
    s = (q @ keys.transpose(-1, -2) / D ** 0.5).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vals


def main(perturb: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    q, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k = F.normalize(torch.randn(B, H, L, D, generator=gen, dtype=torch.float64), dim=-1)
    q = F.normalize(q, dim=-1)  # Titans l2-normalises queries and keys
    alpha = 0.1 * torch.sigmoid(torch.randn(B, H, L, generator=gen, dtype=torch.float64))
    theta = 0.45 * torch.sigmoid(torch.randn(B, H, L, generator=gen, dtype=torch.float64))
    mem_k, mem_v = (torch.randn(H, PERSISTENT, D, generator=gen, dtype=torch.float64)
                    for _ in range(2))  # the persistent tokens (learned; random here)
    want_mem, want_M = paper_memory(q, k, v + 0.05 * perturb * (torch.arange(L) == 11)[:, None],
                                    alpha, theta)
    want_attn = paper_persistent_window(q, k, v, mem_k, mem_v)
    want = want_attn * torch.sigmoid(want_mem)

    node = attncc.recurrent_state(update="delta", decay="scalar")  # L6
    memory = attncc.compile(attncc.Attention(memory=node))
    attn_spec = attncc.Attention(mask=attncc.sliding_window(WINDOW),
                                 memory=attncc.persistent(PERSISTENT))  # M2 + K4
    attention = attncc.compile(attn_spec)
    print(f"L6 {node.text()} -> {memory.chunked.name}\nM2 + K4 {attn_spec.memory.text()} -> "
          f"{attention.name}")
    x = [t.float().to(DEVICE) for t in (q, k, v)]
    a, th = alpha.float().to(DEVICE), theta.float().to(DEVICE)
    start = time.perf_counter()
    g, beta = torch.log1p(-a), 2 * th / (1 - a)  # Titans' gates as L6's inputs (exact)
    y_mem, S = memory(x[0], x[1], (1 - a)[..., None] * x[2], g=g, beta=beta, scale=1.0,
                      return_state=True)
    y_attn = attention(*x, mem_k=mem_k.float().to(DEVICE), mem_v=mem_v.float().to(DEVICE))
    o = y_attn * torch.sigmoid(y_mem)  # MAG's gate
    took = time.perf_counter() - start

    ok = report("memory read y_t = M_t^T q_t vs autograd-trained memory", y_mem, want_mem, TOL)
    ok &= report("memory state M_L", S, want_M, TOL)
    ok &= report("persistent tokens + window softmax vs dense", y_attn, want_attn, TOL)
    ok &= report("gated layer output", o, want, TOL)
    mem_bytes = B * H * D * D * 4
    attn_kv = 2 * H * (PERSISTENT + WINDOW) * D * 4
    print(f"saved: the memory is {mem_bytes} bytes of fp32 state per layer whatever the length, "
          f"and the attention keeps {PERSISTENT} persistent + {WINDOW} window tokens "
          f"({attn_kv} bytes of fp32 KV), vs {2 * B * H * L * D * 4} bytes of KV for full causal "
          f"softmax over these {L} tokens (growing {2 * B * H * D * 4} bytes per token)")
    print(f"B={B} H={H} L={L} D={D} persistent={PERSISTENT} w={WINDOW} {RUNS_ON}: the L6 "
          f"chunked (WY) and the serving (K4) Triton kernels; momentum and deep memory are not "
          f"expressible (see the docstring); {took:.1f} s")
    return result(ok)


if __name__ == "__main__":
    sys.exit(main(perturbed(__doc__)))
