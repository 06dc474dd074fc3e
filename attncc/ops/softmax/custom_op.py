"""Compiled attention as `torch.library` custom ops: `attncc::attention_fwd` and
`attncc::attention_bwd`, with fake (shape-only) implementations and an autograd formula, so
attncc kernels are differentiable, compile under `torch.compile(fullgraph=True)` as single
graph nodes and survive `torch.export`.

    attention_fwd(str kernel, Tensor q, Tensor k, Tensor v, Tensor[] captures, Tensor params,
                  Tensor[] reorder_inputs, str layout, bool permuted, str backend)
        -> (Tensor o, Tensor lse)

`kernel` names a `CompiledAttention` in this process's registry: `<tag>-<spec key>` (the sha256
of the spec's kernel text), so two compiles of one spec share it and an exported graph carries a
readable constant. q/k/v/o are in the call's `layout` ("bhsd" [B, H, L, D] or "bshd"
[B, L, H, D]); o is contiguous in that layout, lse fp32 [B, Hq, Lq]. `captures` holds every
captured tensor of the spec in `spec.captures` order; `params` is float64 CPU
[sm_scale, *parameter values] (`attncc.ops.softmax.binding`). The backward returns gradients for q, k, v
and for each captured tensor that requires grad (ALiBi slopes, bias tables, sink logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from attncc import config
from attncc.ir.reorder import inverse
from attncc.ops.op_registry import OpRegistry
from attncc.ops.softmax.backward import attention_backward
from attncc.ops.softmax.binding import unpack_params
from attncc.validate import check_nondecreasing

if TYPE_CHECKING:
    from attncc.ops.softmax.compiled import CompiledAttention

Tensor = torch.Tensor
_REGISTRY: OpRegistry[CompiledAttention] = OpRegistry("an attention")
calling, lookup = _REGISTRY.calling, _REGISTRY.lookup


def register(attn: CompiledAttention) -> str:
    """Put `attn` in the registry under its key (`attncc.ops.op_registry`)."""
    return _REGISTRY.register(f"{attn.spec.tag}-{attn.spec.key}", attn)


@contextlib.contextmanager
def _autograd_dispatch() -> Iterator[None]:
    """Undo the Autograd dispatch-key exclusion that custom ops run their implementation under:
    the reference backward differentiates the PyTorch reference with autograd, which would
    otherwise record nothing ("element 0 of tensors does not require grad")."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther,
                C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude):
        yield


