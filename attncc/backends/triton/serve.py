"""The serving kernels (`attncc/backends/triton/templates/attn_serve.py.j2`): render, cache, launch.

One rendered source per (mask, score mod, normaliser) holds two jit functions: the forward
kernel `<name>` (paged / dense / ragged KV, split-KV, GQA packing) and `<name>_merge` (the
LSE merge of partials, docs/semantics.md). The layout is not in the source: KV_MODE, RAGGED_Q,
HAS_SLOTS, ... are constexprs, so every layout of one spec shares one cache entry.

Every launch goes through `launch`, which calls the hooks in `LAUNCH_HOOKS` around it, so
tests can record launches (and tell the interpreter's own work inside a launch from the host
work around it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import sympy

from attncc.backends import keys
from attncc.backends.triton.printer import PRINTER_VERSION, TritonPrinter
from attncc.backends.triton.render import (BLOCK_MAP_ARGS, kernel_arguments, printer_names,
                                           score_source)
from attncc.backends.triton.source import CachedSource, load_module
from attncc.backends.triton.templating import environment, template_hash
from attncc.ir.nodes import DenseMemory
from attncc.ir.plan import KernelPlan
from attncc.ir.symbols import H_IDX, Load, buffer_symbol

BACKEND = "triton-serve"
TEMPLATES = ("attn_serve.py.j2", "attn_serve_merge.py.j2", "helpers.py.j2")
FIXED_ARGS = (
    [(n, "*fp32" if n in ("O_PART", "LSE_PART", "LSE") else "*{dt}")
     for n in ("Q", "K", "V", "O", "LSE", "O_PART", "LSE_PART")]
    + [(n, "*i32") for n in ("PAGE_TABLE", "KV_LEN", "CU_Q", "CU_K", "LK_MASK", "HEAD_LEN")]
    + [("MEM_K", "*{dt}"), ("MEM_V", "*{dt}"), ("WORK", "*i32"), ("VISITS", "*i32")]
    + [("K_S", "*{dt}"), ("V_S", "*{dt}"), ("HEAD_MAP", "*i32"), ("CU_Q_IN", "*i32"),
       ("ERR", "*i64")]
    + [(f"stride_{x}{d}", "i32") for x, dims in (("q", "bmhd"), ("k", "bnhd"), ("v", "bnhd"),
                                                   ("o", "bmhd"), ("l", "bmh"), ("p", "t"),
                                                   ("ks", "bnhd"), ("vs", "bnhd"))
       for d in dims]
    + [(f"stride_{x}", "i32") for x in ("mkh", "mks", "mkd", "mvh", "mvs", "mvd")]
    + [(n, "i32") for n in ("page_size", "q_rows", "kv_rows", "Hq", "Hkv")]
    + [("sm_scale", "fp32")]
    + [(n, "i32") for n in ("n_slots", "head_len_div", "kv_pos0", "split_base", "n_rows_total",
                            "n_sink", "window", "ring", "n_req", "num_pages", "kv_cap")]
)
MERGE_FIXED_ARGS = (
    [("O_PART", "*fp32"), ("LSE_PART", "*fp32"), ("O", "*{dt}"), ("LSE", "*fp32")]
    + [(f"stride_{x}", "i32") for x in ("ob", "om", "oh", "od", "lb", "lm", "lh")]
    + [(n, "i32") for n in ("n_rows_total", "rows_per_b", "Hq", "n_parts")]
)
LAUNCH_HOOKS: list[Callable[[str, tuple, dict], contextlib.AbstractContextManager]] = []
"""Each hook is called as hook(kernel_name, grid, arguments) and entered around the launch."""


def extra_arguments(plan: KernelPlan) -> list[tuple[str, str]]:
    """Params and captures (the serving kernel reads no block map and takes no reorder)."""
    return [a for a in kernel_arguments(plan) if a not in BLOCK_MAP_ARGS]


def signature(plan: KernelPlan, dtype: str, merge: bool = False) -> dict[str, str]:
    """Triton signature (name -> type) of the forward or merge kernel for q's `dtype`."""
    fixed = MERGE_FIXED_ARGS if merge else FIXED_ARGS
    return {n: t.format(dt=keys.triton_type(dtype)) for n, t in fixed} | dict(extra_arguments(plan))


def serve_name(plan: KernelPlan) -> str:
    return keys.kernel_name("attn_serve", plan.spec.tag, plan.spec.key)


