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

from attncc.backends.reference.linear import (
    _check_axes,
    _check_tensor,
    check_inputs,
    recurrent_reference,
)
from attncc.ir.linear import LinearState
from attncc.validate import check_device


def check_cu_seqlens(cu_seqlens: object, total: int, device: torch.device | None = None) -> int:
    """Raise ValueError unless `cu_seqlens` is a valid int [N + 1] ending at `total`, on the CPU
    or on `device` (the device of q; the kernels copy it there); return N."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = (f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens: expected an int32 or int64 tensor [N + 1], got {got}")
    check_device("cu_seqlens", cu_seqlens,
                 None if device is None or cu_seqlens.device.type == "cpu" else device)
    cu = cu_seqlens.cpu()
    if cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected 0 = cu[0] <= cu[1] <= ... <= cu[N] = T = {total} "
                         f"(tokens in q), got {cu.tolist()}")
    return cu.numel() - 1


def _bhl(x: Tensor | None) -> Tensor | None:
    """[T, H, ...] -> a [1, H, T, ...] view (no copy)."""
    return None if x is None else x.transpose(0, 1).unsqueeze(0)


def _check_packed_shapes(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
                         beta: Tensor | None) -> None:
    """Shape errors in the caller's packed layout, before the [1, H, T, D] views would report
    them in the kernel's."""
    T, H, Dk = q.shape
    if list(k.shape) != [T, H, Dk]:
        raise ValueError(f"k: expected shape [T, H, Dk] = {[T, H, Dk]}, got {list(k.shape)}")
    if list(v.shape[:2]) != [T, H]:
        raise ValueError(f"v: expected shape [T, H, Dv] with [T, H] = {[T, H]}, "
                         f"got {list(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        axes = node.input_axes(name)  # e.g. ("B", "H", "L", "Dk"): packed, [T, H, Dk]
        if axes is not None and x is not None:
            packed = ("T",) + tuple(a for a in axes if a not in ("B", "L"))
            _check_axes(name, x, packed, {"T": T, "H": H, "Dk": Dk})


def varlen_views(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
                 beta: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """Check packed inputs; return [1, H, T, D] views of q, k, v (g, beta likewise) and N."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a packed tensor [T, H, D] with cu_seqlens, "
                             f"got {got}")
    check_device("q", q)
    n = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    _check_packed_shapes(q, k, v, node, g, beta)
    qv, kv, vv, gv, bv = _bhl(q), _bhl(k), _bhl(v), _bhl(g), _bhl(beta)
    check_inputs(qv, kv, vv, node, gv, bv, None)  # dtypes, gate signs, decays
    if initial_state is not None:
        _, H, Dk = q.shape
        shape = [n, H, node.feature_dim(Dk), node.state_dv(v.shape[-1])]
        _check_tensor("initial_state", initial_state, shape, "[N, H, F, Dv']")
        check_device("initial_state", initial_state, q.device)
    return qv, kv, vv, gv, bv, n


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
