"""A fake CUDA driver for running attncc's host path on a machine without a GPU.

`install()` makes Triton's active driver one whose module loader and launcher do nothing (they
count, and with `install(record=True)` record, what they were given), and makes CPU tensors
launch the sm_90 prebuilt binaries that `attncc build` (or `build.build_targets`) put in
ATTNCC_CACHE_DIR: all of a launch runs for real except the driver calls, so the time a call
takes is attncc's host work plus Triton's launcher up to the point where the real one would call
`cuLaunchKernel`. Used by benchmarks/host_overhead.py (timings) and tests/direct_launch_child.py
(the arguments a launch hands over, the binaries it loads).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

LAUNCHES = [0]  # how many launches the fake launcher received
RECORDED: list[dict] = []  # with install(record=True): one entry per launch
TENSOR_MAPS: list[dict] = []  # with install(record=True): one entry per encoded TMA tensor map
LOADS: list[dict] = []  # one entry per binary loaded onto the fake device
_recording = [False]


def describe(value: Any) -> list:
    """A launch argument as [kind, value]: a tensor's pointer as its offset modulo 16."""
    import torch

    if isinstance(value, torch.Tensor):
        return ["ptr", value.data_ptr() % 16]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    return ["float", value]


class FakeLauncher:
    """Triton's launcher contract (`launcher_cls(src, metadata)`, then
    `launcher(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *arguments)`, constexprs among the arguments); it counts (and records)."""

    def __init__(self, src: Any, metadata: Any) -> None:
        self.types = list(src.signature.values())
        self.name, self.hash = metadata.name, metadata.hash

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args) -> None:
        LAUNCHES[0] += 1
        if _recording[0]:
            RECORDED.append({"name": self.name, "hash": self.hash, "grid": [gx, gy, gz],
                             "function": function, "n_args": len(args),
                             "args": [describe(a) for a, t in zip(args, self.types, strict=True)
                                      if t != "constexpr"]})


class FakeUtils:
    def load_binary(self, name, kernel, shared, device):
        LOADS.append({"name": name, "sha": hashlib.sha256(kernel).hexdigest(),
                      "shared": shared})
        return 1, 2, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000,
                "mem_clock_rate": 2619000, "mem_bus_width": 5120}  # an H100's

    def unload_module(self, module):
        pass


class FakeDriver:
    utils = FakeUtils()
    launcher_cls = FakeLauncher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the fake driver has no timer")

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


def fake_cuda_launch(kernel, grid, stream, args) -> None:
    """The CUDA backend's `driver.launch_kernel` contract; it counts (and records)."""
    LAUNCHES[0] += 1
    if _recording[0]:
        RECORDED.append({"backend": "cuda", "name": kernel.name, "grid": list(grid),
                         "threads": kernel.threads, "smem": kernel.smem,
                         "function": kernel.function, "n_args": len(args),
                         "args": [[kind, _describe_cuda(kind, value)] for kind, value in args]})


def _describe_cuda(kind: str, value: Any) -> Any:
    """A pointer as its offset modulo 16, a tensor map as the index of its record in
    TENSOR_MAPS (-1: the zeros of a cp.async launch), any other value as it is."""
    if kind == "ptr":
        return value % 16
    if kind == "tmap":
        return int.from_bytes(value[:8], "little") - 1 if len(value) == 128 else "bad size"
    return value


def fake_encode_tensor_map(data_type, address, *, dims, strides, box, swizzle, l2_promotion
                           ) -> bytes:
    """The CUDA backend's `driver.encode_tensor_map` contract: 128 bytes whose first 8 hold
    1 + the index of this call's record in TENSOR_MAPS (recorded with install(record=True))."""
    if _recording[0]:
        TENSOR_MAPS.append({"data_type": data_type, "address": address % 16,
                            "dims": list(dims), "strides": list(strides), "box": list(box),
                            "swizzle": swizzle, "l2_promotion": l2_promotion})
    return (len(TENSOR_MAPS)).to_bytes(8, "little") + bytes(120)


def install(record: bool = False) -> None:
    """Triton's driver becomes the fake one, and CPU tensors launch sm_90 prebuilt binaries
    (Triton's and the CUDA backend's); `record`: every launch is also described in RECORDED
    (slower: not for timings)."""
    import torch
    from triton.runtime import driver

    from attncc.backends.cuda import driver as cuda_driver
    from attncc.backends.cuda import forward as cuda_forward

    from attncc.backends.triton import forward as triton_forward
    from attncc.backends.triton import serve_run
    from attncc.backends.triton.backward import kernel as triton_backward
    from attncc.backends.triton.backward import launch as triton_backward_launch

    _recording[0] = record
    driver.set_active(FakeDriver())
    triton_forward.prebuilt_arch = triton_backward.prebuilt_arch = lambda device: 90
    triton_forward.target_of = triton_backward_launch.target_of = lambda device: "sm90"
    # serving kernels launch through Triton's JIT, which compiles for the fake driver's sm_90
    serve_run.target_of = lambda device: "sm90"
    serve_run.TritonServing.check_device = lambda self, device: None
    cuda_forward.device_arch = lambda device: 90
    cuda_driver.launch_kernel = fake_cuda_launch
    cuda_driver.encode_tensor_map = fake_encode_tensor_map
    torch.cuda.device = lambda device: contextlib.nullcontext()
