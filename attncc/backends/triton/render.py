"""Render a KernelPlan into Triton source with `attncc/backends/triton/templates/attn_fwd.py.j2`.

All decisions are made here, in Python; the template only lays out the prepared strings.
`kernel_arguments(plan)` is the one list of kernel arguments (name, Triton type) that the
renderer, the launcher and the ahead-of-time compiler share.
"""

from __future__ import annotations

from itertools import combinations

import sympy

from attncc.backends import keys
from attncc.backends.triton.printer import TritonPrinter
from attncc.backends.triton.templating import environment
from attncc.ir.nodes import ScoreMod
from attncc.ir.plan import KernelPlan
from attncc.ir.tiles import RowInterval
from attncc.passes.row_intervals import row_intervals
from attncc.passes.select_tiles import block_map_kv_tiles
from attncc.ir.symbols import (B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_FIRST, Q_IDX, Q_LAST,
                               SCORE, Load, buffer_symbol)

TEMPLATE = "attn_fwd.py.j2"
BLOCK_MAP_TEMPLATE = "block_map.py.j2"
BLOCK_MAP_ROWS_TEMPLATE = "block_map_rows.py.j2"
TEMPLATES = (TEMPLATE, BLOCK_MAP_TEMPLATE, BLOCK_MAP_ROWS_TEMPLATE,
             "helpers.py.j2")  # every file a source depends on


def kernel_name(plan: KernelPlan) -> str:
    """Readable name plus content hash, e.g. `attn_fwd_causal_sw_softcap_9f3a0c12d4`."""
    return keys.kernel_name("attn_fwd", plan.spec.tag, plan.spec.key)


def printer_names(plan: KernelPlan) -> dict[str, str]:
    names = {B_IDX.name: "off_b", H_IDX.name: "off_h", Q_IDX.name: "q_idx",
             KV_IDX.name: "kv_idx", LQ.name: "Lq", LK.name: "Lk", HQ.name: "Hq",
             HKV.name: "Hkv", SCORE.name: "score", Q_FIRST.name: "q_first",
             Q_LAST.name: "q_last"}
    names.update({p.name: keys.param_arg(p.name) for p in plan.spec.params})
    return names


BLOCK_MAP_ARGS = [("KV_TILES", "*i32"), ("kvt_stride_b", "i32"), ("kvt_stride_h", "i32"),
                  ("kvt_stride_m", "i32"), ("kvt_stride_c", "i32")]
REORDER_ARGS = [("Q_POS", "*i32"), ("KV_POS", "*i32")]


def kernel_arguments(plan: KernelPlan) -> list[tuple[str, str]]:
    """Runtime arguments after the fixed ones, as (name, Triton signature type)."""
    args = list(BLOCK_MAP_ARGS) if plan.block_map is not None else []
    args += REORDER_ARGS if plan.spec.reorder is not None else []
    args += [(keys.param_arg(p.name), "i32" if p.kind == "int" else "fp32")
             for p in plan.spec.params]
    for cap in plan.spec.captures:
        ptr, strides, sizes = keys.capture_arg_names(cap.name, cap.ndim)
        args.append((ptr, "*" + keys.triton_type(cap.dtype)))
        args += [(s, "i32") for s in strides] + [(n, "i32") for n in sizes]
    return args


def fixed_arguments(dtype: str) -> list[tuple[str, str]]:
    t = "*" + keys.triton_type(dtype)
    args = [("Q", t), ("K", t), ("V", t), ("O", t), ("LSE", "*fp32"), ("VISITS", "*i8")]
    for x in "qkvo":
        m = "m" if x in "qo" else "n"
        args += [(f"stride_{x}{s}", "i32") for s in ("b", "h", m, "d")]
    return args + [("Lq", "i32"), ("Lk", "i32"), ("Hq", "i32"), ("Hkv", "i32"),
                   ("sm_scale", "fp32")]


def piece_loops(plan: KernelPlan, printer: TritonPrinter) -> list[dict]:
    if plan.block_map is not None:
        return []  # the kernel reads its tiles from the block map instead
    out = []
    for i, piece in enumerate(plan.tiles.pieces):
        j = str(i)
        loops = ([("n_begin" + j, "f_begin" + j, True), ("f_begin" + j, "f_end" + j, False),
                  ("f_end" + j, "n_end" + j, True)] if piece.exact
                 else [("n_begin" + j, "n_end" + j, True)])
        out.append({
            "comment": piece.text().replace("\n", " "),
            "some_lo": printer.doprint(piece.some_lo), "some_hi": printer.doprint(piece.some_hi),
            "all_lo": printer.doprint(piece.all_lo), "all_hi": printer.doprint(piece.all_hi),
            "guard": "" if piece.guard is sympy.true else printer.doprint(piece.guard),
            "exact": piece.exact, "loops": loops,
            "earlier": list(range(i)),
        })
    return out


RENDERS = [0]  # how many sources this process rendered (tests: a cache hit renders nothing)


def score_source(printer: TritonPrinter, score: ScoreMod | None) -> str:
    """The printed score mod for the templates' `s = (score_expr)` ("" without one). A mod that
    does not read `score` (a function of q_idx, h or constants only) prints a [BLOCK_M, 1] or
    scalar value; a full tile applies no mask that would broadcast it, so it is broadcast to
    the score tile here, else `p` is not a [BLOCK_M, BLOCK_N] operand of `tl.dot`."""
    if score is None:
        return ""
    text = printer.doprint(score.expr)
    return text if score.expr.has(SCORE) else f"tl.zeros_like(score) + ({text})"


