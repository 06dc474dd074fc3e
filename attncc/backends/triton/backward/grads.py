"""Gradients of captured tensors from what the kernels wrote, reduced deterministically.

Each read `Load(cap, *index)` of a grad-requiring capture in the score mod (a `GradLoad`)
contributes `dL/ds[b,h,i,j] * d score_expr / d load` to `cap[index(b,h,i,j)]`:

- reduced loads (index free of q_idx/kv_idx: ALiBi slope[h], head bias[h], a 0-d scalar): the
  dq kernel sums its tile's contributions into one fp32 slot per program, `partial[B*Hq, nM]`
  (non-atomic); here they are summed over nM and scattered by the index at (b, h).
- kv loads (index involves kv_idx only: S7 logcount[kv], S8 calibration[kv], a key-padding
  bias[b, 0, 0, kv]): each dk/dv program sums its key tile's contributions over the query rows
  of each head, written once into [B, Hq, Lk]: O(Lk) memory per (b, h).
- other loads (bias[b,h,q,kv] S5, relative table[h, bucket(q-kv)] S4, anything data
  dependent): the general path. The dq kernel writes each element's contribution once into a
  zero-filled fp32 scratch [B, Hq, Lq, Lk] at original positions: O(Lq*Lk) memory per (b, h);
  the index is evaluated densely here (`torch_eval.evaluate`, as the reference does) and the
  contributions are scattered into the capture. S5's identity index on a tensor of the call's
  extents skips the scatter: the scratch is its gradient (summed over broadcast dims).

Scatters use `index_put_(accumulate=True)`: on CUDA a sort-based kernel (deterministic, per the
PyTorch maintainers in pytorch/pytorch#55827 and #39307), on the CPU sequential. It runs under
`torch.use_deterministic_algorithms(True)` so that an atomic fast path PyTorch may add for
non-deterministic mode (proposed in pytorch/pytorch#171381) is never taken.
So two backward calls give bitwise-equal capture gradients. An index outside the tensor reads
0 in the forward (the IR's semantics) and receives no gradient.

N2 sink logits are not read by the score mod: `dsink[h] = -sum_{b,i} exp(sink[h] - lse) delta`
(lse includes the sink; delta = rowsum(o * do) - dlse), a small torch reduction.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping

import torch

from attncc.ir.eval import evaluate
from attncc.backends.triton.backward.render import GradLoad
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_IDX


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def scatter_sum(shape: torch.Size, index: list[torch.Tensor], values: torch.Tensor
                ) -> torch.Tensor:
    """fp32 tensor of `shape` with `values` summed at `index` (broadcast with `values`); entries
    whose index falls outside `shape` are dropped. Deterministic (see the module docstring)."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32, device=values.device)
    if not shape:  # a 0-d capture: every contribution lands on its one element
        return values.sum().reshape(())
    index = torch.broadcast_tensors(*[torch.as_tensor(i, device=values.device).long()
                                      for i in index], values)[:-1]
    inside = torch.ones_like(index[0], dtype=torch.bool)
    flat = torch.zeros_like(index[0])
    for i, size in zip(index, shape):
        inside &= (i >= 0) & (i < size)
        flat = flat * size + i
    flat, vals = flat[inside], values.expand(inside.shape)[inside].float()
    with _deterministic():
        out.index_put_((flat,), vals, accumulate=True)
    return out.view(shape)


def _env(spec: AttentionSpec, B: int, Hq: int, Hkv: int, Lq: int, Lk: int,
         params: Mapping[str, float | int], device: torch.device, kind: str) -> dict:
    """Index symbols laid out like the kernel's buffer of a `kind` load: reduced [B, Hq],
    kv [B, Hq, Lk], tile [B, Hq, Lq, Lk] (original positions)."""
    env = {LQ: Lq, LK: Lk, HQ: Hq, HKV: Hkv}
    env.update({p.symbol: params.get(p.name, p.value) for p in spec.params})
    axes = {"reduced": (B_IDX, H_IDX), "kv": (B_IDX, H_IDX, KV_IDX),
            "tile": (B_IDX, H_IDX, Q_IDX, KV_IDX)}[kind]
    extent = {B_IDX: B, H_IDX: Hq, Q_IDX: Lq, KV_IDX: Lk}
    for axis, symbol in enumerate(axes):
        shape = [1] * len(axes)
        shape[axis] = extent[symbol]
        env[symbol] = torch.arange(extent[symbol], device=device).view(shape)
    return env


def capture_gradients(spec: AttentionSpec, loads: tuple[GradLoad, ...],
                      buffers: list[torch.Tensor], *, B: int, Hq: int, Hkv: int, Lq: int,
                      Lk: int, params: Mapping[str, float | int],
                      tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{capture name: fp32 gradient} from the dq kernel's buffers, one per load in `loads`
    order: `partial` [B*Hq, nM] for reduced loads, [B, Hq, Lk] for kv loads, `scratch`
    [B, Hq, Lq, Lk] for the others."""
    grads: dict[str, torch.Tensor] = {}
    for load, buf in zip(loads, buffers):
        target = tensors[load.capture]
        g = _identity_gradient(load, target.shape, buf) if load.kind == "tile" else None
        if g is not None:
            grads[load.capture] = grads[load.capture] + g if load.capture in grads else g
            continue
        if load.kind == "tile":  # the O(Lq*Lk) path: say so (STYLE: no silent slow paths)
            warnings.warn(f"captured tensor {load.capture!r}: its gradient for the read "
                          f"{load.load} goes through the general path, a [B, Hq, Lq, Lk] fp32 "
                          "scratch and a scatter (O(Lq*Lk) memory per batch and head)",
                          stacklevel=2)
        env = _env(spec, B, Hq, Hkv, Lq, Lk, params, buf.device, load.kind)
        values = buf.view(B, Hq, -1).sum(-1) if load.reduced else buf
        index = [evaluate(i, env, tensors) for i in load.index]
        g = scatter_sum(target.shape, index, values)
        grads[load.capture] = grads[load.capture] + g if load.capture in grads else g
    return grads


def _identity_gradient(load: GradLoad, shape: torch.Size, scratch: torch.Tensor
                       ) -> torch.Tensor | None:
    """S5's `bias[b|0, h|0, q, kv]` on a tensor of exactly the call's extents: the scratch is
    the gradient itself, summed over the broadcast (size-1, index-0) dims. None otherwise."""
    if len(load.index) != 4 or len(shape) != 4:
        return None
    broadcast = []
    for dim, (index, symbol) in enumerate(zip(load.index, (B_IDX, H_IDX, Q_IDX, KV_IDX))):
        if index == 0 and shape[dim] == 1:
            broadcast.append(dim)
        elif index != symbol or shape[dim] != scratch.shape[dim]:
            return None
    return scratch.sum(dim=broadcast, keepdim=True) if broadcast else scratch


def sink_gradient(sink: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """N2: d loss / d sink[h] = -sum_{b,i} exp(sink[h] - lse[b,h,i]) delta[b,h,i]; fp32 [Hq].
    lse [B, Hq, Lq] includes the sink, so it is finite on every row."""
    weight = torch.exp(sink.float().view(1, -1, 1) - lse)
    return -(weight * delta).sum(dim=(0, 2))
