"""Argument checks for a compiled attention call: every problem is reported before any launch,
naming the argument, what was expected and what was given."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import sympy
import torch

from attncc import config
from attncc.ir.derived import split_sources
from attncc.ir.nodes import Param
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, QP, Load
from attncc.passes.select_tiles import MAX_HEAD_DIM

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = {"bhsd": "[B, H, L, D]", "bshd": "[B, L, H, D]"}


def to_bhsd(name: str, t: Any, layout: str) -> torch.Tensor:
    """Check one of q/k/v and return it as a BHSD view (no copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor {LAYOUTS[layout]} (layout={layout!r}), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    return t.transpose(1, 2) if layout == "bshd" else t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes are BHSD here: q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv].

    The checks read only shapes, dtypes and devices, so a combination that passed once passes
    always: it is remembered (a few hundred at most) and a repeat call skips the work. Not
    while torch.compile traces: its shapes may be symbolic (not hashable), and the graph keeps
    the checks it needs as guards anyway."""
    if torch.compiler.is_compiling():
        _check_qkv(q, k, v)
        return
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)
    if key in _PASSED_QKV:
        return
    _check_qkv(q, k, v)
    if len(_PASSED_QKV) >= 256:
        _PASSED_QKV.clear()
    _PASSED_QKV.add(key)


_PASSED_QKV: set[tuple] = set()


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        check_device(name, t, q.device)
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: expected batch size {q.shape[0]} (as q), got {t.shape[0]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected {k.shape[1]} heads and length {k.shape[2]} (as k), "
                         f"got {v.shape[1]} heads and length {v.shape[2]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected head dim {q.shape[3]} (the head dim of q), "
                         f"got {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: expected a number of kv heads dividing the {hq} query heads "
                         f"(Hq % Hkv == 0), got Hkv = {hkv}")
    for name, d in (("q", q.shape[3]), ("v", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected a head dim between 1 and {MAX_HEAD_DIM}, got {d}")


def check_device(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    """`t` holds data (a meta tensor has none: a kernel would read garbage) and, when `device`
    is given, lives on it (the device of q)."""
    if t.device.type == "meta":
        where = ("a cpu or cuda device" if device is None or device.type == "meta"
                 else f"device {device} (the device of q)")
        raise ValueError(f"{name}: expected a tensor with data on {where}, got a meta tensor")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of q), got {t.device}")


def check_devices(q: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """q holds data (not a meta tensor) and every other tensor given lives on q's device
    (`cu_seqlens` may also be on the CPU: the kernels copy it). A custom op sends meta inputs to
    its shape-only implementation, so the caller checks before calling it."""
    if not isinstance(q, torch.Tensor):
        return  # check_inputs reports it
    check_device("q", q)
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor):
            cpu_ok = name == "cu_seqlens" and x.device.type == "cpu"
            check_device(name, x, None if cpu_ok else q.device)


def check_scale(scale: Any) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")


def check_param_value(p: Param, value: Any) -> int | float:
    """A runtime value for parameter `p`: an int (not a bool) for int parameters, a finite real
    number for float ones, positive where `p` requires it."""
    if p.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        article = "an" if p.kind == "int" else "a"
        raise TypeError(f"parameter {p.name!r}: expected {article} {p.kind} value, "
                        f"got {type(value).__name__} {value!r}")
    if p.kind == "float" and not math.isfinite(value):
        raise ValueError(f"parameter {p.name!r}: expected a finite float value, got {value!r}")
    Param(p.name, p.kind, value, p.positive)  # Param's own checks (positivity)
    return value


def sort_runtime(params: Mapping[str, Param], captures: Mapping[str, Any],
                 runtime: Mapping[str, Any], value_of: Callable[[Param, Any], Any]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Sort call keyword arguments into parameter values (each checked by `value_of`) and
    replacement captured tensors (checked for rank and dtype against the capture)."""
    values, tensors = {}, {}
    for name, value in runtime.items():
        if name in params:
            values[name] = value_of(params[name], value)
        elif name in captures:
            c = captures[name]
            if not isinstance(value, torch.Tensor) or value.dim() != c.ndim or \
                    str(value.dtype).removeprefix("torch.") != c.dtype:
                got = (f"{value.dim()}-d {value.dtype}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise TypeError(f"{name}: expected a {c.ndim}-d {c.dtype} tensor, got {got}")
            tensors[name] = value
        else:
            raise TypeError(f"unexpected keyword argument {name!r}: this kernel's runtime "
                            f"parameters are {sorted(params)} and tensors {sorted(captures)}")
    return values, tensors


def split_runtime(spec: AttentionSpec, runtime: Mapping[str, Any]
                  ) -> tuple[dict[str, int | float], dict[str, torch.Tensor]]:
    """Sort call keyword arguments into parameter values and replacement captured tensors."""
    params = {p.name: p for p in spec.params}
    captures = {c.name: c for c in spec.captures}
    runtime, derived = split_sources(spec.captures, runtime, {*params, *captures})
    values, tensors = sort_runtime(params, captures, runtime, check_param_value)
    return ({n: values.get(n, p.value) for n, p in params.items()},
            {n: tensors.get(n, derived.get(n, c.tensor)) for n, c in captures.items()})


def check_captures(spec: AttentionSpec, tensors: Mapping[str, torch.Tensor],
                   device: torch.device, sizes: Mapping[sympy.Symbol, int]) -> None:
    """Captured tensors: on q's device, and long enough where indexed by a plain index. With
    `config.debug_checks()`, a capture promised nondecreasing is checked too (a device sync)."""
    for cap in spec.captures:
        t = tensors[cap.name]
        if t is None:
            raise ValueError(f"{cap.name}: this spec reads a captured tensor {cap.name!r}; "
                             f"pass it as {cap.name}=tensor")
        if t.device != device:
            raise ValueError(f"{cap.name}: expected the captured tensor on {device} (the device "
                             f"of q), got {t.device}")
        if cap.nondecreasing and config.debug_checks():
            check_nondecreasing(cap.name, t)
    for node in (spec.mask, spec.score):
        if node is None:
            continue
        for ld in node.expr.atoms(Load):
            t = tensors[ld.args[0].name]
            for axis, index in enumerate(ld.args[1:]):
                if index in sizes and t.shape[axis] < sizes[index]:
                    raise ValueError(
                        f"{ld.args[0].name}: dimension {axis} is indexed by {index} up to "
                        f"{sizes[index] - 1}, so it needs size >= {sizes[index]}, "
                        f"got shape {tuple(t.shape)}")


def check_nondecreasing(name: str, t: torch.Tensor) -> None:
    """Raise unless `t[i] <= t[i + 1]` for all i: the kernel skips kv tiles by these values, so a
    decrease would silently drop allowed pairs. Synchronises with the device (debug mode only)."""
    drops = (t[1:] < t[:-1]).nonzero()
    if drops.numel():
        i = int(drops[0, 0])
        raise ValueError(f"{name}: expected values that never decrease (the kernel skips kv tiles "
                         f"by them), got {name}[{i + 1}] = {int(t[i + 1])} < "
                         f"{name}[{i}] = {int(t[i])}")


def index_extents(B: int, Hq: int, Lq: int, Lk: int) -> dict[sympy.Symbol, int]:
    return {B_IDX: B, H_IDX: Hq, Q_IDX: Lq, KV_IDX: Lk, QP: Lk}  # the aligned position qp < Lk
