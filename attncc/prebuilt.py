"""Kernels compiled ahead of time for a named GPU, stored as their own cache entries.

`attncc build` (no GPU needed) and `precompile` at run time share `load_or_compile`: load the
artifact if a build made it (no Triton compile: the cubin and PTX are read from disk), else
compile it with `triton_aot`, store it, and say so. With `ATTNCC_OFFLINE=1` a missing kernel
raises `NotPrebuiltError` naming the kernel, the target and the signature instead.

One entry per (kernel, kind, arch, dtype, head dims, variant), through `cache.load_or_build`
(atomic, checksummed, locked, so racing builders build it once and `attncc cache verify` covers
it):

    kernels/<kernel name>.sm90.fp16.d128-<key[:16]>/
        kernel.cubin  kernel.ptx  triton.json  artifact.json  meta.json

triton.json is Triton's own metadata file for the binary. meta.json adds `kind` ("forward" |
"block_map"), `kernel`, `target` ("sm_90"), `arch`, `dtype`, `head_dim_qk`, `head_dim_v`,
`variant`, `schedule` and `source_key` (the key of the source entry it was compiled from). Key:
sha256 of the source key (canonical IR, templates, attncc/torch/triton versions), kind, arch,
dtype, head dims, the variant, the schedule and the triton version.

On a GPU, `TritonForward.launch` runs these entries: `direct_kernel` loads (or, not prebuilt,
compiles and logs) the entry for the launch's variant (`launch_spec.forward_variant`) and
launches its cubin through Triton's launcher (`triton_direct`), never through Triton's JIT.
`attncc build` and `precompile` make the default variant (contiguous q/k/v/o, lse written,
original token order, 32-bit integers), and for a reordered spec the `permuted=True` one too
(`build_targets`); a launch that needs another compiles it once, with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from attncc import config
from attncc.backends import cache, triton_aot
from attncc.backends.launch_spec import (DEFAULT_VARIANT, ForwardVariant, block_map_spec,
                                         forward_spec)
from attncc.backends.triton_aot import SUPPORTED_ARCHS, CompiledArtifact, artifact_stem
from attncc.backends.triton_direct import METADATA_FILE, DirectKernel
from attncc.ir.nodes import Schedule
from attncc.ir.plan import Signature
from attncc.passes.select_tiles import MAX_HEAD_DIM

if TYPE_CHECKING:
    from attncc.backends.triton_backend import TritonForward
    from attncc.kernel import CompiledAttention

log = logging.getLogger("attncc")
KINDS = ("forward", "block_map")
DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
FORMAT = 2  # bump when the entry's files or fields change


class NotPrebuiltError(RuntimeError):
    """ATTNCC_OFFLINE=1 and the kernel asked for is not in the cache."""


@dataclass(frozen=True)
class Prebuilt:
    artifact: CompiledArtifact
    built: bool  # compiled by this call (False: loaded from the cache)
    seconds: float
    entry: cache.CacheEntry


def parse_arch(arch: int | str) -> int:
    """90, "90", "sm90", "sm_90" or "sm_90a" -> 90; ValueError unless in SUPPORTED_ARCHS."""
    text = str(arch).strip().lower().removeprefix("sm").removeprefix("_").removesuffix("a")
    if not text.isdigit() or int(text) not in SUPPORTED_ARCHS:
        known = ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS)
        raise ValueError(f"unknown arch {arch!r} (supported: {known})")
    return int(text)


def parse_dtype(dtype: Any) -> str:
    """"float16", "fp16", torch.float16, ... -> "float16" | "bfloat16" | "float32"."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (supported: float16, bfloat16, float32)")
    return DTYPES[name]


def check_head_dim(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d!r} is not supported (1..{MAX_HEAD_DIM})")
    return d


def kinds(forward: TritonForward) -> tuple[str, ...]:
    """The kernels a launch of `forward` may run: its block-map kernel too when it has one."""
    return KINDS if "block_map.py" in forward.entry.files else KINDS[:1]


