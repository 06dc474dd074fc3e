"""Gradients of a compiled softmax attention: dq, dk, dv and the gradients of captured tensors
that require grad (ALiBi slopes, bias tables, head biases, sink logits, 0-d scalars).

`attention_backward` is the one entry point the autograd formula calls. It picks the same
backend as the forward: the generated Triton backward kernels on CUDA (or under
TRITON_INTERPRET=1), else the PyTorch reference differentiated by autograd (the CPU path, and
the oracle the kernels are tested against).

The Triton path (`attncc.backends.triton.backward.launch`): delta = rowsum(o * do) - dlse in
torch, then a dq kernel per query tile (same tile loops as the forward; it also collects the
contributions to captured tensors) and a dk/dv kernel per kv tile and kv head (the query tiles
that visit it, with the forward's partial/full classification, summed over the GQA group in one
program). No atomics: results are bitwise reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from attncc.backends.reference.forward import attention_reference, compute_dtype
from attncc.ir.spec import AttentionSpec

if TYPE_CHECKING:
    from attncc.ops.softmax.compiled import CompiledAttention


@dataclass
class Gradients:
    """dq/dk/dv in the shapes and dtypes of q/k/v (BHSD); `captures` maps the name of each
    captured tensor that was asked for to its gradient (its shape and dtype)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    captures: dict[str, torch.Tensor] = field(default_factory=dict)


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
    chosen = attn._choose(backend, q.device)
    if chosen == "reference":
        if permuted:
            return _reference_permuted(attn, q, k, v, do, dlse, sm_scale=sm_scale,
                                       params=params, tensors=tensors,
                                       reorder_inputs=reorder_inputs,
                                       grad_captures=grad_captures)
        return reference_backward(attn.spec, q, k, v, do, dlse, sm_scale=sm_scale,
                                  params=params, tensors=tensors,
                                  reorder_inputs=reorder_inputs, grad_captures=grad_captures)
    from attncc.backends.triton.backward.launch import triton_backward
    return triton_backward(attn, q, k, v, o, lse, do, dlse, sm_scale=sm_scale, params=params,
                           tensors=tensors, reorder_inputs=reorder_inputs,
                           grad_captures=grad_captures, permuted=permuted)


def _reference_permuted(attn, q, k, v, do, dlse, *, reorder_inputs, **kw) -> Gradients:
    """The reference works in the original order: un-permute the inputs, permute the grads."""
    from attncc.ir.reorder import inverse

    Lq, Lk = q.shape[2], k.shape[2]
    q_pos, kv_pos = (p.long() for p in attn.positions.get(Lq, Lk, q.device, dict(reorder_inputs)))
    iq, ikv = inverse(q_pos), inverse(kv_pos)
    g = reference_backward(attn.spec, q[:, :, iq], k[:, :, ikv], v[:, :, ikv], do[:, :, iq],
                           None if dlse is None else dlse[:, :, iq],
                           reorder_inputs=reorder_inputs, **kw)
    return Gradients(g.dq[:, :, q_pos], g.dk[:, :, kv_pos], g.dv[:, :, kv_pos], g.captures)


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
