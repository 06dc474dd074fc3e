"""The device block-map builder from per-row key intervals (`attncc.passes.row_intervals`,
templates/block_map_rows.py.j2) against the pair-evaluation builder (block_map.py.j2) and the
dense mask, under the interpreter: equal classes for random interval masks (catalogue masks,
per-row tables that are not monotone, conditions on the query row and the head, unions of up to
three intervals) at random odd shapes and tiles. The analysis picks the pair form, and says why,
for masks with no interval form; the forward of a mask routed to the device builder uses the
row-interval kernel and matches the fp64 reference.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.backends.triton.block_maps import block_map_values, group_sizes
from attncc.backends.triton.render import block_map_kernel_name, render_block_map
from attncc.backends.triton.source import load_module
from attncc.ir.nodes import Capture, Mask
from attncc.ir.symbols import H_IDX, KV_IDX, Q_IDX, QP, Load, buffer_symbol
from attncc.passes.pipeline import run_spec_passes
from attncc.passes.row_intervals import row_intervals
from tests.catalog_cases import masks as catalogue
from tests.test_backward import _assert_close, _backward
from tests.test_backward import _inputs as _bw_inputs
from tests.test_classify_blocks import HQ, brute_force, dense

B = 2
PAIRS_FORM = "# block-map kernel form: the mask at every (q, kv) pair of every tile"
ROWS_FORM = "# block-map kernel form: per-row key intervals"


def _table(name: str) -> sympy.Basic:
    return Load(buffer_symbol(name), Q_IDX)


def row_table_mask(Lq: int, seed: int) -> Mask:
    """`lo[q] <= kv <= hi[q]` from per-row tables in no particular order (rows with lo > hi
    allow nothing), except where `skip[q]`: a mask whose bounds no closed form describes."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(-5, Lq + 20, (Lq,), generator=g, dtype=torch.int32)
    hi = lo + torch.randint(-3, 60, (Lq,), generator=g, dtype=torch.int32)
    skip = torch.rand(Lq, generator=g) < 0.2
    caps = (Capture.of("lo", lo), Capture.of("hi", hi), Capture.of("skip", skip))
    expr = sympy.And(sympy.Ge(KV_IDX, _table("lo")), sympy.Le(KV_IDX, _table("hi")),
                     sympy.Eq(_table("skip"), 0))
    return Mask(expr, (), caps, tag="rows")


def per_head_union_mask(Hq: int, seed: int) -> Mask:
    """Three intervals, one per head parity, one shared: `kv < 3 + h` or, on even heads,
    causal, on odd heads a window of a per-row width."""
    g = torch.Generator().manual_seed(seed)
    width = torch.randint(0, 40, (512,), generator=g, dtype=torch.int64)
    cap = Capture.of("width", width)
    even = sympy.Eq(sympy.Mod(H_IDX, 2), 0)
    expr = sympy.Or(sympy.Lt(KV_IDX, 3 + H_IDX), sympy.And(even, sympy.Le(KV_IDX, QP)),
                    sympy.And(sympy.Not(even), sympy.Le(KV_IDX, QP),
                              sympy.Ge(KV_IDX, QP - Load(buffer_symbol("width"), Q_IDX))))
    return Mask(expr, (), (cap,), tag="heads")


PARAMS = ("window", "prefix", "sinks", "chunk", "block")
INTERVAL_CATALOGUE = ["M1-causal", "M2-sliding-window", "M3-bidirectional", "M5-prefix-lm",
                      "M6-sinks-window", "M7-chunked", "M8-block-causal", "M18-per-head",
                      "M11-cu-seqlens"]
NAMES = INTERVAL_CATALOGUE + ["row-table", "per-head-union"]


def make_mask(name: str, Lq: int, Lk: int, seed: int) -> Mask:
    if name == "row-table":
        return row_table_mask(Lq, seed)
    if name == "per-head-union":
        return per_head_union_mask(HQ, seed)
    return catalogue(B, HQ, Lq, Lk, seed)[name]


