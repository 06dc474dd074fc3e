"""The CUDA backend's softmax family: the generated forward kernel of one plan. No backward
kernel yet: a backward call is an error naming the Triton backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from attncc.backends.base import Gradients, Source
from attncc.backends.cuda.forward import CudaForward
from attncc.backends.cuda.render import check_plan
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec

if TYPE_CHECKING:
    from attncc.backends.base import Backend
    from attncc.ir.positions import Positions


class CudaSoftmax:
    """`SoftmaxFamily` of the CUDA backend; `kernel` is the `CudaForward`. Made for every spec
    `attncc.compile` sees, so making one only checks the plan: nothing is rendered until a
    source, a build or a launch asks."""

    block_maps = None  # the CUDA kernel reads no run-time block map

    def __init__(self, backend: Backend, plan: KernelPlan, spec: AttentionSpec,
                 positions: Positions | None) -> None:
        check_plan(plan)
        self.backend, self.spec = backend, spec
        self.kernel = CudaForward(plan)
        self.name = self.kernel.name

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, *, sm_scale: float, params: Mapping[str, float | int],
                tensors: Mapping[str, torch.Tensor], reorder_inputs: Mapping[str, torch.Tensor],
                positions: tuple[torch.Tensor, torch.Tensor] | None, permuted: bool,
                visits: torch.Tensor | None = None) -> None:
        if visits is not None:
            raise ValueError("backend 'cuda': visit counting is a Triton kernel feature; use "
                             "backend='triton'")
        if q.shape[2] == 0:
            return
        self.kernel.launch(q, k, v, o, lse, sm_scale=sm_scale, params=params, tensors=tensors)

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None, *,
                 sm_scale: float, params: Mapping[str, float | int],
                 tensors: Mapping[str, torch.Tensor],
                 reorder_inputs: Mapping[str, torch.Tensor], grad_captures: Sequence[str],
                 permuted: bool) -> Gradients:
        raise ValueError(f"backend 'cuda': {self.name} has a forward kernel only (no CUDA "
                         "backward yet); train with backend='triton'")

    def sources(self) -> list[Source]:
        files = self.kernel.entry.files
        return [Source("CUDA source", str(files["kernel.cu"]), self.kernel.source)]
