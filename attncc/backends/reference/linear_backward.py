"""The reference backward of the linear-recurrence family (docs/catalog.md, L1-L7): autograd through
`recurrent_reference` (or `varlen_reference`, packed) in fp64 or fp32. It is the oracle the
generated backward kernels are tested against, and what the reference backend differentiates."""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.ir.linear import LinearState

INPUTS = ("q", "k", "v", "g", "beta", "initial_state")


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