def build_targets(forward: TritonForward) -> list[tuple[str, ForwardVariant]]:
    """The (kind, variant) pairs `attncc build` makes per signature: the usual forward; with a
    reorder also the one for tokens kept in the reordered order (`permuted=True`, how a model
    that stays permuted across layers calls it); the block-map kernel when there is one."""
    targets = [("forward", DEFAULT_VARIANT)]
    if forward.plan.spec.reorder is not None:
        targets.append(("forward", ForwardVariant(gather_rows=False)))
    return targets + [("block_map", DEFAULT_VARIANT)] * ("block_map" in kinds(forward))


def kernel_name(forward: TritonForward, kind: str) -> str:
    from attncc.backends.triton_render import block_map_kernel_name
    return forward.name if kind == "forward" else block_map_kernel_name(forward.plan)


def artifact_key(forward: TritonForward, kind: str, arch: int, dtype: str, head_dim_qk: int,
                 head_dim_v: int, variant: ForwardVariant = DEFAULT_VARIANT) -> str:
    import triton
    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    text = "\n".join(map(str, [forward.entry.meta["key"], kind, f"sm{arch}", dtype, head_dim_qk,
                               head_dim_v, variant, sched.text(),
                               f"triton={triton.__version__}", f"format={FORMAT}"]))
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_compile(forward: TritonForward, kind: str, dtype: str, head_dim_qk: int,
                    head_dim_v: int, arch: int, variant: ForwardVariant = DEFAULT_VARIANT
                    ) -> Prebuilt:
    """The artifact of one kernel for sm_<arch>, one signature and (forward kernels) one
    variant: loaded when a build made it, else compiled (no GPU needed) and stored; with
    ATTNCC_OFFLINE=1, NotPrebuiltError."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind not in kinds(forward):
        raise ValueError(f"{forward.name} has no {kind} kernel")
    if kind == "block_map" and variant != DEFAULT_VARIANT:
        raise ValueError(f"the block-map kernel has one variant, got {variant}")
    dtype, arch = parse_dtype(dtype), parse_arch(arch)
    head_dim_qk, head_dim_v = check_head_dim(head_dim_qk), check_head_dim(head_dim_v)
    key = artifact_key(forward, kind, arch, dtype, head_dim_qk, head_dim_v, variant)
    name = (artifact_stem(kernel_name(forward, kind), arch, dtype, head_dim_qk, head_dim_v)
            + variant.suffix())
    start = time.perf_counter()
    if config.offline():
        entry = cache.load(key, name)
        if entry is None:
            raise NotPrebuiltError(
                f"ATTNCC_OFFLINE=1 and kernel {kernel_name(forward, kind)} ({kind}) for sm_{arch}"
                f", {dtype}, head dims {head_dim_qk}/{head_dim_v} is not in the cache "
                f"{config.cache_dir()} (entry {name}); build it ahead of time with "
                f"`attncc build MANIFEST --arch sm_{arch}` or unset ATTNCC_OFFLINE")
    else:
        def build() -> dict[str, bytes]:
            art = _compile(forward, kind, dtype, head_dim_qk, head_dim_v, arch, variant)
            info = {f: getattr(art, f) for f in ("name", "arch", "dtype", "head_dim_qk",
                                                 "head_dim_v", "shared_bytes", "n_regs",
                                                 "stack_bytes")}
            info["schedule"] = asdict(art.schedule)
            return {"kernel.cubin": art.cubin, "kernel.ptx": art.ptx.encode(),
                    METADATA_FILE: art.triton_metadata.encode(),
                    "artifact.json": json.dumps(info, indent=1, sort_keys=True).encode()}

        sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
        meta = {"kind": kind, "kernel": kernel_name(forward, kind), "target": f"sm_{arch}",
                "arch": arch, "dtype": dtype, "head_dim_qk": head_dim_qk,
                "head_dim_v": head_dim_v, "variant": asdict(variant), "schedule": sched.text(),
                "source_key": forward.entry.meta["key"]}
        entry = cache.load_or_build(key, name, build, extra_meta=meta)
    return Prebuilt(_artifact(entry), entry.built, time.perf_counter() - start, entry)


def precompile(attention: CompiledAttention, dtype: Any, head_dim_qk: int,
               head_dim_v: int | None = None, arch: int | str | None = None
               ) -> CompiledArtifact:
    """The forward kernel of `attention` for sm_<arch> (None: this machine's GPU) and one call
    signature, loaded from the cache when `attncc build` made it; also its block-map kernel
    when it has one, and a reordered spec's `permuted=True` forward (`build_targets`). Each
    kernel compiled here (not prebuilt) logs one WARNING line on the "attncc" logger with its
    name and compile time."""
    if attention.triton is None:
        raise ValueError(f"precompile: memory {attention.spec.memory.text()!r} has no kernel")
    if arch is None:
        arch = _current_arch()
    head_dim_v = head_dim_qk if head_dim_v is None else head_dim_v
    results = [load_or_compile(attention.triton, kind, dtype, head_dim_qk, head_dim_v, arch,
                               variant) for kind, variant in build_targets(attention.triton)]
    for r in results:
        _say_if_compiled(r)
    return results[0].artifact


def direct_kernel(forward: TritonForward, kind: str, dtype: str, head_dim_qk: int,
                  head_dim_v: int, arch: int, variant: ForwardVariant = DEFAULT_VARIANT
                  ) -> DirectKernel:
    """The prebuilt binary of one kernel, ready to launch with no compile: loaded from the
    cache, or compiled now (one WARNING line; NotPrebuiltError with ATTNCC_OFFLINE=1)."""
    result = load_or_compile(forward, kind, dtype, head_dim_qk, head_dim_v, arch, variant)
    _say_if_compiled(result)
    dtype, arch = result.artifact.dtype, result.artifact.arch
    if kind == "forward":
        spec = forward_spec(forward, dtype, head_dim_qk, head_dim_v, arch, variant)
        fn = forward.jit_function()
    else:
        spec = block_map_spec(forward, dtype, head_dim_qk, head_dim_v, arch)
        fn = forward.block_map_function()
    return DirectKernel(fn, spec, result.entry.files)


def _say_if_compiled(result: Prebuilt) -> None:
    if result.built:
        log.warning("attncc: compiled %s in %.1fs (not prebuilt; `attncc build` makes it "
                    "ahead of time)", result.entry.meta["name"], result.seconds)


def _current_arch() -> int:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("precompile: arch=None means this machine's GPU, and there is no "
                           "CUDA GPU here; pass a target, e.g. arch='sm_90'")
    major, minor = torch.cuda.get_device_capability()
    return parse_arch(major * 10 + minor)


def _compile(forward: TritonForward, kind: str, dtype: str, head_dim_qk: int, head_dim_v: int,
             arch: int, variant: ForwardVariant) -> CompiledArtifact:
    # through the module, so a test (or a caller) can replace the compilers
    if kind == "forward":
        return triton_aot.compile_for_target(forward, dtype, head_dim_qk, head_dim_v, arch,
                                             variant=variant)
    return triton_aot.compile_block_map_for_target(forward, arch, dtype, head_dim_qk, head_dim_v)


def _artifact(entry: cache.CacheEntry) -> CompiledArtifact:
    info = json.loads(entry.files["artifact.json"].read_bytes())
    return CompiledArtifact(
        name=info["name"], arch=info["arch"], dtype=info["dtype"],
        head_dim_qk=info["head_dim_qk"], head_dim_v=info["head_dim_v"],
        schedule=Schedule(**info["schedule"]), shared_bytes=info["shared_bytes"],
        n_regs=info["n_regs"], stack_bytes=info["stack_bytes"],
        ptx=entry.files["kernel.ptx"].read_text(), cubin=entry.files["kernel.cubin"].read_bytes(),
        triton_metadata=entry.files[METADATA_FILE].read_text())
