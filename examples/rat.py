"""RAT (Wei et al. 2025, "RAT: Bridging RNN efficiency and attention accuracy"): a gated linear
recurrence inside chunks of C tokens, and softmax attention across the chunks' summaries.

RAT's layer, per head, for token t in chunk c = t // C (channel-wise gates f_t in (0, 1)^d):
    k~_t = f_t * k~_{t-1} + (1 - f_t) * k_t,   v~_t = f_t * v~_{t-1} + (1 - f_t) * v_t
(elementwise; the recurrence restarts at each chunk's first token), and
    o_t = softmax over { k~ at the end of chunks 0..c-1, k~_t } of q_t . k~ / sqrt(d),
          weighting the matching v~ (every earlier chunk's summary, plus the current chunk's
          running summary: causal), and y_t = z_t * o_t with an output gate z_t in (0, 1)^d
(the form of the authors' write-up, github.com/CLAIRE-Labo/RAT; the gates come from
projections of x_t, random here).

Expressed with the IR, no extension needed:
  - the recurrence is L3 (scalar data-dependent gate, `recurrent_state(decay="scalar")`) with
    every channel as its own head (Dk = 1, key = 1 - f, gate g = log f, values = the pair
    (k, v) of that channel, query = 1, scale 1): S_t = f_t S_{t-1} + (1 - f_t) (k_t, v_t) is
    exactly (k~_t, v~_t), and chunks are separate sequences (the batch axis), which restarts it;
  - the softmax across chunks is one attncc kernel over keys [chunk-end summaries; running
    summaries] with a traced mask: `kv < q // C` (earlier chunks) or `kv == n_chunks + q`
    (the token's own running summary).
What the IR cannot say directly: a channel-wise (diagonal) gated recurrence whose state is the
vector itself (a "diagonal state" linear rule); here it is L3 on d one-channel heads, which is
exact but launches d times as many (tiny) programs.

The independent check is the formulas above as plain loops in fp64. Exit status 1 on any
mismatch (`--perturb` changes one input of the independent computation, to show the check can
fail).
"""

from __future__ import annotations

import sys
import time

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, RUNS_ON, perturbed, report, result, visited

import attncc

B, H, L, D, C = 1, 2, 64, 8, 16  # C: RAT's chunk length
N_CHUNKS = L // C
TOL = 1e-4  # fp32 kernels against fp64 loops, of max(|expected|, 1)


def paper_rat(q, k, v, f, z) -> torch.Tensor:
    """RAT from its formulas, one token at a time."""
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            kt, vt, ends = [], [], []  # running summaries per token, chunk-end summaries
            for t in range(L):
                if t % C == 0:
                    ks, vs = torch.zeros(D, dtype=q.dtype), torch.zeros(D, dtype=q.dtype)
                ff = f[b, h, t]
                ks = ff * ks + (1 - ff) * k[b, h, t]
                vs = ff * vs + (1 - ff) * v[b, h, t]
                kt.append(ks)
                vt.append(vs)
                if t % C == C - 1:
                    ends.append((ks, vs))
            for t in range(L):
                c = t // C
                keys = torch.stack([e[0] for e in ends[:c]] + [kt[t]])
                vals = torch.stack([e[1] for e in ends[:c]] + [vt[t]])
                p = torch.softmax(keys @ q[b, h, t] / D ** 0.5, 0)
                out[b, h, t] = z[b, h, t] * (p @ vals)
    return out


def chunk_summaries(recurrence, k, v, f) -> tuple[torch.Tensor, torch.Tensor]:
    """(k~, v~) [B, H, L, D] for every token, by the L3 kernel: one head per (head, channel),
    one sequence per chunk."""
    def per_channel(x):  # [B, H, L, D] -> [B * N_CHUNKS, H * D, C]
        return x.reshape(B, H, N_CHUNKS, C, D).permute(0, 2, 1, 4, 3).reshape(
            B * N_CHUNKS, H * D, C)
    gate = per_channel(f)
    ones = torch.ones(*gate.shape, 1, device=f.device)
    kv = torch.stack([per_channel(k), per_channel(v)], -1)  # values: the channel's (k, v)
    s = recurrence(ones, (1 - gate)[..., None], kv, g=gate.log(), scale=1.0)
    s = s.reshape(B, N_CHUNKS, H, D, C, 2).permute(5, 0, 2, 1, 4, 3)  # [2, B, H, n, C, D]
    return s[0].reshape(B, H, L, D), s[1].reshape(B, H, L, D)


def main(perturb: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    f, z = (torch.sigmoid(torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) + 1)
            for _ in range(2))  # forget and output gates
    want = paper_rat(q, k, v, f + 0.05 * perturb * (torch.arange(L) == 9)[:, None], z)

    recurrence = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(decay="scalar")))

    def rat_mask(b, h, q_idx, kv_idx):  # traced: raw positions, Lk = N_CHUNKS + L
        return (kv_idx < q_idx // C) | (kv_idx == q_idx + N_CHUNKS)

    across = attncc.compile(rat_mask)
    print(f"L3 {recurrence.node.text()} -> {recurrence.chunked.name} (chunks as sequences, "
          f"channels as heads)\nsoftmax across chunks: {across.spec.mask.text()} -> "
          f"{across.name}")
    x = [t.float().to(DEVICE) for t in (q, k, v, f, z)]
    start = time.perf_counter()
    k_sum, v_sum = chunk_summaries(recurrence, x[1], x[2], x[3])
    ends = slice(C - 1, L, C)  # the chunk-end summaries
    keys = torch.cat([k_sum[:, :, ends], k_sum], 2)  # [B, H, N_CHUNKS + L, D]
    vals = torch.cat([v_sum[:, :, ends], v_sum], 2)
    o = x[4] * across(x[0], keys, vals)  # the output gate
    took = time.perf_counter() - start

    ok = report("RAT layer vs paper loops", o, want, TOL)
    seen, total = visited(across.spec, L, N_CHUNKS + L, 16)
    causal_seen, _ = visited(attncc.Attention(mask=attncc.causal()), L, L, 16)
    kv_rat = 2 * B * H * (N_CHUNKS + 1) * D * 4
    print(f"saved: the softmax reads N_CHUNKS + 1 = {N_CHUNKS + 1} keys per query instead of up "
          f"to {L}; {seen}/{total} 16x16 tiles visited (causal softmax over the tokens: "
          f"{causal_seen}: at this size the running-summary diagonal, one key per row of a "
          f"16-key tile, costs as many tiles as causal; the chunk part grows as L / C); "
          f"a decode step would read {kv_rat} bytes of fp32 summaries (one per chunk + the "
          f"running one) vs {2 * B * H * L * D * 4} bytes of KV cache for causal softmax")
    print(f"B={B} H={H} L={L} D={D} C={C} {RUNS_ON}: the L3 chunked and the softmax "
          f"Triton kernels; {took:.1f} s")
    return result(ok)


if __name__ == "__main__":
    sys.exit(main(perturbed(__doc__)))
