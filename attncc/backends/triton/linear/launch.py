"""Argument preparation shared by the recurrent and chunked linear-state kernels.

Both kernel families take one argument list (attncc/backends/triton/templates/linear_*.py.j2):
    Q, K, V, O, G, BETA, LAM, S0, SN, CU, strides of q, k, v, o [b, h, l, d], g [b, h, l, d],
    beta [b, h, l], state [b, h, f, v], then H, L, scale.
Dense inputs are [B, H, L, D] (any strides). Packed varlen inputs (`cu_seqlens`) are
[T, H, D] and run as [1, H, T, D] views with batch strides 0: the launch's batch axis is then the
sequence index, which picks the state and the token offset cu[n].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attncc.ir.linear import LinearState
from attncc.validate import check_scale
from attncc.validate.linear import check_inputs, varlen_views


@dataclass
class LinearLaunch:
    """Everything a launch needs: `args` (pointers and strides, in kernel order), `nbh` programs
    along the batch-head axis, the head dims, and the tensors handed back to the caller."""

    args: list
    nbh: int
    dk: int
    dv: int
    length: int
    scale: float
    varlen: bool
    o: Tensor  # [B, H, L, Dv] or packed [T, H, Dv]
    s_out: Tensor | None  # [B or N, H, F, Dv'] fp32
    # the same pointers and strides by name (q, k, v, o, g, beta, lam, s0, sn, cu; strides of
    # q, k, v, o, g, b, s), for kernels whose argument list differs (the chunked ones)
    pointers: dict
    strides: dict
    views: int  # batch size of the [B, H, L, D] views (1 for packed inputs)
    cu: Tensor | None  # cu_seqlens as int32 on the device
    strides_of: Callable[[Tensor | None, int], list[int]]  # strides as the launch passes them


def prepare_launch(node: LinearState, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
                   beta: Tensor | None, scale: float | None, initial_state: Tensor | None,
                   return_state: bool, cu_seqlens: Tensor | None) -> LinearLaunch:
    """Check the inputs (ValueError before any launch) and lay out the kernel arguments."""
    check_scale(scale)
    varlen = cu_seqlens is not None
    if varlen:
        qv, kv, vv, gv, bv, nb = varlen_views(q, k, v, node, g, beta, initial_state, cu_seqlens)
        o = torch.empty(*v.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
        ov = o.transpose(0, 1).unsqueeze(0)
        cu = cu_seqlens.to(q.device, torch.int32)
    else:
        check_inputs(q, k, v, node, g, beta, initial_state)
        qv, kv, vv, gv, bv, nb = q, k, v, g, beta, q.shape[0]
        o = torch.empty(*v.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        ov, cu = o, None
    _, H, L, Dk = qv.shape
    Dv = vv.shape[-1]
    dev = q.device
    s_in = None if initial_state is None else initial_state.to(dev, torch.float32).contiguous()
    s_out = torch.empty(nb, H, node.feature_dim(Dk), node.state_dv(Dv), dtype=torch.float32,
                        device=dev) if return_state else None
    lam = None
    if node.decay is not None:
        vals = node.decay if isinstance(node.decay, tuple) else (node.decay,) * H
        lam = torch.tensor(vals, dtype=torch.float32, device=dev)

    def strides(x: Tensor | None, n: int) -> list[int]:
        if x is None:
            return [0] * n
        st = (list(x.stride()) + [0])[:n]
        return [0] + st[1:] if varlen else st  # batch axis = sequence index: no batch stride

    # s_in and s_out are both contiguous [B, H, F, Dv']: one set of strides serves both
    s_strides = list((s_out if s_out is not None else s_in if s_in is not None else ov).stride())
    pointers = {"q": qv, "k": kv, "v": vv, "o": ov, "g": q if g is None else gv,
                "beta": q if beta is None else bv, "lam": q if lam is None else lam,
                "s0": ov if s_in is None else s_in, "sn": ov if s_out is None else s_out,
                "cu": q if cu is None else cu}
    named = {"q": strides(qv, 4), "k": strides(kv, 4), "v": strides(vv, 4), "o": strides(ov, 4),
             "g": strides(gv, 4), "b": strides(bv, 3), "s": s_strides}
    args = [*pointers.values(), *(x for st in named.values() for x in st), H, L]
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    return LinearLaunch(args, nb * H, Dk, Dv, L, scale, varlen, o, s_out, pointers, named,
                        qv.shape[0], cu, strides)
