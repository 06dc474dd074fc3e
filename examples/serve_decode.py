"""A toy decoding loop over a paged KV cache that grows page by page.

Two requests with different prompt lengths decode together. Pages come from a shuffled free
list (random placement); every step appends one token per request (taking a new page when the
last one is full), then runs ONE plan made before the loop (what a CUDA graph would replay: new
page-table entries and lengths, same buffers) and checks the result against full attention
recomputed from scratch with the fp64 reference.

    TRITON_INTERPRET=1 python examples/serve_decode.py     # on a CPU, well under a minute
"""

from __future__ import annotations

import os
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module loads

import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.ir.nodes import DenseMemory

PAGE, HQ, HKV, D = 4, 4, 2, 32
PROMPTS, STEPS, MAX_PAGES = [5, 19], 24, 12


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(16),
                            score=attncc.softcap(50.0), memory=attncc.paged(PAGE))
    attn = attncc.compile(spec)  # -> ServingAttention
    B, num_pages = len(PROMPTS), len(PROMPTS) * MAX_PAGES
    k_cache = torch.zeros(num_pages, PAGE, HKV, D, device=device)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_pages, generator=g).tolist()  # random page placement
    page_table = torch.zeros(B, MAX_PAGES, dtype=torch.int32, device=device)
    kv_len = torch.zeros(B, dtype=torch.int32, device=device)
    history_k = [torch.empty(0, HKV, D) for _ in range(B)]  # the oracle's dense copy
    history_v = [torch.empty(0, HKV, D) for _ in range(B)]

    def append(b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token of request b into its cache, taking a page when needed."""
        n = int(kv_len[b])
        if n % PAGE == 0:
            page_table[b, n // PAGE] = free.pop()
        page = int(page_table[b, n // PAGE])
        k_cache[page, n % PAGE], v_cache[page, n % PAGE] = k.to(device), v.to(device)
        kv_len[b] += 1
        history_k[b] = torch.cat([history_k[b], k[None]])
        history_v[b] = torch.cat([history_v[b], v[None]])

    for b, n in enumerate(PROMPTS):  # prefill the caches with the prompts' keys and values
        for _ in range(n):
            append(b, torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g))

    plan = attn.plan(batch=B, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=MAX_PAGES, dtype=torch.float32, device=device, return_lse=True)
    print(f"{attn.name}: {plan.num_splits} kv splits, tiles {plan.block_m}x{plan.block_n}")
    dense = spec.replace(memory=DenseMemory())
    worst, start = 0.0, time.perf_counter()
    for step in range(STEPS):
        for b in range(B):
            append(b, torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g))
        q = torch.randn(B, HQ, 1, D, generator=g).to(device)
        o, lse = attn.run(plan, q, k_cache, v_cache, page_table=page_table, kv_len=kv_len)
        for b in range(B):  # recompute full attention over everything request b has seen
            k = history_k[b].permute(1, 0, 2)[None].double()
            v = history_v[b].permute(1, 0, 2)[None].double()
            ro, rl = attention_reference(dense, q[b:b + 1].cpu().double(), k, v)
            err = max((o[b].cpu() - ro[0]).abs().max().item(),
                      (lse[b].cpu() - rl[0]).abs().max().item())
            worst = max(worst, err)
            if err > 2e-5:
                raise SystemExit(f"step {step}, request {b}: error {err:.2e} > 2e-5")
    lengths = kv_len.tolist()
    pages = [-(-n // PAGE) for n in lengths]
    print(f"{STEPS} steps, kv lengths {lengths} in {pages} pages of {PAGE}; max error against "
          f"fp64 {worst:.1e}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
