"""`CompiledAttention`: the callable that `attncc.compile` returns.

Compiling runs the spec passes and renders (or loads from the disk cache) the Triton source.
A call checks its arguments, binds runtime parameters and captured tensors, and launches: on
CUDA tensors the compiled kernel, on CPU tensors the same kernel under Triton's interpreter when
TRITON_INTERPRET=1, otherwise the PyTorch reference (with a warning: it is the slow path).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from attncc import config
from attncc.backends.reference import attention_reference
from attncc.backends.triton_backend import TritonForward
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import TileClasses
from attncc.passes.pipeline import run_spec_passes
from attncc.validate import (LAYOUTS, check_captures, check_qkv, check_scale, index_extents,
                             split_runtime, to_bhsd)

BACKENDS = ("auto", "triton", "reference")


class CompiledAttention:
    """attn(q, k, v, *, return_lse=False, scale=None, layout="bhsd", backend="auto", **runtime)

    q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv] (layout="bshd": [B, L, H, D]).
    Returns o with q's layout and dtype (and lse fp32 [B, Hq, Lq], natural log, when asked).
    `runtime` overrides parameter values (`window=512`) or captured tensors (`doc=new_doc`)
    for this call; neither recompiles.
    """

    def __init__(self, spec: AttentionSpec, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.backend = backend
        self.plan = run_spec_passes(spec)
        self.triton = TritonForward(self.plan) if spec.memory.text() == "dense" else None
        self._warned_reference = False

    @property
    def name(self) -> str:
        return self.triton.name if self.triton else "reference"

    @property
    def tiles(self) -> TileClasses:
        return self.plan.tiles

    def _choose(self, backend: str, device: torch.device) -> str:
        if backend != "auto":
            return backend
        if device.type == "cuda" or config.triton_interpret():
            return "triton"
        if not self._warned_reference:
            warnings.warn(f"{self.name}: CPU tensors and TRITON_INTERPRET is not set, so this "
                          "runs the PyTorch reference (slow path). Use CUDA tensors for the "
                          "compiled kernel or TRITON_INTERPRET=1 to run it on the CPU.",
                          stacklevel=3)
            self._warned_reference = True
        return "reference"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 return_lse: bool = False, scale: float | None = None, layout: str = "bhsd",
                 backend: str | None = None, _visits: torch.Tensor | None = None,
                 **runtime: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
        qb, kb, vb = (to_bhsd(n, t, layout) for n, t in (("q", q), ("k", k), ("v", v)))
        check_qkv(qb, kb, vb)
        check_scale(scale)
        params, tensors = split_runtime(self.spec, runtime)
        B, Hq, Lq, dqk = qb.shape
        check_captures(self.spec, tensors, q.device, index_extents(B, Hq, Lq, kb.shape[2]))
        chosen = self._choose(backend or self.backend, q.device)
        if chosen not in BACKENDS[1:]:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {chosen!r}")
        scale = scale if scale is not None else self.spec.scale
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(dqk)
        if chosen == "reference":
            o, lse = attention_reference(self.spec, qb, kb, vb, scale=sm_scale, params=params,
                                         captures=tensors)
            o, lse = o.to(q.dtype), lse.float()
            o = o.transpose(1, 2) if layout == "bshd" else o
        else:
            if self.triton is None:
                raise ValueError(f"backend 'triton': memory {self.spec.memory.text()!r} has no "
                                 "kernel yet; use backend='reference'")
            o = torch.empty(q.shape[:-1] + (vb.shape[-1],), dtype=q.dtype, device=q.device)
            ob = o.transpose(1, 2) if layout == "bshd" else o
            lse = (torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
                   if return_lse else None)
            if Lq > 0:
                self.triton.launch(qb, kb, vb, ob, lse, sm_scale=sm_scale, params=params,
                                   tensors=tensors, visits=_visits)
        return (o, lse) if return_lse else o

    def __repr__(self) -> str:
        return f"CompiledAttention({self.name})"
