"""What one prebuilt binary is: a `Target` (a kernel's `LaunchSpec` for one arch, named by
kind, dtype, head dims and variant), and the checks of the arguments that name them
(`attncc.backends.targets`).
`attncc.backends.triton.prebuilt` loads and builds them; `attncc.backends.triton.build` lists the
targets `attncc build` makes for a spec (it constructs the backward kernels, so it sits above
them, while the kernels' launchers import this module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attncc.backends.triton.launch_spec import (DEFAULT_VARIANT, LaunchSpec, Variant,
                                                backward_spec, block_map_spec, forward_spec,
                                                forward_tiles)
from attncc.backends import keys
from attncc.backends.targets import check_head_dim, parse_arch, parse_dtype  # noqa: F401
from attncc.backends.triton.aot import artifact_stem

if TYPE_CHECKING:
    from attncc.backends.triton.forward import TritonForward
    from attncc.backends.triton.backward.kernel import TritonBackward

KINDS = ("forward", "block_map", "dq", "dkdv")
FORMAT = 3  # bump when an entry's files or fields change


def kinds(forward: TritonForward) -> tuple[str, ...]:
    """The forward kernels a launch of `forward` may run: its block-map kernel too when it has
    one (the backward adds "dq" and "dkdv")."""
    return KINDS[:2] if "block_map.py" in forward.entry.files else KINDS[:1]


@dataclass(frozen=True)
class Target:
    """One binary to load or build: `spec` compiled for sm_<arch>; the rest names it."""

    kind: str
    spec: LaunchSpec
    source_key: str  # the key of the cache entry holding the generated source
    arch: int
    dtype: str
    head_dim_qk: int
    head_dim_v: int
    variant: Variant = DEFAULT_VARIANT

    def key(self) -> str:
        """The binary's cache key: the source entry's key (canonical IR, templates, versions),
        which kernel of it, the launch spec and the arch. Not the kernel's readable name: two
        spellings of one spec (`causal() & sliding_window(w)` and `sliding_window(w)`) share a
        source key and so one binary, loaded under either name."""
        spec = self.spec
        return keys.cache_key("triton-binary", self.source_key, extra=list(map(str, [
            self.kind, sorted(spec.signature.items()), sorted(spec.constexprs.items()),
            spec.aligned, spec.divisible, spec.schedule.num_warps, spec.schedule.num_stages,
            f"sm{self.arch}",
            f"format={FORMAT}"])))

    def entry_name(self) -> str:
        """`<kernel>.sm90.fp16.d128`, then the variant's suffix, and a block map's tiles."""
        return (artifact_stem(self.spec.name, self.arch, self.dtype, self.head_dim_qk,
                              self.head_dim_v) + self.variant.suffix() + self.tiles_suffix())

    def tiles_suffix(self) -> str:
        s = self.spec.schedule
        return f".t{s.block_m}x{s.block_n}" if self.kind == "block_map" else ""

    def describe(self) -> str:
        variant = self.variant.suffix().lstrip(".") or "default"
        return (f"kernel {self.spec.name} ({self.kind}) for sm_{self.arch}, {self.dtype}, head "
                f"dims {self.head_dim_qk}/{self.head_dim_v}, variant {variant}")


def forward_target(forward: TritonForward, kind: str, dtype: Any, head_dim_qk: int,
                   head_dim_v: int, arch: int | str, variant: Variant = DEFAULT_VARIANT,
                   tiles: tuple[int, int] | None = None) -> Target:
    """The forward kernel or the block-map kernel (with `tiles`, default the forward's, for
    a backward kernel's tiles) of `forward` for one signature; arguments are checked here."""
    if kind not in KINDS[:2]:
        raise ValueError(f"kind: expected one of {KINDS[:2]}, got {kind!r}")
    if kind not in kinds(forward):
        raise ValueError(f"{forward.name} has no {kind} kernel")
    if kind == "block_map" and variant != DEFAULT_VARIANT:
        raise ValueError(f"the block-map kernel has one variant, got {variant}")
    dtype, arch = parse_dtype(dtype), parse_arch(arch)
    head_dim_qk, head_dim_v = check_head_dim(head_dim_qk), check_head_dim(head_dim_v)
    if kind == "forward":
        spec = forward_spec(forward, dtype, head_dim_qk, head_dim_v, arch, variant)
    else:
        spec = block_map_spec(forward, arch, tiles or forward_tiles(
            forward, dtype, head_dim_qk, head_dim_v, arch))
    return Target(kind, spec, forward.entry.meta["key"], arch, dtype, head_dim_qk, head_dim_v,
                  variant)


def backward_target(backward: TritonBackward, kernel: str, dtype: Any, head_dim_qk: int,
                    head_dim_v: int, arch: int | str, variant: Variant = DEFAULT_VARIANT
                    ) -> Target:
    """The backward's "dq" or "dkdv" kernel for one signature."""
    dtype, arch = parse_dtype(dtype), parse_arch(arch)
    head_dim_qk, head_dim_v = check_head_dim(head_dim_qk), check_head_dim(head_dim_v)
    spec = backward_spec(backward, kernel, dtype, head_dim_qk, head_dim_v, arch, variant)
    return Target(kernel, spec, backward.entry.meta["key"], arch, dtype, head_dim_qk,
                  head_dim_v, variant)
