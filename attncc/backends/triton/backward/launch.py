"""One Triton backward call of a compiled attention: delta, block maps (one at each kernel's
tiles), the two kernel launches, captured-tensor and sink gradients.

`triton_backward` is the Triton softmax family's backward
(`attncc.backends.triton.softmax.TritonSoftmax.backward`), which the front end's
`attention_backward` runs on CUDA tensors (or under TRITON_INTERPRET=1). A backward variant
is rendered per set of captures that need a gradient and kept per softmax family, so a call with
the same set renders and loads nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from attncc.backends.base import Gradients
from attncc.backends import keys
from attncc.backends.triton.block_maps import q_tile_lists
from attncc.backends.triton.forward import target_of
from attncc.backends.triton.backward.kernel import TritonBackward
from attncc.backends.triton.backward.grads import capture_gradients, sink_gradient

if TYPE_CHECKING:
    from attncc.backends.triton.softmax import TritonSoftmax

_VARIANTS: weakref.WeakKeyDictionary[TritonSoftmax, dict] = weakref.WeakKeyDictionary()


def backward_kernels(attn: TritonSoftmax, score_grads: Sequence[str]) -> TritonBackward:
    """The backward variant of `attn` for the grad-requiring captures its score mod reads."""
    variants = _VARIANTS.setdefault(attn, {})
    key = tuple(sorted(score_grads))
    if key not in variants:
        variants[key] = TritonBackward(attn.kernel, key)
    return variants[key]


def score_reads(attn: TritonSoftmax) -> set[str]:
    score = attn.kernel.plan.spec.score
    return {c.name for c in score.captures} if score is not None else set()


def triton_backward(attn: TritonSoftmax, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                    dlse: torch.Tensor | None, *, sm_scale: float,
                    params: Mapping[str, float | int], tensors: Mapping[str, torch.Tensor],
                    reorder_inputs: Mapping[str, torch.Tensor],
                    grad_captures: Sequence[str], permuted: bool) -> Gradients:
    """q/k/v/o/do BHSD (any strides); lse, dlse [B, Hq, Lq]. See
    `attncc.backends.base.SoftmaxFamily.backward`."""
    B, Hq, Lq, dqk = q.shape
    Hkv, Lk, d_v = k.shape[1], k.shape[2], v.shape[3]
    sink = attn.spec.normaliser.sink
    sink_name = sink.name if sink is not None else None
    kernels = backward_kernels(attn, [n for n in grad_captures if n in score_reads(attn)])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # delta = rowsum(o * do) - dlse: dS = P (dP - delta) covers both outputs' gradients
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), 0.0)
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    captures: dict[str, torch.Tensor] = {}
    if Lq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        target = target_of(q.device)
        dtype = keys.dtype_name(q.dtype)
        scheds = {kernel: kernels.schedule(dtype, dqk, d_v, target, kernel)
                  for kernel in ("dq", "dkdv")}
        positions = (attn.positions.get(Lq, Lk, q.device, dict(reorder_inputs))
                     if attn.positions is not None else None)
        kv_tiles = q_tiles = None
        if attn.block_maps is not None:
            # one map per kernel's tiles, built once when they agree (a map on device tensors
            # is rebuilt on every get)
            maps: dict[tuple[int, int], torch.Tensor] = {}
            for sched in scheds.values():
                tiles = (sched.block_m, sched.block_n)
                if tiles not in maps:
                    maps[tiles] = attn.block_maps.get(
                        B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, block_m=tiles[0], block_n=tiles[1],
                        params=params, tensors=tensors, positions=positions, device=q.device,
                        prebuilt_for=(dtype, dqk, d_v))
            kv_tiles = maps[scheds["dq"].block_m, scheds["dq"].block_n]
            q_tiles = q_tile_lists(maps[scheds["dkdv"].block_m, scheds["dkdv"].block_n])
        # the interpreter's tl.dot multiplies raw bf16 bits (triton-lang/triton#11584)
        upcast = target == "interpreter" and q.dtype == torch.bfloat16
        buffers = kernels.launch(q, k, v, do, lse, delta, dq, dk, dv, scheds=scheds,
                                 sm_scale=sm_scale, params=params, tensors=tensors,
                                 kv_tiles=kv_tiles, q_tiles=q_tiles, positions=positions,
                                 gather_rows=not permuted, upcast_dot=upcast)
        captures = capture_gradients(attn.kernel.plan.spec, kernels.loads, buffers, B=B, Hq=Hq,
                                     Hkv=Hkv, Lq=Lq, Lk=Lk, params=params, tensors=tensors)
    if sink_name in grad_captures:
        g = sink_gradient(tensors[sink_name], lse, delta)
        captures[sink_name] = captures[sink_name] + g if sink_name in captures else g
    out = {}
    for name in grad_captures:  # a capture only the mask reads gets a zero gradient
        t = tensors[name]
        g = captures.get(name)
        out[name] = torch.zeros_like(t) if g is None else g.to(t.dtype).reshape(t.shape)
    return Gradients(dq, dk, dv, out)
