"""One call's runtime arguments in the flat form of the `attncc::attention_fwd` custom op.

A call's keyword arguments (`window=512`, `doc=new_doc`) become a list of captured tensors in the
spec's order and one CPU float64 tensor `params = [sm_scale, *parameter values]`. The op reads
`params` on the host, so a new scalar value is new tensor data, never a new graph: under
`torch.compile` nothing recompiles when it changes (pass a 0-d CPU tensor for a value that
changes from call to call; a Python number is a constant of the compiled graph).

Everything here runs at call time, also while torch.compile traces it, so it is plain Python
over values precomputed once per kernel (`CallSignature`): no sympy at call time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attncc.ir.derived import split_sources
from attncc.ir.nodes import Capture, Param
from attncc.ir.reorder import SegmentSort, UserPermutation
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, QP, Load
from attncc.validate import check_param_value, sort_runtime

_EXTENTS = {B_IDX: "B", H_IDX: "Hq", Q_IDX: "Lq", KV_IDX: "Lk", QP: "Lk"}  # qp < Lk


@dataclass(frozen=True)
class CallSignature:
    """What a call binds, precomputed from the spec.

    extent_checks: (capture name, axis, index name, extent name) for each axis of a captured
    tensor indexed by a plain index (b, h, q_idx, kv_idx, or the aligned query position
    q_idx + Lk - Lq), whose size must cover that extent.
    broadcast_checks: (capture name, axis) for each axis that has size 1 in the spec's tensor and
    that every load indexes with a constant (S5's broadcast dims): the kernel reads only that
    one entry, so a call tensor must keep size 1 there (a larger one would be silently sliced).
    reorder_keys: the `permutation()` keywords of the reorder's call tensors, in op order.
    token_tables: nondecreasing captures read at q_idx (M11's `doc_start` / `doc_end` from
    cu_seqlens): one entry per token of the packed sequence, so never longer than the call's
    max(Lq, Lk) tokens (a longer one describes sequences this call does not have).
    """

    params: tuple[Param, ...]
    captures: tuple[Capture, ...]
    extent_checks: tuple[tuple[str, int, str, str], ...]
    reorder_keys: tuple[str, ...]
    token_tables: tuple[str, ...] = ()
    broadcast_checks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        # lookup tables every call reads, built once (the dataclass stays frozen)
        set_ = object.__setattr__
        set_(self, "param_by_name", {p.name: p for p in self.params})
        set_(self, "capture_by_name", {c.name: c for c in self.captures})
        set_(self, "taken", {*self.param_by_name, *self.capture_by_name})
        set_(self, "derived", any(c.reduction is not None for c in self.captures))
        set_(self, "nondecreasing", any(c.nondecreasing for c in self.captures))
        set_(self, "default_captures", tuple(c.tensor for c in self.captures))
        set_(self, "default_values", tuple(p.value for p in self.params))
        # `unpack_row`'s values of the spec's own parameters (what `bind_numbers` starts from)
        try:
            set_(self, "default_bound", unpack_row(self, [1.0, *self.default_values])[1])
        except (TypeError, ValueError):
            set_(self, "default_bound", None)

    @staticmethod
    def of(spec: AttentionSpec) -> CallSignature:
        checks = []
        indices: dict[str, list[tuple]] = {}  # capture name -> the index tuple of each load
        for node in (spec.mask, spec.score):
            if node is None:
                continue
            for ld in sorted(node.expr.atoms(Load), key=str):
                indices.setdefault(ld.args[0].name, []).append(ld.args[1:])
                for axis, index in enumerate(ld.args[1:]):
                    if index in _EXTENTS:
                        checks.append((ld.args[0].name, axis, str(index), _EXTENTS[index]))
        keys = (("key_score",) if isinstance(spec.reorder, SegmentSort) else
                ("perm",) if isinstance(spec.reorder, UserPermutation) else ())
        at_q = {ld.args[0].name for ld in spec.mask.expr.atoms(Load)
                if ld.args[1:] == (Q_IDX,)} if spec.mask is not None else set()
        tables = tuple(c.name for c in spec.captures if c.nondecreasing and c.name in at_q)
        return CallSignature(spec.params, spec.captures, tuple(checks), keys, tables,
                             _broadcast_axes(spec.captures, indices))


def _broadcast_axes(captures: tuple[Capture, ...], indices: dict[str, list[tuple]]
                    ) -> tuple[tuple[str, int], ...]:
    out = []
    for c in captures:
        loads = indices.get(c.name, [])
        if c.tensor is None or not loads:
            continue
        for axis, size in enumerate(c.tensor.shape):
            if size == 1 and all(len(ix) > axis and ix[axis].is_Integer for ix in loads):
                out.append((c.name, axis))
    return tuple(out)


def bind(sig: CallSignature, runtime: Mapping[str, Any], sm_scale: float,
         device: torch.device, extents: Mapping[str, int]
         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Check `runtime` (parameter values and replacement captured tensors) and return
    (captures in the spec's order, params float64 CPU [1 + number of parameters])."""
    caps, row = bind_row(sig, runtime, sm_scale, device, extents)
    return caps, pack_row(row)


def bind_row(sig: CallSignature, runtime: Mapping[str, Any], sm_scale: float,
             device: torch.device, extents: Mapping[str, int]
             ) -> tuple[list[torch.Tensor], list[Any]]:
    """`bind` before packing: (captures, [sm_scale, *parameter values]), each value a checked
    Python number or a one-element CPU tensor (checked by `unpack_row` when it is read)."""
    if not runtime and not sig.derived:  # the spec's own values and tensors
        caps, row = list(sig.default_captures), [sm_scale, *sig.default_values]
    else:
        # derived captures (`buf[b].sum()`) are recomputed from their source on every call
        if sig.derived:
            runtime, derived = split_sources(sig.captures, runtime, sig.taken)
        else:
            derived = {}
        values, tensors = sort_runtime(sig.param_by_name, sig.capture_by_name, runtime,
                                       _param_value)
        caps = [tensors.get(c.name, derived.get(c.name, c.tensor)) for c in sig.captures]
        row = [sm_scale] + [values.get(p.name, p.value) for p in sig.params]
    if caps:
        _check_captures(sig, caps, device, extents)
    return caps, row


_EXACT = 2**53  # |an int| up to this goes through float64 unchanged


def bind_numbers(sig: CallSignature, runtime: Mapping[str, Any], sm_scale: float
                 ) -> tuple[float, dict[str, int | float]] | None:
    """`unpack_row(sig, bind_row(sig, runtime, ...)[1])` for a call whose runtime values are
    all plain Python numbers for parameters (`window=128`) of a spec without captured
    tensors: the same values (as they come back from float64) after the same checks, without
    the general path's sorting and row. None when the call is not of that kind or a check
    fails: the general path then binds it (and raises its error)."""
    values = sig.default_bound
    if sig.captures or values is None:
        return None
    values = dict(values)
    by_name = sig.param_by_name
    for name, x in runtime.items():
        p = by_name.get(name)
        kind = type(x)
        if p is None or (kind is not int and (kind is not float or p.kind == "int")):
            return None  # an unknown name, a bool, a tensor, a float for an int, ...
        if kind is int:
            if not -_EXACT <= x <= _EXACT:
                return None
            if p.kind == "float":
                x = float(x)
        elif not math.isfinite(x):
            return None
        if p.positive and not x > 0:
            return None
        values[name] = x
    return float(sm_scale), values


def pack_row(row: list[Any]) -> torch.Tensor:
    """The op's `params`: float64 CPU [len(row)]."""
    if any(isinstance(x, torch.Tensor) for x in row):
        return torch.stack([torch.as_tensor(x).to(torch.float64).reshape(()) for x in row])
    return torch.tensor(row, dtype=torch.float64)


def _param_value(p: Param, value: Any) -> Any:
    """A Python number (checked now) or a one-element CPU tensor (its value is checked by
    `unpack_params` inside the op: reading it here would stop torch.compile's trace)."""
    if not isinstance(value, torch.Tensor):
        return check_param_value(p, value)
    if value.numel() != 1 or value.device.type != "cpu" or value.dtype == torch.bool or \
            value.is_complex():
        raise TypeError(f"parameter {p.name!r}: expected a number or a one-element real CPU "
                        f"tensor (the kernel reads it on the host), got a tensor of shape "
                        f"{tuple(value.shape)}, {value.dtype} on {value.device}")
    return value


def _check_captures(sig: CallSignature, caps: list[torch.Tensor], device: torch.device,
                    extents: Mapping[str, int]) -> None:
    by_name = {}
    for c, t in zip(sig.captures, caps):
        if t is None:
            raise ValueError(f"{c.name}: this spec reads a captured tensor {c.name!r}; "
                             f"pass it as {c.name}=tensor")
        if t.device != device:
            raise ValueError(f"{c.name}: expected the captured tensor on {device} (the device "
                             f"of q), got {t.device}")
        by_name[c.name] = t
    for name, axis in sig.broadcast_checks:
        t = by_name[name]
        if t.shape[axis] != 1:
            built = tuple(next(c for c in sig.captures if c.name == name).tensor.shape)
            raise ValueError(f"{name}: dimension {axis} had size 1 when the spec was built "
                             f"(shape {built}), so it broadcasts and the kernel reads only its "
                             f"index 0; expected size 1 there, got shape {tuple(t.shape)}. "
                             "Build the spec with a tensor of the full shape to use every entry")
    for name, axis, index, extent in sig.extent_checks:
        t, n = by_name[name], extents[extent]
        if t.shape[axis] < n:
            raise ValueError(f"{name}: dimension {axis} is indexed by {index} up to {n - 1}, "
                             f"so it needs size >= {n}, got shape {tuple(t.shape)}")
    tokens = max(extents["Lq"], extents["Lk"])
    for name in sig.token_tables:
        if by_name[name].shape[0] > tokens:
            raise ValueError(f"{name}: expected one entry per token, at most max(Lq, Lk) = "
                             f"{tokens}, got {by_name[name].shape[0]}: its cu_seqlens (last "
                             f"entry, or total=) describe more tokens than this call has")


def unpack_params(sig: CallSignature, params: torch.Tensor
                  ) -> tuple[float, dict[str, int | float]]:
    """(sm_scale, {name: value}) from the op's `params`; values given as tensors are checked
    here, on the host, before any launch."""
    return unpack_row(sig, params.tolist())


def unpack_row(sig: CallSignature, row: list[Any]) -> tuple[float, dict[str, int | float]]:
    """`unpack_params` on the row before packing (the eager call's direct path): each value
    goes through float64, as it would in the op's tensor, and the same checks."""
    if len(row) == 1 and not sig.params:  # sm_scale alone: a float `check_scale` passed
        return float(row[0]), {}
    row = [float(x) for x in row]  # a tensor's .item() too: one element, real, on the CPU
    if len(row) != 1 + len(sig.params):
        raise ValueError(f"params: expected {1 + len(sig.params)} values (sm_scale and "
                         f"{[p.name for p in sig.params]}), got {len(row)}")
    out: dict[str, int | float] = {}
    for p, x in zip(sig.params, row[1:]):
        if p.kind == "int":
            if not (math.isfinite(x) and x == int(x)):
                raise ValueError(f"parameter {p.name!r}: expected an int value, got {x!r}")
            x = int(x)
        elif not math.isfinite(x):
            raise ValueError(f"parameter {p.name!r}: expected a finite float value, got {x!r}")
        if p.positive and not x > 0:
            check_param_value(p, x)  # raises its message; every other check holds by now
        out[p.name] = x
    return row[0], out
