"""Gradients of a compiled softmax attention: dq, dk, dv and the gradients of captured tensors
that require grad (ALiBi slopes, bias tables, head biases, sink logits, 0-d scalars).

`attention_backward` is the one entry point the autograd formula calls. It picks the same
backend as the forward (`CompiledAttention.family`) and runs that family's backward: the
generated backward kernels on CUDA (or under TRITON_INTERPRET=1), else the PyTorch reference
differentiated by autograd (the CPU path, and the oracle the kernels are tested against).

The generated kernels compute delta = rowsum(o * do) - dlse in torch, then a dq kernel per query
tile (same tile loops as the forward; it also collects the contributions to captured tensors)
and a dk/dv kernel per kv tile and kv head (the query tiles that visit it, with the forward's
partial/full classification, summed over the GQA group in one program). No atomics: results are
bitwise reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from attncc.backends.base import Gradients

if TYPE_CHECKING:
    from attncc.ops.softmax.compiled import CompiledAttention


def attention_backward(attn: CompiledAttention, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                       dlse: torch.Tensor | None = None, *, sm_scale: float,
                       params: Mapping[str, float | int], tensors: Mapping[str, torch.Tensor],
                       reorder_inputs: Mapping[str, torch.Tensor] = {},
                       grad_captures: Sequence[str] = (), backend: str = "auto",
                       permuted: bool = False) -> Gradients:
    """Gradients of `attn`'s forward at (q, k, v) given o, lse (fp32, natural log) and the
    incoming do (and dlse). Tensors are BHSD in the original token order, or with
    `permuted=True` (a reordered spec) all of q/k/v/o/lse/do/dlse and the gradients are in the
    reordered order, as the forward's `permuted=True` returns them."""
    check_backward_inputs(attn, q, k, v, o, lse, do, dlse, grad_captures, tensors)
    family = attn.family(backend, q.device, "backward kernel")
    return family.backward(q, k, v, o, lse, do, dlse, sm_scale=sm_scale, params=params,
                           tensors=tensors, reorder_inputs=reorder_inputs,
                           grad_captures=grad_captures, permuted=permuted)


def check_backward_inputs(attn: CompiledAttention, q, k, v, o, lse, do, dlse,
                          grad_captures: Sequence[str], tensors: Mapping[str, torch.Tensor]
                          ) -> None:
    """Shapes of o/lse/do/dlse against q/k/v, and grad_captures against the spec's captures:
    a clear error before any launch."""
    B, Hq, Lq, _ = q.shape
    want = {"o": (B, Hq, Lq, v.shape[3]), "do": (B, Hq, Lq, v.shape[3]), "lse": (B, Hq, Lq)}
    got = {"o": o, "do": do, "lse": lse}
    if dlse is not None:
        want["dlse"], got["dlse"] = (B, Hq, Lq), dlse
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)} (from q {list(q.shape)} "
                             f"and v {list(v.shape)}), got {list(got[name].shape)}")
    captures = {c.name: c for c in attn.spec.captures}
    for name in grad_captures:
        if name not in captures:
            raise ValueError(f"grad_captures: {name!r} is not a captured tensor of this spec; "
                             f"its captures are {sorted(captures)}")
        t = tensors.get(name)
        if t is None or not t.dtype.is_floating_point:
            raise TypeError(f"grad_captures: {name!r} must be a floating-point tensor to have a "
                            f"gradient, got {None if t is None else t.dtype}")
