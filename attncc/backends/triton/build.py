"""What `attncc build` and `precompile` make for one compiled spec: the forward kernel, its
permuted variant, its block map and, for training, the backward kernels and their block map.

This sits above the kernel classes (it constructs `TritonBackward` to name its binaries), while
`prebuilt` and `prebuilt_targets`, which the kernels' own launchers call, sit below them: that
split is what keeps the Triton backend's imports free of cycles.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.backends.triton.aot import CompiledArtifact
from attncc.backends.triton.backward.kernel import TritonBackward
from attncc.backends.triton.forward import TritonForward
from attncc.backends.triton.launch_spec import DEFAULT_VARIANT, Variant
from attncc.backends.triton.prebuilt import load_or_compile_target, say_if_compiled
from attncc.backends.triton.prebuilt_targets import (Target, backward_target, forward_target,
                                                     kinds, parse_arch)


def build_targets(forward: TritonForward, dtype: Any, head_dim_qk: int, head_dim_v: int,
                  arch: int | str, *, backward: bool = False) -> list[Target]:
    """What `attncc build` and `precompile` make per signature: the usual forward; with a
    reorder also the one for tokens kept in the reordered order (`permuted=True`, how a model
    that stays permuted across layers calls it); the block-map kernel when there is one; with
    `backward`, the dq and dkdv kernels (no learnable captures) and the block map at each
    one's tiles (dq and dk/dv take different tiles)."""
    def one(kind: str, variant: Variant = DEFAULT_VARIANT, tiles=None) -> Target:
        return forward_target(forward, kind, dtype, head_dim_qk, head_dim_v, arch, variant,
                              tiles)

    targets = [one("forward")]
    if forward.plan.spec.reorder is not None:
        targets.append(one("forward", Variant(gather_rows=False)))
    has_block_map = "block_map" in kinds(forward)
    if has_block_map:
        targets.append(one("block_map"))
    if backward:
        kernels = TritonBackward(forward, ())
        targets += [backward_target(kernels, k, dtype, head_dim_qk, head_dim_v, arch)
                    for k in ("dq", "dkdv")]
        if has_block_map:  # a map at each backward kernel's tiles that no earlier map has
            made = [(t.spec.schedule.block_m, t.spec.schedule.block_n) for t in targets
                    if t.kind == "block_map"]
            for t in targets[-2:]:
                tiles = (t.spec.schedule.block_m, t.spec.schedule.block_n)
                if tiles not in made:
                    made.append(tiles)
                    targets.append(one("block_map", tiles=tiles))
    return targets


def precompile(forward: TritonForward, dtype: Any, head_dim_qk: int,
               head_dim_v: int | None = None, arch: int | str | None = None, *,
               backward: bool = False) -> CompiledArtifact:
    """The forward kernel `forward` for sm_<arch> (None: this machine's GPU) and one call
    signature, loaded from the cache when `attncc build` made it, with the other kernels of
    `build_targets` (its block map, a reordered spec's `permuted=True` forward, and with
    `backward` the gradient kernels). Each kernel compiled here (not prebuilt) logs one WARNING
    line on the "attncc" logger with its name and compile time."""
    if arch is None:
        arch = _current_arch()
    head_dim_v = head_dim_qk if head_dim_v is None else head_dim_v
    targets = build_targets(forward, dtype, head_dim_qk, head_dim_v, arch, backward=backward)
    results = [load_or_compile_target(t) for t in targets]
    for r in results:
        say_if_compiled(r)
    return results[0].artifact


def _current_arch() -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("precompile: arch=None means this machine's GPU, and there is no "
                           "CUDA GPU here; pass a target, e.g. arch='sm_90'")
    major, minor = torch.cuda.get_device_capability()
    return parse_arch(major * 10 + minor)
