"""The CUDA printer, proven on the CPU: every catalogue mask and score mod, traced user
functions and one expression per printer rule are printed as `__host__ __device__` functions,
compiled by nvcc into one host binary (and for sm_80: each case has a kernel calling them), and
evaluated on index grids against the IR's own evaluator (`attncc.ir.eval`): random grids drawn
by hypothesis and exhaustive small ones, with Lq != Lk (negative aligned differences), indices
past captured tensors' extents (reads give 0) and strided captures. Masks and kv ranges must be
equal; scores agree within atol = rtol = 2e-5 (fp32 math against the fp64 evaluator). A
deliberately broken rule (C's `%` or `/` for floor semantics) must fail the same check.

Cost: one nvcc run for the whole batch (~15-25 s on 2 cores, cached by source hash in the temp
dir), two small ones for the broken rules.
"""

from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.backends.cuda import printer as cuda_printer
from attncc.backends.cuda.printer import PRINTER_VERSION, CudaPrinter, render_functions
from attncc.ir.nodes import Capture, Mask, Normaliser, Param, ScoreMod
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import (H_IDX, KV_IDX, LK, LQ, Q_IDX, SCORE, Load, Sigmoid, buffer_symbol,
                               param_symbol)
from attncc.ir.tiles import TileClasses
from attncc.passes.pipeline import run_spec_passes
from tests.catalog_cases import masks, scores
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


CASES = catalogue_cases() + traced_cases() + rule_cases()


@pytest.fixture(scope="module")
def binary():
    return build(CASES)


def test_every_rule_is_exercised():
    """Each `_print_*` rule of the printer prints some node of some case: a rule no case reaches
    would go unchecked."""
    seen = set()
    for case in CASES:
        spec = case.plan.spec
        exprs = [n.expr for n in (spec.mask, spec.score) if n is not None]
        exprs += [e for p in case.plan.tiles.pieces for e in (p.some_lo, p.some_hi, p.all_lo,
                                                              p.all_hi, p.guard)]
        for e in exprs:
            seen |= {type(x).__name__ for x in sympy.preorder_traversal(e)}
    rules = {name.removeprefix("_print_") for name in dir(CudaPrinter)
             if name.startswith("_print_")}
    assert rules - seen == set()


def test_catalogue_is_complete():
    names = {c.name for c in CASES}
    assert set(masks(B, HQ, L, L)) <= names and set(scores(B, HQ, L, L)) <= names


@pytest.mark.parametrize("Lq, Lk, Hq", [(L, L, 2), (23, 37, HQ + 1), (37, 23, HQ), (1, 45, 2),
                                        (45, 1, 3)])
def test_exhaustive_small_grids(binary, Lq, Lk, Hq):
    """Every (b, h, q, kv) of a shape, b and h one past the captured tensors' extents."""
    check(binary, CASES, full_grid(Lq, Lk, Hq, 1, B + 1))


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(Lq=st.integers(1, 64), Lk=st.integers(1, 64), Hq=st.integers(1, HQ + 2),
       seed=st.integers(0, 2 ** 16))
def test_random_grids(binary, Lq, Lk, Hq, seed):
    check(binary, CASES, random_grid(Lq, Lk, Hq, 1, B + 1, n=256, seed=seed))


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
    assert (printed.has_mask, printed.has_score, printed.has_sink, printed.n_ranges) == (
        True, True, True, 1)
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


def test_broken_rules_are_caught(monkeypatch):
    """Each broken rule must fail the check on negative differences (the chunked mask's
    aligned q at Lq > Lk, a traced `(q - kv) % 4`, the rule case `floors`), where the true
    rules pass: the cases printed three ways, compiled in one small binary."""
    cases = [c for c in CASES if c.name in ("M7-chunked", "periodic", "floors")]
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
