"""The CUDA printer, proven on the CPU: every catalogue mask and score mod, hand-written and
random traced user functions, and one expression per printer rule are printed as
`__host__ __device__` functions, compiled by nvcc into one host binary (each case also has an
sm_80 kernel calling them, so the device side compiles too; -Werror=double-promotion keeps the
math fp32), and evaluated on index grids against the IR's own evaluator (`attncc.ir.eval`):
random grids drawn by hypothesis and exhaustive small ones, with Lq != Lk (negative aligned
differences), b and h past captured tensors' extents, indices outside them (reads give 0) and
strided captures. Masks, kv ranges and row intervals must be equal; scores agree within
atol = rtol = 2e-5 (fp32 math against the fp64 evaluator). Deliberately broken rules (C's `%`
or `/` where the IR means floor semantics, a double literal) must fail the same check.

Cost: one nvcc run for the 69 cases (about 3 s of CPU; cached by source hash in the temp dir),
one for the broken rules, one refused compile; the file takes about 20 s of CPU in all.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.backends.cuda import printer as cuda_printer
from attncc.backends.cuda.printer import PRINTER_VERSION, CudaPrinter, render_functions
from attncc.backends.triton.printer import TritonPrinter
from attncc.ir.nodes import Capture, Mask, Normaliser, Param, ScoreMod
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import (H_IDX, KV_IDX, LK, LQ, Q_IDX, SCORE, Load, Sigmoid, buffer_symbol,
                               param_symbol)
from attncc.ir.tiles import TileClasses
from attncc.passes.pipeline import run_spec_passes
from tests.catalog_cases import masks, scores
from tests.fuzz_support import Shape
from tests.fuzz_traced import _ftable, _table, mask_fn, score_fn
from tests.cuda_printer_harness import (NVCC, Case, build, check, differences, full_grid,
                                        random_grid)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA printer's host "
                                "check compiles the printed functions with nvcc")

B, HQ, L = 2, 4, 40  # the shape the catalogue's captured tensors are built for


def _case(name: str, spec: AttentionSpec) -> Case:
    plan = run_spec_passes(spec)
    return Case(name, plan, {c.name: c.tensor for c in plan.spec.captures})


def catalogue_cases() -> list[Case]:
    out = [_case(name, AttentionSpec(mask=m)) for name, m in masks(B, HQ, L, L).items()]
    out += [_case(name, AttentionSpec(score=s)) for name, s in scores(B, HQ, L, L).items()]
    sinks = torch.tensor([0.5, -1.0, 2.0, 8.0])
    out.append(_case("N2-sink-causal", attncc.Attention(mask=attncc.causal(),
                                                        normaliser=attncc.sink(sinks))))
    return out


def traced_cases() -> list[Case]:
    """FlexAttention-style mask_mod / score_mod functions, traced by attncc."""
    g = torch.Generator().manual_seed(3)
    doc = torch.sort(torch.randint(0, 3, (L - 7,), generator=g))[0]  # shorter than L: reads 0
    tab = torch.randint(0, 5, (L,), generator=g, dtype=torch.int32)
    rel = torch.randn(HQ, 9, generator=g)
    half_bias = torch.randn(L, generator=g).half()
    bf_bias = torch.randn(HQ, L, generator=g).bfloat16()

    def periodic(b, h, q_idx, kv_idx):  # negative differences through // and %
        return ((q_idx - kv_idx) % 4 <= 1) & ((q_idx - kv_idx) // 4 >= -2)

    def same_doc(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    def table_where(b, h, q_idx, kv_idx):
        return torch.where(q_idx > kv_idx, tab[kv_idx], tab[q_idx] + h) >= 2

    def relative(score, b, h, q_idx, kv_idx):  # q - kv + 4 leaves [0, 9): reads 0
        return score * 0.5 + torch.tanh(score) - torch.abs(q_idx - kv_idx) * 0.1 \
            + rel[h, q_idx - kv_idx + 4]

    def smooth(score, b, h, q_idx, kv_idx):
        return torch.sigmoid(score) * torch.sqrt(torch.abs(score) + 1) \
            + torch.log(torch.abs(score) + 1) + torch.clamp(score, -2.0, 2.0)

    def low_precision(score, b, h, q_idx, kv_idx):
        return score + half_bias[kv_idx] * bf_bias[h, q_idx]

    def causal_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    out = [_case(f.__name__, attncc.Attention(mask=f))
           for f in (periodic, same_doc, table_where)]
    out += [_case(f.__name__, attncc.Attention(score=f))
            for f in (relative, smooth, low_precision, causal_score)]
    return out


def _int_tree(rng: random.Random, depth: int):
    """A random int tree of tests/fuzz_traced.py's grammar (seeded: one compile per source)."""
    if depth == 0 or rng.random() < 0.3:
        return rng.choice([("b",), ("h",), ("q",), ("kv",), ("c", rng.randint(-6, 9)),
                           (rng.choice(["tq", "tkv"]), rng.randint(0, 3))])
    sub = functools.partial(_int_tree, rng, depth - 1)
    kind = rng.randrange(6)
    if kind == 0:
        return (rng.choice(["+", "-", "*", "min", "max"]), sub(), sub())
    if kind in (1, 2):  # floor division and modulo of differences: the rules most at risk
        return (rng.choice(["//", "%"]), ("-", sub(), sub()), rng.randint(1, 7))
    if kind == 3:
        return ("abs", sub())
    if kind == 4:
        return ("clamp", sub(), rng.randint(-5, 5), rng.randint(5, 30))
    return ("where", _bool_tree(rng, depth - 1), sub(), sub())


