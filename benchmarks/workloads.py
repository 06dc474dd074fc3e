"""The workload table: every landed capability, each with its attncc spec, the equivalent
FlexAttention mask_mod/score_mod, how SDPA can express it, and its shape grid.

Families: `dense` (causal and not), `flex` (the FlexAttention benchmark set), `sparse` (2-D
neighbourhood and HilbertA on token grids, row-major and Hilbert order); `manifest` workloads
come from a manifest (manifest_workloads.py). Kernel families the harness does not measure yet
are listed in PENDING with the reason; add one by writing its builders and appending its
`Workload`s to `WORKLOADS` (and removing it from PENDING): the harness, peers and report need no
change for a new forward workload. Backward needs a harness that checks gradients too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import attncc
from attncc.ir.reorder import inverse
from benchmarks import mods

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# B x H fills the GPU: B * H * L = 16K * 16 token-heads in every shape (H = 16 while L <= 16K,
# then fewer heads at B = 1), so every shape launches the same number of query tiles.
TOKEN_HEADS = 16384 * 16

PENDING = {  # kernels that exist, but no workload of the harness measures them yet
    "linear": "linear-attention kernels (L1-L7, chunked and recurrent) exist; no workload "
              "times them yet (flash-linear-attention would be their peer)",
    "decode": "serving kernels (paged, ragged, split-KV decode) exist; no workload times them "
              "yet (needs a plan/run timing loop)",
    "backward": "backward kernels exist; no workload times them yet (the harness checks "
                "outputs only, not gradients)",
}


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    L: int
    D: int
    dtype: str
    grid: tuple[int, int] | None = None  # token grid (height, width) of sparse workloads

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["grid"] = list(self.grid) if self.grid else None
        return out


def fill(L: int, D: int, dtype: str, grid: tuple[int, int] | None = None) -> Shape:
    """The fill rule above: B * H * L = TOKEN_HEADS."""
    H = 16 if L <= TOKEN_HEADS // 16 else max(1, TOKEN_HEADS // L)
    return Shape(max(1, TOKEN_HEADS // (H * L)), H, L, D, dtype, grid)


@dataclass(frozen=True)
class Variant:
    """One workload built for one shape on one device.

    sdpa: "plain" (no mask), "causal" (is_causal=True) or "dense" (attn_mask built from the mods:
    bool from mask_mod, additive bias from score_mod, which must then be additive); None when
    SDPA cannot express it (`sdpa_reason`). perm: the inputs are stored in this token order
    (`perm[new] = original`), the mods take positions in it, attncc runs with permuted=True."""

    spec: attncc.AttentionSpec
    mask_mod: Callable | None = None
    score_mod: Callable | None = None
    sdpa: str | None = "dense"
    sdpa_reason: str | None = None
    perm: torch.Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)  # recorded in the JSON
    flex_reason: str | None = None  # set: FlexAttention cannot express it (no mask_mod known)


@dataclass(frozen=True)
class Workload:
    name: str
    family: str
    about: str
    make: Callable[[Shape, str, bool], Variant]  # (shape, device, smoke) -> Variant
    shapes: tuple[Shape, ...]
    smoke_shapes: tuple[Shape, ...]


@dataclass
class Case:
    """A workload at one shape with its inputs: q/k/v [B, H, L, D] in the variant's token order."""

    workload: Workload
    shape: Shape
    variant: Variant
    device: str
    smoke: bool
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. the dense SDPA mask, built once


def make_case(workload: Workload, shape: Shape, device: str, smoke: bool, seed: int = 0) -> Case:
    variant = workload.make(shape, device, smoke)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape.B, shape.H, shape.L, shape.D, generator=gen, device=device,
                           dtype=DTYPES[shape.dtype]) for _ in range(3))
    if variant.perm is not None:
        q, k, v = (t[:, :, variant.perm].contiguous() for t in (q, k, v))
    return Case(workload, shape, variant, device, smoke, q, k, v)


# ---- dense -------------------------------------------------------------------------------------

DENSE_L = (1024, 2048, 4096, 8192, 16384, 32768)
DENSE_SHAPES = tuple(fill(L, D, dt) for dt in ("bfloat16", "float16") for D in (64, 128)
                     for L in DENSE_L)
DENSE_SMOKE = (Shape(1, 1, 128, 32, "bfloat16"), Shape(1, 1, 96, 16, "float16"))


def _dense_causal(shape: Shape, device: str, smoke: bool) -> Variant:
    return Variant(attncc.Attention(mask=attncc.causal()), mods.causal, sdpa="causal")


def _dense_full(shape: Shape, device: str, smoke: bool) -> Variant:
    return Variant(attncc.Attention(), sdpa="plain")


# ---- the FlexAttention benchmark set -----------------------------------------------------------

FLEX_SHAPES = tuple(fill(L, D, "bfloat16") for D in (64, 128) for L in (2048, 8192, 32768))
FLEX_SMOKE = (Shape(1, 1, 128, 32, "bfloat16"),)
SOFTCAP = 20.0
NO_SCORE_MOD = "SDPA has no score_mod: a soft-cap (tanh of the score) is not an additive mask"


