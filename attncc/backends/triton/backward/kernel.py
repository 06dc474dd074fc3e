"""The Triton backward of a softmax attention: source from the disk cache (one per plan and set
of grad-requiring captures), module loaded once per process, two launches per call.

`launch` runs the dq kernel (dq and the captured-tensor contributions) and the dk/dv kernel (one
program per kv tile of one (batch, kv head), summing its GQA group in-program): no atomics, so
dq, dk, dv and capture gradients are bitwise reproducible. Tile sizes are chosen here by head
dim (`choose_backward`): the dk/dv kernel keeps k, v and their fp32 gradients resident while
streaming q and do, so it needs smaller tiles than the forward. On a GPU `attncc build` can
target, both run their prebuilt binaries (`attncc.backends.triton.prebuilt`), not Triton's JIT.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

from attncc.backends.triton import prebuilt
from attncc.backends.triton.launch_spec import (BACKWARD_ALIGNED, BACKWARD_UNIT_STRIDES, Variant,
                                                backward_constexprs, choose_variant)
from attncc.backends.triton.forward import (BACKEND, TritonForward, argument_values,
                                            prebuilt_arch, version_stamp)
from attncc.backends.triton.backward.render import (
    backward_arguments,
    fixed_arguments,
    grad_loads,
    kernel_name,
    render,
    template_hash,
)
from attncc.backends.triton.direct import DirectKernels
from attncc.backends.triton.prebuilt_targets import backward_target
from attncc.backends.triton.printer import PRINTER_VERSION
from attncc.backends.triton.source import CachedSource, load_module
from attncc.ir.nodes import Schedule
from attncc.ir.plan import KernelPlan
from attncc.passes.select_tiles import fit_shared_memory, padded


def cache_key(plan: KernelPlan, grad_captures: Sequence[str]) -> str:
    """Canonical IR hash + backward template bytes + grad set + backend + versions."""
    text = "\n".join([plan.spec.key, template_hash(), "backward", ",".join(grad_captures),
                      BACKEND, version_stamp(), f"printer={PRINTER_VERSION}"])
    return hashlib.sha256(text.encode()).hexdigest()


def _shared_bytes(bm: int, bn: int, stages: int, dqk: int, dv: int, elem: int) -> int:
    """dk/dv kernel: resident k, v tiles plus q and do tiles per pipeline stage."""
    return elem * (bn * (dqk + dv) + stages * bm * (dqk + dv))


def choose_backward(target: str, dtype: str, dqk: int, dv: int) -> Schedule:
    """Backward tiles by head dim, shrunk until the dk/dv kernel fits the target's shared
    memory; the interpreter gets 64 x 64 tiles (fewer, larger tiles run faster on the CPU).
    Not tuned on a GPU yet (none was lent): chosen from compiled register and spill counts
    (d <= 64: no spills; d128 64 x 64 / 8 warps spills ~184 B/thread in dk/dv, 32 x 32 none
    but a quarter of the tensor-core work per tile)."""
    if target == "interpreter":
        return Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1)
    d, elem = max(padded(dqk), padded(dv)), 4 if dtype == "float32" else 2
    if d <= 64:
        bm, bn, warps, stages = 64, 64, 4, 2
    elif d <= 128:
        bm, bn, warps, stages = 64, 64, 8, 2 if target == "sm90" else 1
    else:  # 8 warps: 4 spill ~144 B/thread in dk/dv at d256 (sm_90 compile, cuobjdump)
        bm, bn, warps, stages = 32, 32, 8, 1
    if elem == 4:
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    return fit_shared_memory(Schedule(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages),
                             target, lambda sc: _shared_bytes(sc.block_m, sc.block_n,
                                                              sc.num_stages, padded(dqk),
                                                              padded(dv), elem))


class TritonBackward:
    """The backward kernels of one forward plan for one set of grad-requiring captures."""

    def __init__(self, forward: TritonForward, grad_captures: Sequence[str]) -> None:
        self.plan = forward.plan
        self.grad_captures = tuple(sorted(grad_captures))
        self.loads, _ = grad_loads(self.plan, self.grad_captures)
        self.name = kernel_name(self.plan, self.grad_captures)
        self.kernel = CachedSource(
            cache_key(self.plan, self.grad_captures), self.name,
            lambda: {"kernel.py": render(self.plan, self.grad_captures).encode()},
            {"backend": BACKEND, "spec": self.plan.spec.text(), "kind": "backward",
             "grad_captures": list(self.grad_captures)})
        self.entry = self.kernel.entry
        self._module: ModuleType | None = None
        self._schedules: dict[tuple, Schedule] = {}
        self._prebuilt = DirectKernels()
        # every argument's name in order (names do not depend on the dtype)
        self.argument_names = [n for n, _ in fixed_arguments("float16")
                               + backward_arguments(self.plan, self.loads)]

    @property
    def source(self) -> str:
        return self.kernel.source

    def functions(self) -> tuple[Any, Any]:
        """(dq kernel, dk/dv kernel) as triton JITFunctions."""
        if self._module is None:
            self._module = load_module(str(self.entry.files["kernel.py"]), self.name)
        return getattr(self._module, self.name + "_dq"), getattr(self._module,
                                                                 self.name + "_dkdv")

    def schedule(self, dtype: str, dqk: int, dv: int, target: str) -> Schedule:
        key = (dtype, dqk, dv, target)
        if key not in self._schedules:
            chosen = choose_backward(target, dtype, dqk, dv)
            user = self.plan.spec.schedule  # fields the user fixed apply to both directions
            self._schedules[key] = dataclasses.replace(chosen, **{
                f.name: getattr(user, f.name) for f in dataclasses.fields(user)
                if getattr(user, f.name) not in (None, False)})
        return self._schedules[key]

    def buffers(self, B: int, Hq: int, Lq: int, Lk: int, block_m: int,
                device: torch.device) -> list[torch.Tensor]:
        """One fp32 buffer per grad load, in `self.loads` order (see triton_backward_grads)."""
        n_m = -(-Lq // block_m)
        shapes = {"reduced": (B * Hq, n_m), "kv": (B, Hq, Lk), "tile": (B, Hq, Lq, Lk)}
        return [torch.zeros(shapes[g.kind], dtype=torch.float32, device=device)
                for g in self.loads]

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
               lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
               dv: torch.Tensor, *, sched: Schedule, sm_scale: float,
               params: Mapping[str, int | float], tensors: Mapping[str, torch.Tensor],
               kv_tiles: torch.Tensor | None, q_tiles: torch.Tensor | None,
               positions: tuple[torch.Tensor, torch.Tensor] | None, gather_rows: bool,
               upcast_dot: bool) -> list[torch.Tensor]:
        """q/k/v/do/dq/dk/dv BHSD views (any strides); lse, delta fp32 [B, Hq, Lq] contiguous,
        rows in the kernel's layout order (as the forward wrote lse). Returns the grad-load
        buffers, filled."""
        B, Hq, Lq, dqk = q.shape
        Hkv, Lk, d_v = k.shape[1], k.shape[2], v.shape[3]
        bufs = self.buffers(B, Hq, Lq, Lk, sched.block_m, q.device)
        values = argument_values(self.plan, params, tensors, kv_tiles, positions)
        if q_tiles is not None:
            values += [q_tiles, *(q_tiles.stride(axis) for axis in range(4))]
        values += bufs
        expected = len(backward_arguments(self.plan, self.loads))
        assert len(values) == expected, (len(values), expected)
        constexprs = backward_constexprs(sched, dqk, d_v, upcast_dot=upcast_dot,
                                         gather_rows=gather_rows)
        args = (q, k, v, do, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
                Lq, Lk, Hq, Hkv, float(sm_scale), *values)
        grids = {"dq": (-(-Lq // sched.block_m), B * Hq), "dkdv": (-(-Lk // sched.block_n),
                                                                  B * Hkv)}
        if prebuilt_arch(q.device) is not None:
            dtype = str(q.dtype).removeprefix("torch.")
            named = dict(zip(self.argument_names, args, strict=True)) | constexprs
            variant = choose_variant(named, BACKWARD_ALIGNED, BACKWARD_UNIT_STRIDES,
                                     gather_rows=gather_rows)
            for kernel, grid in grids.items():
                self._run_prebuilt(kernel, grid, named, q.device, (dtype, dqk, d_v), variant)
            return bufs
        dq_fn, dkdv_fn = self.functions()  # the interpreter, or a GPU attncc build cannot target
        launch = dict(num_warps=sched.num_warps, num_stages=sched.num_stages, **constexprs)
        dq_fn[grids["dq"]](*args, **launch)
        dkdv_fn[grids["dkdv"]](*args, **launch)
        return bufs

    def _run_prebuilt(self, kernel: str, grid: tuple[int, int], values: Mapping[str, Any],
                      device: torch.device, signature: tuple[str, int, int],
                      variant: Variant) -> None:
        """Launch the prebuilt `kernel` ("dq" | "dkdv") binary (see
        `attncc.backends.triton.prebuilt`)."""
        arch = prebuilt_arch(device)

        def load():
            dq_fn, dkdv_fn = self.functions()
            target = backward_target(self, kernel, *signature, arch, variant)
            return prebuilt.direct_kernel(target, dq_fn if kernel == "dq" else dkdv_fn)

        self._prebuilt.launch((kernel, signature, arch, variant), device, load, grid, values)

