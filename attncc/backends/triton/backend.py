"""The Triton backend's entry: the `Backend` object (`attncc.backends.base`) that
`attncc.backends.registry` names "triton". Its kernels run on CUDA tensors, or on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1); ahead of time it builds GPU binaries into the
disk cache (`attncc.backends.triton.prebuilt`)."""

from __future__ import annotations

from typing import Any

import torch

from attncc import config
from attncc.backends.base import Source, Unsupported
from attncc.backends.triton import build, prebuilt
from attncc.backends.triton.aot import CompiledArtifact
from attncc.backends.triton.linear.family import TritonLinear
from attncc.backends.triton.serve_run import TritonServing
from attncc.backends.triton.softmax import TritonSoftmax
from attncc.ir.linear import LinearState
from attncc.ir.plan import KernelPlan
from attncc.ir.positions import Positions
from attncc.ir.spec import AttentionSpec


class TritonBackend:
    """Generated Triton kernels for every family: softmax, linear recurrence, serving."""

    name = "triton"
    compiles = True

    def runs_on(self, device: torch.device) -> str | None:
        if device.type == "cuda" or config.triton_interpret():
            return None
        return "CPU tensors and TRITON_INTERPRET is not set"

    def softmax(self, plan: KernelPlan, spec: AttentionSpec,
                positions: Positions | None) -> TritonSoftmax:
        return TritonSoftmax(self, plan, spec, positions)

    def linear(self, node: LinearState) -> TritonLinear:
        return TritonLinear(self, node)

    def serving(self, plan: KernelPlan) -> TritonServing:
        return TritonServing(self, plan)

    def render(self, family: Any) -> list[Source]:
        if not isinstance(family, TritonSoftmax):
            raise Unsupported(f"backend 'triton': no source listing for {type(family).__name__}")
        return family.sources()

    def targets(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int, arch: int,
                *, backward: bool = False) -> list[prebuilt.Target]:
        return build.build_targets(family.kernel, dtype, head_dim_qk, head_dim_v, arch,
                                   backward=backward)

    def build(self, target: prebuilt.Target) -> prebuilt.Prebuilt:
        return prebuilt.load_or_compile_target(target)

    def precompile(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int | None,
                   arch: int | str | None, *, backward: bool = False) -> CompiledArtifact:
        return build.precompile(family.kernel, dtype, head_dim_qk, head_dim_v, arch,
                                backward=backward)


BACKEND = TritonBackend()
