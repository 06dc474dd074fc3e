"""The CUDA backend's entry: the `Backend` object (`attncc.backends.base`) that
`attncc.backends.registry` names "cuda". Its forward kernels are CUDA C++ (CuTe) rendered
from the same plan as the Triton ones, compiled by nvcc into cubins in the disk cache
(`binary`), and launched through the CUDA driver API (`driver`). They run on CUDA tensors only;
"auto" prefers Triton (registry order) until GPU measurements say otherwise."""

from __future__ import annotations

from typing import Any

import torch

from attncc.backends.base import Source, Unsupported
from attncc.backends.cuda import binary
from attncc.backends.cuda.softmax import CudaSoftmax
from attncc.backends.targets import parse_arch
from attncc.ir.linear import LinearState
from attncc.ir.plan import KernelPlan
from attncc.ir.positions import Positions
from attncc.ir.spec import AttentionSpec


class CudaBackend:
    """Generated CUDA C++ softmax forward kernels (no linear, serving or backward yet)."""

    name = "cuda"
    compiles = True

    def runs_on(self, device: torch.device) -> str | None:
        return None if device.type == "cuda" else "the CUDA backend runs on CUDA tensors only"

    def softmax(self, plan: KernelPlan, spec: AttentionSpec,
                positions: Positions | None) -> CudaSoftmax:
        return CudaSoftmax(self, plan, spec, positions)

    def linear(self, node: LinearState) -> Any:
        raise Unsupported("backend 'cuda': no linear-recurrence kernels; use backend='triton'")

    def serving(self, plan: KernelPlan) -> Any:
        raise Unsupported("backend 'cuda': no serving kernels; use backend='triton'")

    def render(self, family: Any) -> list[Source]:
        if not isinstance(family, CudaSoftmax):
            raise Unsupported(f"backend 'cuda': no source listing for {type(family).__name__}")
        return family.sources()

    def targets(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int, arch: int,
                *, backward: bool = False) -> list[binary.Target]:
        if backward:
            raise Unsupported("backend 'cuda': no backward kernels to build; use "
                              "backend='triton' for `backward = true` entries")
        return [family.kernel.target(dtype, head_dim_qk, head_dim_v, parse_arch(arch))]

    def build(self, target: binary.Target) -> binary.Built:
        return binary.load_or_build(target)

    def precompile(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int | None,
                   arch: int | str | None, *, backward: bool = False) -> binary.Built:
        if arch is None:
            from attncc.backends.cuda.forward import device_arch

            arch = device_arch(torch.device("cuda"))
        target, = self.targets(family, dtype, head_dim_qk, head_dim_v or head_dim_qk, arch,
                               backward=backward)
        return binary.load_or_build(target)


BACKEND = CudaBackend()
