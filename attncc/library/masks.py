"""Named masks M1–M20 as `Mask` IR values (semantics: docs/semantics.md).

Every size (window, chunk, grid dims) is a runtime `Param`: changing it never recompiles.
Named masks align the last query with the last key: `qp = q_idx + Lk - Lq` is the query's
position (docs/semantics.md, "Query positions when Lq != Lk"), so a decode row (Lq = 1) sits at
Lk - 1. Masks over a per-row captured table (M11 `doc`, M19 `ancestors`) and the grid masks
(M12-M15) index by the raw row `q_idx`.
"""

from __future__ import annotations

import sympy
import torch

from attncc.ir.nodes import Capture, Mask, Param
from attncc.ir.reorder import Hilbert2D, inverse
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, QP, Load, buffer_symbol

Q, KV, H = Q_IDX, KV_IDX, H_IDX


def _int(name: str, value: int, minimum: int = 1) -> Param:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return Param(name, "int", value, positive=minimum >= 1)


def _load(cap: Capture, *index: sympy.Basic) -> sympy.Basic:
    return Load(buffer_symbol(cap.name), *index)


def _bool_load(cap: Capture, *index: sympy.Basic) -> sympy.Basic:
    return sympy.Ne(_load(cap, *index), 0)


def _tensor(name: str, value: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Capture:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim or value.dtype not in dtypes:
        raise ValueError(f"{name}: expected a {ndim}-d tensor of dtype "
                         f"{'/'.join(str(d) for d in dtypes)}, got {value.dim()}-d {value.dtype}")
    return Capture.of(name, value)


_INT = (torch.int32, torch.int64)
_BOOL = (torch.bool,)


def full() -> Mask:
    """M20 and plain attention: every pair allowed."""
    return Mask(sympy.true, tag="full")


def causal() -> Mask:
    """M1: `kv <= qp`."""
    return Mask(sympy.Le(KV, QP), tag="causal")


def sliding_window(window: int) -> Mask:
    """M2: `kv <= qp and qp - kv < window` (the window counts the query itself)."""
    w = _int("window", window)
    return Mask(sympy.And(sympy.Le(KV, QP), sympy.Lt(QP - KV, w.symbol)), (w,), tag="sw")


def bidirectional_window(window: int) -> Mask:
    """M3: `abs(qp - kv) <= window`."""
    w = _int("window", window, minimum=0)
    return Mask(sympy.Le(sympy.Abs(QP - KV), w.symbol), (w,), tag="biwin")


def dilated_window(window: int, dilation: int, causal: bool = False) -> Mask:
    """M4: `abs(qp - kv) <= window and (qp - kv) % dilation == 0`, optionally `& causal()`."""
    w, d = _int("window", window, minimum=0), _int("dilation", dilation)
    expr = sympy.And(sympy.Le(sympy.Abs(QP - KV), w.symbol),
                     sympy.Eq(sympy.Mod(QP - KV, d.symbol), 0))
    if causal:
        expr = sympy.And(expr, sympy.Le(KV, QP))
    return Mask(expr, (w, d), tag="dilated")


def prefix_lm(prefix: int) -> Mask:
    """M5: `kv < prefix or kv <= qp`."""
    p = _int("prefix", prefix, minimum=0)
    return Mask(sympy.Or(sympy.Lt(KV, p.symbol), sympy.Le(KV, QP)), (p,), tag="prefix")


def sinks_window(sinks: int, window: int) -> Mask:
    """M6 (StreamingLLM): `kv < sinks or sliding_window(window)`."""
    s = _int("sinks", sinks, minimum=0)
    return Mask(s.symbol > KV, (s,), tag="sinks") | sliding_window(window)


def chunked(chunk: int) -> Mask:
    """M7: `qp // chunk == kv // chunk and kv <= qp`: a decode query attends to its own chunk."""
    c = _int("chunk", chunk)
    same = sympy.Eq(sympy.floor(QP / c.symbol), sympy.floor(KV / c.symbol))
    return Mask(sympy.And(same, sympy.Le(KV, QP)), (c,), tag="chunked")


def block_causal(block: int) -> Mask:
    """M8: `kv // block <= qp // block`."""
    c = _int("block", block)
    return Mask(sympy.Le(sympy.floor(KV / c.symbol), sympy.floor(QP / c.symbol)), (c,),
                tag="blockcausal")


def strided_heads(block: int, n_local: int, stride: int, delta: int) -> Mask:
    """M9 (S2-Attention): on blocks `I = qp // block`, `J = kv // block`:
    `J <= I and (I - J < n_local or (J + h * delta + 1) % stride == 0)`."""
    b, n, s = _int("block", block), _int("n_local", n_local), _int("stride", stride)
    dl = _int("delta", delta, minimum=0)
    i, j = sympy.floor(QP / b.symbol), sympy.floor(KV / b.symbol)
    strided = sympy.Eq(sympy.Mod(j + H * dl.symbol + 1, s.symbol), 0)
    expr = sympy.And(sympy.Le(j, i), sympy.Or(sympy.Lt(i - j, n.symbol), strided))
    return Mask(expr, (b, n, s, dl), tag="s2")


def global_tokens(window: int, is_global: torch.Tensor) -> Mask:
    """M10 (Longformer): `abs(qp - kv) <= window or is_global[qp] or is_global[kv]`;
    `is_global`: bool[Lk], indexed by position."""
    w = _int("window", window, minimum=0)
    g = _tensor("is_global", is_global, 1, _BOOL)
    expr = sympy.Or(sympy.Le(sympy.Abs(QP - KV), w.symbol), _bool_load(g, QP), _bool_load(g, KV))
    return Mask(expr, (w,), (g,), tag="global")


def document(doc: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
             causal: bool = True, total: int | None = None) -> Mask:
    """M11: `doc[q] == doc[kv] and kv <= q` (`causal=False` drops `kv <= q`).

    `doc=`: int[L] document ids, any order (a document may be non-contiguous), so no closed-form
    kv range follows from them: tiles are classified by evaluating the mask.

    `cu_seqlens=`: int[N + 1], `0 = cu[0] <= ... <= cu[N] <= total` (checked: on the host for a
    CPU tensor, else on the device without a sync when `total` is given), sequence i holding tokens
    `[cu[i], cu[i + 1])`. The mask becomes one interval of keys per query row,
    `doc_start[q] <= kv <= q` (or `<= doc_end[q]`), captured as int32[total] tensors built on
    cu_seqlens' device in O(total) memory by `document_inputs` (`total` defaults to `cu[N]`,
    read back with one device sync; pass it to avoid that). Tokens in `[cu[N], total)` form one
    more sequence (padding attends only padding); a call with more than `total` queries, or with
    fewer than `total` tokens (max(Lq, Lk) < total: offsets of another batch), is an error before
    any launch. Tiles are then exact: the kernel loads
    `doc_start` (and `doc_end`) at each query tile's first and last row, O(1) per tile, and
    visits only tiles holding allowed pairs. Pass new sequences at call time with
    `attn(q, k, v, **attncc.document_inputs(cu_seqlens))`.

    The fast path trusts `doc_start`/`doc_end` to be nondecreasing (checking it needs a device
    sync); a decreasing tensor makes the kernel skip allowed tiles. `ATTNCC_DEBUG=1` checks it
    before every launch."""
    if (doc is None) == (cu_seqlens is None):
        raise ValueError("document: expected exactly one of doc= or cu_seqlens=, got "
                         f"{'both' if doc is not None else 'neither'}")
    if cu_seqlens is None:
        if total is not None:
            raise ValueError("document: total= goes with cu_seqlens=, not with doc=")
        d = _tensor("doc", doc, 1, _INT)
        expr = sympy.Eq(_load(d, Q), _load(d, KV))
        if causal:
            expr = sympy.And(expr, sympy.Le(KV, Q))
        return Mask(expr, (), (d,), tag="doc")
    inputs = document_inputs(cu_seqlens, total=total, causal=causal)
    start = Capture.of("doc_start", inputs["doc_start"], nondecreasing=True)
    if causal:
        return Mask(sympy.And(sympy.Ge(KV, _load(start, Q)), sympy.Le(KV, Q)), (), (start,),
                    tag="doc")
    end = Capture.of("doc_end", inputs["doc_end"], nondecreasing=True)
    return Mask(sympy.And(sympy.Ge(KV, _load(start, Q)), sympy.Le(KV, _load(end, Q))), (),
                (start, end), tag="doc")


def document_inputs(cu_seqlens: torch.Tensor, *, total: int | None = None,
                    causal: bool = True) -> dict[str, torch.Tensor]:
    """The tensors `document(cu_seqlens=..., causal=causal)` reads, for new sequences at call
    time: `attn(q, k, v, **attncc.document_inputs(cu_seqlens))`.

    `doc_start`: int32[total], the first token of each token's sequence; with `causal=False` also
    `doc_end`: int32[total], its last token (inclusive). Tokens in `[cu[-1], total)` form one
    more sequence. Built on cu_seqlens' device in O(total) memory (a binary search per token),
    with no device sync when `total` is given (else `total = cu_seqlens[-1]`, read back with one
    sync).

    `cu_seqlens` must hold `0 = cu[0] <= cu[1] <= ... <= cu[-1] <= total`: a CPU tensor (or one
    read back for `total`) is checked on the host and a violation raises ValueError here; a
    device tensor with `total` given is checked on the device with `torch._assert_async` (no
    sync: CUDA reports a violation at the next synchronisation)."""
    _tensor("cu_seqlens", cu_seqlens, 1, _INT)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens: expected at least one entry (0), got an empty tensor")
    if total is not None:
        _int("total", total, minimum=0)
    if cu_seqlens.device.type == "cpu" or total is None:
        # on the host already, or total needs a read-back anyway: one copy, checked here
        offsets = cu_seqlens.tolist()
        total = offsets[-1] if total is None else total
        check_cu_seqlens_host(offsets, total)
    else:
        check_cu_seqlens_async(cu_seqlens, total)
    cu = cu_seqlens.contiguous()
    pos = torch.arange(total, device=cu.device, dtype=cu.dtype)
    seq = torch.searchsorted(cu[1:], pos, right=True)  # sequence of each token; N past cu[N]
    bounds = torch.cat([cu, cu.new_full((1,), total)])  # sequence N: the padding [cu[N], total)
    out = {"doc_start": bounds[seq].to(torch.int32)}
    if not causal:
        out["doc_end"] = (bounds[seq + 1] - 1).to(torch.int32)
    return out


def check_cu_seqlens_host(offsets: list[int], total: int) -> None:
    """`0 = cu[0] <= cu[1] <= ... <= cu[-1] <= total`, on host values, before anything is built:
    an unsorted `cu_seqlens` would give sequences with negative lengths and a `doc_start` that
    decreases, which the kernel trusts when it skips kv tiles."""
    shown = offsets if len(offsets) <= 12 else [*offsets[:5], "...", *offsets[-5:]]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0 (the first sequence starts at "
                         f"token 0), got cu_seqlens[0] = {offsets[0]} in {shown}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(f"cu_seqlens: expected nondecreasing offsets (sequence i holds tokens "
                             f"[cu_seqlens[i], cu_seqlens[i + 1])), got cu_seqlens[{i}] = "
                             f"{offsets[i]} < cu_seqlens[{i - 1}] = {offsets[i - 1]} in {shown}")
    if offsets[-1] > total:
        raise ValueError(f"total: expected at least cu_seqlens[-1] = {offsets[-1]} (every "
                         f"sequence's tokens), got {total}")


def check_cu_seqlens_async(cu_seqlens: torch.Tensor, total: int) -> None:
    """The checks of `check_cu_seqlens_host` on the device, without a host sync: a violation
    fails the stream (CUDA reports it at the next synchronisation) with this message."""
    cu = cu_seqlens
    ok = (cu[0] == 0) & (cu[1:] >= cu[:-1]).all() & (cu[-1] <= total)
    torch._assert_async(ok, f"cu_seqlens: expected 0 = cu_seqlens[0] <= cu_seqlens[1] <= ... <= "
                            f"cu_seqlens[-1] <= total = {total}, got offsets that break it")


def _clamped_centre(coord: sympy.Basic, size: sympy.Basic, kernel: sympy.Basic) -> sympy.Basic:
    half = sympy.floor(kernel / 2)
    return sympy.Min(sympy.Max(coord, half), size - 1 - half)


def _near(q_coord, kv_coord, size, kernel) -> sympy.Basic:
    return sympy.Le(sympy.Abs(_clamped_centre(q_coord, size, kernel) - kv_coord),
                    sympy.floor(kernel / 2))


def neighbourhood_2d(height: int, width: int, kernel_h: int, kernel_w: int) -> Mask:
    """M12 (NATTEN): on an H x W grid, `(y, x) = divmod(i, W)`, the query centre clamped to
    `[k // 2, dim - 1 - k // 2]`; allowed when both offsets are within `k // 2`."""
    hh, ww = _int("grid_h", height), _int("grid_w", width)
    kh, kw = _int("kernel_h", kernel_h), _int("kernel_w", kernel_w)
    qy, qx = sympy.floor(Q / ww.symbol), sympy.Mod(Q, ww.symbol)
    ky, kx = sympy.floor(KV / ww.symbol), sympy.Mod(KV, ww.symbol)
    expr = sympy.And(_near(qy, ky, hh.symbol, kh.symbol), _near(qx, kx, ww.symbol, kw.symbol))
    return Mask(expr, (hh, ww, kh, kw), tag="na2d")


def neighbourhood_3d(frames: int, height: int, width: int, kernel: tuple[int, int, int],
                     tile: tuple[int, int, int] | None = None) -> Mask:
    """M13: 3-D neighbourhood on T x H x W. With `tile=(tt, th, tw)` (sliding tile attention) the
    rule applies to tile coordinates, so whole tiles are in or out."""
    dims = [_int(n, v) for n, v in zip(("grid_t", "grid_h", "grid_w"), (frames, height, width))]
    kern = [_int(n, v) for n, v in zip(("kernel_t", "kernel_h", "kernel_w"), kernel)]
    t_, h_, w_ = (p.symbol for p in dims)
    coords = lambda i: (sympy.floor(i / (h_ * w_)), sympy.Mod(sympy.floor(i / w_), h_),  # noqa: E731
                        sympy.Mod(i, w_))
    params = [*dims, *kern]
    sizes = [t_, h_, w_]
    qc, kc = list(coords(Q)), list(coords(KV))
    if tile is not None:
        tiles = [_int(n, v) for n, v in zip(("tile_t", "tile_h", "tile_w"), tile)]
        params += tiles
        qc = [sympy.floor(c / t.symbol) for c, t in zip(qc, tiles)]
        kc = [sympy.floor(c / t.symbol) for c, t in zip(kc, tiles)]
        sizes = [sympy.ceiling(s / t.symbol) for s, t in zip(sizes, tiles)]
    expr = sympy.And(*(_near(a, b, s, k.symbol) for a, b, s, k in zip(qc, kc, sizes, kern)))
    return Mask(expr, tuple(params), tag="sta" if tile else "na3d")


def criss_cross(height: int, width: int) -> Mask:
    """M14 (CCNet): same row or same column of an H x W grid."""
    ww = _int("grid_w", width)
    hh = _int("grid_h", height)  # not in the predicate; names the grid for reorder="auto"
    expr = sympy.Or(sympy.Eq(sympy.floor(Q / ww.symbol), sympy.floor(KV / ww.symbol)),
                    sympy.Eq(sympy.Mod(Q, ww.symbol), sympy.Mod(KV, ww.symbol)))
    return Mask(expr, (hh, ww), tag="crisscross")


def block_topk(indices: torch.Tensor, block: int, causal: bool = True, *,
               per_token: bool = False) -> Mask:
    """M16 (MoBA/NSA): `kv // block in indices[b, h, qp // block, :]` (entries < 0 are unused),
    the diagonal block `qp // block` always on, `& causal()` when `causal`. `indices`:
    int[B, Hq, ceil(Lk / block), k], one row per block of positions.

    `per_token=True` (MoBA's and NSA's gate: every query token routes itself): `indices`
    int[B, Hq, Lq, k], one row per query (the raw row `q`, like every per-row table), and the
    rule reads `indices[b, h, q, :]`; the diagonal block and causality as above. Tiles then come
    from the generated block-map kernel (a query tile reads the union of its rows' blocks)."""
    idx = _tensor("block_idx", indices, 4, _INT)
    bs = _int("block", block)
    qb, kb = sympy.floor(QP / bs.symbol), sympy.floor(KV / bs.symbol)
    row = Q if per_token else qb
    picks = [sympy.Eq(_load(idx, B_IDX, H, row, j), kb) for j in range(indices.shape[-1])]
    expr = sympy.Or(sympy.Eq(qb, kb), *picks)
    if causal:
        expr = sympy.And(expr, sympy.Le(KV, QP))
    # the "topk" tag selects the per-block fast path (block_maps.topk_classes)
    return Mask(expr, (bs,), (idx,), tag="topk_token" if per_token else "topk")


def bigbird(block: int, radius: int, global_blocks: torch.Tensor, random_blocks: torch.Tensor
            ) -> Mask:
    """M17: on blocks `I = qp // block`, `J = kv // block`:
    `abs(I - J) <= radius or G[I] or G[J] or R[I, J]`.

    `global_blocks`: bool[n_blocks]; `random_blocks`: bool[n_blocks, n_blocks], drawn once by the
    caller (see `bigbird_random_blocks` for the fixed-seed draw)."""
    bs, r = _int("block", block), _int("radius", radius, minimum=0)
    g = _tensor("global_blocks", global_blocks, 1, _BOOL)
    rnd = _tensor("random_blocks", random_blocks, 2, _BOOL)
    i, j = sympy.floor(QP / bs.symbol), sympy.floor(KV / bs.symbol)
    expr = sympy.Or(sympy.Le(sympy.Abs(i - j), r.symbol), _bool_load(g, i), _bool_load(g, j),
                    _bool_load(rnd, i, j))
    return Mask(expr, (bs, r), (g, rnd), tag="bigbird")


def bigbird_random_blocks(n_blocks: int, per_row: int, seed: int = 0) -> torch.Tensor:
    """`R[I, J]` for M17: `per_row` random key blocks per query block from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_blocks, n_blocks, generator=gen)
    top = scores.topk(min(per_row, n_blocks), dim=1).indices
    return torch.zeros(n_blocks, n_blocks, dtype=torch.bool).scatter_(1, top, True)


def per_head_classes(head_class: torch.Tensor, sinks: int, window: int) -> Mask:
    """M18 (DuoAttention): heads of class 0 (`full`) are causal, class 1 (`stream`) use M6."""
    cls = _tensor("head_class", head_class, 1, _INT)
    streaming = sinks_window(sinks, window)
    is_full = sympy.Eq(_load(cls, H), 0)
    expr = sympy.Or(sympy.And(is_full, sympy.Le(KV, QP)),
                    sympy.And(sympy.Not(is_full), streaming.expr))
    return Mask(expr, streaming.params, (cls,), tag="headclass")


def tree(prefix: int, ancestors: torch.Tensor) -> Mask:
    """M19 (speculative decoding): `kv < prefix or (prefix <= kv and anc[q, kv - prefix])`."""
    p = _int("prefix", prefix, minimum=0)
    anc = _tensor("ancestors", ancestors, 2, _BOOL)
    expr = sympy.Or(sympy.Lt(KV, p.symbol),
                    sympy.And(sympy.Ge(KV, p.symbol), _bool_load(anc, Q, KV - p.symbol)))
    return Mask(expr, (p,), (anc,), tag="tree")


def hilberta(height: int, width: int, tile: int, shift: int, centre: int) -> Mask:
    """M15 (HilbertA), in ORIGINAL positions: tokens attend within the same tile of `tile = 4^t`
    consecutive Hilbert ranks, boundaries shifted by `shift`, plus a `centre x centre` block at
    the grid centre that every token attends to. Pair with `reorder=Hilbert2D(H, W)`."""
    rank = inverse(Hilbert2D(height, width).permutation(height * width)).to(torch.int32)
    rk = Capture.of("hilbert_rank", rank, static=True)  # fixed by the grid, not per-batch data
    t, s = _int("tile", tile), _int("shift", shift, minimum=0)
    c, ww, hh = _int("centre", centre), _int("grid_w", width), _int("grid_h", height)
    same_tile = sympy.Eq(sympy.floor((_load(rk, Q) + s.symbol) / t.symbol),
                         sympy.floor((_load(rk, KV) + s.symbol) / t.symbol))
    y0, x0 = sympy.floor((hh.symbol - c.symbol) / 2), sympy.floor((ww.symbol - c.symbol) / 2)
    ky, kx = sympy.floor(KV / ww.symbol), sympy.Mod(KV, ww.symbol)
    central = sympy.And(ky >= y0, ky < y0 + c.symbol, kx >= x0, kx < x0 + c.symbol)
    return Mask(sympy.Or(same_tile, central), (t, s, c, ww, hh), (rk,), tag="hilberta")
