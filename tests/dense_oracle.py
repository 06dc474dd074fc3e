"""An independent dense fp64 attention oracle, written straight from CATALOG.md.

Nothing here goes through sympy or attncc's evaluator: masks are boolean tensors built from the
CATALOG predicates with broadcast index tensors (or explicit loops for the grid masks), score
mods are plain torch on `s`, and the softmax is spelled out with the Section 0 conventions.
`tests/test_reference_dense_*.py` compare `attncc.backends.reference.forward.attention_reference` to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import pytest
import torch

F64 = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}
CHUNKS = {"q_chunk": 16, "kv_chunk": 32}  # small, so the chunk-merge path runs on every test


def make_qkv(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int = 8, Dv: int = 5,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random fp64 q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] (Dv != D on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=F64)
    return q, k, v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor | None = None,
                    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    scale: float | None = None, sink: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CATALOG Section 0 softmax attention, densely, in fp64.

    allowed: bool broadcastable to [B, Hq, Lq, Lk] (None: all pairs). score: maps the scaled
    score s [B, Hq, Lq, Lk] to the modified score. sink: float[Hq] (N2). Returns o, lse.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0
    kv_head = [h // (Hq // Hkv) for h in range(Hq)]  # query head h reads kv head h // group
    kf, vf = k[:, kv_head], v[:, kv_head]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q, kf)
    if score is not None:
        s = score(s).expand(B, Hq, Lq, Lk)
    m = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if allowed is not None:
        m = m & allowed.expand(B, Hq, Lq, Lk)
    m = m & (s > -math.inf)  # a score of -inf (log 0 in S8) is a key with weight 0
    s_m = torch.where(m, s, torch.full_like(s, -math.inf))
    row_max = torch.where(m.any(-1), s_m.amax(-1), torch.zeros(B, Hq, Lq, dtype=F64))
    e = torch.where(m, torch.exp(s_m - row_max[..., None]), torch.zeros_like(s))
    denom = e.sum(-1)  # sum_j m_ij e^(s_ij - row_max)
    if sink is not None:
        denom = denom + torch.exp(sink.to(F64).view(1, Hq, 1) - row_max)
    has_mass = denom > 0
    safe = torch.where(has_mass, denom, torch.ones_like(denom))
    o = torch.einsum("bhqk,bhkd->bhqd", e, vf) / safe[..., None]
    o = torch.where(has_mass[..., None], o, torch.zeros_like(o))
    lse = torch.where(has_mass, torch.log(safe) + row_max, torch.full_like(denom, -math.inf))
    return o, lse


# ---- index grids ------------------------------------------------------------------------------

def grid(Lq: int, Lk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [Lq,1], kv [1,Lk] and the aligned query position qp = q + Lk - Lq (Section 0)."""
    q = torch.arange(Lq).view(Lq, 1)
    kv = torch.arange(Lk).view(1, Lk)
    return q, kv, q + (Lk - Lq)


def heads(H: int) -> torch.Tensor:
    """h as [H, 1, 1], to broadcast against [Lq, Lk]."""
    return torch.arange(H).view(H, 1, 1)


# ---- masks M1-M20, one function per CATALOG row ------------------------------------------------

def m_causal(Lq, Lk):  # M1
    _, kv, qp = grid(Lq, Lk)
    return kv <= qp


def m_sliding(Lq, Lk, w):  # M2
    _, kv, qp = grid(Lq, Lk)
    return (kv <= qp) & (qp - kv < w)


def m_biwin(Lq, Lk, w):  # M3 (q in the table is qp, Section 0)
    _, kv, qp = grid(Lq, Lk)
    return (qp - kv).abs() <= w


def m_dilated(Lq, Lk, w, d, causal=False):  # M4
    _, kv, qp = grid(Lq, Lk)
    out = ((qp - kv).abs() <= w) & ((qp - kv) % d == 0)
    return out & m_causal(Lq, Lk) if causal else out