def _bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _positions(attn: CompiledAttention, Lq: int, Lk: int, device: torch.device,
               reorder: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    return attn.positions.get(Lq, Lk, device, reorder) if attn.positions else None


def run_forward(attn: CompiledAttention, q: Tensor, k: Tensor, v: Tensor,
                captures: list[Tensor], bound: tuple[float, dict[str, int | float]],
                reorder_inputs: list[Tensor], layout: str, permuted: bool, backend: str,
                visits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The op's implementation (and an eager call's direct path, `CompiledAttention.__call__`):
    `bound` = (sm_scale, parameter values) read on the host (`unpack_params`); build
    positions, and run the chosen backend's softmax family."""
    sig = attn.signature
    qb, kb, vb = (q, k, v) if layout == "bhsd" else (_bhsd(q, layout), _bhsd(k, layout),
                                                      _bhsd(v, layout))
    B, Hq, Lq, _ = qb.shape
    Lk = kb.shape[2]
    sm_scale, values = bound
    tensors = {c.name: t for c, t in zip(sig.captures, captures)} if captures else {}
    if sig.nondecreasing and config.debug_checks():  # config reads the environment
        for c in sig.captures:
            if c.nondecreasing:
                check_nondecreasing(c.name, tensors[c.name])
    reorder = dict(zip(sig.reorder_keys, reorder_inputs)) if reorder_inputs else {}
    positions = _positions(attn, Lq, Lk, q.device, reorder) if attn.positions else None
    family = attn.family(backend, q.device)
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    o = (torch.empty_like(q, memory_format=torch.contiguous_format) if vb.shape[3] == q.shape[3]
         else q.new_empty((*q.shape[:3], vb.shape[3])))  # q's dtype and device, contiguous
    family.forward(qb, kb, vb, _bhsd(o, layout), lse, sm_scale=sm_scale, params=values,
                   tensors=tensors, reorder_inputs=reorder, positions=positions,
                   permuted=permuted, visits=visits)
    return o, lse


# Explicit schemas: the same on every torch from 2.4 (no annotation inference differences).
FWD_SCHEMA = ("(str kernel, Tensor q, Tensor k, Tensor v, Tensor[] captures, Tensor params, "
              "Tensor[] reorder_inputs, str layout, bool permuted, str backend) "
              "-> (Tensor, Tensor)")
BWD_SCHEMA = ("(str kernel, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor grad_o, "
              "Tensor? grad_lse, Tensor[] captures, Tensor params, Tensor[] reorder_inputs, "
              "str layout, bool permuted, str backend, bool[] grad_captures) "
              "-> (Tensor, Tensor, Tensor, Tensor[])")


@torch.library.custom_op("attncc::attention_fwd", mutates_args=(), schema=FWD_SCHEMA)
def attention_fwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, captures: list[Tensor],
                  params: Tensor, reorder_inputs: list[Tensor], layout: str, permuted: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    attn = lookup(kernel)
    return run_forward(attn, q, k, v, captures, unpack_params(attn.signature, params),
                       reorder_inputs, layout, permuted, backend)


@attention_fwd.register_fake
def _attention_fwd_fake(kernel, q, k, v, captures, params, reorder_inputs, layout, permuted,
                        backend):
    B, Hq, Lq = _bhsd(q, layout).shape[:3]
    o = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return o, q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("attncc::attention_bwd", mutates_args=(), schema=BWD_SCHEMA)
def attention_bwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  grad_o: Tensor, grad_lse: Tensor | None, captures: list[Tensor],
                  params: Tensor, reorder_inputs: list[Tensor], layout: str, permuted: bool,
                  backend: str, grad_captures: list[bool]
                  ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq/dk/dv (contiguous, in q/k/v's layout) and the gradient of each capture whose
    `grad_captures` entry is True (in order)."""
    attn = lookup(kernel)
    sig = attn.signature
    qb, kb, vb, ob, dob = (_bhsd(t, layout) for t in (q, k, v, o, grad_o))
    dlse = grad_lse
    sm_scale, values = unpack_params(sig, params)
    tensors = {c.name: t for c, t in zip(sig.captures, captures)}
    reorder = dict(zip(sig.reorder_keys, reorder_inputs))
    if permuted:  # attention_backward takes the original token order: un-permute, then back
        q_pos, kv_pos = (p.long() for p in _positions(attn, qb.shape[2], kb.shape[2],
                                                      q.device, reorder))
        iq, ikv = inverse(q_pos), inverse(kv_pos)
        qb, ob, dob, lse = qb[:, :, iq], ob[:, :, iq], dob[:, :, iq], lse[:, :, iq]
        kb, vb = kb[:, :, ikv], vb[:, :, ikv]
        dlse = dlse[:, :, iq] if dlse is not None else None
    names = [c.name for c, g in zip(sig.captures, grad_captures) if g]
    with _autograd_dispatch():
        g = attention_backward(attn, qb, kb, vb, ob, lse, dob, dlse, sm_scale=sm_scale,
                               params=values, tensors=tensors, reorder_inputs=reorder,
                               grad_captures=names, backend=backend)
    dq, dk, dv = g.dq, g.dk, g.dv
    if permuted:
        dq, dk, dv = dq[:, :, q_pos], dk[:, :, kv_pos], dv[:, :, kv_pos]
    dq, dk, dv = (_bhsd(t, layout).contiguous() for t in (dq, dk, dv))
    return dq, dk, dv, [g.captures[n].contiguous() for n in names]


@attention_bwd.register_fake
def _attention_bwd_fake(kernel, q, k, v, o, lse, grad_o, grad_lse, captures, params,
                        reorder_inputs, layout, permuted, backend, grad_captures):
    grads = [c.new_empty(c.shape) for c, g in zip(captures, grad_captures) if g]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grads


def _setup_context(ctx, inputs, output) -> None:
    kernel, q, k, v, captures, params, reorder_inputs, layout, permuted, backend = inputs
    o, lse = output
    ctx.meta = (kernel, layout, permuted, backend, len(captures))
    ctx.save_for_backward(q, k, v, o, lse, params, *captures, *reorder_inputs)


def _backward(ctx, do: Tensor, dlse: Tensor | None):
    kernel, layout, permuted, backend, n_caps = ctx.meta
    q, k, v, o, lse, params, *rest = ctx.saved_tensors
    captures, reorder_inputs = rest[:n_caps], rest[n_caps:]
    wanted = [bool(w) and c.is_floating_point()
              for w, c in zip(ctx.needs_input_grad[4], captures)]
    dq, dk, dv, dcaps = torch.ops.attncc.attention_bwd(
        kernel, q, k, v, o, lse, do.contiguous(), dlse, list(captures), params,
        list(reorder_inputs), layout, permuted, backend, wanted)
    it = iter(dcaps)
    cap_grads = [next(it) if w else None for w in wanted]
    return (None, dq, dk, dv, cap_grads, None, [None] * len(reorder_inputs), None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
