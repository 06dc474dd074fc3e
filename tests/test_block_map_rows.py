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
from attncc.backends.reference.forward import attention_reference
from attncc.backends.triton.block_maps import block_map_values, group_sizes
from attncc.backends.triton.render import block_map_kernel_name, render_block_map
from attncc.backends.triton.source import load_module
from attncc.ir.nodes import Capture, Mask
from attncc.ir.symbols import H_IDX, KV_IDX, Q_IDX, QP, Load, buffer_symbol
from attncc.passes.pipeline import run_spec_passes
from attncc.passes.row_intervals import row_intervals
from tests.catalog_cases import masks as catalogue
from tests.test_classify_blocks import HQ, brute_force, dense

B = 2


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


def kernel(plan, pairs: bool):
    """The block-map kernel of `plan` in the pair or the row-interval form, rendered into a
    file of its own and loaded once per source."""
    source = render_block_map(plan, pairs=pairs)
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
    plan = run_spec_passes(attncc.Attention(mask=mask))
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
    check(name, 77, 131, 32, 16, 0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), Lq=st.integers(1, 150), Lk=st.integers(1, 150),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32]), seed=st.integers(0, 99),
       value=st.integers(1, 70))
def test_rows_equal_pairs_and_dense_on_random_shapes(name, Lq, Lk, bm, bn, seed, value):
    """Random odd shapes, tiles, tables and run-time parameter values (every size parameter
    of the mask set to `value`)."""
    check(name, Lq, Lk, bm, bn, seed, params=dict.fromkeys(PARAMS, value))


PARAMS = ("window", "prefix", "sinks", "chunk", "block")


EDGE_VALUES = {"M2-sliding-window": [*range(1, 19), *range(30, 37)],
               "M6-sinks-window": list(range(1, 19)), "M7-chunked": list(range(1, 19))}


@pytest.mark.parametrize("name", list(EDGE_VALUES))
def test_tile_edges_on_every_offset(name):
    """Window and chunk sizes 1..BLOCK_N + 2 put a row's first or last key on every column of
    a tile, first and last included, and windows near BLOCK_M + BLOCK_N make the first full
    tiles: where the O(1) min / max tests decide a tile alone, an off-by-one there shows."""
    for value in EDGE_VALUES[name]:
        check(name, 53, 70, 16, 16, 0, params=dict.fromkeys(PARAMS, value), pairs=False)
