"""The user-facing entry points: `Attention`, `compile`, `explain`."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

from attncc.describe import explain_text
from attncc.ir.linear import Hybrid, LinearState
from attncc.ir.memory import PagedMemory, PerHeadLengths, PersistentMemory, RaggedMemory
from attncc.ir.nodes import Mask, Normaliser, Schedule, ScoreMod
from attncc.ir.reorder import AutoReorder, Reorder
from attncc.ir.spec import AttentionSpec
from attncc.ir.trace import trace_mask, trace_score
from attncc.ops.softmax.compiled import CompiledAttention
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.ops.linear.hybrid import CompiledHybrid
from attncc.ops.serving.compiled import ServingAttention


def _as_mask(mask: Any) -> Mask | None:
    if mask is None or isinstance(mask, Mask):
        return mask
    if callable(mask):
        return trace_mask(mask)
    raise TypeError(f"mask: expected an attncc Mask or a mask_mod(b, h, q_idx, kv_idx) function, "
                    f"got {type(mask).__name__}")


def _as_score(score: Any) -> ScoreMod | None:
    if score is None or isinstance(score, ScoreMod):
        return score
    if isinstance(score, (list, tuple)):
        mods = [_as_score(s) for s in score]
        return functools.reduce(lambda a, b: a.then(b), mods) if mods else None
    if callable(score):
        return trace_score(score)
    raise TypeError(f"score: expected an attncc ScoreMod, a score_mod(score, b, h, q_idx, kv_idx)"
                    f" function or a list of them, got {type(score).__name__}")


def _as_reorder(reorder: Any) -> Reorder | None:
    if reorder == "auto":
        return AutoReorder()
    if reorder is None or isinstance(reorder, Reorder):
        return reorder
    raise TypeError(f"reorder: expected an attncc reorder (Hilbert2D, Morton2D, TileMajor, "
                    f"Hilbert3D, SegmentSort, UserPermutation), 'auto' or None, "
                    f"got {reorder!r}")


def Attention(mask: Any = None, score: Any = None, *, normaliser: Normaliser | None = None,
              memory: Any = None, reorder: Any = None, schedule: Schedule | None = None,
              scale: float | None = None) -> AttentionSpec:
    """Describe an attention variant. `mask`/`score` take attncc values or FlexAttention-style
    functions (traced); a list of score mods applies them in order."""
    kwargs: dict[str, Any] = {"mask": _as_mask(mask), "score": _as_score(score), "scale": scale,
                              "reorder": _as_reorder(reorder)}
    if isinstance(memory, LinearState):
        if mask is not None or score is not None:
            raise ValueError("memory: a linear-recurrence state takes no mask or score mod yet "
                             "(chunk-local and block-causal compositions are still to come); "
                             f"got mask={mask is not None}, score={score is not None}")
        normaliser = normaliser or Normaliser("none")  # N3 (docs/catalog.md): no softmax
    if normaliser is not None:
        kwargs["normaliser"] = normaliser
    if memory is not None:
        kwargs["memory"] = memory
    if schedule is not None:
        kwargs["schedule"] = schedule
    return AttentionSpec(**kwargs)


def _spec_from_function(fn: Callable, **kwargs: Any) -> AttentionSpec:
    n = len(inspect.signature(fn).parameters)
    if n == 4:
        if kwargs.get("mask") is not None:
            raise TypeError(f"{fn.__qualname__} is a mask_mod, but mask= was also given")
        return Attention(mask=fn, **kwargs)
    if n == 5:
        if kwargs.get("score") is not None:
            raise TypeError(f"{fn.__qualname__} is a score_mod, but score= was also given")
        return Attention(score=fn, **kwargs)
    raise TypeError(f"{fn.__qualname__}: expected a mask_mod(b, h, q_idx, kv_idx) or a "
                    f"score_mod(score, b, h, q_idx, kv_idx), got a function of {n} arguments")


def compile(spec: AttentionSpec | Hybrid | Callable | None = None, /, *, backend: str = "auto",
            **attention_kwargs: Any) -> CompiledAttention | Callable[[Callable], CompiledAttention]:
    """`compile(spec)`, `@compile` on a mask_mod/score_mod, or `@compile(mask=..., score=...)`;
    `compile(attncc.hybrid(...))` for an L8 hybrid (`CompiledHybrid`)."""
    if isinstance(spec, Hybrid):
        if attention_kwargs:
            raise TypeError(f"compile(hybrid): unexpected arguments {sorted(attention_kwargs)}")
        return CompiledHybrid(spec, backend)
    if isinstance(spec, AttentionSpec):
        if attention_kwargs:
            raise TypeError(f"compile(spec): unexpected arguments {sorted(attention_kwargs)}; "
                            "put them in the Attention(...) spec")
        if isinstance(spec.memory, LinearState):
            return CompiledLinearAttention(spec, backend)
        if isinstance(spec.memory, (PagedMemory, RaggedMemory, PersistentMemory, PerHeadLengths)):
            if backend != "auto":
                raise ValueError(f"backend: serving memories ({spec.memory.text()}) run the "
                                 f"Triton serving kernels only; expected 'auto', got {backend!r}")
            return ServingAttention(spec)
        return CompiledAttention(spec, backend)
    if spec is None:
        return lambda fn: CompiledAttention(_spec_from_function(fn, **attention_kwargs), backend)
    if callable(spec):
        return CompiledAttention(_spec_from_function(spec, **attention_kwargs), backend)
    raise TypeError(f"compile: expected an AttentionSpec or a function, got {type(spec).__name__}")


def explain(spec: AttentionSpec | CompiledAttention, *, shape: Iterable[int] | None = None,
            block: tuple[int, int] = (64, 64), png: str | None = None) -> str:
    """The IR after each pass and the tile classes; for a mask on a token grid, the cost of each
    candidate token order; with `shape=(Lq, Lk)`, the tile map the kernel visits ('.' skipped,
    'p' partial: mask evaluated, 'F' full: mask skipped) for batch 0, head 0, also drawn to
    the PNG file `png` (needs matplotlib: `pip install attncc[viz]`)."""
    return explain_text(spec.spec if isinstance(spec, CompiledAttention) else spec, shape, block,
                        png)
