"""Kernels compiled ahead of time for a named GPU, stored as their own cache entries.

`attncc build` (no GPU needed) and GPU launches share `load_or_compile_target`: load the artifact
if a build made it (no Triton compile: the cubin, PTX and Triton's metadata are read from disk),
else compile it with `triton_aot`, store it, and say so in one WARNING line. With
`ATTNCC_OFFLINE=1` a missing kernel raises `NotPrebuiltError` naming the kernel, the target, the
signature and the variant instead.

A `Target` is one binary: a kernel ("forward" | "block_map" | "dq" | "dkdv") as a
`launch_spec.LaunchSpec` (argument types, constexprs, aligned pointers, warps and stages) for one
arch. One entry per target, through `cache.load_or_build` (atomic, checksummed, locked, so
racing builders build it once and `attncc cache verify` covers it):

    kernels/<kernel name>.sm90.fp16.d128[.variant]-<key[:16]>/
        kernel.cubin  kernel.ptx  triton.json  artifact.json  meta.json

triton.json is Triton's own metadata file for the binary. meta.json adds `kind`, `kernel`,
`target` ("sm_90"), `arch`, `dtype`, `head_dim_qk`, `head_dim_v`, `variant`, `schedule` and
`source_key` (the key of the source entry it was compiled from). Key: sha256 of the source key
(canonical IR, templates, attncc/torch/triton versions), the kind, the launch spec, the arch and
the triton version: whatever changes the binary changes the key, and the spelling of the spec
(the readable kernel name) does not. Entries are looked up by key under any readable name, so
`causal() & sliding_window(w)` and `sliding_window(w)` are stored once and either spelling loads
the other's binary (the binary's own symbol name is read from its triton.json).

On a GPU, `TritonForward.launch`, the block-map launch and `TritonBackward.launch` run these
entries through `direct` (Triton's launcher, never Triton's JIT), picking the variant their
arguments need (`launch_spec.choose_variant`); they import this module, so it reads the kernel
objects only through what it is handed. `attncc build` and `precompile` make the targets of
`build.build_targets`: the default variant (contiguous, lse written, original token order,
32-bit integers), a reordered spec's `permuted=True` forward, the block map, and with
`backward=True` the dq/dkdv kernels (no learnable captures) and their block map; a launch that
needs another variant compiles it once, with a log line.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from attncc import config
from attncc.backends import cache
from attncc.backends.cache import NotPrebuiltError  # noqa: F401 (callers catch it here)
from attncc.backends.triton import aot as triton_aot
from attncc.backends.triton.launch_spec import DEFAULT_VARIANT, Variant
from attncc.backends.triton.aot import CompiledArtifact
from attncc.backends.triton.direct import METADATA_FILE, DirectKernel
from attncc.ir.nodes import Schedule
# the target helpers are part of this module's interface (the CLI, manifests, tests use them)
from attncc.backends.triton.prebuilt_targets import (Target, backward_target,  # noqa: F401
                                                     check_head_dim, forward_target, kinds,
                                                     parse_arch, parse_dtype)

if TYPE_CHECKING:
    from attncc.backends.triton.forward import TritonForward

log = logging.getLogger("attncc")


@dataclass(frozen=True)
class Prebuilt:
    artifact: CompiledArtifact
    built: bool  # compiled by this call (False: loaded from the cache)
    seconds: float
    entry: cache.CacheEntry


def artifact_key(forward: TritonForward, kind: str, arch: int, dtype: str, head_dim_qk: int,
                 head_dim_v: int, variant: Variant = DEFAULT_VARIANT) -> str:
    """The cache key of `forward_target(...)`."""
    return forward_target(forward, kind, dtype, head_dim_qk, head_dim_v, arch, variant).key()


def load_or_compile(forward: TritonForward, kind: str, dtype: Any, head_dim_qk: int,
                    head_dim_v: int, arch: int | str, variant: Variant = DEFAULT_VARIANT
                    ) -> Prebuilt:
    """`load_or_compile_target` of `forward_target(...)`."""
    return load_or_compile_target(forward_target(forward, kind, dtype, head_dim_qk, head_dim_v,
                                                 arch, variant))


def load_or_compile_target(target: Target) -> Prebuilt:
    """The artifact of `target`: loaded when a build made it, else compiled (no GPU needed)
    and stored; with ATTNCC_OFFLINE=1, NotPrebuiltError."""
    key, name = target.key(), target.entry_name()
    start = time.perf_counter()
    # by key, under any readable name: another spelling of the spec may have built it
    if config.offline():
        entry = cache.load_prebuilt(key, name, target.describe(),
                                    f"attncc build MANIFEST --arch sm_{target.arch}")
    else:
        def build() -> dict[str, bytes]:
            what = (f"{target.dtype}, head dims {target.head_dim_qk}/{target.head_dim_v}, "
                    f"{target.spec.schedule.text()}")
            art = triton_aot.compile_spec(target.spec, target.arch, what, dtype=target.dtype,
                                          head_dims=(target.head_dim_qk, target.head_dim_v))
            info = {f: getattr(art, f) for f in ("name", "arch", "dtype", "head_dim_qk",
                                                 "head_dim_v", "shared_bytes", "n_regs",
                                                 "stack_bytes")}
            info["schedule"] = asdict(art.schedule)
            return {"kernel.cubin": art.cubin, "kernel.ptx": art.ptx.encode(),
                    METADATA_FILE: art.triton_metadata.encode(),
                    "artifact.json": json.dumps(info, indent=1, sort_keys=True).encode()}

        meta = {"kind": target.kind, "kernel": target.spec.name, "target": f"sm_{target.arch}",
                "arch": target.arch, "dtype": target.dtype, "head_dim_qk": target.head_dim_qk,
                "head_dim_v": target.head_dim_v, "variant": asdict(target.variant),
                "schedule": target.spec.schedule.text(), "source_key": target.source_key}
        entry = cache.load_or_build(key, name, build, extra_meta=meta, any_name=True)
    return Prebuilt(_artifact(entry), entry.built, time.perf_counter() - start, entry)


def direct_kernel(target: Target, fn: Any) -> DirectKernel:
    """The binary of `target` (the @triton.jit function `fn`), ready to launch with no compile:
    loaded from the cache, or compiled now (one WARNING line; NotPrebuiltError with
    ATTNCC_OFFLINE=1)."""
    result = load_or_compile_target(target)
    say_if_compiled(result)
    return DirectKernel(fn, target.spec, result.entry.files)


def say_if_compiled(result: Prebuilt) -> None:
    if result.built:
        log.warning("attncc: compiled %s in %.1fs (not prebuilt; `attncc build` makes it "
                    "ahead of time)", result.entry.meta["name"], result.seconds)


def _artifact(entry: cache.CacheEntry) -> CompiledArtifact:
    info = json.loads(entry.files["artifact.json"].read_bytes())
    return CompiledArtifact(
        name=info["name"], arch=info["arch"], dtype=info["dtype"],
        head_dim_qk=info["head_dim_qk"], head_dim_v=info["head_dim_v"],
        schedule=Schedule(**info["schedule"]), shared_bytes=info["shared_bytes"],
        n_regs=info["n_regs"], stack_bytes=info["stack_bytes"],
        ptx=entry.files["kernel.ptx"].read_text(), cubin=entry.files["kernel.cubin"].read_bytes(),
        triton_metadata=entry.files[METADATA_FILE].read_text())
