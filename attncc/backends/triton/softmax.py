"""The Triton backend's softmax family: the generated forward kernel of one plan, its run-time
block maps, and the generated backward kernels (`attncc.backends.triton.backward.launch`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from attncc.backends.base import Gradients, Source, Unsupported
from attncc.backends.triton.backward.launch import triton_backward
from attncc.backends.triton.block_maps import BlockMaps
from attncc.backends.triton.forward import TritonForward
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec

if TYPE_CHECKING:
    from attncc.backends.base import Backend
    from attncc.ir.positions import Positions


class TritonSoftmax:
    """`SoftmaxFamily` of the Triton backend. `kernel`: the `TritonForward` (its source, cache
    entry and launches); `block_maps`: the `BlockMaps` it reads, or None."""

    def __init__(self, backend: Backend, plan: KernelPlan, spec: AttentionSpec,
                 positions: Positions | None) -> None:
        if spec.memory.text() != "dense":
            raise Unsupported(f"memory {spec.memory.text()!r} has no kernel yet")
        self.backend, self.spec, self.positions = backend, spec, positions
        self.kernel = TritonForward(plan)
        self.block_maps = BlockMaps(self.kernel) if plan.block_map else None
        self.name = self.kernel.name

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, *, sm_scale: float, params: Mapping[str, float | int],
                tensors: Mapping[str, torch.Tensor], reorder_inputs: Mapping[str, torch.Tensor],
                positions: tuple[torch.Tensor, torch.Tensor] | None, permuted: bool,
                visits: torch.Tensor | None = None) -> None:
        """Build (or reuse) the block map for this call's tiles, then launch."""
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if Lq == 0:
            return
        kv_tiles = None
        if self.block_maps is not None:
            sched = self.kernel.schedule_for(q, k, v)
            kv_tiles = self.block_maps.get(
                B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, block_m=sched.block_m,
                block_n=sched.block_n, params=params, tensors=tensors, positions=positions,
                device=q.device, prebuilt_for=(str(q.dtype).removeprefix("torch."),
                                               q.shape[3], v.shape[3]))
        self.kernel.launch(q, k, v, o, lse, sm_scale=sm_scale, params=params, tensors=tensors,
                           kv_tiles=kv_tiles, positions=positions, gather_rows=not permuted,
                           visits=visits)

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None, *,
                 sm_scale: float, params: Mapping[str, float | int],
                 tensors: Mapping[str, torch.Tensor],
                 reorder_inputs: Mapping[str, torch.Tensor], grad_captures: Sequence[str],
                 permuted: bool) -> Gradients:
        return triton_backward(self, q, k, v, o, lse, do, dlse, sm_scale=sm_scale,
                               params=params, tensors=tensors, reorder_inputs=reorder_inputs,
                               grad_captures=grad_captures, permuted=permuted)

    def sources(self) -> list[Source]:
        """The forward kernel's source and, when it has one, its block-map kernel's."""
        files = self.kernel.entry.files
        out = [Source("triton source", str(files["kernel.py"]), self.kernel.source)]
        if "block_map.py" in files:
            path = files["block_map.py"]
            out.append(Source("block-map kernel source", str(path), path.read_text()))
        return out