def _seeded(shape: Shape, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(shape.L * 1000 + salt)


def _noop(shape, device, smoke):
    return Variant(attncc.Attention(), sdpa="plain")


def _causal(shape, device, smoke):
    return Variant(attncc.Attention(mask=attncc.causal()), mods.causal, sdpa="causal")


def _relative_bias(shape, device, smoke):
    # the same FlexAttention-style function, traced by attncc
    return Variant(attncc.Attention(score=mods.relative_bias), score_mod=mods.relative_bias)


def _head_bias(shape, device, smoke):
    hb = torch.randn(shape.H, generator=_seeded(shape, 1)).to(device)
    return Variant(attncc.Attention(score=attncc.head_bias(hb)), score_mod=mods.head_bias(hb))


def _alibi(shape, device, smoke):
    return Variant(attncc.Attention(score=attncc.alibi()),
                   score_mod=mods.alibi(mods.alibi_slopes(shape.H, device)))


def _sliding_window(shape, device, smoke):
    window = shape.L // 4 if smoke else 2048
    return Variant(attncc.Attention(mask=attncc.sliding_window(window)),
                   mods.sliding_window(window), params={"window": window})


def documents(L: int, n_docs: int) -> torch.Tensor:
    """cu_seqlens int32[n_docs + 1]: `n_docs` documents of random lengths covering [0, L)."""
    gen = torch.Generator().manual_seed(L)
    cuts = torch.sort(torch.randperm(L - 1, generator=gen)[: n_docs - 1] + 1).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([L])]).to(torch.int32)


def _document(shape, device, smoke):
    n_docs = 3 if smoke else 12  # 12: attention-gym's document benchmark
    cu = documents(shape.L, n_docs)
    doc = torch.repeat_interleave(torch.arange(n_docs), cu.diff().long()).to(device)
    spec = attncc.Attention(mask=attncc.document(cu_seqlens=cu.to(device), total=shape.L))
    return Variant(spec, mods.document(doc),
                   params={"documents": n_docs, "cu_seqlens": cu.tolist()})


def _prefix_lm(shape, device, smoke):
    prefix = shape.L // 8 if smoke else 512
    return Variant(attncc.Attention(mask=attncc.prefix_lm(prefix)), mods.prefix_lm(prefix),
                   params={"prefix": prefix})


def _softcap(shape, device, smoke):
    return Variant(attncc.Attention(score=attncc.softcap(SOFTCAP)),
                   score_mod=mods.softcap(SOFTCAP), sdpa=None, sdpa_reason=NO_SCORE_MOD,
                   params={"softcap": SOFTCAP})


FLEX_SET = (
    ("noop", _noop, "no mask, no score_mod"),
    ("causal", _causal, "causal mask"),
    ("relative-bias", _relative_bias, "score + (q - kv), traced score_mod"),
    ("head-bias", _head_bias, "score + hb[h]"),
    ("alibi", _alibi, "score + slope[h] * (kv - q)"),
    ("sliding-window", _sliding_window, "causal sliding window 2048 (smoke: L / 4)"),
    ("document", _document, "causal document mask, 12 documents (smoke: 3) from cu_seqlens"),
    ("prefix-lm", _prefix_lm, "prefix-LM 512 (smoke: L / 8)"),
    ("softcap", _softcap, "20 * tanh(score / 20)"),
)


# ---- sparse / reordered on token grids ---------------------------------------------------------

SPARSE_SHAPES = tuple(fill(s * s, D, "bfloat16", (s, s)) for D in (64, 128) for s in (64, 128))
SPARSE_SMOKE = (Shape(1, 1, 256, 16, "float16", (16, 16)),)


def _sparse(kind: str, order: str) -> Callable[[Shape, str, bool], Variant]:
    def make(shape: Shape, device: str, smoke: bool) -> Variant:
        height, width = shape.grid
        L = height * width
        if kind == "hilberta":
            tile, centre = (16, 4) if smoke else (64, 8)  # 64 = 4^3 tokens: aligned 8x8 squares
            mask = attncc.hilberta(height, width, tile, 0, centre)
            rank = inverse(attncc.hilbert((height, width)).permutation(L)).to(device)
            mask_mod = mods.hilberta(rank, height, width, tile, 0, centre)
            params = {"tile": tile, "shift": 0, "centre": centre}
        else:
            size = int(kind.split("-")[1].split("x")[0])
            mask = attncc.neighbourhood_2d(height, width, size, size)
            mask_mod = mods.neighbourhood_2d(height, width, size, size)
            params = {"kernel": [size, size]}
        reorder = attncc.hilbert((height, width)) if order == "hilbert" else None
        perm = reorder.permutation(L, device=device) if reorder is not None else None
        if perm is not None:
            mask_mod = mods.permuted(mask_mod, perm)
        return Variant(attncc.Attention(mask=mask, reorder=reorder), mask_mod, perm=perm,
                       params={**params, "order": order})
    return make


SPARSE_SET = tuple((f"{kind}-{order}", _sparse(kind, order), f"{about}, {order} order")
                   for kind, about in (("na2d-7x7", "2-D neighbourhood M12 7x7"),
                                       ("na2d-13x13", "2-D neighbourhood M12 13x13"),
                                       ("hilberta", "HilbertA M15, tile 64, centre 8x8"))
                   for order in ("rowmajor", "hilbert"))


WORKLOADS: tuple[Workload, ...] = (
    Workload("dense-causal", "dense", "causal", _dense_causal, DENSE_SHAPES, DENSE_SMOKE),
    Workload("dense-full", "dense", "non-causal", _dense_full, DENSE_SHAPES, DENSE_SMOKE),
    *(Workload(f"flex-{n}", "flex", about, make, FLEX_SHAPES, FLEX_SMOKE)
      for n, make, about in FLEX_SET),
    *(Workload(f"sparse-{n}", "sparse", about, make, SPARSE_SHAPES, SPARSE_SMOKE)
      for n, make, about in SPARSE_SET),
)


def select(only: list[str] | None) -> list[Workload]:
    """Workloads whose name contains any of the substrings (all when `only` is empty)."""
    if not only:
        return list(WORKLOADS)
    chosen = [w for w in WORKLOADS if any(s in w.name for s in only)]
    if not chosen:
        raise ValueError(f"--only {only}: no workload matches; the workloads are "
                         f"{[w.name for w in WORKLOADS]}")
    return chosen