_LOADED: dict[str, object] = {}
_PLANS: dict[str, object] = {}


def _plan(name: str, mask: Mask):
    """The plan of mask `name`: its structure (and so its kernels) does not change with the
    shape, seed or parameter values a check draws; the values are passed at launch."""
    if name not in _PLANS:
        _PLANS[name] = run_spec_passes(attncc.Attention(mask=mask))
    return _PLANS[name]


def kernel(plan, pairs: bool):
    """The block-map kernel of `plan` in the pair or the row-interval form, rendered into a
    file of its own and loaded once per source."""
    source = render_block_map(plan, pairs=pairs)
    assert (PAIRS_FORM if pairs else ROWS_FORM) in source
    if source not in _LOADED:
        name = block_map_kernel_name(plan)
        fd, path = tempfile.mkstemp(suffix=".py", prefix=name)
        with os.fdopen(fd, "w") as f:
            f.write(source)
        module = load_module(path, f"{name}_{'pairs' if pairs else 'rows'}_{len(_LOADED)}")
        _LOADED[source] = getattr(module, name)
    return _LOADED[source]


def classes(plan, kw: dict, pairs: bool, bm: int, bn: int) -> torch.Tensor:
    """int8 [Gb, Gh, nM, nN] from the block-map kernel in the pair or row-interval form."""
    Lq, Lk = kw["Lq"], kw["Lk"]
    Gb, Gh = group_sizes(plan, B, HQ)
    out = torch.full((Gb, Gh, -(-Lq // bm), -(-Lk // bn)), -1, dtype=torch.int8)
    values = block_map_values(plan, out, Lq=Lq, Lk=Lk, Hq=HQ, Hkv=HQ, block_m=bm, block_n=bn,
                              params=kw["params"], tensors=kw["tensors"], positions=None)
    kernel(plan, pairs)[(out.shape[2], Gb * Gh)](**values)
    return out


def check(name: str, Lq: int, Lk: int, bm: int, bn: int, seed: int,
          params: dict[str, int] | None = None, pairs: bool = True) -> None:
    """Row-interval classes == brute force on the dense mask (== pair-form classes when
    `pairs`); `params`: run-time values replacing the mask's own (new values, same kernel)."""
    mask = make_mask(name, Lq, Lk, seed)
    plan = _plan(name, mask)
    assert row_intervals(plan.spec).pieces is not None, row_intervals(plan.spec).why
    params = {p.name: (params or {}).get(p.name, p.value) for p in mask.params}
    kw = dict(Lq=Lq, Lk=Lk, B=B, params=params,
              tensors={c.name: c.tensor for c in mask.captures})
    want = brute_force(dense(mask.expr, kw), bm, bn)
    what = f"{name} {Lq}x{Lk} tiles {bm}x{bn} {params}"
    rows = classes(plan, kw, False, bm, bn)
    assert torch.equal(rows, want), f"rows {what}\n{want}\n{rows}"
    if pairs:
        got = classes(plan, kw, True, bm, bn)
        assert torch.equal(got, want), f"pairs {what}\n{want}\n{got}"


@pytest.mark.parametrize("name", NAMES)
def test_rows_equal_pairs_and_dense(name):
    check(name, 45, 83, 16, 16, 0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), Lq=st.integers(1, 100), Lk=st.integers(1, 100),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32]), seed=st.integers(0, 99),
       values=st.fixed_dictionaries({p: st.integers(1, 70) for p in PARAMS}))
def test_rows_equal_pairs_and_dense_on_random_shapes(name, Lq, Lk, bm, bn, seed, values):
    """Random odd shapes, tiles, tables and run-time values of the mask's size parameters."""
    check(name, Lq, Lk, bm, bn, seed, params=values)