def _piece_exprs(plan: KernelPlan, printer: TritonPrinter) -> list[dict]:
    """Closed-form kv ranges of the mask (a sound cover even where inexact: the kernel evaluates
    the mask on every tile it visits, so no block map is needed); none (read every key) when a
    bound depends on the head, since the rows of one tile are several heads."""
    if plan.spec.mask is None:
        return []
    pieces = plan.tiles.pieces
    if any(H_IDX in (p.some_lo.free_symbols | p.some_hi.free_symbols) for p in pieces):
        return []
    return [{"comment": p.text().replace("\n", " "), "some_lo": printer.doprint(p.some_lo),
             "some_hi": printer.doprint(p.some_hi),
             "guard": "True" if p.guard is sympy.true else printer.doprint(p.guard)}
            for p in pieces]


def render(plan: KernelPlan) -> str:
    spec = plan.spec
    names = printer_names(plan)
    printer = TritonPrinter(names)
    pieces = _piece_exprs(plan, printer)
    sink = spec.normaliser.sink
    sink_of = (lambda h: TritonPrinter({**names, H_IDX.name: h}).doprint(
        Load(buffer_symbol(sink.name), H_IDX))) if sink else (lambda h: "")
    n = len(pieces)
    extra = extra_arguments(plan)
    return environment().get_template(TEMPLATES[0]).render(
        kernel_name=serve_name(plan),
        spec_lines=spec.text().splitlines(),
        runtime_scalars=[a for a, t in FIXED_ARGS if not t.startswith("*")]
        + [a for a, t in extra if not t.startswith("*")],
        extra_args=[a for a, _ in extra],
        score_expr=score_source(printer, spec.score),
        mask_expr=printer.doprint(spec.mask.expr) if spec.mask is not None else "True",
        pieces=pieces,
        range_lo=_nest("tl.minimum", [f"tl.where(hi{i} >= lo{i}, lo{i}, Lk)" for i in range(n)]),
        range_hi=_nest("tl.maximum", [f"hi{i}" for i in range(n)]),
        visit_expr=" | ".join(f"visit_{i}" for i in range(n)),
        has_sink=sink is not None, sink_load=sink_of("off_h_r"), merge_sink_load=sink_of("h_m"),
    )


def _nest(fn: str, items: list[str]) -> str:
    out = items[0] if items else ""
    for item in items[1:]:
        out = f"{fn}({out}, {item})"
    return out


def source_key(plan: KernelPlan) -> str:
    """The cache key of the serving source of `plan`."""
    return keys.cache_key(BACKEND, plan.spec.key, templates=template_hash(TEMPLATES),
                          printer=PRINTER_VERSION)


class TritonServe:
    """The serving kernels of one plan (its spec's memory is set to dense: layouts are
    constexprs). Building it renders (or loads) the source in the disk cache."""

    def __init__(self, plan: KernelPlan) -> None:
        spec = plan.spec.replace(memory=DenseMemory())
        self.plan = KernelPlan(spec=spec, tiles=plan.tiles, block_map=plan.block_map)
        self.name = serve_name(self.plan)
        self.source_entry = CachedSource(
            source_key(self.plan), self.name,
            lambda: {"kernel.py": render(self.plan).encode()},
            {"backend": BACKEND, "spec": spec.text()})
        self.entry = self.source_entry.entry
        self._module: ModuleType | None = None
        # a mask without closed-form kv ranges is evaluated on every kv tile up to kv_len
        self.reads_every_tile = spec.mask is not None and not _piece_exprs(
            self.plan, TritonPrinter(printer_names(self.plan)))

    @property
    def source(self) -> str:
        return self.source_entry.source

    def _functions(self) -> ModuleType:
        if self._module is None:
            self._module = load_module(str(self.entry.files["kernel.py"]), self.name)
        return self._module

    def forward(self):
        return getattr(self._functions(), self.name)

    def merge(self):
        return getattr(self._functions(), self.name + "_merge")


def launch(name: str, fn: Any, grid: tuple, args: list[Any], constexprs: dict[str, Any],
           **options: Any) -> Any:
    """fn[grid](*args, **constexprs, **options), inside every hook of LAUNCH_HOOKS; returns
    what Triton's launch returns (its `CompiledKernel` when the JIT ran one)."""
    with contextlib.ExitStack() as stack:
        for hook in LAUNCH_HOOKS:
            stack.enter_context(hook(name, grid, {"args": args, **constexprs}))
        return fn[grid](*args, **constexprs, **options)
