"""The reference backend's softmax family: `attention_reference` in fp32 (fp64 for fp64
inputs) for the forward, autograd through it for the backward (the CPU path, and the oracle the
generated kernels are tested against)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from attncc.backends.base import Gradients
from attncc.backends.reference.forward import attention_reference, compute_dtype
from attncc.ir.reorder import inverse
from attncc.ir.spec import AttentionSpec

if TYPE_CHECKING:
    from attncc.backends.base import Backend
    from attncc.ir.positions import Positions


def reference_backward(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       do: torch.Tensor, dlse: torch.Tensor | None = None, *, sm_scale: float,
                       params: Mapping[str, float | int] = {},
                       tensors: Mapping[str, torch.Tensor] = {},
                       reorder_inputs: Mapping[str, torch.Tensor] = {},
                       grad_captures: Sequence[str] = ()) -> Gradients:
    """Autograd through `attention_reference` in fp32 (fp64 for fp64 inputs). q/k/v/do BHSD
    in the original token order; dlse [B, Hq, Lq] or None."""
    ct = compute_dtype(q.dtype)
    with torch.enable_grad():
        qc, kc, vc = (t.detach().to(ct).requires_grad_() for t in (q, k, v))
        caps = {name: t.detach().to(ct if t.is_floating_point() else t.dtype)
                for name, t in tensors.items()}
        for name in grad_captures:
            caps[name].requires_grad_()
        o, lse = attention_reference(spec, qc, kc, vc, scale=sm_scale, params=params,
                                     captures=caps, reorder_inputs=reorder_inputs)
        outputs, grads_out = [o], [do.to(ct)]
        if dlse is not None:
            finite = torch.isfinite(lse)  # an empty row's lse is -inf and carries no gradient
            outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
            grads_out.append(torch.where(finite, dlse.to(ct), torch.zeros_like(lse)))
        wrt = [qc, kc, vc] + [caps[name] for name in grad_captures]
        grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads[:3], (q, k, v)))
    captures = {name: g.to(tensors[name].dtype)
                for name, g in zip(grad_captures, grads[3:])}
    return Gradients(dq, dk, dv, captures)


class ReferenceSoftmax:
    """`SoftmaxFamily` of the reference backend for one spec (`attncc.backends.base`)."""

    name = "reference"
    block_maps: Any = None  # the reference evaluates the mask directly

    def __init__(self, backend: Backend, spec: AttentionSpec, positions: Positions | None
                 ) -> None:
        self.backend, self.spec, self.positions = backend, spec, positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, *, sm_scale: float, params: Mapping[str, float | int],
                tensors: Mapping[str, torch.Tensor], reorder_inputs: Mapping[str, torch.Tensor],
                positions: tuple[torch.Tensor, torch.Tensor] | None, permuted: bool,
                visits: torch.Tensor | None = None) -> None:
        """The reference in fp32 (fp64 for fp64 inputs), as the kernel accumulates, cast into
        o; with `permuted=True`, un-permute in and permute out."""
        ct = compute_dtype(q.dtype)
        q, k, v = (t.to(ct) for t in (q, k, v))
        tensors = {n: t.to(ct) if t.is_floating_point() else t for n, t in tensors.items()}
        if permuted and positions is not None:
            q_pos, kv_pos = (p.long() for p in positions)
            q, k, v = q[:, :, inverse(q_pos)], k[:, :, inverse(kv_pos)], v[:, :, inverse(kv_pos)]
        o_ref, lse_ref = attention_reference(self.spec, q, k, v, scale=sm_scale, params=params,
                                             captures=tensors, reorder_inputs=reorder_inputs)
        if permuted and positions is not None:
            o_ref, lse_ref = o_ref[:, :, q_pos], lse_ref[:, :, q_pos]
        o.copy_(o_ref)
        lse.copy_(lse_ref)

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None, *,
                 sm_scale: float, params: Mapping[str, float | int],
                 tensors: Mapping[str, torch.Tensor],
                 reorder_inputs: Mapping[str, torch.Tensor], grad_captures: Sequence[str],
                 permuted: bool) -> Gradients:
        """Autograd through the reference; with `permuted`, in the reordered token order (the
        reference works in the original one: un-permute the inputs, permute the grads)."""
        kw = dict(sm_scale=sm_scale, params=params, tensors=tensors,
                  reorder_inputs=reorder_inputs, grad_captures=grad_captures)
        if not permuted:
            return reference_backward(self.spec, q, k, v, do, dlse, **kw)
        Lq, Lk = q.shape[2], k.shape[2]
        q_pos, kv_pos = (p.long() for p in self.positions.get(Lq, Lk, q.device,
                                                              dict(reorder_inputs)))
        iq, ikv = inverse(q_pos), inverse(kv_pos)
        g = reference_backward(self.spec, q[:, :, iq], k[:, :, ikv], v[:, :, ikv], do[:, :, iq],
                               None if dlse is None else dlse[:, :, iq], **kw)
        return Gradients(g.dq[:, :, q_pos], g.dk[:, :, kv_pos], g.dv[:, :, kv_pos], g.captures)
