"""Property: for random masks and score mods (catalogue atoms combined with `&`, `|`, `~`,
`.then()`, and random traced FlexAttention-style functions), random shapes, dtypes and layouts,
the Triton kernel (the interpreter on CPU) matches the fp64 reference AND an independent
brute-force dense computation written from the CATALOG formulas (`tests/fuzz_exprs.py`), so a
bug shared by the reference and the kernel (a wrong named-mask formula) is caught too.

Tolerances: `tests/fuzz_support.TOL` (max abs/rel error against fp64 on inputs rounded to the
tested dtype); the reference and the brute force agree to 1e-6 (both fp64).
Profiles and switching on known-defect classes: `tests/fuzz_support.py`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import attncc
from attncc.backends.reference import attention_reference
from tests.fuzz_exprs import (build_mask, build_score, dense_mask, dense_score, identity_score,
                              mask_trees, score_trees, sink_logits)
from tests.fuzz_support import TOL, Shape, assert_close, fuzz_settings, make_qkv

# both fp64; the reference evaluates functions of fp32 captured tensors (log of calibration
# weights) in their dtype, so they agree to ~1e-8, not to rounding
REF_TOL = 1e-6

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero"),
              pytest.mark.filterwarnings("ignore:Generating overly large repr")]


@st.composite
def shapes(draw, max_len: int = 40) -> Shape:
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    Lq = draw(st.one_of(st.just(1), st.integers(1, max_len)))
    Lk = draw(st.one_of(st.just(Lq), st.integers(1, max_len)))
    D = draw(st.sampled_from([16, 32]))
    return Shape(B=draw(st.integers(1, 2)), Hq=Hkv * group, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D,
                 Dv=draw(st.sampled_from([D, D, 16, 32])),
                 dtype=draw(st.sampled_from(["float32", "float16"])),
                 layout=draw(st.sampled_from(["bhsd", "bshd"])),
                 strides=draw(st.sampled_from(["contig", "contig", "dstride2", "padded"])),
                 scale=draw(st.one_of(st.none(), st.sampled_from([0.05, 0.3, 1.0]))),
                 tiles=draw(st.sampled_from([None, (16, 16), (16, 16), (16, 32), (32, 16)])))


@st.composite
def cases(draw):
    shape = draw(shapes())
    mask = draw(st.one_of(st.none(), mask_trees(shape)))
    score = draw(st.one_of(st.none(), score_trees(shape)))
    sink = draw(st.one_of(st.none(), st.none(), st.integers(0, 99)))
    return shape, mask, score, sink, draw(st.integers(0, 2 ** 16))


def run_case(shape: Shape, mask, score, sink, seed: int) -> None:
    assume(not identity_score(score))
    spec = attncc.Attention(mask=None if mask is None else build_mask(mask, shape),
                            score=None if score is None else build_score(score, shape),
                            normaliser=None if sink is None else attncc.sink(
                                sink_logits(sink, shape.Hq)),
                            scale=shape.scale,
                            schedule=None if shape.tiles is None else attncc.Schedule(
                                block_m=shape.tiles[0], block_n=shape.tiles[1]))
    q, k, v, q64, k64, v64 = make_qkv(shape, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = attncc.compile(spec)
        o, lse = attn(q, k, v, return_lse=True, layout=shape.layout, backend="triton")
        ro, rl = attention_reference(spec, q64, k64, v64, q_chunk=16, kv_chunk=16)
    allowed = (torch.ones(shape.B, shape.Hq, shape.Lq, shape.Lk, dtype=torch.bool)
               if mask is None else dense_mask(mask, shape))
    s_mod = None if score is None else dense_score(score, shape)
    do, dl = _dense(q64, k64, v64, allowed, s_mod, shape, sink)
    # the reference against the brute force first: a disagreement here is a formula bug
    assert_close("reference o vs brute force", ro, do, REF_TOL)
    assert_close("reference lse vs brute force", rl, dl, REF_TOL)
    o_tol, lse_tol = TOL[shape.dtype]
    o = o.transpose(1, 2) if shape.layout == "bshd" else o
    assert o.shape == (shape.B, shape.Hq, shape.Lq, shape.Dv) and o.dtype == q.dtype
    assert_close("kernel o vs fp64", o, do, o_tol)
    assert_close("kernel lse vs fp64", lse, dl, lse_tol)


def _dense(q64, k64, v64, allowed, s_mod, shape, sink):
    from tests.fuzz_support import dense_softmax
    return dense_softmax(q64, k64, v64, allowed, s_mod, shape.scale,
                         None if sink is None else sink_logits(sink, shape.Hq))


@fuzz_settings(25)
@given(cases())
def test_fuzz_masks_and_scores(case):
    run_case(*case)


@st.composite
def traced_cases(draw):
    """Only traced functions (raw indices), where the printers and tile classifiers meet
    arbitrary index arithmetic."""
    from tests.fuzz_exprs import bool_exprs, traced_scores
    shape = draw(shapes())
    mask = ("fn", draw(bool_exprs(2)))
    score = draw(st.one_of(st.none(), traced_scores()))
    return shape, mask, score, None, draw(st.integers(0, 2 ** 16))


@fuzz_settings(20)
@given(traced_cases())
def test_fuzz_traced_functions(case):
    run_case(*case)
