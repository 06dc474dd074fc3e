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

import re
import warnings

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import attncc
from attncc.backends.reference.forward import attention_reference
from tests.fuzz_exprs import (bool_exprs, build_mask, build_score, dense_mask, dense_score,
                              mask_trees, score_trees, sink_logits,
                              traced_scores)
from tests.fuzz_support import (TOL, Shape, assert_close, dense_softmax, fuzz_settings,
                                log_example, make_qkv, regressions)

# both fp64; the reference evaluates functions of fp32 captured tensors (log of calibration
# weights) in their dtype, so they agree to ~1e-8, not to rounding
REF_TOL = 1e-6

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero"),
              pytest.mark.filterwarnings("ignore:Generating overly large repr"),
              # the traced functions draw their captured tables at trace time from freshly
              # seeded generators (deterministic), which the tracer's warning cannot tell apart
              pytest.mark.filterwarnings("ignore:.*calls torch.rand:UserWarning")]


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
    return shape, mask, score, sink, draw(st.integers(0, 2 ** 16)), draw(recalls(shape))


def recalls(shape: Shape):
    """A second call of the same compiled kernel: (dL, shift) = both lengths + dL, every
    parameter value and captured tensor of the named atoms shifted by `shift` (passed as
    runtime keywords: a new value must never reuse a stale block map or tile list); None: no
    second call."""
    return st.one_of(st.none(), st.tuples(st.integers(1 - min(shape.Lq, shape.Lk), 6),
                                          st.integers(0, 3)))


def make_spec(shape: Shape, mask, score, sink) -> attncc.AttentionSpec:
    return attncc.Attention(mask=None if mask is None else build_mask(mask, shape),
                            score=None if score is None else build_score(score, shape),
                            normaliser=None if sink is None else attncc.sink(
                                sink_logits(sink, shape.Hq)),
                            scale=shape.scale,
                            schedule=None if shape.tiles is None else attncc.Schedule(
                                block_m=shape.tiles[0], block_n=shape.tiles[1]))


def run_case(shape: Shape, mask, score, sink, seed: int, recall=None) -> None:
    spec = make_spec(shape, mask, score, sink)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = attncc.compile(spec)
    check_call(attn, spec, shape, mask, score, sink, seed, {})
    if recall is None:
        return
    dL, shift = recall
    shape2 = shape._replace(Lq=shape.Lq + dL, Lk=shape.Lk + dL)
    mask2, score2 = shifted(mask, shift), shifted(score, shift)
    sink2 = None if sink is None else sink + shift
    spec2 = make_spec(shape2, mask2, score2, sink2)
    names = [(p.name, p.kind) for p in spec.params], [c.text() for c in spec.captures]
    if names != ([(p.name, p.kind) for p in spec2.params], [c.text() for c in spec2.captures]):
        return  # shifted values merged or split parameters: not the same kernel's arguments
    runtime = {p.name: p.value for p in spec2.params}
    runtime.update({c.name: c.tensor for c in spec2.captures})
    try:
        check_call(attn, spec2, shape2, mask2, score2, sink2, seed + 1, runtime)
    except ValueError as e:
        # a bias compiled with a size-1 (broadcast) dim and then given a full one: the one
        # acceptable outcome other than the right answer is this clear error (see below)
        if not re.match(r"bias: dimension \d had size 1 when the spec was built", str(e)):
            raise


def shifted(tree, shift: int):
    """The same structure with every int argument of a named atom + shift and every float
    argument * (1 + shift / 2) (traced functions unchanged: their constants are compiled in)."""
    if tree is None or shift == 0 or tree[0] == "fn":
        return tree
    if tree[0] in ("and", "or", "not", "then"):
        return (tree[0], *(shifted(t, shift) for t in tree[1:]))
    return (tree[0], *(a + shift if type(a) is int else a * (1 + shift / 2)
                       if type(a) is float else a for a in tree[1:]))