def render(plan: KernelPlan) -> str:
    """Triton source of the forward kernel for `plan` (signature-independent)."""
    RENDERS[0] += 1
    spec = plan.spec
    printer = TritonPrinter(printer_names(plan))
    sink = spec.normaliser.sink
    pieces = piece_loops(plan, printer)
    return environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(plan),
        spec_lines=spec.text().splitlines(),
        runtime_scalars=unspecialised_scalars(["Lq", "Lk"], kernel_arguments(plan)),
        extra_args=[name for name, _ in kernel_arguments(plan)],
        score_expr=score_source(printer, spec.score),
        mask_expr=printer.doprint(spec.mask.expr) if spec.mask is not None else "True",
        pieces=pieces,
        block_map=plan.block_map is not None,
        has_partial=plan.block_map is not None or bool(pieces),  # tiles the mask cuts
        # the careful pass (a non-finite value met a masked key) is rare: its loops are not
        # software-pipelined, so it adds no stage buffers or registers to the common pass
        fast_loop=("range", ""), careful_loop=("tl.range", ", num_stages=1"),
        reorder=spec.reorder is not None,
        has_sink=sink is not None,
        sink_load=printer.doprint(Load(buffer_symbol(sink.name), H_IDX)) if sink else "",
    )



def unspecialised_scalars(first: list[str], args: list[tuple[str, str]]) -> list[str]:
    """Integer and float arguments Triton must not specialise on (values change per call)."""
    return first + [name for name, kind in args if not kind.startswith("*")]


def block_map_kernel_name(plan: KernelPlan) -> str:
    return keys.kernel_name("block_map", plan.spec.tag, plan.spec.key)


def block_map_arguments(plan: KernelPlan) -> list[tuple[str, str]]:
    """The block-map kernel's arguments after its fixed ones: positions, params, captures."""
    return [a for a in kernel_arguments(plan) if a not in BLOCK_MAP_ARGS]


def render_block_map(plan: KernelPlan, pairs: bool = False) -> str:
    """Triton source of the kernel that classifies tiles of `plan`'s mask on the device: from
    per-row key intervals when `attncc.passes.row_intervals` finds the mask is a union of a few
    (`plan.block_map.rows` records that decision for `explain`), else by evaluating the mask
    at every pair. `pairs=True` renders the pair form whatever the mask (tests and the static
    report compare the two)."""
    RENDERS[0] += 1
    printer = TritonPrinter(printer_names(plan))
    args = block_map_arguments(plan)
    rows = None if pairs else row_intervals(plan.spec).pieces
    common = dict(
        kernel_name=block_map_kernel_name(plan),
        spec_lines=plan.spec.text().splitlines(),
        runtime_scalars=unspecialised_scalars(["Gh", "Lq", "Lk", "cls_stride_b", "cls_stride_h",
                                               "cls_stride_m"], args),
        extra_args=[name for name, _ in args],
    )
    if rows is None:
        return environment().get_template(BLOCK_MAP_TEMPLATE).render(
            **common, mask_expr=printer.doprint(plan.spec.mask.expr),
            reorder=plan.spec.reorder is not None)
    return environment().get_template(BLOCK_MAP_ROWS_TEMPLATE).render(
        **common, kv_tiles=block_map_kv_tiles(len(rows)), **_row_pieces(rows, printer))


def _row_pieces(rows: tuple[RowInterval, ...], printer: TritonPrinter) -> dict:
    """The row-interval kernel's prepared lines: each piece's bounds, the tile tests, and the
    inclusion-exclusion terms (every non-empty set of pieces; its intersection's bounds are the
    max of the lows and the min of the highs, its sign (-1)^(size + 1))."""
    pieces = [{"i": i, "comment": f"piece {i}: {p.text()}", "lo": printer.doprint(p.lo),
               "hi": printer.doprint(p.hi),
               "on": f"row_ok & (lo{i} <= hi{i})" + ("" if p.cond is sympy.true else
                                                    f" & (({printer.doprint(p.cond)}) != 0)")}
              for i, p in enumerate(rows)]
    full = " | ".join(f"((all_lo{i} <= c0) & (all_hi{i} >= c1))" for i in range(len(rows)))
    empty = " & ".join(f"((c1 < some_lo{i}) | (c0 > some_hi{i}))" for i in range(len(rows)))
    intersections, terms = [], []
    for size in range(1, len(rows) + 1):
        for members in combinations(range(len(rows)), size):
            name = "".join(str(i) for i in members)
            if size > 1:
                lows, highs = [f"lo{i}" for i in members], [f"hi{i}" for i in members]
                intersections += [f"lo{name} = {_nested('tl.maximum', lows)}",
                                  f"hi{name} = {_nested('tl.minimum', highs)}"]
            terms.append({"sign": "" if size % 2 else "-", "lo": f"lo{name}",
                          "hi": f"hi{name}"})
    return {"pieces": pieces, "full_expr": full, "empty_expr": empty,
            "intersections": intersections, "terms": terms}


def _nested(fn: str, names: list[str]) -> str:
    """`fn(a, fn(b, c))`: tl.maximum / tl.minimum take two operands."""
    return names[0] if len(names) == 1 else f"{fn}({names[0]}, {_nested(fn, names[1:])})"
