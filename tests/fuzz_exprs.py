"""Random mask and score expressions for the fuzz tests, as plain nested tuples.

A tuple tree is what hypothesis draws, prints and shrinks (so a failure pastes straight into an
`@example`). Three readings of one tree:
- `build_mask` / `build_score`: the attncc values (named catalogue atoms, `&`, `|`, `~`,
  `.then()`, traced FlexAttention-style functions);
- `dense_mask` / `dense_score`: brute force on index grids with plain torch, from the CATALOG
  Section 1/2 formulas (named atoms use `qp = q_idx + Lk - Lq`; traced functions see raw
  indices and run as ordinary Python on broadcast index tensors);
- captured tensors (doc ids, slopes, biases) come from a seed and the call's shape.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import attncc
from tests.dense_oracle import random_tree_ancestors
from tests.fuzz_support import Shape
from tests.fuzz_traced import _gen, bool_exprs, float_exprs, mask_fn, score_fn


def _grids(shape: Shape):
    b = torch.arange(shape.B).view(-1, 1, 1, 1)
    h = torch.arange(shape.Hq).view(1, -1, 1, 1)
    q = torch.arange(shape.Lq).view(1, 1, -1, 1)
    kv = torch.arange(shape.Lk).view(1, 1, 1, -1)
    return b, h, q, kv, q + (shape.Lk - shape.Lq)


def _as_bool(x, shape: Shape) -> torch.Tensor:
    full = (shape.B, shape.Hq, shape.Lq, shape.Lk)
    return torch.as_tensor(x).bool().expand(full) if not isinstance(x, torch.Tensor) or \
        x.dim() == 0 else x.bool().expand(full)


# ---- named masks: (tag, ints...) ---------------------------------------------------------------


def named_masks(shape: Shape):
    """Named atoms valid for `shape`: the ones defined on one token axis (doc, cu, na2d,
    crisscross) only where Lq == Lk; the rest at any Lq, Lk (those whose formula reads the
    aligned query position qp: biwin, dilated, chunked, s2, topk, global, bigbird)."""
    sq = shape.Lq == shape.Lk
    seed = st.integers(0, 2 ** 16)
    w = st.integers(0, 12)
    atoms = [st.just(("full",)), st.just(("causal",)),
             st.tuples(st.just("sw"), st.integers(1, 12)),
             st.tuples(st.just("prefix"), w),
             st.tuples(st.just("sinks"), st.integers(0, 4), st.integers(1, 12)),
             st.tuples(st.just("blockcausal"), st.integers(1, 9)),
             st.tuples(st.just("headclass"), seed, st.integers(0, 3), st.integers(1, 9))]
    if shape.Lk >= shape.Lq:
        atoms.append(st.tuples(st.just("tree"), seed))
    atoms += [st.tuples(st.just("biwin"), w),
              st.tuples(st.just("dilated"), w, st.integers(1, 4), st.booleans()),
              st.tuples(st.just("chunked"), st.integers(1, 9)),
              st.tuples(st.just("s2"), st.integers(1, 6), st.integers(1, 3),
                        st.integers(1, 4), st.integers(0, 2)),
              st.tuples(st.just("topk"), seed, st.sampled_from([4, 8, 16]), st.booleans()),
              st.tuples(st.just("global"), w, seed),
              st.tuples(st.just("bigbird"), seed, st.sampled_from([4, 8]), st.integers(0, 2))]
    if sq:
        atoms += [st.tuples(st.just("doc"), seed, st.integers(1, 4)),
                  st.tuples(st.just("cu"), seed),
                  st.tuples(st.just("na2d"), st.integers(0, 2), st.integers(0, 2)),
                  st.just(("crisscross",))]
    return st.one_of(*atoms)


def mask_trees(shape: Shape, depth: int = 2):
    atom = st.one_of(named_masks(shape), st.tuples(st.just("fn"), bool_exprs(2)))
    if depth == 0:
        return atom
    sub = mask_trees(shape, depth - 1)
    return st.one_of(atom, atom, st.tuples(st.sampled_from(["and", "or"]), sub, sub),
                     st.tuples(st.just("not"), sub))


def _grid_dims(L: int) -> tuple[int, int]:
    w = max(d for d in range(1, int(L ** 0.5) + 1) if L % d == 0)
    return L // w, w


def _cu(seed: int, L: int) -> list[int]:
    cuts = sorted(torch.randint(0, L + 1, (3,), generator=_gen(seed)).tolist())
    return [0, *cuts, L]


def _mask_data(node, shape: Shape):
    """The captured tensors a named atom reads (same tensors for build and dense)."""
    tag, L = node[0], max(shape.Lq, shape.Lk)
    if tag == "headclass":
        return (torch.randint(0, 2, (shape.Hq,), generator=_gen(node[1])))
    if tag == "tree":
        return random_tree_ancestors(shape.Lq, node[1])
    if tag == "topk":
        nb = -(-L // node[2])
        return (torch.randint(-1, nb, (shape.B, shape.Hq, nb, 2), generator=_gen(node[1])))
    if tag == "global":
        return (torch.rand(L, generator=_gen(node[2])) < 0.15)
    if tag == "bigbird":
        nb = -(-L // node[2])
        g = _gen(node[1])
        return (torch.rand(nb, generator=g) < 0.2), (torch.rand(nb, nb, generator=g) < 0.2)
    if tag == "doc":
        return (torch.randint(0, node[2], (L,), generator=_gen(node[1])))
    if tag == "cu":
        return (torch.tensor(_cu(node[1], L), dtype=torch.int32))
    return None


def build_mask(tree, shape: Shape) -> attncc.Mask:
    tag = tree[0]
    if tag in ("and", "or"):
        a, b = build_mask(tree[1], shape), build_mask(tree[2], shape)
        return a & b if tag == "and" else a | b
    if tag == "not":
        return ~build_mask(tree[1], shape)
    if tag == "fn":
        return attncc.Attention(mask=mask_fn(tree[1], shape)).mask
    data = _mask_data(tree, shape)
    a = tree[1:]
    match tag:
        case "full":
            return attncc.full()
        case "causal":
            return attncc.causal()
        case "sw":
            return attncc.sliding_window(a[0])
        case "prefix":
            return attncc.prefix_lm(a[0])
        case "sinks":
            return attncc.sinks_window(a[0], a[1])
        case "blockcausal":
            return attncc.block_causal(a[0])
        case "headclass":
            return attncc.per_head_classes(data, a[1], a[2])
        case "tree":
            return attncc.tree(shape.Lk - shape.Lq, data)
        case "biwin":
            return attncc.bidirectional_window(a[0])
        case "dilated":
            return attncc.dilated_window(a[0], a[1], causal=a[2])
        case "chunked":
            return attncc.chunked(a[0])
        case "s2":
            return attncc.strided_heads(*a)
        case "topk":
            return attncc.block_topk(data, a[1], causal=a[2])
        case "global":
            return attncc.global_tokens(a[0], data)
        case "bigbird":
            return attncc.bigbird(a[1], a[2], *data)
        case "doc":
            return attncc.document(data)
        case "cu":
            return attncc.document(cu_seqlens=data)
        case "na2d":
            gh, gw = _grid_dims(shape.Lq)
            return attncc.neighbourhood_2d(gh, gw, min(2 * a[0] + 1, gh | 1),
                                           min(2 * a[1] + 1, gw | 1))
        case "crisscross":
            return attncc.criss_cross(*_grid_dims(shape.Lq))
    raise AssertionError(f"unknown mask {tree!r}")


def dense_mask(tree, shape: Shape) -> torch.Tensor:
    """bool [B, Hq, Lq, Lk] from the CATALOG formulas (named atoms on qp)."""
    tag = tree[0]
    if tag in ("and", "or"):
        a, b = dense_mask(tree[1], shape), dense_mask(tree[2], shape)
        return a & b if tag == "and" else a | b
    if tag == "not":
        return ~dense_mask(tree[1], shape)
    b, h, q, kv, qp = _grids(shape)
    if tag == "fn":
        return _as_bool(mask_fn(tree[1], shape, brute=True)(b, h, q, kv), shape)
    data = _mask_data(tree, shape)
    a = tree[1:]
    causal = kv <= qp

    def sliding(win):
        return causal & (qp - kv < win)

    match tag:
        case "full":
            out = torch.tensor(True)
        case "causal":
            out = causal
        case "sw":
            out = sliding(a[0])
        case "prefix":
            out = (kv < a[0]) | causal
        case "sinks":
            out = (kv < a[0]) | sliding(a[1])
        case "blockcausal":
            out = kv // a[0] <= qp // a[0]
        case "headclass":
            out = torch.where(data.view(1, -1, 1, 1) == 0, causal, (kv < a[1]) | sliding(a[2]))
        case "tree":
            P = shape.Lk - shape.Lq
            rel = (kv - P).clamp(0, max(shape.Lq - 1, 0))
            anc = data[q.clamp(max=shape.Lq - 1), rel] if shape.Lq else torch.tensor(False)
            out = (kv < P) | ((kv >= P) & anc)
        case "biwin":
            out = (qp - kv).abs() <= a[0]
        case "dilated":
            out = ((qp - kv).abs() <= a[0]) & ((qp - kv) % a[1] == 0)
            out = out & causal if a[2] else out
        case "chunked":
            out = (qp // a[0] == kv // a[0]) & causal
        case "s2":
            blk, n_local, stride, delta = a
            i, j = qp // blk, kv // blk
            out = (j <= i) & ((i - j < n_local) | ((j + h * delta + 1) % stride == 0))
        case "topk":
            blk = a[1]
            qb, kb = (qp // blk).expand(shape.B, shape.Hq, shape.Lq, 1), kv // blk
            picks = data[b, h, qb.clamp(min=0)]  # [B, Hq, Lq, 1, 2]
            picks = torch.where(qb.unsqueeze(-1) >= 0, picks, 0)  # a read before row 0 is 0
            hit = (picks == kb.unsqueeze(-1)).any(-1) | (qb == kb)
            out = hit & causal if a[2] else hit
        case "global":
            out = ((qp - kv).abs() <= a[0]) | (data[qp.clamp(min=0)] & (qp >= 0)) | data[kv]
        case "bigbird":
            blk, radius = a[1], a[2]
            i, j = qp // blk, kv // blk
            G, R = data
            ic = i.clamp(min=0).expand(-1, -1, -1, shape.Lk)  # a read before block 0 is 0
            out = ((i - j).abs() <= radius) | G[j] | ((G[i.clamp(min=0)] | R[
                ic, j.expand(-1, -1, shape.Lq, -1)]) & (i >= 0))
        case "doc":
            out = (data[qp] == data[kv]) & causal
        case "cu":
            ids = torch.zeros(shape.Lk, dtype=torch.long)
            for n, (s, e) in enumerate(zip(data[:-1].tolist(), data[1:].tolist())):
                ids[s:e] = n
            out = (ids[qp] == ids[kv]) & causal
        case "na2d":
            gh, gw = _grid_dims(shape.Lq)
            kh, kw = min(2 * a[0] + 1, gh | 1), min(2 * a[1] + 1, gw | 1)
            cy = (qp // gw).clamp(kh // 2, gh - 1 - kh // 2)
            cx = (qp % gw).clamp(kw // 2, gw - 1 - kw // 2)
            out = ((cy - kv // gw).abs() <= kh // 2) & ((cx - kv % gw).abs() <= kw // 2)
        case "crisscross":
            gw = _grid_dims(shape.Lq)[1]
            out = (qp // gw == kv // gw) | (qp % gw == kv % gw)
        case _:
            raise AssertionError(f"unknown mask {tree!r}")
    return _as_bool(out, shape)


# ---- named scores ------------------------------------------------------------------------------


def named_scores(shape: Shape, zeros: bool = True):
    """zeros: S7/S8 may give some keys weight 0 (score -inf); not where another score mod
    follows (`-inf * -0.7` or `abs(-inf)` would be +inf, where softmax is undefined)."""
    seed = st.integers(0, 2 ** 16)
    zero = st.booleans() if zeros else st.just(False)
    atoms = [st.tuples(st.just("scale"), st.sampled_from([0.5, 1.5, -0.7])),
             st.tuples(st.just("softcap"), st.sampled_from([0.5, 2.0, 20.0])),
             st.tuples(st.just("bias"), seed, st.tuples(*[st.booleans()] * 4)),
             st.tuples(st.just("headbias"), seed),
             st.tuples(st.just("logcount"), seed, zero),
             st.tuples(st.just("calib"), seed, zero)]
    atoms += [st.tuples(st.just("alibi"), st.one_of(st.none(), seed)),  # S3, S4 read qp
              st.tuples(st.just("relbias"), seed, st.integers(0, 4))]
    return st.one_of(*atoms)


def traced_scores():
    """("fn", tree)."""
    return st.tuples(st.just("fn"), float_exprs(2))


def score_trees(shape: Shape):
    atom = st.one_of(named_scores(shape), traced_scores())
    first = st.one_of(named_scores(shape, zeros=False), traced_scores())
    return st.one_of(atom, st.tuples(st.just("then"), first, atom))


def _score_data(node, shape: Shape):
    tag = node[0]
    if tag == "alibi":
        return None if node[1] is None else (torch.rand(shape.Hq, generator=_gen(node[1])))
    if tag == "relbias":
        return (torch.randn(shape.Hq, 2 * node[2] + 1, generator=_gen(node[1])))
    if tag == "bias":
        dims = [1 if one else n for one, n in
                zip(node[2], (shape.B, shape.Hq, shape.Lq, shape.Lk))]
        t = torch.randn(*dims, generator=_gen(node[1]))
        if node[1] % 3 == 1:  # the same values in [.., kv, q] storage: non-contiguous
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif node[1] % 3 == 2 and dims[3] > 1:  # one value per row: stride 0 along kv
            t = t[..., :1].expand(dims)
        return (t)
    if tag == "headbias":
        return (torch.randn(shape.Hq, generator=_gen(node[1])))
    if tag in ("logcount", "calib"):  # some weights 0 (score -inf: the key gets weight 0)
        g = _gen(node[1])
        w = torch.rand(shape.Lk, generator=g) + 0.2
        if node[2]:
            w = w * (torch.rand(shape.Lk, generator=g) > 0.25)
        return (w.log() if tag == "logcount" else w)
    return None


def build_score(tree, shape: Shape) -> attncc.ScoreMod:
    tag = tree[0]
    if tag == "then":
        return build_score(tree[1], shape).then(build_score(tree[2], shape))
    if tag == "fn":
        return attncc.Attention(score=score_fn(tree[1], shape)).score
    data = _score_data(tree, shape)
    match tag:
        case "scale":
            return attncc.scale(tree[1])
        case "softcap":
            return attncc.softcap(tree[1])
        case "alibi":
            return attncc.alibi(data)
        case "relbias":
            return attncc.relative_bias(data)
        case "bias":
            return attncc.bias(data)
        case "headbias":
            return attncc.head_bias(data)
        case "logcount":
            return attncc.log_count(data)
        case "calib":
            return attncc.calibration(data)
    raise AssertionError(f"unknown score {tree!r}")


def dense_score(tree, shape: Shape):
    """A function s [B, Hq, Lq, Lk] fp64 -> modified s, from the CATALOG Section 2 formulas."""
    tag = tree[0]
    if tag == "then":
        first, second = dense_score(tree[1], shape), dense_score(tree[2], shape)
        return lambda s: second(first(s))
    b, h, q, kv, qp = _grids(shape)
    if tag == "fn":
        fn = score_fn(tree[1], shape, brute=True)

        def traced(s):
            old = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)  # int index * float -> fp64, not fp32
            try:
                return torch.as_tensor(fn(s, b, h, q, kv), dtype=torch.float64)
            finally:
                torch.set_default_dtype(old)
        return traced
    data = _score_data(tree, shape)
    match tag:
        case "scale":
            return lambda s: s * tree[1]
        case "softcap":
            return lambda s: tree[1] * torch.tanh(s / tree[1])
        case "alibi":
            slope = (2.0 ** (-8.0 * (h.double() + 1) / shape.Hq) if data is None
                     else data.double().view(1, -1, 1, 1))
            return lambda s: s + slope * (kv - qp)
        case "relbias":
            m = tree[2]
            bucket = (qp - kv).clamp(-m, m) + m
            return lambda s: s + data.double()[h, bucket]
        case "bias":
            return lambda s: s + data.double()
        case "headbias":
            return lambda s: s + data.double().view(1, -1, 1, 1)
        case "logcount":
            return lambda s: s + data.double()[kv]
        case "calib":
            return lambda s: s + torch.log(data.double()[kv])
    raise AssertionError(f"unknown score {tree!r}")


def sink_logits(seed: int, Hq: int) -> torch.Tensor:
    return (torch.randn(Hq, generator=_gen(seed)) * 2)
