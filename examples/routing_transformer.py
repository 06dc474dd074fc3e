"""Routing Transformer (Roy et al., 2021): attention within k-means clusters (M11 & R5).

Queries and keys share one projection (Q = K, as the paper does for routing attention); each
head runs spherical k-means on its vectors and a token attends the earlier tokens of its own
cluster: `o_i = sum_{j <= i, c(j) = c(i)} softmax_j(q_i . k_j / sqrt(d)) v_j`.

In attncc the clusters are documents (M11, `attncc.document(doc)` with `doc = cluster id`,
documents need not be contiguous) and the segment-sort reorder (R5, `attncc.segment_sort(L)`
with `key_score = -cluster`: one segment, clusters in ascending order, token order kept inside
a cluster) puts each cluster's tokens together, so the kernel's tiles turn from scattered to
block-diagonal. Masks and causality still see the original positions: the result is the same.
The clustering is per head and M11's `doc` and R5's `key_score` have no head axis, so each head
is one call with its own `doc=` and `key_score=` (runtime tensors: no recompile).

Checked against an independent dense PyTorch version (boolean [L, L] mask `c(i) == c(j) and
j <= i`, masked softmax in fp64), with and without the reorder: fp32 within 1e-4 (max abs
error; exit 1 beyond). Prints the tiles read and their density (allowed pairs / area read)
before and after the reorder, from the kernel's own record of the tiles it read.

    TRITON_INTERPRET=1 python examples/routing_transformer.py      # about 5 s on a CPU
"""

from __future__ import annotations

import math
import sys

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, check_abs, perturbed

import attncc

H, L, D = 2, 128, 32
CLUSTERS, ITERATIONS, TILE = 4, 8, 16
TOL = 1e-4  # fp32, max abs error against the fp64 oracle


def kmeans(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Spherical k-means (Lloyd) on the rows of x [L, D]: int64[L] cluster ids."""
    x = torch.nn.functional.normalize(x, dim=-1)
    centroids = x[torch.randperm(len(x), generator=gen)[:CLUSTERS]]
    for _ in range(ITERATIONS):
        assign = (x @ centroids.T).argmax(-1)
        for c in range(CLUSTERS):
            if (assign == c).any():
                centroids[c] = torch.nn.functional.normalize(x[assign == c].mean(0), dim=-1)
    return (x @ centroids.T).argmax(-1)


def dense_routing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cluster: torch.Tensor
                  ) -> torch.Tensor:
    """fp64, one head ([L, D] each): softmax over the earlier tokens of the same cluster."""
    allowed = (cluster[:, None] == cluster[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    s = (q.double() @ k.double().T / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


def main() -> int:
    perturb = perturbed(__doc__)
    gen = torch.Generator().manual_seed(0)
    # a few directions plus noise, so the clusters are real (and of unequal sizes)
    modes = torch.randn(CLUSTERS, D, generator=gen) * 2
    qk = modes[torch.randint(0, CLUSTERS, (1, H, L), generator=gen)]
    qk = qk + torch.randn(1, H, L, D, generator=gen)  # shared query/key vectors
    v = torch.randn(1, H, L, D, generator=gen)

    placeholder = torch.zeros(L, dtype=torch.int64, device=DEVICE)  # replaced at each call
    schedule = attncc.Schedule(block_m=TILE, block_n=TILE)
    orders = {"original order": None, "sorted by cluster (R5)": attncc.segment_sort(L)}
    n = L // TILE
    ok, worst = True, 0.0
    stats = {name: [0, 0] for name in orders}  # tiles read, allowed pairs
    for h in range(H):
        cluster = kmeans(qk[0, h], gen)
        sizes = torch.bincount(cluster, minlength=CLUSTERS).tolist()
        print(f"head {h}: cluster sizes {sizes}")
        x, vh = qk[:, h:h + 1].to(DEVICE), v[:, h:h + 1].to(DEVICE)
        ref_cluster = cluster.clone()
        if perturb:  # a wrong oracle (one token moved to another cluster) must be caught
            ref_cluster[L - 1] = (ref_cluster[L - 1] + 1) % CLUSTERS
        ref = dense_routing(qk[0, h], qk[0, h], v[0, h], ref_cluster)
        allowed_pairs = int(((cluster[:, None] == cluster[None, :]).tril()).sum())
        for name, order in orders.items():
            attn = attncc.compile(attncc.Attention(mask=attncc.document(placeholder),
                                                   reorder=order, schedule=schedule))
            extra = {"key_score": -cluster.double().to(DEVICE)} if order is not None else {}
            visits = torch.zeros(1, n, n, dtype=torch.int8, device=DEVICE)
            out = attn(x, x, vh, backend="triton", _visits=visits, doc=cluster.to(DEVICE),
                       **extra)
            err = (out[0, 0].double().cpu() - ref).abs().max().item()
            worst = max(worst, err)
            stats[name][0] += int((visits > 0).sum())
            stats[name][1] += allowed_pairs
            print(f"  {name:24s}: {int((visits > 0).sum()):2d} of {n * n} tiles read, "
                  f"max |o - dense PyTorch| = {err:.2e}")
    before, after = (stats[name] for name in orders)
    print(f"attncc saved: tiles of {TILE}x{TILE} read over {H} heads: {before[0]} in the original "
          f"order (density {before[1] / (before[0] * TILE * TILE):.0%}) -> {after[0]} sorted by "
          f"cluster (density {after[1] / (after[0] * TILE * TILE):.0%}); dense {H * n * n}")
    ok = check_abs("o - dense PyTorch routing attention", worst, TOL, over=" over both orders")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