def m_prefix(Lq, Lk, p):  # M5
    _, kv, qp = grid(Lq, Lk)
    return (kv < p) | (kv <= qp)


def m_sinks(Lq, Lk, s, w):  # M6
    _, kv, _ = grid(Lq, Lk)
    return (kv < s) | m_sliding(Lq, Lk, w)


def m_chunked(Lq, Lk, c):  # M7
    _, kv, qp = grid(Lq, Lk)
    return (qp // c == kv // c) & (kv <= qp)


def m_block_causal(Lq, Lk, c):  # M8
    _, kv, qp = grid(Lq, Lk)
    return kv // c <= qp // c


def m_strided(H, Lq, Lk, b, n_local, stride, delta):  # M9 -> [H, Lq, Lk]
    _, kv, qp = grid(Lq, Lk)
    i, j, h = qp // b, kv // b, heads(H)
    return (j <= i) & ((i - j < n_local) | ((j + h * delta + 1) % stride == 0))


def _read(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] with the IR's out-of-range rule: an index outside the table reads 0."""
    inside = (index >= 0) & (index < table.shape[0])
    return torch.where(inside, table[index.clamp(0, table.shape[0] - 1)],
                       torch.zeros((), dtype=table.dtype))


def m_global(Lq, Lk, w, is_global):  # M10; qp < 0 (Lq > Lk) reads no global flag
    _, kv, qp = grid(Lq, Lk)
    return ((qp - kv).abs() <= w) | _read(is_global, qp) | is_global[kv]


def m_document(doc):  # M11 (Lq == Lk == len(doc))
    q, kv, _ = grid(len(doc), len(doc))
    return (doc[q] == doc[kv]) & (kv <= q)


def doc_from_cu_seqlens(cu: list[int]) -> torch.Tensor:
    """Document id of each packed token, by an explicit loop over the sequences."""
    ids = []
    for n, (a, b) in enumerate(pairwise(cu)):
        ids += [n] * (b - a)
    return torch.tensor(ids, dtype=torch.int64)


def _clamp_centre(c: int, size: int, k: int) -> int:
    return min(max(c, k // 2), size - 1 - k // 2)


def m_neigh_2d(Hg, Wg, kh, kw):  # M12: a loop over queries, keys as coordinate vectors
    n = Hg * Wg
    ky, kx = torch.arange(n) // Wg, torch.arange(n) % Wg
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        qy, qx = divmod(i, Wg)
        cy, cx = _clamp_centre(qy, Hg, kh), _clamp_centre(qx, Wg, kw)
        out[i] = ((cy - ky).abs() <= kh // 2) & ((cx - kx).abs() <= kw // 2)
    return out


def m_neigh_3d(dims, kernel, tile=None):  # M13; tile=: the rule on tile coordinates
    T, Hg, Wg = dims
    n = T * Hg * Wg
    tile = tile or (1, 1, 1)
    sizes = [-(-d // t) for d, t in zip(dims, tile)]  # tiles per axis (edge tiles may be short)
    j = torch.arange(n)
    key = [c // tt for c, tt in zip((j // (Hg * Wg), (j // Wg) % Hg, j % Wg), tile)]
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        t, rest = divmod(i, Hg * Wg)
        y, x = divmod(rest, Wg)
        ok = torch.ones(n, dtype=torch.bool)
        for c, tt, s, k, kc in zip((t, y, x), tile, sizes, kernel, key):
            ok &= (_clamp_centre(c // tt, s, k) - kc).abs() <= k // 2
        out[i] = ok
    return out


def m_criss_cross(Hg, Wg):  # M14
    n = Hg * Wg
    j = torch.arange(n)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        out[i] = (j // Wg == i // Wg) | (j % Wg == i % Wg)
    return out


def hilbert_d2xy(n: int, d: int) -> tuple[int, int]:
    """Classical Hilbert curve on an n x n grid (n = 2^k): the d-th cell as (x, y)."""
    x = y = 0
    s, t = 1, d
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y = x + s * rx, y + s * ry
        t //= 4
        s *= 2
    return x, y


def m_hilberta(rank, Hg, Wg, tile, shift, centre):  # M15 in original positions
    """rank[i]: Hilbert index of grid cell i; tiles of `tile` consecutive ranks, boundaries
    shifted by `shift`, plus the `centre x centre` block at the grid centre for every query."""
    n = Hg * Wg
    y0, x0 = (Hg - centre) // 2, (Wg - centre) // 2
    j = torch.arange(n)
    ky, kx = j // Wg, j % Wg
    central = (ky >= y0) & (ky < y0 + centre) & (kx >= x0) & (kx < x0 + centre)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        out[i] = ((rank + shift) // tile == (int(rank[i]) + shift) // tile) | central
    return out


def m_block_topk(idx, Lq, Lk, block, causal=True, per_token=False):  # M16, explicit loops
    """The query's block is that of its aligned position qp, always on; idx [B, H, n_blocks, k]
    names the other kv blocks per query block (a block outside idx reads 0s), or with
    `per_token` idx [B, H, Lq, k] per raw query row."""
    B, H = idx.shape[:2]
    key_block = torch.arange(Lk) // block
    out = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                qb = (i + Lk - Lq) // block
                if per_token:
                    row = idx[b, h, i]
                else:
                    row = idx[b, h, qb] if 0 <= qb < idx.shape[2] else [0] * idx.shape[3]
                picked = [int(x) for x in row if x >= 0] + [qb]
                out[b, h, i] = torch.isin(key_block, torch.tensor(picked))
    return out & m_causal(Lq, Lk) if causal else out


def m_bigbird(L, block, radius, G, R, Lk=None):  # M17 on Lq = L queries, Lk (default L) keys
    _, kv, qp = grid(L, L if Lk is None else Lk)
    i, j = qp // block, kv // block
    rand = torch.zeros_like(i - j, dtype=torch.bool)
    for a in range(i.shape[0]):  # R[i, j] with the out-of-range rule (i < 0 when Lq > Lk)
        if 0 <= int(i[a, 0]) < R.shape[0]:
            rand[a] = _read(R[int(i[a, 0])], j[0])
    return ((i - j).abs() <= radius) | _read(G, i) | G[j] | rand


def m_head_classes(H, Lq, Lk, cls, s, w):  # M18 -> [H, Lq, Lk]
    full = (cls.view(H, 1, 1) == 0)
    return torch.where(full, m_causal(Lq, Lk), m_sinks(Lq, Lk, s, w))


def m_tree(Lq, Lk, P, anc):  # M19; anc: bool[Lq, Lk - P]
    out = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        out[i, :P] = True
        out[i, P:] = anc[i]
    return out


def random_tree_ancestors(n: int, seed: int = 0) -> torch.Tensor:
    """anc[i, j]: node j is node i or one of its ancestors, for a random tree (parent < child)."""
    gen = torch.Generator().manual_seed(seed)
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    return anc


# ---- the comparison every test makes -----------------------------------------------------------

def check(spec, q, k, v, allowed=None, score=None, sink=None, scale=None, chunks=CHUNKS,
          **reference_kwargs):
    """attention_reference(spec) == dense_attention(allowed, score, sink) in fp64; no NaN.

    `scale` goes to both; `reference_kwargs` (params=, captures=, reorder_inputs=) to the reference
    only, so the oracle must be built from the values those arguments mean."""
    from attncc.backends.reference.forward import attention_reference

    o, lse = attention_reference(spec, q, k, v, scale=scale, **chunks, **reference_kwargs)
    o_ref, lse_ref = dense_attention(q, k, v, allowed, score, scale=scale, sink=sink)
    assert o.dtype == lse.dtype == F64
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(lse, lse_ref, **TOL)
    return o, lse


@pytest.fixture
def one_thread():
    """These problems are tiny: on a shared 2-core machine torch's thread pool costs ~5x more
    than it saves, so the dense tests run single-threaded (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
