"""Tracing FlexAttention-style `mask_mod(b, h, q_idx, kv_idx)` and `score_mod(score, ...)`.

The function runs once with `Traced` stand-ins: Python operators and the torch calls listed in
`attncc.ir.traced._TORCH_FUNCTIONS` build a sympy expression; indexing a captured tensor with
traced indices becomes a `Load`. Anything that needs a concrete value (`if`, `and`, `.item()`,
`int()`, an unsupported torch call) raises `TraceError` naming the function, the line and the
construct; so does any other exception the function raises while traced (recursion included).

A captured tensor indexed in its leading dimensions only and then reduced (`buf[b].sum()`) becomes
a new captured tensor (`buf_sum[b]`, see `attncc.ir.derived`) that each call recomputes in torch
before the launch, so the kernel reads one number. A call to a random torch function (`torch.rand`)
runs once, at trace time: its values are frozen into the kernel, so it warns.
"""

from __future__ import annotations

import inspect
import linecache
import sys
import warnings
from types import CodeType
from typing import Callable

import sympy
from torch.overrides import TorchFunctionMode

from attncc.ir.nodes import Mask, ScoreMod
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, SCORE
from attncc.ir.traced import (TraceError, Traced, _active, _Context, _ctx, _lift, _Partial)

__all__ = ["TraceError", "trace_mask", "trace_score"]


_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
    "bernoulli", "multinomial", "normal", "poisson", "uniform_", "normal_", "random_",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "bernoulli_", "dropout",
})
_FACTORIES = frozenset({"tensor", "as_tensor", "full", "scalar_tensor", "asarray"})


class _TraceMode(TorchFunctionMode):
    """Sees every torch call made while a function is traced, also those on plain tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RANDOM:
            frame = _user_frame(_ctx().fn.__code__)
            warnings.warn_explicit(
                f"{_ctx().fn.__qualname__} calls torch.{name}: it runs once, when the function "
                f"is traced, so its values are frozen into the compiled kernel (the function is "
                f"not deterministic; draw the tensor outside and capture it instead)",
                UserWarning, frame.f_code.co_filename if frame else "<unknown>",
                frame.f_lineno if frame else 0, module=(frame.f_globals.get("__name__")
                                                        if frame else None))
        if name in _FACTORIES and any(isinstance(a, (Traced, _Partial))
                                      for a in (*args, *kwargs.values())):
            raise _ctx().fail(f"torch.{name}() of a traced value",
                              "use the traced value directly: it already acts as a 0-d tensor")
        return func(*args, **kwargs)


def _user_frame(code: CodeType):
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _run(fn: Callable, args: tuple[Traced, ...]) -> tuple[Traced, _Context]:
    ctx = _Context(fn)
    _active.append(ctx)
    try:
        with _TraceMode():
            result = fn(*args)
        if result is None:
            raise ctx.fail("the function returned None (a missing `return`?)",
                           "return the mask (bool) or the modified score")
        result = _lift(result) if not isinstance(result, Traced) else result
        if result.expr.has(sympy.zoo):  # log(0), x / (y - y) after simplification
            raise ctx.fail(f"an expression that is infinite for every input (`{result.expr}`)",
                           "sympy made it complex infinity: a division by zero or log(0); "
                           "write float(\"-inf\") or guard it with torch.where")
        return result, ctx
    except TraceError:
        raise
    except RecursionError as e:
        raise ctx.fail("unbounded recursion (RecursionError)",
                       "a traced function must finish with no concrete values to stop on; "
                       "unroll it to a fixed depth", _raising_line(e, fn)) from None
    except Exception as e:  # anything else the function raised, named at its line
        where = _raising_line(e, fn)
        filename, lineno = where.rsplit(":", 1)
        line = linecache.getline(filename, int(lineno)).strip()
        raise ctx.fail(f"`{line}` raised {type(e).__name__}: {e}",
                       "only Python numbers, traced values and captured tensors can be "
                       "combined", where) from e
    finally:
        _active.pop()


def _raising_line(e: BaseException, fn: Callable) -> str:
    """file:line of the innermost frame of `fn`'s code (else the outermost frame of its file)
    in the traceback of `e`."""
    code, found, tb = fn.__code__, None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code or (found is None and
                                          tb.tb_frame.f_code.co_filename == code.co_filename):
            found = tb
        tb = tb.tb_next
    if found is None:
        return f"{code.co_filename}:{code.co_firstlineno}"
    return f"{found.tb_frame.f_code.co_filename}:{found.tb_lineno}"


def _index_args() -> tuple[Traced, ...]:
    return tuple(Traced(s, "int") for s in (B_IDX, H_IDX, Q_IDX, KV_IDX))


def _check_arity(fn: Callable, expected: int, kind: str) -> None:
    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return
    if n != expected:
        names = "(b, h, q_idx, kv_idx)" if expected == 4 else "(score, b, h, q_idx, kv_idx)"
        raise TypeError(f"{kind} {getattr(fn, '__qualname__', fn)}: expected a function of "
                        f"{names}, got one taking {n} arguments")


def trace_mask(fn: Callable) -> Mask:
    """Trace `fn(b, h, q_idx, kv_idx) -> bool` into a Mask."""
    _check_arity(fn, 4, "mask_mod")
    result, ctx = _run(fn, _index_args())
    if result.kind != "bool":
        raise TypeError(f"mask_mod {fn.__qualname__}: expected a boolean expression, got "
                        f"a value of kind {result.kind!r}: `{result.expr}`")
    return Mask(result.expr, tuple(ctx.params.values()), tuple(ctx.captures.values()),
                _tag(fn))


def trace_score(fn: Callable) -> ScoreMod:
    """Trace `fn(score, b, h, q_idx, kv_idx) -> float` into a ScoreMod."""
    _check_arity(fn, 5, "score_mod")
    result, ctx = _run(fn, (Traced(SCORE, "float"), *_index_args()))
    if result.kind == "bool":
        raise TypeError(f"score_mod {fn.__qualname__}: expected a numeric expression, got a "
                        f"boolean `{result.expr}` (did you mean a mask_mod?)")
    return ScoreMod(result.expr, tuple(ctx.params.values()), tuple(ctx.captures.values()),
                    _tag(fn))


def _tag(fn: Callable) -> str:
    name = getattr(fn, "__name__", "custom")
    return name if name.isidentifier() and name != "<lambda>" else "custom"
