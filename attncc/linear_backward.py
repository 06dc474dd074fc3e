"""Autograd for the linear-recurrence kernels (CATALOG 5, L1-L6).

`LinearAttentionFunction` runs a forward kernel (chunked or recurrent) and, on backward, the
generated reverse-time kernel (`attncc.backends.triton_linear_backward`): o and the final state
are differentiable with respect to q, k, v, g, beta and the initial state.
`reference_backward` is the oracle: torch.autograd through `recurrent_reference` (fp64 or fp32),
also what `CompiledLinearAttention` differentiates when it runs the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attncc.backends.reference_linear import recurrent_reference
from attncc.backends.reference_linear_varlen import varlen_reference
from attncc.ir.linear import LinearState

INPUTS = ("q", "k", "v", "g", "beta", "initial_state")


def needs_grad(*tensors: Any) -> bool:
    """True when autograd is recording and some tensor among `tensors` requires a gradient."""
    return torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in tensors)


class LinearAttentionFunction(torch.autograd.Function):
    """(o, final_state) = forward_kernel(q, k, v, g, beta, initial_state); backward by
    `backward_kernel` (a `TritonLinearBackward`). Not twice differentiable."""

    @staticmethod
    def forward(ctx, forward_kernel, backward_kernel, scale, cu_seqlens, q, k, v, g, beta,
                initial_state):
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        o, state = forward_kernel(q, k, v, g=g, beta=beta, scale=scale,
                                  initial_state=initial_state, return_state=True, **extra)
        ctx.save_for_backward(q, k, v, g, beta, initial_state,
                              o if backward_kernel.node.normalize else None)
        ctx.backward_kernel, ctx.scale, ctx.cu_seqlens = backward_kernel, scale, cu_seqlens
        ctx.set_materialize_grads(False)
        return o, state

    @staticmethod
    @once_differentiable
    def backward(ctx, do, d_state):
        q, k, v, g, beta, initial_state, o = ctx.saved_tensors
        if do is None:  # only the final state was used
            do = torch.zeros(*v.shape, dtype=q.dtype, device=q.device)
        grads = ctx.backward_kernel(q, k, v, do, g=g, beta=beta, scale=ctx.scale,
                                    initial_state=initial_state, d_final_state=d_state,
                                    cu_seqlens=ctx.cu_seqlens, o=o)
        return (None, None, None, None, *(grads[name] for name in INPUTS))


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
