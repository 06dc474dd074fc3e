"""The reference backend's entry: the `Backend` object (`attncc.backends.base`) that
`attncc.backends.registry` names "reference". Plain PyTorch, any device, no generated kernels:
the CPU path and the oracle of every family that has one (softmax, linear recurrence)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attncc.backends.base import ServingFamily, Source, Unsupported, no_ahead_of_time
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_backward import reference_backward
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.reference.softmax import ReferenceSoftmax
from attncc.ir.linear import LinearState
from attncc.ir.plan import KernelPlan
from attncc.ir.positions import Positions
from attncc.ir.spec import AttentionSpec


class ReferenceLinear:
    """`LinearFamily` of the reference backend: the spec's recurrence loop, differentiated by
    autograd (in fp64 for fp64 inputs, else fp32)."""

    name = "reference"
    no_backward: str | None = None
    recurrent = chunked = None  # no generated kernels

    def __init__(self, backend: ReferenceBackend, node: LinearState) -> None:
        self.backend, self.node = backend, node

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None,
                beta: Tensor | None, scale: float | None, initial_state: Tensor | None,
                cu_seqlens: Tensor | None, return_state: bool) -> tuple[Tensor, Tensor | None]:
        args: dict[str, Any] = {"g": g, "beta": beta, "scale": scale,
                                "initial_state": initial_state}
        if cu_seqlens is not None:
            args["cu_seqlens"] = cu_seqlens
        run = varlen_reference if cu_seqlens is not None else recurrent_reference
        return run(q, k, v, self.node, output_final_state=return_state, **args)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, o: Tensor | None,
                 g: Tensor | None, beta: Tensor | None, scale: float | None,
                 initial_state: Tensor | None, d_final_state: Tensor | None,
                 cu_seqlens: Tensor | None) -> dict[str, Tensor | None]:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return reference_backward(q, k, v, self.node, do, g=g, beta=beta, scale=scale,
                                  initial_state=initial_state, d_final_state=d_final_state,
                                  cu_seqlens=cu_seqlens, dtype=dtype)


class ReferenceBackend:
    """Runs everywhere; compiles nothing."""

    name = "reference"
    compiles = False

    def runs_on(self, device: torch.device) -> str | None:
        return None

    def softmax(self, plan: KernelPlan, spec: AttentionSpec,
                positions: Positions | None) -> ReferenceSoftmax:
        return ReferenceSoftmax(self, spec, positions)

    def linear(self, node: LinearState) -> ReferenceLinear:
        return ReferenceLinear(self, node)

    def serving(self, plan: KernelPlan) -> ServingFamily:
        raise Unsupported("backend 'reference': serving plans launch generated kernels; the "
                          "reference oracles of each memory layout are plain functions")

    def render(self, family: Any) -> list[Source]:
        raise no_ahead_of_time(self.name)

    def targets(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int, arch: int,
                *, backward: bool = False) -> list[Any]:
        raise no_ahead_of_time(self.name)

    def build(self, target: Any) -> Any:
        raise no_ahead_of_time(self.name)

    def precompile(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int | None,
                   arch: int | str | None, *, backward: bool = False) -> Any:
        raise no_ahead_of_time(self.name)


BACKEND = ReferenceBackend()
