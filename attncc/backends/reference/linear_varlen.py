"""Varlen (packed sequences, `cu_seqlens`) for the linear-recurrence axis: checks, views and the
reference, shared by the Triton kernels and their tests.

Layout (as K3 `RaggedMemory`): q, k [T, H, Dk]; v [T, H, Dv]; o [T, H, Dv]; g [T, H] (L3, L6)
or [T, H, Dk] (L4); beta [T, H]; cu_seqlens int32 or int64 [N + 1], cu[0] = 0, non-decreasing,
cu[N] = T; sequence n is tokens cu[n] .. cu[n+1] - 1, with its own state: initial and final
states [N, H, F, Dv'] (F, Dv' as in `reference_linear`). Each sequence starts from its initial
state (zeros when none is given); nothing flows from one sequence to the next.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.backends.reference.linear import recurrent_reference
from attncc.ir.linear import LinearState
from attncc.validate.linear import varlen_views


def varlen_reference(
    q: Tensor, k: Tensor, v: Tensor, state_node: LinearState, *, cu_seqlens: Tensor,
    g: Tensor | None = None, beta: Tensor | None = None, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`recurrent_reference` on each packed sequence: (o [T, H, Dv], final [N, H, F, Dv'])."""
    qv, kv, vv, gv, bv, n = varlen_views(q, k, v, state_node, g, beta, initial_state,
                                         cu_seqlens)
    cu = cu_seqlens.tolist()
    outs, states = [], []
    for i in range(n):
        sl = slice(cu[i], cu[i + 1])
        o, s = recurrent_reference(
            qv[:, :, sl], kv[:, :, sl], vv[:, :, sl], state_node, scale=scale,
            g=None if gv is None else gv[:, :, sl], beta=None if bv is None else bv[:, :, sl],
            initial_state=None if initial_state is None else initial_state[i:i + 1],
            output_final_state=True)
        outs.append(o[0].transpose(0, 1))
        states.append(s)
    if n == 0:
        return v.new_zeros(v.shape).to(q.dtype), None
    o = torch.cat(outs, dim=0)
    return o, (torch.cat(states, dim=0) if output_final_state else None)