def check_call(attn, spec, shape: Shape, mask, score, sink, seed: int, runtime: dict) -> None:
    """Run `attn` (compiled for `spec`'s structure) with `runtime` keywords; check it against
    the fp64 reference of `spec` and the brute force of the trees."""
    q, k, v, q64, k64, v64 = make_qkv(shape, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o, lse = attn(q, k, v, return_lse=True, layout=shape.layout, backend="triton",
                      **runtime)
        ro, rl = attention_reference(spec, q64, k64, v64, q_chunk=16, kv_chunk=16)
    allowed = (torch.ones(shape.B, shape.Hq, shape.Lq, shape.Lk, dtype=torch.bool)
               if mask is None else dense_mask(mask, shape))
    s_mod = None if score is None else dense_score(score, shape)
    do, dl = dense_softmax(q64, k64, v64, allowed, s_mod, shape.scale,
                           None if sink is None else sink_logits(sink, shape.Hq))
    # the reference against the brute force first: a disagreement here is a formula bug
    assert_close("reference o vs brute force", ro, do, REF_TOL)
    assert_close("reference lse vs brute force", rl, dl, REF_TOL)
    o_tol, lse_tol = TOL[shape.dtype]
    o = o.transpose(1, 2) if shape.layout == "bshd" else o
    assert o.shape == (shape.B, shape.Hq, shape.Lq, shape.Dv) and o.dtype == q.dtype
    assert_close("kernel o vs fp64", o, do, o_tol)
    assert_close("kernel lse vs fp64", lse, dl, lse_tol)


def _qp_case(mask, score=None):
    """Decode-like Lq < Lk and Lq > Lk, where q and qp differ."""
    return (Shape(1, 2, 1, 5, 35, 16, 16, "float32", "bhsd", "contig", None, (16, 16)),
            mask, score, None, 1, None)


# Shrunk failures of known defects (named atoms reading q instead of qp; tracer), on once the
# class is switched on (tests/fuzz_support.py). S4 (relative_bias) was found by this test.
@regressions(*(_qp_case(m) for m in [
    ("biwin", 3), ("dilated", 6, 2, False), ("chunked", 4), ("s2", 2, 1, 3, 1)]),
    _qp_case(None, ("alibi", None)), _qp_case(None, ("relbias", 0, 1)),
    (Shape(1, 2, 1, 5, 35, 32, 32, "float16", "bhsd", "contig", 1.0),
     ("fn", ("!=", ("c", -2), ("c", 0))), ("relbias", 0, 1), None, 1, None))
# Found by this test, fixed (attncc/ops/softmax/binding.py `broadcast_checks`): `attncc.bias(t)` turns every
# size-1 dim of `t` into index 0 in the compiled expression, and a replacement `bias=` of another
# size on that dim was accepted, so a kernel compiled with a decode-shaped bias [B, H, 1, Lk]
# read row 0 for every query of a later [B, H, Lq, Lk] bias; now that call is a clear error.
@regressions((
    Shape(1, 2, 2, 1, 1, 16, 32, "float32", "bhsd", "padded", None, (16, 32)),
    ("dilated", 2, 3, True), ("bias", 65536, (False, True, False, False)), 14, 3210, (4, 0)),
    (Shape(1, 1, 1, 1, 1, 16, 16, "float32", "bhsd", "contig", None), None,
     ("bias", 0, (False, False, False, False)), None, 0, (4, 0)))
@regressions((Shape(1, 1, 1, 1, 1, 16, 16, "float32", "bhsd", "contig", None),
                          None, ("fn", ("s",)), None, 26196, None))
@fuzz_settings(25)
@given(cases())
def test_fuzz_masks_and_scores(case):
    log_example("masks_and_scores", case)
    run_case(*case)


@st.composite
def traced_cases(draw):
    """Only traced functions (raw indices), where the printers and tile classifiers meet
    arbitrary index arithmetic."""
    shape = draw(shapes())
    mask = ("fn", draw(bool_exprs(2)))
    score = draw(st.one_of(st.none(), traced_scores()))
    return shape, mask, score, None, draw(st.integers(0, 2 ** 16)), draw(recalls(shape))


# Found by this test, fixed (attncc/backends/triton/render.py `score_source`): a score mod
# that does not read `score` (here tanh(-0.1 q_idx)) printed a [BLOCK_M, 1] value, and on a
# full tile (no mask to broadcast it) tl.dot got a [BLOCK_M, 1] p: a crash inside the kernel.
@example((Shape(1, 1, 1, 16, 16, 16, 16, "float32", "bhsd", "contig", None, (16, 16)),
          ("fn", ("!=", ("c", 0), ("c", 1))), ("fn", ("tanh", ("*i", ("q",), -0.1))), None, 5393,
          None))
@example((Shape(2, 2, 2, 36, 36, 16, 16, "float16", "bhsd", "dstride2", None, (16, 16)),
          ("fn", ("<=", ("kv",), ("+", ("q",), ("c", 40)))),
          ("fn", ("sigmoid", ("*c", ("*i", ("//", ("q",), 7), -0.1), 0.5))), None, 5393, (3, 1)))
# Found by this test, fixed (ITE and Equivalent in attncc/ir/eval.py,
# triton_printer.py and ir/intervals.py): an int torch.where compared inside another condition
# becomes sympy's ITE, which the evaluators rejected.
@regressions((
    Shape(1, 1, 1, 1, 1, 16, 16, "float32", "bhsd", "contig", None),
    ("fn", ("<", ("b",), ("where", ("<", ("b",), ("where", ("<", ("b",), ("h",)), ("b",),
                                                   ("h",))), ("b",), ("h",)))),
    None, None, 0, None), (
    Shape(2, 2, 2, 1, 1, 16, 16, "float32", "bhsd", "contig", None), None,
    ("fn", ("*c", ("wheref", ("!=", ("where", ("!=", ("tq", 1), ("kv",)), ("c", 0), ("c", 8)),
                              ("tq", 3)), ("fq", 1), ("*i", ("h",), -0.1)), 2.0)),
    None, 2, None))
# Found by this test, fixed (attncc/ir/traced.py: `int // 1` and rounding an int are the
# identity): `tab[q_idx] // 1` traced to floor(Load(tab, q_idx)) and the printer emitted
# tl.floor of the int64 load: InterpreterError in the kernel.
@regressions((
    Shape(1, 6, 2, 1, 1, 16, 16, "float16", "bhsd", "dstride2", 0.3, (32, 16)),
    ("fn", (">=", ("abs", ("//", ("tq", 0), 1)), ("c", 3))), None, None, 3, None))
# Found by the long profile, fixed (attncc/ir/symbols.py: a Load is real): abs(exp(t[q_idx]))
# simplified to exp(re(t[q_idx])), and no printer has a rule for `re`.
@regressions((Shape(1, 1, 1, 1, 1, 16, 16, "float32", "bhsd", "contig", None),
              ("fn", ("<", ("b",), ("b",))), ("fn", ("absf", ("exp", ("fq", 0)))), None, 0, None))
@fuzz_settings(20)
@given(traced_cases())
def test_fuzz_traced_functions(case):
    log_example("traced_functions", case)
    run_case(*case)
