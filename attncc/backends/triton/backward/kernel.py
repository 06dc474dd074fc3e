"""The Triton backward of a softmax attention: source from the disk cache (one per plan and set
of grad-requiring captures), module loaded once per process, two launches per call.

`launch` runs the dq kernel (dq and the captured-tensor contributions) and the dk/dv kernel (one
program per kv tile of one (batch, kv head), summing its GQA group in-program): no atomics, so
dq, dk, dv and capture gradients are bitwise reproducible. Tile sizes come from
`attncc.passes.select_tiles.choose_backward`: the dk/dv kernel keeps k, v and their fp32
gradients resident while streaming q and do, so it needs smaller tiles than the forward; the dq
kernel keeps q and do resident and takes its own tiles (each launch gets its kernel's). On a
GPU `attncc build` can target, both run their prebuilt binaries
(`attncc.backends.triton.prebuilt`), not Triton's JIT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

from attncc.backends.triton import prebuilt
from attncc.backends.triton.launch_spec import (BACKWARD_ALIGNED, BACKWARD_STRIDES,
                                                BACKWARD_UNIT_STRIDES, Variant,
                                                backward_constexprs, choose_variant)
from attncc.backends import keys
from attncc.backends.triton.forward import BACKEND, TritonForward, argument_values, prebuilt_arch
from attncc.backends.triton.backward.render import (
    TEMPLATES,
    backward_arguments,
    fixed_arguments,
    grad_loads,
    kernel_name,
    render,
)
from attncc.backends.triton.direct import DirectKernels
from attncc.backends.triton.prebuilt_targets import backward_target
from attncc.backends.triton.printer import PRINTER_VERSION
from attncc.backends.triton.source import CachedSource, load_module
from attncc.backends.triton.templating import template_hash
from attncc.ir.nodes import Schedule
from attncc.ir.plan import KernelPlan
from attncc.passes.select_tiles import choose_backward


def source_key(plan: KernelPlan, grad_captures: Sequence[str]) -> str:
    """The cache key of the backward source of `plan` for the grad set `grad_captures`."""
    return keys.cache_key(f"{BACKEND}-backward", plan.spec.key,
                          templates=template_hash(TEMPLATES), printer=PRINTER_VERSION,
                          extra=[f"grads={','.join(grad_captures)}"])


class TritonBackward:
    """The backward kernels of one forward plan for one set of grad-requiring captures."""

    def __init__(self, forward: TritonForward, grad_captures: Sequence[str]) -> None:
        self.plan = forward.plan
        self.grad_captures = tuple(sorted(grad_captures))
        self.loads, _ = grad_loads(self.plan, self.grad_captures)
        self.name = kernel_name(self.plan, self.grad_captures)
        self.kernel = CachedSource(
            source_key(self.plan, self.grad_captures), self.name,
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

    def schedule(self, dtype: str, dqk: int, dv: int, target: str, kernel: str) -> Schedule:
        """The tiles of `kernel` ("dq" | "dkdv") for one signature."""
        key = (dtype, dqk, dv, target, kernel)
        if key not in self._schedules:
            chosen = choose_backward(target, dtype, dqk, dv, kernel)
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
               dv: torch.Tensor, *, scheds: Mapping[str, Schedule], sm_scale: float,
               params: Mapping[str, int | float], tensors: Mapping[str, torch.Tensor],
               kv_tiles: torch.Tensor | None, q_tiles: torch.Tensor | None,
               positions: tuple[torch.Tensor, torch.Tensor] | None, gather_rows: bool,
               upcast_dot: bool) -> list[torch.Tensor]:
        """q/k/v/do/dq/dk/dv BHSD views (any strides); lse, delta fp32 [B, Hq, Lq] contiguous,
        rows in the kernel's layout order (as the forward wrote lse); `scheds`: each kernel's
        ("dq", "dkdv") tiles; `kv_tiles`: the block map at dq's tiles, `q_tiles`: the transposed
        one at dk/dv's (each kernel reads only its own). Returns the grad-load buffers, filled."""
        B, Hq, Lq, dqk = q.shape
        Hkv, Lk, d_v = k.shape[1], k.shape[2], v.shape[3]
        bufs = self.buffers(B, Hq, Lq, Lk, scheds["dq"].block_m, q.device)
        values = argument_values(self.plan, params, tensors, kv_tiles, positions)
        if q_tiles is not None:
            values += [q_tiles, *(q_tiles.stride(axis) for axis in range(4))]
        values += bufs
        expected = len(backward_arguments(self.plan, self.loads))
        assert len(values) == expected, (len(values), expected)
        args = (q, k, v, do, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
                Lq, Lk, Hq, Hkv, float(sm_scale), *values)
        constexprs = {kernel: backward_constexprs(sched, dqk, d_v, upcast_dot=upcast_dot,
                                                  gather_rows=gather_rows)
                      for kernel, sched in scheds.items()}
        grids = {"dq": (-(-Lq // scheds["dq"].block_m), B * Hq),
                 "dkdv": (-(-Lk // scheds["dkdv"].block_n), B * Hkv)}
        if prebuilt_arch(q.device) is not None:
            dtype = keys.dtype_name(q.dtype)
            named = dict(zip(self.argument_names, args, strict=True))
            variant = choose_variant(named | constexprs["dq"], BACKWARD_ALIGNED,
                                     BACKWARD_UNIT_STRIDES, BACKWARD_STRIDES,
                                     gather_rows=gather_rows)
            for kernel, grid in grids.items():
                self._run_prebuilt(kernel, grid, named | constexprs[kernel], q.device,
                                   (dtype, dqk, d_v), variant)
            return bufs
        functions = dict(zip(("dq", "dkdv"), self.functions()))  # the interpreter, or a GPU
        for kernel, grid in grids.items():  # attncc build cannot target
            functions[kernel][grid](*args, num_warps=scheds[kernel].num_warps,
                                    num_stages=scheds[kernel].num_stages, **constexprs[kernel])
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

