"""Cubins built ahead of time (or on first use) for one kernel, arch, dtype and head dim, as
entries of the disk cache.

One entry per `Target`, through `cache.load_or_build` (atomic, checksummed, locked: racing
builders compile once; a corrupt entry is rebuilt, never loaded):

    kernels/<kernel>.sm90.bf16.d128[.tma]-<key[:16]>/  kernel.cubin  artifact.json  meta.json

(`.tma`: the sm_90a cubin that loads K and V by TMA, what a build makes; without it on sm_90,
the cp.async one for layouts a tensor map cannot describe.)

Key: sha256 of the source entry's key (canonical IR, templates and headers, printer version,
attncc/torch/triton versions), the arch, dtype, head dims and tiles, and the toolchain (nvcc
version, nvidia-cutlass version, nvcc flags). A machine without nvcc cannot know which nvcc
built a cubin, so there the entry is found by the same key less the toolchain
(`lookup`, stored in meta.json): `attncc build --backend cuda` on a machine with nvcc ships
cubins to one without. With ATTNCC_OFFLINE=1 a missing cubin is `NotPrebuiltError`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from attncc import config
from attncc.backends import cache, keys
from attncc.backends.cache import NotPrebuiltError
from attncc.backends.cuda import toolchain
from attncc.backends.cuda.render import HEADERS, Tiles

log = logging.getLogger("attncc")
ELEMENTS = {"float16": "cutlass::half_t", "bfloat16": "cutlass::bfloat16_t"}
# per arch: the machinery header and its traits and forward types (templates/*.cuh). sm_90
# (built as sm_90a) runs both products on wgmma, K and V loaded by TMA (Target.tma) or by
# cp.async (layouts a tensor map cannot describe); the others on mma.sync (sm_80 and up)
MACHINERY = {90: ("attncc_fwd_sm90.cuh", "attncc::Sm90Traits", "attncc::Sm90Forward")}
SM90_TMA_TRAITS = "attncc::Sm90TmaTraits"
SM80_MACHINERY = ("attncc_fwd_sm80.cuh", "attncc::Sm80Traits", "attncc::Sm80Forward")


@dataclass(frozen=True)
class NoVariant:
    """The CUDA kernel has one variant per signature (strides are arguments): the CLI's label
    asks every target for these suffixes."""

    def suffix(self) -> str:
        return ""


@dataclass(frozen=True)
class Target:
    """One cubin: the forward kernel `kernel` of the source entry `source_key`."""

    kernel: str
    source_key: str
    arch: int
    dtype: str
    head_dim_qk: int
    head_dim_v: int
    tiles: Tiles
    # the source entry it is compiled from, made on first use (not part of the identity)
    source: Callable[[], cache.CacheEntry] | None = field(default=None, compare=False,
                                                          repr=False)
    kind: str = "forward"
    variant: NoVariant = field(default_factory=NoVariant)
    tma: bool = False  # sm_90: K and V tiles by TMA from host-encoded tensor maps

    def tiles_suffix(self) -> str:
        return ""

    def lookup(self) -> str:
        """The key less the toolchain (what a machine without nvcc or the CUTLASS headers,
        which loads cubins built elsewhere, can compute)."""
        return keys.cache_key("cuda-cubin", self.source_key, extra=[
            self.kind, f"sm_{self.arch}", self.dtype, f"d{self.head_dim_qk}/{self.head_dim_v}",
            json.dumps(asdict(self.tiles), sort_keys=True), *(["tma"] if self.tma else [])])

    def key(self) -> str:
        """The entry's key: `lookup` and the toolchain's versions (ToolchainError without
        nvcc)."""
        return keys.digest("\n".join([self.lookup(), *toolchain.versions()]))

    def entry_name(self) -> str:
        return (f"{self.kernel}.sm{self.arch}.{keys.triton_type(self.dtype)}."
                f"d{self.head_dim_qk}{'.tma' if self.tma else ''}")

    def describe(self) -> str:
        return (f"CUDA kernel {self.kernel} for sm_{self.arch}, {self.dtype}, head dims "
                f"{self.head_dim_qk}/{self.head_dim_v}"
                f"{', K/V by TMA' if self.tma else ''}")

    def defines(self) -> dict[str, str]:
        header, traits, forward = MACHINERY.get(self.arch, SM80_MACHINERY)
        if self.tma:
            traits = SM90_TMA_TRAITS
        return {"ATTNCC_MACHINERY": f'"{header}"', "ATTNCC_TRAITS": traits,
                "ATTNCC_FORWARD": forward,
                "ATTNCC_ELEMENT": ELEMENTS[self.dtype], "ATTNCC_HEAD_DIM": str(self.head_dim_qk),
                "ATTNCC_BLOCK_M": str(self.tiles.block_m),
                "ATTNCC_BLOCK_N": str(self.tiles.block_n), "ATTNCC_WARPS": str(self.tiles.warps)}


@dataclass(frozen=True)
class Built:
    """A target's cache entry; `built`: compiled by this call (False: loaded)."""

    entry: cache.CacheEntry
    built: bool
    seconds: float

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.entry.files["artifact.json"].read_bytes())

    @property
    def cubin(self) -> bytes:
        return self.entry.files["kernel.cubin"].read_bytes()


