"""The CUDA backend's forward kernel of one plan: its source in the disk cache (rendered on
first use, not when the spec is compiled: every `attncc.compile` asks each backend for a
family), its cubins per (arch, dtype, head dim), and one launch per call through `driver`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attncc.backends import cache, keys
from attncc.backends.cuda import binary, driver, tensor_map
from attncc.backends.cuda.render import (HEADERS, check_head_dims, kernel_arguments,
                                         kernel_name, render, source_key, template_text)
from attncc.ir.plan import KernelPlan

DTYPES = ("float16", "bfloat16")
ALIGN = 8  # elements (16 bytes): each cp.async moves 8 of them


def device_arch(device: torch.device) -> int:
    """sm_<arch> of `device` (e.g. 90); the fake driver of benchmarks/fake_cuda.py replaces it.
    ValueError for a device that is not a CUDA GPU (before anything is compiled or loaded)."""
    if device.type != "cuda":
        raise ValueError(f"backend 'cuda': runs on CUDA tensors, got {device.type} tensors; "
                         "use backend='triton' (TRITON_INTERPRET=1 on a CPU) or 'reference'")
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class CudaForward:
    def __init__(self, plan: KernelPlan) -> None:
        self.plan = plan
        self.name = kernel_name(plan)
        self.arguments = kernel_arguments(plan)  # (C++ type, name) after the fixed ones
        self._entry: cache.CacheEntry | None = None
        self._kernels: dict[tuple, driver.LoadedKernel] = {}

    @property
    def entry(self) -> cache.CacheEntry:
        """The source entry: kernel.cu and the headers it includes, rendered once."""
        if self._entry is None:
            def build() -> dict[str, bytes]:
                files = {"kernel.cu": render(self.plan).encode()}
                return files | {h: template_text(h).encode() for h in HEADERS}

            self._entry = cache.load_or_build(
                source_key(self.plan), self.name, build,
                extra_meta={"backend": "cuda", "spec": self.plan.spec.text()})
        return self._entry

    @property
    def source(self) -> str:
        return self.entry.files["kernel.cu"].read_text()

    def target(self, dtype: Any, head_dim_qk: int, head_dim_v: int, arch: int,
               tma: bool = True) -> binary.Target:
        """The cubin for this signature; on sm_90 K/V by TMA unless `tma` is False (the
        cp.async variant, for layouts `tensor_map.allows` refuses; `attncc build` makes the
        TMA one)."""
        dtype = keys.parse_dtype(dtype)
        if dtype not in DTYPES:
            raise ValueError(f"backend 'cuda': dtype {dtype} has no CUDA kernel (it has "
                             f"{', '.join(DTYPES)}); use backend='triton'")
        tiles = check_head_dims(head_dim_qk, head_dim_v, arch)
        return binary.Target(self.name, source_key(self.plan), arch, dtype, head_dim_qk,
                             head_dim_v, tiles, source=lambda: self.entry,
                             tma=tma and arch == 90)

    def _kernel(self, q: torch.Tensor, v: torch.Tensor, arch: int, tma: bool
                ) -> driver.LoadedKernel:
        what = (q.dtype, q.shape[3], v.shape[3], q.device, tma)
        kernel = self._kernels.get(what)
        if kernel is None:
            target = self.target(keys.dtype_name(q.dtype), q.shape[3], v.shape[3], arch, tma)
            built = binary.load_or_build(target)
            binary.say_if_compiled(built)
            info = built.info
            kernel = self._kernels[what] = driver.load_kernel(
                built.cubin, info["name"], info["threads"], info["smem"], q.device.index or 0)
        return kernel

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor | None, *, sm_scale: float, params: Mapping[str, int | float],
               tensors: Mapping[str, torch.Tensor]) -> None:
        """q/k/v/o BHSD views whose head dim is contiguous and 16-byte aligned rows; lse fp32
        [B, Hq, Lq] contiguous, or None."""
        arch = device_arch(q.device)  # a CPU tensor stops here
        _check_layout(q=q, k=k, v=v, o=o)
        B, Hq, Lq, _ = q.shape
        args: list[tuple[str, Any]] = [("ptr", t.data_ptr()) for t in (q, k, v, o)]
        args.append(("ptr", lse.data_ptr() if lse is not None else 0))
        for t in (q, k, v, o):
            args += [("i64", s) for s in t.stride()[:3]]
        args += [("i32", Lq), ("i32", k.shape[2]), ("i32", Hq), ("i32", k.shape[1]),
                 ("f32", float(sm_scale))]
        tiles = check_head_dims(q.shape[3], v.shape[3], arch)
        # sm_90: K and V by TMA where both layouts allow a tensor map, else the cp.async cubin
        tma = arch == 90 and tensor_map.allows(k) and tensor_map.allows(v)
        with torch.cuda.device(q.device):  # encode, load and launch in this device's context
            maps = ([tensor_map.encode_bhsd(t, tiles.block_n) for t in (k, v)] if tma
                    else [tensor_map.NONE] * 2)
            args += [("tmap", m) for m in maps]
            args += _extra(self.arguments, params, tensors)
            grid = (-(-Lq // tiles.block_m), B * Hq, 1)
            driver.launch_kernel(self._kernel(q, v, arch, tma), grid,
                                 driver.current_stream(q.device.index or 0), args)


def _check_layout(**tensors: torch.Tensor) -> None:
    """ValueError unless every tensor's head dim is contiguous and its rows (and pointer) are
    16-byte aligned: the kernel copies 8 elements per instruction."""
    for name, t in tensors.items():
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s % ALIGN for s in t.stride()[:3]):
            raise ValueError(f"backend 'cuda': {name} needs a contiguous head dim and strides "
                             f"that are multiples of {ALIGN} elements on a 16-byte aligned "
                             f"pointer (got strides {tuple(t.stride())}, pointer offset "
                             f"{t.data_ptr() % 16}); pass a contiguous tensor or use "
                             "backend='triton'")


def _extra(arguments: list[tuple[str, str]], params: Mapping[str, int | float],
           tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, Any]]:
    """The (kind, value) of each argument after the fixed ones, by its name: `p_<param>`, a
    captured tensor's `cap_<name>_ptr`, `_stride<i>`, `_size<i>`."""
    out: list[tuple[str, Any]] = []
    for ctype, name in arguments:
        if name.startswith("p_"):
            value = params[name[2:]]
            out.append(("i32", int(value)) if ctype == "int" else ("f32", float(value)))
            continue
        cap, _, field = name[len("cap_"):].rpartition("_")
        t = tensors[cap]
        if field == "ptr":
            out.append(("ptr", t.data_ptr()))
        elif field.startswith("stride"):
            out.append(("i32", t.stride(int(field[6:]))))
        else:
            out.append(("i32", t.shape[int(field[4:])]))
    return out
