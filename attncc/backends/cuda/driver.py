"""Load a cubin and launch its kernel through the CUDA driver API, with no C++ extension.

Loading goes through Triton's active driver (`load_binary`: the module onto the current
device's primary context, the function handle, and the opt-in to more than 48 KiB of dynamic
shared memory); launching is `cuLaunchKernel` through ctypes, on the stream Triton's driver
names current (torch's). The fake driver of benchmarks/fake_cuda.py replaces `launch_kernel`
and Triton's driver, so a CPU runs all of a launch except the driver calls.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# C type of each argument kind a kernel takes (see `forward.CudaForward.arguments`)
CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
          "f32": ctypes.c_float}


@dataclass(frozen=True)
class LoadedKernel:
    name: str
    function: int  # CUfunction handle
    threads: int
    smem: int  # dynamic shared memory bytes


def load_kernel(image: bytes, name: str, threads: int, smem: int, device_index: int
                ) -> LoadedKernel:
    """The kernel `name` of the cubin `image`, loaded onto device `device_index`."""
    from triton.runtime import driver

    loaded = driver.active.utils.load_binary(name, image, smem, device_index)
    return LoadedKernel(name, loaded[1], threads, smem)


def current_stream(device_index: int) -> int:
    from triton.runtime import driver

    return driver.active.get_current_stream(device_index)


@functools.cache
def _libcuda() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 6, ctypes.c_uint,
                                   ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_void_p]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def launch_kernel(kernel: LoadedKernel, grid: tuple[int, int, int], stream: int,
                  args: Sequence[tuple[str, Any]]) -> None:
    """cuLaunchKernel(kernel, grid, (threads, 1, 1), smem, stream, args); args are
    (kind, value) with kind in CTYPES. RuntimeError naming the kernel on a driver error."""
    lib = _libcuda()
    holders = [CTYPES[kind](value) for kind, value in args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    err = lib.cuLaunchKernel(kernel.function, grid[0], grid[1], grid[2], kernel.threads, 1, 1,
                             kernel.smem, stream, params, None)
    if err != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(err, ctypes.byref(text))
        raise RuntimeError(f"{kernel.name}: cuLaunchKernel failed with CUDA error {err} "
                           f"({(text.value or b'?').decode()}), grid {grid}")
