"""Linear-recurrence attention (docs/catalog.md, L1-L7) as `torch.library` custom ops:
`attncc::linear_fwd` and `attncc::linear_bwd`, with fake (shape-only) implementations and an
autograd formula, so `CompiledLinearAttention` is differentiable, compiles under
`torch.compile(fullgraph=True)` as one graph node and survives `torch.export`.

    linear_fwd(str kernel, Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta,
               Tensor? initial_state, Tensor? cu_seqlens, Tensor? scale, bool return_state,
               str backend) -> (Tensor o, Tensor final_state)

`kernel` names a `CompiledLinearAttention` in this process's registry: `linear_<rule>-<spec key>`.
Shapes as `CompiledLinearAttention`: q, k [B, H, L, Dk], v [B, H, L, Dv] (or packed [T, H, D]
with `cu_seqlens` [N + 1]); o like v in q's dtype; final_state fp32 [B or N, H, F, Dv'] (fp64 for
fp64 inputs on the reference), or an empty fp32 [0] when `return_state` is False (an op returns
no None). `scale` is an optional one-element float64 CPU tensor read on the host, so a new value
is data, never a recompile. The backward op returns dq, dk, dv and the gradients of g, beta and
initial_state for those given (in that order): the generated backward kernel, or autograd through
the reference (backend "reference", or a rule without a backward kernel, with a warning).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from attncc.backends import registry
from attncc.ops.op_registry import OpRegistry
from attncc.ops.softmax.custom_op import _autograd_dispatch
from attncc.validate import check_devices, check_scale

if TYPE_CHECKING:
    from attncc.ops.linear.compiled import CompiledLinearAttention

Tensor = torch.Tensor
_REGISTRY: OpRegistry[CompiledLinearAttention] = OpRegistry("a linear attention")
calling, lookup = _REGISTRY.calling, _REGISTRY.lookup
OPTIONAL = ("g", "beta", "initial_state")  # the inputs besides q, k, v that have gradients


def register(attn: CompiledLinearAttention) -> str:
    """Put `attn` in the registry under its key (`attncc.ops.op_registry`)."""
    return _REGISTRY.register(f"linear_{attn.node.rule}-{attn.spec.key}", attn)


def scale_tensor(scale: float | Tensor | None) -> Tensor | None:
    """The op's `scale`: None (the rule's default), or a one-element float64 CPU tensor."""
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or scale.device.type != "cpu" or not scale.is_floating_point():
            raise TypeError(f"scale: expected a number or a one-element floating CPU tensor (read "
                            f"on the host), got a tensor of shape {tuple(scale.shape)}, "
                            f"{scale.dtype} on {scale.device}")
        return scale.reshape(()).to(torch.float64)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a number, a one-element CPU tensor or None, "
                        f"got {type(scale).__name__}")
    check_scale(scale)
    return torch.tensor(float(scale), dtype=torch.float64)


def linear(attn: CompiledLinearAttention, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
           beta: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor | None,
           scale: float | Tensor | None, return_state: bool, backend: str
           ) -> tuple[Tensor, Tensor]:
    """Call `attncc::linear_fwd` for `attn` (eagerly: `attn` itself, not the registry's)."""
    check_devices(q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                  cu_seqlens=cu_seqlens)
    args = (attn.key, q, k, v, g, beta, initial_state, cu_seqlens, scale_tensor(scale),
            return_state, backend)
    if torch.compiler.is_compiling():  # the graph names the kernel by its key
        return torch.ops.attncc.linear_fwd(*args)
    with calling(attn):
        return torch.ops.attncc.linear_fwd(*args)


def _host_scale(scale: Tensor | None) -> float | None:
    return None if scale is None else float(scale.item())


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _not_an_alias(out: Tensor, inputs: tuple[Tensor | None, ...]) -> Tensor:
    """A custom op may not return its input: the reference hands back the initial state
    itself when there is no token to step through."""
    ptr = out.untyped_storage().data_ptr()
    if out.numel() and any(x is not None and x.numel() and
                           x.untyped_storage().data_ptr() == ptr for x in inputs):
        return out.clone()
    return out


FWD_SCHEMA = ("(str kernel, Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, "
              "Tensor? initial_state, Tensor? cu_seqlens, Tensor? scale, bool return_state, "
              "str backend) -> (Tensor, Tensor)")
BWD_SCHEMA = ("(str kernel, Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, "
              "Tensor? initial_state, Tensor? cu_seqlens, Tensor? scale, Tensor? o, "
              "Tensor grad_o, Tensor? grad_state, str backend) "
              "-> (Tensor, Tensor, Tensor, Tensor[])")


@torch.library.custom_op("attncc::linear_fwd", mutates_args=(), schema=FWD_SCHEMA)
def linear_fwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
               beta: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor | None,
               scale: Tensor | None, return_state: bool, backend: str
               ) -> tuple[Tensor, Tensor]:
    o, state = lookup(kernel).run(q, k, v, g=g, beta=beta, scale=_host_scale(scale),
                                  initial_state=initial_state, cu_seqlens=cu_seqlens,
                                  return_state=return_state, backend=backend)
    if state is None:
        state = torch.empty(0, dtype=torch.float32, device=q.device)
    else:
        state = _not_an_alias(state.to(_state_dtype(q)), (initial_state,))
    return _not_an_alias(o, (q, k, v)), state


