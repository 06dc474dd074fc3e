"""Render the backward kernels of a KernelPlan with `attncc/backends/triton/templates/attn_bwd.py.j2`.

The backward reads the same IR as the forward: the mask and tile pieces print exactly as the
forward prints them (`triton_render.piece_loops`), so both directions classify tiles (partial /
full) by the same arithmetic, each kernel at its own tile sizes (dk/dv inverts it per kv tile,
`_dkdv_piece`; it may also visit as partial a tile with no allowed pair, which adds nothing).
Score mods enter through the chain rule: `d score_expr / d score` and, for every load of a
captured tensor that requires grad, `d score_expr / d load`, both differentiated by sympy and
printed by the same TritonPrinter.

`GradLoad.kind` says how a load's gradient is collected (see `attncc.backends.
triton_backward_grads`): "reduced" (index free of `q_idx`/`kv_idx`: ALiBi slope[h], head
bias[h], a 0-d scalar) is summed inside each dq program into one fp32 slot per program; "kv"
(index involves `kv_idx` only: S7/S8, a key-padding bias[b, 0, 0, kv]) is summed over the query
rows inside each dk/dv program into [B, Hq, Lk]; "tile" (anything else) writes its per-element
contribution into a [B, Hq, Lq, Lk] fp32 scratch tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sympy

from attncc.backends import keys
from attncc.backends.triton.printer import TritonPrinter
from attncc.backends.triton.render import (
    printer_names,
    piece_loops,
    score_source,
    unspecialised_scalars,
    kernel_arguments,
)
from attncc.backends.triton.templating import environment
from attncc.ir.plan import KernelPlan
from attncc.ir.symbols import KV_IDX, Q_IDX, SCORE, Load

TEMPLATE = "attn_bwd.py.j2"
TEMPLATES = (TEMPLATE, "helpers.py.j2")
Q_TILE_ARGS = [("Q_TILES", "*i32"), ("qt_stride_b", "i32"), ("qt_stride_h", "i32"),
               ("qt_stride_n", "i32"), ("qt_stride_c", "i32")]
CONSTEXPRS = ("D_QK", "D_V", "D_QK_PAD", "D_V_PAD", "BLOCK_M", "BLOCK_N", "DOT_PRECISION",
              "UPCAST_DOT", "GATHER_ROWS")


@dataclass(frozen=True)
class GradLoad:
    """One read `Load(capture, *index)` of a grad-requiring capture inside the score mod.

    derivative: d score_expr / d load (sympy, in the IR's symbols).
    kind: "reduced" (one number per (b, h) suffices), "kv" or "tile" (module docstring)."""

    capture: str
    load: sympy.Basic
    derivative: sympy.Basic
    kind: str

    @property
    def reduced(self) -> bool:
        return self.kind == "reduced"

    @property
    def index(self) -> tuple[sympy.Basic, ...]:
        return tuple(self.load.args[1:])


def grad_loads(plan: KernelPlan, grad_captures: Sequence[str]) -> tuple[tuple[GradLoad, ...],
                                                                          sympy.Basic | None]:
    """(the loads of `grad_captures` in the score mod, d score_expr / d score).

    Loads are differentiated as independent variables: a tensor read twice at the same index is
    one sympy node (its derivative counts both reads); reads at different indices are separate
    loads whose gradients are summed into the same tensor."""
    score = plan.spec.score
    if score is None:
        return (), None
    wanted = set(grad_captures)
    loads = sorted((e for e in score.expr.atoms(Load) if e.args[0].name in wanted), key=str)
    dummies = {load: sympy.Dummy(f"load{i}", real=True) for i, load in enumerate(loads)}
    back = {d: load for load, d in dummies.items()}
    expr = score.expr.xreplace(dummies)
    out = []
    for load in loads:
        index_symbols = set().union(*(a.free_symbols for a in load.args[1:])) if load.args[1:] \
            else set()
        out.append(GradLoad(load.args[0].name, load,
                            _derivative(expr, dummies[load]).xreplace(back),
                            _kind(index_symbols & {Q_IDX, KV_IDX})))
    # kernel arguments GA0.., GK0.., GB0.. follow this order, and so do the launcher's buffers
    out.sort(key=lambda g: KINDS.index(g.kind))
    return tuple(out), _derivative(expr, SCORE).xreplace(back)


def _derivative(expr: sympy.Basic, wrt: sympy.Symbol) -> sympy.Basic:
    """d expr / d wrt as autograd computes it: the step functions (floor, ceil, sign, the
    comparisons inside Piecewise) are flat almost everywhere, so their derivative is 0, where
    sympy leaves an unevaluated `Derivative(floor(x), x)` or a `DiracDelta`."""
    d = sympy.diff(expr, wrt)
    d = d.replace(lambda e: isinstance(e, sympy.Derivative) and isinstance(
        e.expr, (sympy.floor, sympy.ceiling, sympy.sign)), lambda e: sympy.Integer(0))
    d = d.replace(lambda e: isinstance(e, sympy.DiracDelta), lambda e: sympy.Integer(0))
    # the chain rule through floor(2 x) leaves Subs(<the 0 above>, xi, 2 x)
    d = d.replace(lambda e: isinstance(e, sympy.Subs), lambda e: e.doit())
    if d.has(sympy.Derivative):
        raise NotImplementedError(f"backward: sympy cannot differentiate {expr} by {wrt}: "
                                  f"got {d}")
    return d


KINDS = ("reduced", "kv", "tile")


def _kind(positions: set) -> str:
    return "reduced" if not positions else "kv" if positions == {KV_IDX} else "tile"


def kernel_name(plan: KernelPlan, grad_captures: Sequence[str]) -> str:
    """`attn_bwd_<tag>_<spec hash>[_g<hash of the grad set>]`."""
    return (keys.kernel_name("attn_bwd", plan.spec.tag, plan.spec.key)
            + keys.grads_suffix(grad_captures))


def fixed_arguments(dtype: str) -> list[tuple[str, str]]:
    """The backward kernels' leading arguments (both kernels take the same list)."""
    t = "*" + keys.triton_type(dtype)
    args = [("Q", t), ("K", t), ("V", t), ("DO", t), ("LSE", "*fp32"), ("DELTA", "*fp32"),
            ("DQ", t), ("DK", t), ("DV", t)]
    for x, m in (("q", "m"), ("k", "n"), ("v", "n"), ("do", "m"), ("dq", "m"), ("dk", "n"),
                 ("dv", "n")):
        args += [(f"stride_{x}{s}", "i32") for s in ("b", "h", m, "d")]
    return args + [("Lq", "i32"), ("Lk", "i32"), ("Hq", "i32"), ("Hkv", "i32"),
                   ("sm_scale", "fp32")]


def backward_arguments(plan: KernelPlan, loads: Sequence[GradLoad]) -> list[tuple[str, str]]:
    """Runtime arguments after the fixed ones: the forward's (block map, positions, params,
    captures), the transposed block map, then one fp32 buffer per grad load (GA*: per-program
    sums of reduced loads, GK*: per-key sums of kv loads, GB*: per-element scratch of the
    others)."""
    args = kernel_arguments(plan)
    args += Q_TILE_ARGS if plan.block_map is not None else []
    for kind, prefix in zip(KINDS, ("GA", "GK", "GB")):
        args += [(f"{prefix}{i}", "*fp32")
                 for i, _ in enumerate(g for g in loads if g.kind == kind)]
    return args


def _piece_lines(piece: dict, j: int) -> list[str]:
    """The forward's per-piece range arithmetic, line by line (attn_fwd.py.j2 repeats it)."""
    guard = f" & ({piece['guard']})" if piece["guard"] else ""
    lines = [f"some_lo{j} = {piece['some_lo']}", f"some_hi{j} = {piece['some_hi']}",
             f"all_lo{j} = {piece['all_lo']}", f"all_hi{j} = {piece['all_hi']}",
             f"n_begin{j} = some_lo{j} // BLOCK_N",
             (f"n_end{j} = tl.where((some_hi{j} >= some_lo{j}){guard}, "
              f"some_hi{j} // BLOCK_N + 1, n_begin{j})")]
    if piece["exact"]:
        lines += [f"f_begin{j} = (all_lo{j} + BLOCK_N - 1) // BLOCK_N",
                  f"f_end{j} = tl.maximum(all_hi{j} + 1, 0) // BLOCK_N",
                  f"f_begin{j} = tl.minimum(tl.maximum(f_begin{j}, n_begin{j}), n_end{j})",
                  f"f_end{j} = tl.maximum(tl.minimum(f_end{j}, n_end{j}), f_begin{j})"]
    else:  # extra conditions: no tile is provably full
        lines += [f"f_begin{j} = n_end{j}", f"f_end{j} = n_end{j}"]
    return lines


def _dkdv_piece(piece: dict, j: int) -> dict:
    """The dk/dv kernel's view of piece j for one kv tile n: `m_a{j} <= m < m_d{j}` the query
    tiles it visits, `m_b{j} <= m < m_c{j}` the full ones among them. Every bound is
    non-decreasing in q (classify_tiles), so the forward's `n_begin`, `n_end`, `f_begin`,
    `f_end` never decrease with m and each set is an interval, found by bisection (`searches`:
    the first m whose value exceeds n). `n_end` here omits the forward's emptiness test, so an
    m-interval may hold a tile that has no allowed pair: it is visited as partial (the mask makes
    its contribution zero), never as full, since the full range is empty there. A tile an earlier
    piece visits is skipped: the second piece's loops run on its ranges less piece 0's interval
    (branch-free, so pipelined); a third piece onwards tests each tile (`earlier`), a branch
    around its loads that keeps those loops unpipelined."""
    bounds = [f"some_lo = {piece['some_lo']}", f"some_hi = {piece['some_hi']}",
              f"all_lo = {piece['all_lo']}", f"all_hi = {piece['all_hi']}",
              "n_begin = some_lo // BLOCK_N", "n_end = some_hi // BLOCK_N + 1",
              "f_begin = tl.minimum(tl.maximum((all_lo + BLOCK_N - 1) // BLOCK_N, n_begin), "
              "n_end)",
              "f_end = tl.maximum(tl.minimum(tl.maximum(all_hi + 1, 0) // BLOCK_N, n_end), "
              "f_begin)"]
    searches = [{"name": f"m_a{j}", "value": "n_end"}, {"name": f"m_d{j}", "value": "n_begin"}]
    hull = f"tl.maximum(m_d{j}, m_a{j})"
    ranges = [f"m_d{j} = " + (f"tl.where({piece['guard']}, {hull}, m_a{j})" if piece["guard"]
                              else hull)]
    if piece["exact"]:
        searches += [{"name": f"m_b{j}", "value": "f_end"},
                     {"name": f"m_c{j}", "value": "f_begin"}]
        ranges += [f"m_b{j} = tl.minimum(tl.maximum(m_b{j}, m_a{j}), m_d{j})",
                   f"m_c{j} = tl.maximum(tl.minimum(m_c{j}, m_d{j}), m_b{j})"]
        loops = [(f"m_a{j}", f"m_b{j}", True), (f"m_b{j}", f"m_c{j}", False),
                 (f"m_c{j}", f"m_d{j}", True)]
    else:  # extra conditions: no tile is provably full
        loops = [(f"m_a{j}", f"m_d{j}", True)]
    earlier = " & ".join(f"((m < m_a{i}) | (m >= m_d{i}))" for i in piece["earlier"])
    if piece["earlier"] == [0]:  # the second piece: its ranges less piece 0's interval, no branch
        loops = [r for lo, hi, masked in loops
                 for r in ((lo, f"tl.minimum({hi}, m_a0)", masked),
                           (f"tl.maximum({lo}, m_d0)", hi, masked))]
        earlier = ""
    return {"comment": piece["comment"], "bounds": bounds, "searches": searches,
            "ranges": ranges, "loops": loops, "earlier": earlier}


def _pieces_for_backward(plan: KernelPlan, printer: TritonPrinter) -> list[dict]:
    out = []
    for j, piece in enumerate(piece_loops(plan, printer)):
        earlier = " & ".join(f"((n < n_begin{i}) | (n >= n_end{i}))" for i in piece["earlier"])
        out.append({"comment": piece["comment"], "ranges": _piece_lines(piece, j),
                    "loops": piece["loops"], "earlier": earlier})
    return out


def render(plan: KernelPlan, grad_captures: Sequence[str]) -> str:
    """Triton source of both backward kernels (`<name>_dq`, `<name>_dkdv`)."""
    spec = plan.spec
    printer = TritonPrinter(printer_names(plan))
    loads, dscore = grad_loads(plan, grad_captures)
    args = fixed_arguments("float16") + backward_arguments(plan, loads)
    names = [name for name, _ in args] + [f"{c}: tl.constexpr" for c in CONSTEXPRS]
    reduced = [{"expr": printer.doprint(g.derivative), "comment": f"d/d {g.load}"}
               for g in loads if g.reduced]
    per_key = [{"expr": printer.doprint(g.derivative), "comment": f"d/d {g.load}"}
               for g in loads if g.kind == "kv"]
    tiled = [{"expr": printer.doprint(g.derivative)} for g in loads if g.kind == "tile"]
    return environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(plan, grad_captures),
        spec_lines=spec.text().splitlines() + [f"grads of: {', '.join(grad_captures) or '-'}"],
        runtime_scalars=unspecialised_scalars(["Lq", "Lk"], backward_arguments(plan, loads)),
        arguments=names,
        score_expr=score_source(printer, spec.score),
        dscore_expr=printer.doprint(dscore) if dscore not in (None, 1) else "",
        mask_expr=printer.doprint(spec.mask.expr) if spec.mask is not None else "True",
        pieces=_pieces_for_backward(plan, printer),
        dkdv_pieces=[_dkdv_piece(p, j) for j, p in enumerate(piece_loops(plan, printer))],
        block_map=plan.block_map is not None,
        reorder=spec.reorder is not None,
        reduced_grads=reduced,
        key_grads=per_key,
        tile_grads=tiled,
        needs_kv_idx=bool(loads),
    )

