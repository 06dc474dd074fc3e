"""SANA-Video [L7, M8]: block-causal linear attention over video frames, decoded frame by frame
with the state carried from frame to frame, next to block-causal softmax attention over the same
frames (docs/catalog.md).

SANA-Video's attention is ReLU linear attention: with phi = ReLU,
    o_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps),
and in its autoregressive (block-causal) form token i of frame n sees every token of frames
0..n, its own frame bidirectionally. So the whole past is one state per head,
    S_n = sum_{j in frames <= n} phi(k_j) v_j^T,   z_n = sum phi(k_j),
carried from frame to frame: a constant-size cache, where block-causal SOFTMAX attention (M8,
the same visibility) must keep every past frame's keys and values.

attncc: `recurrent_state(block=frame_tokens, normalize=True)` (L7) on relu(q), relu(k): ReLU is
not one of the IR's feature maps (identity, elu1, taylor2), and applying it to q and k before
the call is exactly phi (phi acts on q and k alone); `Attention(mask=block_causal(frame_tokens))`
(M8) for the softmax. Left out: SANA-Video also rotates the features by a 3-D RoPE, applied (as
we read the paper) to the numerator's phi(q), phi(k) only; L7's normaliser uses the numerator's
features, so that split is not expressible in the IR (a separate feature input for z would be).
The independent check below is the paper's formulas as dense masked
matrix products in fp64. Exit status 1 on any mismatch (`--perturb` changes one input of the
independent computation, to show the check can fail).
"""

from __future__ import annotations

import sys
import time

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, RUNS_ON, perturbed, report, result, visited

import attncc

B, H, D = 1, 2, 16
FRAMES, FRAME_TOKENS = 4, 16  # a 4x4 latent per frame
L = FRAMES * FRAME_TOKENS
EPS = 1e-15  # SANA's denominator guard; attncc gives 0 where the denominator is exactly 0
TOL = 1e-4  # fp32 kernels against the fp64 formulas, of max(|expected|, 1)


def frame_visibility() -> torch.Tensor:
    """bool [L, L]: token i sees token j when frame(j) <= frame(i) (M8 / L7's visibility)."""
    frame = torch.arange(L) // FRAME_TOKENS
    return frame[None, :] <= frame[:, None]


def paper_linear(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-causal ReLU linear attention, dense; returns (o, S after the last frame, z)."""
    pq, pk = q.relu(), k.relu()
    w = (pq @ pk.transpose(-1, -2)) * frame_visibility()
    o = (w @ v) / (w.sum(-1, keepdim=True) + EPS)
    return o, pk.transpose(-1, -2) @ v, pk.sum(-2)


def paper_softmax(q, k, v) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    return torch.softmax(s.masked_fill(~frame_visibility(), float("-inf")), -1) @ v


def main(perturb: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    want_lin, want_S, want_z = paper_linear(q, k, v)
    want_soft = paper_softmax(q, k, v)
    if perturb:  # the independent computation sees a different value: the check must fail
        want_lin, _, _ = paper_linear(q, k, v + 0.05 * (torch.arange(L) == 5)[:, None])

    node = attncc.recurrent_state(block=FRAME_TOKENS, normalize=True)  # L7, phi identity
    linear = attncc.compile(attncc.Attention(memory=node))
    soft_spec = attncc.Attention(mask=attncc.block_causal(FRAME_TOKENS))  # M8
    softmax = attncc.compile(soft_spec)
    print(f"{node.catalog_id} {node.text()} -> {linear.name}\n"
          f"M8 {soft_spec.mask.text()} -> {softmax.name}")
    x = [t.float().to(DEVICE) for t in (q, k, v)]
    pq, pk = x[0].relu(), x[1].relu()
    start = time.perf_counter()
    o_pre, state = linear(pq, pk, x[2], return_state=True)  # the whole clip: chunked L7 kernel
    outs, S = [], None  # decode: one frame per call, the state carried frame to frame
    kv_cache: list[torch.Tensor] = []
    soft_outs = []
    for n in range(FRAMES):
        f = slice(n * FRAME_TOKENS, (n + 1) * FRAME_TOKENS)
        o_n, S = linear(pq[:, :, f], pk[:, :, f], x[2][:, :, f], initial_state=S,
                        return_state=True)
        outs.append(o_n)
        kv_cache.append(torch.stack([x[1][:, :, f], x[2][:, :, f]]))
        cache = torch.cat(kv_cache, dim=3)  # frames 0..n: Lk > Lq, last query at the last key
        soft_outs.append(softmax(x[0][:, :, f], cache[0], cache[1]))
    o_soft = softmax(*x)
    took = time.perf_counter() - start

    ok = report("L7 prefill (whole clip) vs paper formula", o_pre, want_lin, TOL)
    ok &= report("L7 frame-by-frame decode vs paper formula", torch.cat(outs, 2), want_lin, TOL)
    ok &= report("L7 state S carried frame to frame", state[..., :D], want_S, TOL)
    ok &= report("L7 normaliser z", state[..., D], want_z, TOL)
    ok &= report("L7 decode state == prefill state", S, state.double().cpu(), TOL)
    ok &= report("M8 block-causal softmax vs dense masked softmax", o_soft, want_soft, TOL)
    ok &= report("M8 frame-by-frame over a growing KV cache", torch.cat(soft_outs, 2), want_soft,
                 TOL)

    seen, total = visited(soft_spec, L, L, FRAME_TOKENS)
    kv_bytes = 2 * B * H * L * D * 4
    state_bytes = B * H * D * (D + 1) * 4
    print(f"saved: block-causal softmax visits {seen}/{total} {FRAME_TOKENS}x{FRAME_TOKENS} "
          f"tiles (dense: {total}); after {FRAMES} frames the linear state is {state_bytes} bytes "
          f"per layer, constant, vs {kv_bytes} bytes of fp32 KV cache for block-causal softmax "
          f"(growing {kv_bytes // FRAMES} bytes per frame)")
    print(f"B={B} H={H} frames={FRAMES}x{FRAME_TOKENS} tokens D={D} {RUNS_ON}: both L7 kernels "
          f"are Triton (chunked block-causal); {took:.1f} s")
    return result(ok)


if __name__ == "__main__":
    sys.exit(main(perturbed(__doc__)))
