"""DuoAttention (Xiao et al., 2024) and RazorAttention (Tang et al., 2024) in a decode loop.

Both split the heads into two classes (M18): retrieval heads keep the whole KV cache and attend
causally; streaming heads keep only `SINKS` attention sinks and a window of the last `WINDOW`
tokens (M6), in a compact cache of fixed size (K5, `attncc.per_head_lengths(sink, window)`).
One serving kernel, planned once (`plan`) and run every step (`run`), computes both classes.

RazorAttention adds, for each streaming head, one compensation token standing for all the
tokens it dropped: `k_c = mean(k_dropped)`, `v_c = mean(v_dropped)`, weighted by their count n,
i.e. its score gets `+ log n` (S7, the per-key log-count bias). attncc holds the token in one
extra slot of the compact cache (the sink slot `SINKS`, so the cache has `SINKS + 1 + WINDOW`
entries) and adds the bias with a score mod that reads the per-head count (`logn[h]`, 0 for
retrieval heads: they read the real token at that position).

Checked every decode step against an independent dense PyTorch computation from the full
history of keys and values (retrieval heads: causal softmax; Duo streaming heads: softmax over
sinks and window; Razor streaming heads: the same plus `n * exp(q.k_c) v_c` in numerator and
`n * exp(q.k_c)` in the denominator), fp32 within 2e-5 (max abs error on o and lse; exit 1
beyond). Prints the KV bytes per head class against a full cache for every head.

    TRITON_INTERPRET=1 python examples/duo_attention.py      # about 10 s on a CPU
"""

from __future__ import annotations

import math
import sys

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, check_abs, perturbed

import attncc

append_stream = attncc.serving_stream.append_stream  # K5 compact-cache helpers
compact_from_dense = attncc.serving_stream.compact_from_dense
ring_slots = attncc.serving_stream.ring_slots