def load_or_build(target: Target) -> Built:
    """The cubin of `target`, compiled from its source entry when the cache lacks it
    (NotPrebuiltError instead with ATTNCC_OFFLINE=1 or without nvcc)."""
    start = time.perf_counter()
    name = target.entry_name()
    try:
        key = target.key()
    except toolchain.ToolchainError as e:  # no nvcc here: a cubin some build stored, or none
        entry = _find_by_lookup(target.lookup())
        if entry is None:
            raise NotPrebuiltError(f"{target.describe()} is not in the cache "
                                   f"{config.cache_dir()} and cannot be compiled here: {e}"
                                   ) from None
        return Built(entry, False, time.perf_counter() - start)
    if config.offline():
        entry = cache.load_prebuilt(key, name, target.describe(),
                                    f"attncc build MANIFEST --arch sm_{target.arch} --backend cuda")
        return Built(entry, False, time.perf_counter() - start)

    def build() -> dict[str, bytes]:
        source = target.source()
        text = source.files["kernel.cu"].read_text()
        headers = {h: source.files[h].read_text() for h in HEADERS}
        cubin = toolchain.compile_cubin(text, headers, target.arch, target.defines())
        info = {"name": target.kernel, "arch": target.arch, "dtype": target.dtype,
                "head_dim_qk": target.head_dim_qk, "head_dim_v": target.head_dim_v,
                "tiles": asdict(target.tiles), "tma": target.tma,
                "threads": 32 * target.tiles.warps,
                "smem": smem_bytes(target), "registers": cubin.registers,
                "spill_bytes": cubin.spill_bytes, "stack_bytes": cubin.stack_bytes,
                "toolchain": toolchain.versions()}
        return {"kernel.cubin": cubin.image,
                "artifact.json": json.dumps(info, indent=1, sort_keys=True).encode()}

    meta = {"kind": target.kind, "backend": "cuda", "kernel": target.kernel,
            "target": f"sm_{target.arch}", "arch": target.arch, "dtype": target.dtype,
            "head_dim_qk": target.head_dim_qk, "head_dim_v": target.head_dim_v,
            "source_key": target.source_key, "lookup": target.lookup()}
    entry = cache.load_or_build(key, name, build, extra_meta=meta, any_name=True)
    return Built(entry, entry.built, time.perf_counter() - start)


def say_if_compiled(result: Built) -> None:
    """One WARNING line when a launch had to compile its cubin (`attncc build` would not)."""
    if result.built:
        log.warning("attncc: compiled %s in %.1fs (not prebuilt; `attncc build --backend cuda` "
                    "makes it ahead of time)", result.entry.meta["name"], result.seconds)


def smem_bytes(target: Target) -> int:
    """Dynamic shared memory of the kernel: Q tile plus one K and one V tile (2-byte elements),
    and on sm_90 1024 bytes to align the swizzled tiles; the header's `kSmemBytes`."""
    t = target.tiles
    align = 1024 if target.arch == 90 else 0
    return 2 * target.head_dim_qk * (t.block_m + 2 * t.block_n) + align


def _find_by_lookup(lookup: str) -> cache.CacheEntry | None:
    for entry in cache.list_entries():
        if entry.meta.get("lookup") == lookup:
            return entry
    return None
