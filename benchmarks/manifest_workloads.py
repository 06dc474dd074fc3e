"""Workloads from an attncc manifest: `python -m benchmarks.run --manifest FILE`, which is what
`attncc bench MANIFEST` runs. One workload per `[[kernel]]` entry, named `manifest-<entry>`:
attncc's kernel for the entry's spec, checked against the reference and (on a GPU) timed.

Shapes: the entry's `shapes` (B, Hq, Hkv, L) x `dtypes` x `head_dims` (Dqk == Dv only: the
harness has one head dim). The harness runs every head as its own kv head (Hkv = Hq): grouped
query heads change the memory traffic, not the work, and `params.kv_heads` records the entry's
Hkv. Smoke shapes (CPU, interpreter): B = H = 1, head dim 16, the entry's smallest L (128 when it
lists none), its first dtype. There is no FlexAttention mask_mod or SDPA mask for an arbitrary
spec, so those peers are recorded as unavailable, with that reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

from attncc.manifest import KernelEntry, load_manifest
from benchmarks.workloads import Shape, Variant, Workload

NO_PEER = "a manifest entry is an attncc spec only: no {} form of it is known"
SMOKE_L = 128


def from_manifest(path: str | Path) -> list[Workload]:
    """A workload per valid entry; a bad entry (or one with no shape to run) is one line on
    stderr. ManifestError when the file itself is unusable."""
    manifest = load_manifest(path)
    for line in manifest.errors:
        print(f"benchmarks: {line}", file=sys.stderr)
    out = []
    for entry in manifest.kernels:
        shapes = _shapes(entry)
        if not shapes:
            print(f"benchmarks: {manifest.path}: kernel {entry.name!r}: no shape to time: give "
                  f"shapes = [[B, Hq, Hkv, L]] and a head dim with Dqk == Dv", file=sys.stderr)
        out.append(Workload(f"manifest-{entry.name}", "manifest", _about(entry), _make(entry),
                            tuple(shapes), (_smoke_shape(entry),)))
    return out


def _shapes(entry: KernelEntry) -> list[Shape]:
    return [Shape(B, Hq, L, dqk, dtype) for B, Hq, _, L in entry.shapes
            for dtype in entry.dtypes for dqk, dv in entry.head_dims if dqk == dv]


def _smoke_shape(entry: KernelEntry) -> Shape:
    L = min((s[3] for s in entry.shapes), default=SMOKE_L)
    return Shape(1, 1, L, 16, entry.dtypes[0])


def _about(entry: KernelEntry) -> str:
    mask = entry.spec.mask.text() if entry.spec.mask is not None else "no mask"
    return f"manifest entry {entry.name!r}: {entry.spec.tag} ({mask[:60]})"


def _make(entry: KernelEntry):
    kv_heads = {s[1]: s[2] for s in entry.shapes}  # Hq -> Hkv

    def make(shape: Shape, device: str, smoke: bool) -> Variant:
        return Variant(entry.spec, sdpa=None, sdpa_reason=NO_PEER.format("SDPA"),
                       flex_reason=NO_PEER.format("FlexAttention"),
                       params={"entry": entry.name, "kv_heads": kv_heads.get(shape.H, shape.H)})
    return make