HQ, HKV, D = 4, 2, 32
SINKS, WINDOW = 4, 16
PROMPT, STEPS = 40, 12  # the prompt already overflows sinks + window: tokens are dropped
CAPACITY = PROMPT + STEPS
STREAM = torch.tensor([-1, 0], dtype=torch.int32)  # kv head 0 retrieval (full), 1 streaming
HEAD_CLASS = torch.tensor([0, 0, 1, 1])  # per query head (GQA: 2 query heads per kv head)
TOL = 2e-5  # fp32, max abs error on o and lse against the fp64 oracle


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, razor: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 dense attention of one decode query q [HQ, D] over the full history k/v
    [HKV, n, D], written from the papers: per query head, the class's keys (and for Razor's
    streaming heads the compensation token with weight n_dropped). Returns o [HQ, D], lse [HQ]."""
    n = k.shape[1]
    pos = torch.arange(n)
    outs, lses = [], []
    for h in range(HQ):
        qh = q[h].double()
        kh, vh = k[h // (HQ // HKV)].double(), v[h // (HQ // HKV)].double()
        s = kh @ qh / math.sqrt(D)
        if HEAD_CLASS[h] == 0:  # retrieval head: every earlier token
            keep = pos < n
        else:  # streaming head: sinks and the window (the query counts in its window)
            keep = (pos < SINKS) | (pos > n - 1 - WINDOW)
        weights = s[keep].exp()
        num, den = weights @ vh[keep], weights.sum()
        dropped = ~keep
        if razor and HEAD_CLASS[h] == 1 and dropped.any():
            k_c, v_c = kh[dropped].mean(0), vh[dropped].mean(0)
            w_c = dropped.sum() * torch.exp(k_c @ qh / math.sqrt(D))
            num, den = num + w_c * v_c, den + w_c
        outs.append(num / den)
        lses.append(den.log())
    return torch.stack(outs), torch.stack(lses)


def run_loop(razor: bool, k_all: torch.Tensor, v_all: torch.Tensor, queries: torch.Tensor,
             perturb: bool) -> tuple[float, float, int, int]:
    """Prefill PROMPT tokens into the caches, then decode STEPS tokens with one plan.
    Returns (worst error, largest change the compensation token makes to o, bytes of the full
    heads' cache, bytes of the streaming caches)."""
    sink = SINKS + 1 if razor else SINKS  # Razor: slot SINKS holds the compensation token
    logn = torch.zeros(HQ, device=DEVICE)  # log(number of dropped tokens), streaming heads

    def compensated(score, b, h, q_idx, kv_idx):  # S7 on the compensation slot, per head
        return score + torch.where(kv_idx == SINKS, logn[h], 0.0)

    spec = attncc.Attention(mask=attncc.causal(), score=compensated if razor else None,
                            memory=attncc.per_head_lengths(sink=sink, window=WINDOW))
    attn = attncc.compile(spec)
    full = STREAM < 0
    k_full = torch.zeros(1, int(full.sum()), CAPACITY, D, device=DEVICE)  # retrieval heads
    v_full = torch.zeros_like(k_full)
    k_full[:, :, :PROMPT], v_full[:, :, :PROMPT] = k_all[:, full, :PROMPT], v_all[:, full, :PROMPT]
    prompt_len = torch.tensor([PROMPT], dtype=torch.int32, device=DEVICE)
    k_str, v_str = compact_from_dense(k_all[:, ~full, :PROMPT], v_all[:, ~full, :PROMPT],
                                      prompt_len, sink, WINDOW)
    # Razor's running sums over the dropped tokens [SINKS, n - WINDOW) of the streaming heads
    k_sum = k_all[:, ~full, SINKS:PROMPT - WINDOW + 1].sum(2)
    v_sum = v_all[:, ~full, SINKS:PROMPT - WINDOW + 1].sum(2)
    dropped = max(PROMPT - WINDOW + 1 - SINKS, 0)  # for the first decode query, at PROMPT
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     kv_capacity=CAPACITY, dtype=torch.float32, return_lse=True,
                     stream_heads=STREAM, device=DEVICE, **({"logn": logn} if razor else {}))
    worst = effect = 0.0
    for step in range(STEPS):
        n = PROMPT + step  # the new token's position; the query sits there
        if razor and step:  # the token at n - WINDOW leaves the window: fold it in
            slot = int(ring_slots(torch.tensor(n - WINDOW), sink, WINDOW))
            k_sum += k_str[:, :, slot]
            v_sum += v_str[:, :, slot]
            dropped += 1
        kv_len = torch.tensor([n], dtype=torch.int32, device=DEVICE)  # before the append
        k_full[:, :, n], v_full[:, :, n] = k_all[:, full, n], v_all[:, full, n]
        append_stream(k_str, v_str, k_all[:, ~full, n:n + 1], v_all[:, ~full, n:n + 1],
                      kv_len, sink)
        if razor and dropped:
            k_str[:, :, SINKS], v_str[:, :, SINKS] = k_sum / dropped, v_sum / dropped
            logn.copy_(torch.where(HEAD_CLASS == 1, math.log(dropped), 0.0))
        o, lse = attn.run(plan, queries[step], k_full, v_full, kv_len=kv_len + 1,
                          k_stream=k_str, v_stream=v_str)
        k_seen, v_seen = k_all[0, :, :n + 1].cpu(), v_all[0, :, :n + 1].cpu()
        if perturb:  # a wrong oracle (one value changed) must be caught
            v_seen = v_seen.clone()
            v_seen[1, n - 1, 0] += 1.0
        ro, rl = oracle(queries[step][0, :, 0].cpu(), k_seen, v_seen, razor)
        err = max((o[0, :, 0].double().cpu() - ro).abs().max().item(),
                  (lse[0, :, 0].double().cpu() - rl).abs().max().item())
        worst = max(worst, err)
        if razor:  # the compensation must matter, or the check above proves little
            effect = max(effect, (ro - oracle(queries[step][0, :, 0].cpu(), k_seen, v_seen,
                                              False)[0]).abs().max().item())
    to_bytes = 2 * 4  # k and v, fp32
    return worst, effect, k_full.numel() * to_bytes, k_str.numel() * to_bytes


def main() -> int:
    perturb = perturbed(__doc__)
    gen = torch.Generator().manual_seed(0)
    k_all = torch.randn(1, HKV, CAPACITY, D, generator=gen).to(DEVICE)
    v_all = torch.randn(1, HKV, CAPACITY, D, generator=gen).to(DEVICE)
    queries = torch.randn(STEPS, 1, HQ, 1, D, generator=gen).to(DEVICE)
    ok = True
    for name, razor in (("DuoAttention", False), ("RazorAttention", True)):
        err, effect, full_bytes, stream_bytes = run_loop(razor, k_all, v_all, queries, perturb)
        entries = stream_bytes // (2 * 4 * D)
        per_full = full_bytes // int((STREAM < 0).sum())
        per_stream = stream_bytes // int((STREAM >= 0).sum())
        print(f"{name}: {STEPS} decode steps after a {PROMPT}-token prompt, sinks {SINKS}, "
              f"window {WINDOW}{', 1 compensation token' if razor else ''}")
        print(f"  attncc saved: KV per retrieval kv head {per_full} B ({CAPACITY} tokens), per "
              f"streaming kv head {per_stream} B ({entries} entries): layer KV "
              f"{full_bytes + stream_bytes} B vs {HKV * per_full} B with full caches "
              f"({1 - (full_bytes + stream_bytes) / (HKV * per_full):.0%} less; the streaming "
              f"cache stays {per_stream} B at any length)")
        if razor:
            print(f"  the compensation token changes the streaming heads' o by up to {effect:.2f}")
        ok &= check_abs(f"o, lse - dense PyTorch {name}", err, TOL, over=f" over {STEPS} steps",
                        indent="  ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
