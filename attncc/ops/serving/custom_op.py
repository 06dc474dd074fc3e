"""Serving kernels (K2-K5: paged, ragged, persistent, per-head lengths) as the `torch.library`
custom op `attncc::serve_run`, which writes into a plan's preallocated buffers:

    serve_run(str kernel, str plan, Tensor(a!) o, Tensor(b!)? lse, Tensor(c!)? o_part,
              Tensor(d!)? lse_part, Tensor q, Tensor k, Tensor v, Tensor? page_table,
              Tensor? kv_len, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? mem_k,
              Tensor? mem_v, Tensor? head_kv_len, Tensor? k_stream, Tensor? v_stream,
              str kv_layout) -> ()

`kernel` names a `ServingAttention` (`serve_<tag>-<spec key>`), `plan` a live `ServePlan` of this
process (`plan<n>`: the host-side work list, tile sizes and bound captures). o / lse / o_part /
lse_part are the plan's outputs and fp32 split partials (shapes in `attncc.ServePlan`),
declared as mutated: under torch.compile the op is one graph node and functionalization sees the
writes. Shapes of the inputs as `ServingAttention.run`. Eager `run` calls the same implementation
without the dispatcher, so it stays one launch (plus the merge) with no aten op on the host.
Serving is inference only: the op has no autograd formula, and an input that requires grad is
an error before any launch. `serve` is the functional form (fresh outputs; allocates).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from attncc.ops.serving.compiled import ServePlan, ServingAttention

Tensor = torch.Tensor
_KERNELS: dict[str, ServingAttention] = {}
_PLANS: weakref.WeakValueDictionary[str, ServePlan] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()
INPUTS = ("page_table", "kv_len", "cu_seqlens_q", "cu_seqlens_k", "mem_k", "mem_v",
          "head_kv_len", "k_stream", "v_stream")  # the op's optional inputs, in schema order


def register(attn: ServingAttention) -> str:
    """Put `attn` in the registry under its key (the latest compile of a spec wins)."""
    key = f"serve_{attn.spec.tag}-{attn.spec.key}"
    _KERNELS[key] = attn
    return key


def register_plan(plan: ServePlan) -> str:
    """A name for `plan` that an op call can carry (held weakly: a dropped plan is gone)."""
    key = f"plan{next(_COUNTER)}"
    _PLANS[key] = plan
    return key


def _lookup(kernel: str, plan: str) -> tuple[ServingAttention, ServePlan]:
    if kernel not in _KERNELS:
        raise ValueError(f"kernel: expected the key of a serving attention compiled in this "
                         f"process, got {kernel!r}; call attncc.compile(spec) first")
    if plan not in _PLANS:
        raise ValueError(f"plan: expected the key of a live ServePlan of this process, got "
                         f"{plan!r}; call attn.plan(...) first and keep the plan alive")
    return _KERNELS[kernel], _PLANS[plan]


def run(attn: ServingAttention, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor,
        kv_layout: str, inputs: dict[str, Tensor | None]) -> None:
    """`attn.run` on its plan: the op while torch.compile / torch.export traces, else the
    implementation directly (no dispatcher: nothing but the launches on the host)."""
    if torch.compiler.is_compiling():
        torch.ops.attncc.serve_run(attn.key, plan.key, plan.o, plan.lse, plan.o_part,
                                   plan.lse_part, q, k, v, *(inputs[n] for n in INPUTS),
                                   kv_layout)
    else:
        _launch(attn, plan, q, k, v, kv_layout, inputs)


def serve(attn: ServingAttention, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor, *,
          kv_layout: str = "nhd", **inputs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The functional form: (o, lse or None) in fresh tensors shaped like the plan's outputs,
    the partials in fresh scratch too, so nothing of the plan is overwritten (allocates)."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise TypeError(f"inputs: expected keywords among {INPUTS}, got {sorted(unknown)}")
    fresh = [None if t is None else torch.empty_like(t)
             for t in (plan.o, plan.lse, plan.o_part, plan.lse_part)]
    torch.ops.attncc.serve_run(attn.key, plan.key, *fresh, q, k, v,
                               *(inputs.get(n) for n in INPUTS), kv_layout)
    return fresh[0], fresh[1]


def _launch(attn: ServingAttention, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor,
            kv_layout: str, inputs: dict[str, Any]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: serving kernels are inference only (no autograd "
                             f"formula); got a tensor that requires grad: use torch.no_grad() "
                             f"or .detach(), or the differentiable CompiledAttention")
    attn.kernels.run(plan, q, k, v, kv_layout, inputs)


RUN_SCHEMA = ("(str kernel, str plan, Tensor(a!) o, Tensor(b!)? lse, Tensor(c!)? o_part, "
              "Tensor(d!)? lse_part, Tensor q, Tensor k, Tensor v, Tensor? page_table, "
              "Tensor? kv_len, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? mem_k, "
              "Tensor? mem_v, Tensor? head_kv_len, Tensor? k_stream, Tensor? v_stream, "
              "str kv_layout) -> ()")


@torch.library.custom_op("attncc::serve_run", mutates_args=("o", "lse", "o_part", "lse_part"),
                         schema=RUN_SCHEMA)
def serve_run(kernel: str, plan: str, o: Tensor, lse: Tensor | None, o_part: Tensor | None,
              lse_part: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
              page_table: Tensor | None, kv_len: Tensor | None, cu_seqlens_q: Tensor | None,
              cu_seqlens_k: Tensor | None, mem_k: Tensor | None, mem_v: Tensor | None,
              head_kv_len: Tensor | None, k_stream: Tensor | None, v_stream: Tensor | None,
              kv_layout: str) -> None:
    attn, p = _lookup(kernel, plan)
    buffers = {"o": o, "lse": lse, "o_part": o_part, "lse_part": lse_part}
    for name, t in buffers.items():
        want = getattr(p, name)
        if (t is None) != (want is None) or (t is not None and (
                t.shape != want.shape or t.dtype != want.dtype or t.device != want.device)):
            got = None if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
            exp = None if want is None else f"{tuple(want.shape)} {want.dtype} on {want.device}"
            raise ValueError(f"{name}: expected a buffer like the plan's ({exp}), got {got}")
    if any(buffers[n] is not getattr(p, n) for n in buffers):  # clones under functionalization
        p = dataclasses.replace(p, **buffers)
    values = (page_table, kv_len, cu_seqlens_q, cu_seqlens_k, mem_k, mem_v, head_kv_len,
              k_stream, v_stream)
    _launch(attn, p, q, k, v, kv_layout, dict(zip(INPUTS, values)))


@serve_run.register_fake
def _serve_run_fake(kernel, plan, o, lse, o_part, lse_part, q, k, v, page_table, kv_len,
                    cu_seqlens_q, cu_seqlens_k, mem_k, mem_v, head_kv_len, k_stream, v_stream,
                    kv_layout):
    return None
