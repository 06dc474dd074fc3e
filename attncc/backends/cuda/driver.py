"""Load a cubin and launch its kernel through the CUDA driver API, with no C++ extension.

Loading goes through Triton's active driver (`load_binary`: the module onto the current
device's primary context, the function handle, and the opt-in to more than 48 KiB of dynamic
shared memory); launching is `cuLaunchKernel` through ctypes, on the stream Triton's driver
names current (torch's), and TMA tensor maps are `cuTensorMapEncodeTiled` through ctypes. The
fake driver of benchmarks/fake_cuda.py replaces `launch_kernel`, `encode_tensor_map` and
Triton's driver, so a CPU runs all of a launch except the driver calls.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# C type of each argument kind a kernel takes (see `forward.CudaForward.arguments`); "tmap": a
# 128-byte CUtensorMap (bytes), passed by value
CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
          "f32": ctypes.c_float}
TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGN = 64  # CUtensorMap is alignas(64)


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
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                                           ctypes.c_void_p, u64p, u64p, u32p, u32p,
                                           *[ctypes.c_int] * 4]
    return lib


def _error_text(lib: Any, err: int) -> str:
    text = ctypes.c_char_p()
    lib.cuGetErrorString(err, ctypes.byref(text))
    return (text.value or b"?").decode()


def _aligned_map(value: bytes = bytes(TENSOR_MAP_BYTES)) -> tuple[Any, int]:
    """A 64-byte aligned 128-byte host buffer holding `value`: (owner to keep alive, address)."""
    owner = (ctypes.c_ubyte * (TENSOR_MAP_BYTES + TENSOR_MAP_ALIGN))()
    address = ctypes.addressof(owner)
    address += -address % TENSOR_MAP_ALIGN
    ctypes.memmove(address, value, TENSOR_MAP_BYTES)
    return owner, address


def encode_tensor_map(data_type: int, address: int, *, dims: Sequence[int],
                      strides: Sequence[int], box: Sequence[int], swizzle: int,
                      l2_promotion: int) -> bytes:
    """cuTensorMapEncodeTiled: the 128-byte CUtensorMap of a tiled tensor at `address` (dims
    innermost first, `strides` in bytes of every dim but the first, `box` elements per copy,
    element strides 1, no interleave, out-of-bounds elements read as zeros). RuntimeError on a
    driver error, with the arguments."""
    lib = _libcuda()
    owner, out = _aligned_map()
    rank = len(dims)
    err = lib.cuTensorMapEncodeTiled(
        out, data_type, rank, address, (ctypes.c_uint64 * rank)(*dims),
        (ctypes.c_uint64 * (rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
        (ctypes.c_uint32 * rank)(*[1] * rank), 0, swizzle, l2_promotion, 0)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUDA error {err} "
                           f"({_error_text(lib, err)}): dims {tuple(dims)}, byte strides "
                           f"{tuple(strides)}, box {tuple(box)}")
    return ctypes.string_at(out, TENSOR_MAP_BYTES)


def launch_kernel(kernel: LoadedKernel, grid: tuple[int, int, int], stream: int,
                  args: Sequence[tuple[str, Any]]) -> None:
    """cuLaunchKernel(kernel, grid, (threads, 1, 1), smem, stream, args); args are
    (kind, value) with kind in CTYPES. RuntimeError naming the kernel on a driver error."""
    lib = _libcuda()
    holders = [_aligned_map(value) if kind == "tmap" else (h := CTYPES[kind](value),
                                                             ctypes.addressof(h))
               for kind, value in args]
    params = (ctypes.c_void_p * len(holders))(*[address for _, address in holders])
    err = lib.cuLaunchKernel(kernel.function, grid[0], grid[1], grid[2], kernel.threads, 1, 1,
                             kernel.smem, stream, params, None)
    if err != 0:
        raise RuntimeError(f"{kernel.name}: cuLaunchKernel failed with CUDA error {err} "
                           f"({_error_text(lib, err)}), grid {grid}")