@linear_fwd.register_fake
def _linear_fwd_fake(kernel, q, k, v, g, beta, initial_state, cu_seqlens, scale, return_state,
                     backend):
    node = lookup(kernel).node
    o = q.new_empty(v.shape[:-1] + (v.shape[-1],))
    if not return_state:
        return o, q.new_empty((0,), dtype=torch.float32)
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    shape = (batch, q.shape[1], node.feature_dim(q.shape[-1]), node.state_dv(v.shape[-1]))
    return o, q.new_empty(shape, dtype=_state_dtype(q))


@torch.library.custom_op("attncc::linear_bwd", mutates_args=(), schema=BWD_SCHEMA)
def linear_bwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None,
               beta: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor | None,
               scale: Tensor | None, o: Tensor | None, grad_o: Tensor,
               grad_state: Tensor | None, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq, dk, dv and [dg, dbeta, d initial_state] for those given, each in its input's dtype:
    the backward of the backend the forward ran (a rule without a backward kernel
    differentiates the reference, with a warning)."""
    attn = lookup(kernel)
    given = dict(zip(("q", "k", "v", *OPTIONAL), (q, k, v, g, beta, initial_state)))
    args = {"o": o, "g": g, "beta": beta, "scale": _host_scale(scale),
            "initial_state": initial_state, "d_final_state": grad_state, "cu_seqlens": cu_seqlens}
    family = attn.family(backend, q.device, warn=False)  # the forward's choice, warned already
    if family.no_backward is not None:  # the forward ran a kernel: say why its backward won't
        warnings.warn(f"{attn.node.text()}: differentiating the PyTorch reference (slow "
                      f"path): {family.no_backward}", stacklevel=2)
        family = attn.families[registry.FALLBACK]
    if family.backend.compiles:
        grads = family.backward(q, k, v, grad_o, **args)
    else:  # autograd through the reference: undo the op's autograd exclusion
        with _autograd_dispatch():
            grads = family.backward(q, k, v, grad_o, **args)
    out = {n: grads[n].to(x.dtype) for n, x in given.items() if x is not None}
    return out["q"], out["k"], out["v"], [out[n] for n in OPTIONAL if n in out]


@linear_bwd.register_fake
def _linear_bwd_fake(kernel, q, k, v, g, beta, initial_state, cu_seqlens, scale, o, grad_o,
                     grad_state, backend):
    rest = [x.new_empty(x.shape) for x in (g, beta, initial_state) if x is not None]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), rest


def _setup_context(ctx, inputs, output) -> None:
    kernel, q, k, v, g, beta, initial_state, cu_seqlens, scale, return_state, backend = inputs
    o, _ = output
    ctx.meta = (kernel, return_state, backend)
    keep_o = o if lookup(kernel).node.normalize else None  # the normaliser's backward reads o
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, scale, keep_o)


def _backward(ctx, do: Tensor, d_state: Tensor):
    kernel, return_state, backend = ctx.meta
    q, k, v, g, beta, initial_state, cu_seqlens, scale, o = ctx.saved_tensors
    dq, dk, dv, rest = torch.ops.attncc.linear_bwd(
        kernel, q, k, v, g, beta, initial_state, cu_seqlens, scale, o, do,
        d_state if return_state else None, backend)
    it = iter(rest)
    dg, dbeta, ds0 = (None if x is None else next(it) for x in (g, beta, initial_state))
    return None, dq, dk, dv, dg, dbeta, ds0, None, None, None, None


linear_fwd.register_autograd(_backward, setup_context=_setup_context)