def _bool_tree(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.4:
        return (rng.choice(["<", "<=", "==", "!=", ">", ">="]), _int_tree(rng, depth),
                _int_tree(rng, depth))
    if rng.random() < 0.8:
        return (rng.choice(["&", "|"]), _bool_tree(rng, depth - 1), _bool_tree(rng, depth - 1))
    return ("~", _bool_tree(rng, depth - 1))


def _float_tree(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.25:
        return rng.choice([("s",), ("*i", _int_tree(rng, 1), rng.choice([0.05, -0.1, 0.25])),
                           (rng.choice(["fq", "fkv", "f0"]), rng.randint(0, 3))])
    sub = functools.partial(_float_tree, rng, depth - 1)
    kind = rng.randrange(6)
    if kind == 0:
        return (rng.choice(["+f", "-f"]), sub(), sub())
    if kind == 1:
        return ("*c", sub(), rng.choice([0.5, -1.0, 2.0, 0.3]))
    if kind == 2:
        return (rng.choice(["tanh", "sigmoid", "absf", "sqrt1", "log1", "exp"]), sub())
    if kind == 3:
        return ("wheref", _bool_tree(rng, 1), sub(), sub())
    if kind == 4:
        return ("clampf", sub(), rng.choice([-2.0, -0.5]), rng.choice([0.5, 3.0]))
    return ("+f", ("s",), sub())


def random_traced_cases(n_masks: int = 12, n_scores: int = 8) -> list[Case]:
    """Random FlexAttention-style functions (the fuzz tests' trees, tests/fuzz_traced.py),
    traced by attncc; a tree that attncc refuses or that folds to a constant is drawn again."""
    rng, shape = random.Random(17), Shape(B, HQ, HQ, L, L, 16, 16, "float32", "bhsd", "contig",
                                          None)
    for seed in range(4):  # the trees' captured tables, drawn outside the traced functions
        _table(seed, L), _ftable(seed, L, False), _ftable(seed, L, True)
    out: list[Case] = []
    for kind, count in (("mask", n_masks), ("score", n_scores)):
        made = 0
        while made < count:
            if kind == "mask":
                tree = _bool_tree(rng, 3)
                try:
                    spec = attncc.Attention(mask=mask_fn(tree, shape))
                except (ValueError, TypeError):
                    continue
            else:
                tree = _float_tree(rng, 3)
                try:
                    spec = attncc.Attention(score=score_fn(tree, shape))
                except (ValueError, TypeError):
                    continue
            node = spec.mask if kind == "mask" else spec.score
            if node is None or len(node.expr.free_symbols - {SCORE}) == 0:
                continue  # folded to a constant (or to `score`): nothing to print
            out.append(_case(f"random-{kind}-{made} {tree}", spec))
            made += 1
    return out


def rule_cases() -> list[Case]:
    """One expression per printer rule the catalogue and tracing may not reach, as IR nodes."""
    q, kv, s = Q_IDX, KV_IDX, SCORE
    k = param_symbol("k", "int")
    c = param_symbol("c", "float", positive=True)
    params = (Param("k", "int", -3), Param("c", "float", 1.75, positive=True))
    cube = torch.randn(HQ - 1, L, L + 3, generator=torch.Generator().manual_seed(5)).double()
    scalar = torch.tensor(0.625)
    flags = torch.rand(L - 5, generator=torch.Generator().manual_seed(6)) < 0.5
    captures = (Capture.of("cube", cube), Capture.of("scalar", scalar),
                Capture.of("flags", flags))
    cube_at = Load(buffer_symbol("cube"), H_IDX, q - 3, kv + k)
    d = q - kv
    score_exprs = {
        "signs": s + sympy.sign(d) * sympy.sign(s) + sympy.Abs(d) * sympy.Abs(s) / 8,
        "heaviside": sympy.Heaviside(s - 1) + sympy.Heaviside(d, sympy.Rational(1, 4)),
        "trig": sympy.sinh(s / 4) + sympy.cosh(s / 8) + sympy.tan(s / 16) + sympy.erf(s)
        + sympy.sin(q) + sympy.cos(kv),
        "exp-log": sympy.exp(s / 4) + sympy.log(1 + s ** 2) + Sigmoid(s) * sympy.tanh(s / c),
        "powers": s ** 3 / 64 + 1 / (s ** 2 + 1) + sympy.sqrt(sympy.Abs(s) + 1)
        + 1 / sympy.sqrt(q + 1) + (sympy.Abs(s) + 1) ** sympy.Rational(1, 3) + 2 ** (s / 4)
        + 1 / (q + 1) + (kv + 2) ** -3,
        "floors": sympy.ceiling(d / 3) + sympy.floor(d / 4) + sympy.floor(s / 2)
        + sympy.ceiling(s) + sympy.Mod(d, 5) + sympy.floor((d + k) / 7),
        "min-max": sympy.Min(q, kv, 7) * s + sympy.Max(s, d, k) + sympy.Min(s, c),
        "piecewise": sympy.Piecewise((s * sympy.pi, d > 3), (sympy.nan, sympy.Eq(d, -5)),
                                     (-sympy.oo, d < -9), (s + sympy.Rational(1, 3), True)),
        "loads": s + cube_at * Load(buffer_symbol("scalar"))
        + Load(buffer_symbol("flags"), kv - 2) * 3,
    }
    masks_exprs = {
        "logic": sympy.Or(sympy.Xor(q > kv, sympy.Eq(sympy.Mod(kv, 2), 0)),
                          sympy.And(sympy.Equivalent(q < 5, kv < 5), sympy.Not(sympy.And(
                              sympy.Eq(sympy.Mod(H_IDX + kv, 3), 0), q > 2)))),
        "ite": sympy.ITE(q > kv, kv < 3, sympy.Ge(H_IDX, 1)) & sympy.Le(kv, q + 30),
        "wide-ints": sympy.Gt(q + 2 ** 40, 2 ** 40 + 5) | sympy.Lt(d + LK - LQ, k),
        "bool-load": sympy.Or(sympy.Ne(Load(buffer_symbol("flags"), q - kv), 0), sympy.Eq(q, kv)),
    }
    out = []
    for name, e in score_exprs.items():
        node = ScoreMod(e, params, captures, "rule")
        out.append(_plain(name, AttentionSpec(score=node)))
    for name, e in masks_exprs.items():
        out.append(_plain(name, AttentionSpec(mask=Mask(e, params, captures, "rule"))))
    return out


def _plain(name: str, spec: AttentionSpec) -> Case:
    """A case from raw IR, past no pass (rules the passes would rewrite stay as written)."""
    return Case(name, KernelPlan(spec=spec, tiles=TileClasses(())),
                {c.name: c.tensor for c in spec.captures})


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    """Built when a test of this file runs, not at collection (69 specs through the passes)."""
    return catalogue_cases() + traced_cases() + random_traced_cases() + rule_cases()


@pytest.fixture(scope="module")
def binary(cases):
    return build(cases)


def test_every_rule_is_exercised(cases):
    """Each `_print_*` rule of the printer prints some node of some case: a rule no case reaches
    would go unchecked."""
    seen = set()
    for case in cases:
        spec = case.plan.spec
        exprs = [n.expr for n in (spec.mask, spec.score) if n is not None]
        exprs += [e for p in case.plan.tiles.pieces for e in (p.some_lo, p.some_hi, p.all_lo,
                                                              p.all_hi, p.guard)]
        exprs += [e for r in case.rows for e in (r.lo, r.hi, r.cond)]
        for e in exprs:
            seen |= {type(x).__name__ for x in sympy.preorder_traversal(e)}
    assert CudaPrinter.rules() - seen == set()


def test_every_triton_rule_has_a_cuda_rule():
    """The two printers print the same IR: a rule added to one belongs in the other."""
    assert TritonPrinter.rules() == CudaPrinter.rules()


def test_catalogue_is_complete(cases):
    names = {c.name for c in cases}
    assert set(masks(B, HQ, L, L)) <= names and set(scores(B, HQ, L, L)) <= names


@pytest.mark.parametrize("Lq, Lk, Hq", [(L, L, 2), (23, 37, HQ + 1), (37, 23, HQ), (1, 45, 2),
                                        (45, 1, 3)])
def test_exhaustive_small_grids(cases, binary, Lq, Lk, Hq):
    """Every (b, h, q, kv) of a shape, b and h one past the captured tensors' extents."""
    check(binary, cases, full_grid(Lq, Lk, Hq, 1, B + 1))


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(Lq=st.integers(1, 64), Lk=st.integers(1, 64), Hq=st.integers(1, HQ + 2),
       seed=st.integers(0, 2 ** 16))
def test_random_grids(cases, binary, Lq, Lk, Hq, seed):
    check(binary, cases, random_grid(Lq, Lk, Hq, 1, B + 1, n=256, seed=seed))


def test_printed_interface():
    """The signatures the kernel templates call, and the text of a few rules."""
    spec = AttentionSpec(mask=attncc.sliding_window(8), score=attncc.softcap(2.0),
                         normaliser=Normaliser("softmax_sink", Capture.of("sinks",
                                                                          torch.zeros(4))))
    printed = render_functions(run_spec_passes(spec))
    assert printed.extra_params == (", int p_window, float p_softcap, const float* cap_sinks_ptr, "
                                    "int cap_sinks_stride0, int cap_sinks_size0")
    src = printed.source
    assert ("__host__ __device__ __forceinline__ bool attncc_mask(int b, int h, int q_idx, "
            "int kv_idx, int Lq, int Lk, int Hq, int Hkv, int p_window") in src
    assert "float attncc_score(float score, int b, int h, int q_idx, int kv_idx, int Lq" in src
    assert "float attncc_sink(int h, int p_window" in src
    assert "attncc_kv_range attncc_kv_range0(int b, int h, int q_first, int q_last," in src
    assert "attncc_row_interval attncc_row0(int b, int h, int q_idx, int Lq, int Lk," in src
    assert (printed.has_mask, printed.has_score, printed.has_sink, printed.n_ranges,
            printed.n_rows) == (True, True, True, 1, 1)
    p = CudaPrinter({"q_idx": "q", "kv_idx": "kv", "score": "s"})
    assert p.doprint(sympy.Mod(Q_IDX - KV_IDX, 3)) == "attncc_mod((q + (-kv)), 3)"
    assert p.doprint(sympy.Piecewise((SCORE, KV_IDX <= Q_IDX), (-sympy.oo, True))) == \
        "((kv <= q) ? s : (-INFINITY))"
    assert p.doprint(SCORE * sympy.Rational(1, 4)) == "(0.25f * s)"
    assert isinstance(PRINTER_VERSION, int)


def _c_remainder(self, e):
    return f"({self._p(e.args[0])} % {self._p(e.args[1])})"


def _c_division(self, e):
    nd = self._int_division(e)
    return f"({self._p(nd[0])} / {self._p(nd[1])})" if nd else f"floorf({self._p(e.args[0])})"


BROKEN = {"C %": ("_print_Mod", _c_remainder),  # C's truncating operators where the IR means
          "C /": ("_print_floor", _c_division)}  # floor semantics


def test_broken_rules_are_caught(cases, monkeypatch):
    """Each broken rule must fail the check on negative differences (the chunked mask's
    aligned q at Lq > Lk, a traced `(q - kv) % 4`, the rule case `floors`), where the true
    rules pass: the cases printed three ways, compiled in one small binary."""
    cases = [c for c in cases if c.name in ("M7-chunked", "periodic", "floors")]
    printed, groups = [render_functions(c.plan) for c in cases], {"true": cases}
    for rule, (method, fn) in BROKEN.items():
        with monkeypatch.context() as patch:
            patch.setattr(cuda_printer.CudaPrinter, method, fn)
            printed += [render_functions(c.plan) for c in cases]
        groups[rule] = [dataclasses.replace(c, name=f"{c.name} [{rule}]") for c in cases]
    every = [c for group in groups.values() for c in group]
    failures = differences(build(every, printed), every, full_grid(37, 23, 1, 1, 1))
    for rule, group in groups.items():
        caught = [text for name, text in failures if name in {c.name for c in group}]
        assert bool(caught) == (rule != "true"), (rule, caught)


def test_double_math_is_refused(cases, monkeypatch):
    """fp32 score math: a literal printed without `f` (a double) promotes the score to double,
    and the check's compile refuses it (-Werror=double-promotion)."""
    monkeypatch.setattr(CudaPrinter, "_finite", lambda self, value: repr(value))
    cases = [c for c in cases if c.name == "trig"]
    with pytest.raises(AssertionError, match="double-promotion"):
        build(cases)