EDGE_PARAMS = {
    "M2-sliding-window": [{"window": v} for v in [*range(1, 18), 32, 33, 34]],
    # sinks < BLOCK_N with a window reaching back into the sinks: tiles the two intervals cover
    # only together (full by the exact count, never by one piece's min / max)
    "M6-sinks-window": [{"sinks": v, "window": v + 16} for v in range(1, 18)],
    "M7-chunked": [{"chunk": v} for v in range(1, 18)],
}


@pytest.mark.parametrize("name", list(EDGE_PARAMS))
def test_tile_edges_on_every_offset(name):
    """Window and chunk sizes 1..BLOCK_N + 1 put a row's first or last key on every column of
    a tile, first and last included, and windows near BLOCK_M + BLOCK_N make the first full
    tiles: where the O(1) min / max tests decide a tile alone, an off-by-one there shows."""
    for params in EDGE_PARAMS[name]:
        check(name, 40, 57, 16, 16, 0, params=params, pairs=False)


# --- which builder the analysis picks, and that the forward / backward run it ------------------

_g = torch.Generator().manual_seed(5)
L_E2E = 150
DOC = torch.sort(torch.randint(0, 4, (L_E2E,), generator=_g))[0]
OFFSETS = torch.tensor([0, 37, 37, 101], dtype=torch.int32)  # document d starts at OFFSETS[d]
LO = torch.randint(-4, L_E2E, (L_E2E,), generator=_g, dtype=torch.int32)
HI = LO + torch.randint(-2, 70, (L_E2E,), generator=_g, dtype=torch.int32)


def doc_offsets(b, h, q_idx, kv_idx):
    """FlexAttention's document mask from offsets: an interval per row, not one the closed
    form can bound (OFFSETS[DOC[q]] is not known to be nondecreasing)."""
    return (kv_idx >= OFFSETS[DOC[q_idx]]) & (kv_idx <= q_idx)


def row_table(b, h, q_idx, kv_idx):
    return (kv_idx >= LO[q_idx]) & (kv_idx <= HI[q_idx])


@pytest.mark.parametrize("mask,why", [
    (attncc.global_tokens(9, torch.rand(64) < 0.1), "Load(is_global, kv_idx)"),
    (attncc.document(torch.tensor([0, 0, 1, 1])), "Load(doc, kv_idx)"),
    (attncc.tree(3, torch.rand(8, 8) < 0.5), "Load(ancestors, q_idx, kv_idx - prefix)"),
    (attncc.block_topk(torch.zeros(1, 1, 4, 3, dtype=torch.int64), 16), "block_idx"),
])
def test_masks_without_intervals_keep_the_pair_kernel_and_say_why(mask, why):
    plan = run_spec_passes(attncc.Attention(mask=mask))
    rows = plan.block_map.rows
    assert rows.pieces is None and why in rows.why and "every (q, kv) pair" in rows.text()
    assert PAIRS_FORM in render_block_map(plan)


def test_reordered_tokens_keep_the_pair_kernel():
    doc = attncc.document(cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    plan = run_spec_passes(attncc.Attention(mask=doc, reorder=attncc.UserPermutation()))
    assert plan.block_map.source == "device" and plan.block_map.rows.pieces is None
    assert "reordered" in plan.block_map.rows.why


@pytest.mark.parametrize("fn", [doc_offsets, row_table])
def test_forward_and_backward_use_the_row_interval_kernel(fn, device):
    """A traced mask routed to the device builder: its block-map source is the row-interval
    form, and the forward and backward that read its map match the fp64 reference."""
    attn = attncc.compile(attncc.Attention(mask=fn))
    source = attn.plan.block_map
    assert source.source == "device" and source.rows.pieces is not None, source.text()
    kernel = attn.kernels.kernel
    assert ROWS_FORM in kernel.entry.files["block_map.py"].read_text()
    q, k, v = _bw_inputs(1, 4, 2, L_E2E, L_E2E, 32, torch.float32, device)
    got, ref, grads = _backward(attn, q, k, v)
    _assert_close(got, ref, grads, torch.float32)
    assert attn.kernels.block_maps.builds >= 1  # the map was built, by the device kernel
