"""Autograd for the linear-recurrence kernels (docs/catalog.md, L1-L6).

The autograd formula lives with the custom ops (`attncc.ops.linear.custom_op`): the op
`attncc::linear_bwd` runs the generated reverse-time kernel
(`attncc.backends.triton.linear.backward`), so o and the final state are differentiable with
respect to q, k, v, g, beta and the initial state.
`reference_backward` is the oracle: torch.autograd through `recurrent_reference` (fp64 or fp32),
also what `CompiledLinearAttention` differentiates when it runs the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.ir.linear import LinearState

INPUTS = ("q", "k", "v", "g", "beta", "initial_state")


def needs_grad(*tensors: Any) -> bool:
    """True when autograd is recording and some tensor among `tensors` requires a gradient."""
    return torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in tensors)


def reference_backward(q: Tensor, k: Tensor, v: Tensor, node: LinearState, do: Tensor, *,
                       g: Tensor | None = None, beta: Tensor | None = None,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       d_final_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                       dtype: torch.dtype = torch.float64) -> dict[str, Tensor | None]:
    """Gradients of sum(o * do) + sum(final_state * d_final_state) by autograd through the
    reference loop in `dtype` (float64 or float32). Shapes as `recurrent_reference` (or packed,
    with `cu_seqlens`, as `varlen_reference`); returns {name: grad in `dtype` or None}."""
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype: expected torch.float64 or torch.float32, got {dtype}")
    given = dict(zip(INPUTS, (q, k, v, g, beta, initial_state)))
    leaves = {n: None if x is None else x.detach().to(dtype).requires_grad_(True)
              for n, x in given.items()}
    with torch.enable_grad():
        args = {"g": leaves["g"], "beta": leaves["beta"], "scale": scale,
                "initial_state": leaves["initial_state"], "output_final_state": True}
        if cu_seqlens is not None:
            o, state = varlen_reference(leaves["q"], leaves["k"], leaves["v"], node,
                                        cu_seqlens=cu_seqlens, **args)
        else:
            o, state = recurrent_reference(leaves["q"], leaves["k"], leaves["v"], node, **args)
        loss = (o * do.to(dtype)).sum()
        if d_final_state is not None:
            loss = loss + (state * d_final_state.to(dtype)).sum()
        present = [x for x in leaves.values() if x is not None]
        grads = torch.autograd.grad(loss, present, allow_unused=True)
    out = dict.fromkeys(INPUTS)
    it = iter(grads)
    for name, x in leaves.items():
        if x is not None:
            grad = next(it)
            out[name] = torch.zeros_like(x) if grad is None else grad
    return out
