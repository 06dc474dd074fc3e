"""attncc and its peers. Each implementation prepares a zero-argument callable for a case (its
output in the case's token order), or raises `Unavailable` with the reason: a peer is never
silently dropped; the reason goes into the JSON.

Peers (benchmarks/README.md): SDPA under `torch.nn.attention.sdpa_kernel` with each backend (flash,
efficient, cuDNN, math), given `is_causal` for causal workloads and a dense mask or bias
(dense_mask.py) for masked ones; FlexAttention under `torch.compile` with a BlockMask from the
workload's mask_mod (built once per case, outside the timing, as attncc's block maps are).
PENDING_PEERS lists peers that are not carried.

Smoke mode (CPU): attncc runs under Triton's interpreter; SDPA's math backend runs on the CPU;
FlexAttention runs eagerly (no torch.compile on a CPU) so its mods are checked too; the other
SDPA backends are "unavailable: no CUDA". Nothing is timed there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import attncc
from benchmarks.dense_mask import TooLarge, dense_mask
from benchmarks.workloads import Case

PENDING_PEERS = {
    "flash-linear-attention": "not carried: no linear-attention workload has landed",
}


class Unavailable(Exception):
    """The implementation cannot run this case; the message says why."""


@dataclass(frozen=True)
class Prepared:
    fn: Callable[[], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the entry


@dataclass(frozen=True)
class Impl:
    name: str
    prepare: Callable[[Case], Prepared]


def _prepare_attncc(case: Case) -> Prepared:
    spec = case.variant.spec
    attn = attncc.compile(spec)
    device = case.q.device
    runtime: dict[str, Any] = {c.name: c.tensor.to(device) for c in spec.captures
                               if c.tensor.device != device}
    if case.variant.perm is not None:
        runtime["permuted"] = True  # inputs already in the reordered layout
    # backend="triton": never the reference fallback (that would check the oracle against itself)
    q, k, v = case.q, case.k, case.v
    where = "Triton interpreter" if device.type == "cpu" else "Triton"
    return Prepared(lambda: attn(q, k, v, backend="triton", **runtime),
                    {"kernel": attn.name, "runs_on": where})


ATTNCC = Impl("attncc", _prepare_attncc)


# ---- SDPA --------------------------------------------------------------------------------------

def _sdpa_kwargs(case: Case) -> dict[str, Any]:
    variant = case.variant
    if variant.sdpa is None:
        raise Unavailable(variant.sdpa_reason or "SDPA cannot express this workload")
    if variant.sdpa == "plain":
        return {}
    if variant.sdpa == "causal":
        return {"is_causal": True}
    try:
        return {"attn_mask": dense_mask(case)}
    except TooLarge as e:
        raise Unavailable(str(e)) from None


def _math_fits(case: Case) -> None:
    """The math backend materialises the fp32 scores (and their softmax): skip what cannot fit."""
    s = case.shape
    need = 3 * s.B * s.H * s.L * s.L * 4
    free = torch.cuda.mem_get_info(case.q.device)[0]
    if need > 0.8 * free:
        raise Unavailable(f"math backend: about {need / 2**30:.0f} GiB of fp32 scores, "
                          f"{free / 2**30:.0f} GiB free")


def sdpa_peer(label: str, backend_name: str) -> Impl:
    def prepare(case: Case) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        cuda = case.q.device.type == "cuda"
        if not cuda and backend_name != "MATH":
            raise Unavailable("no CUDA")
        kwargs = _sdpa_kwargs(case)
        if cuda and backend_name == "MATH":
            _math_fits(case)
        q, k, v = case.q, case.k, case.v

        def fn() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        how = {"plain": "no mask", "causal": "is_causal=True"}.get(case.variant.sdpa)
        if how is None:
            m = kwargs["attn_mask"]
            how = f"dense {'bool mask' if m.dtype == torch.bool else 'additive bias'} " \
                  f"{list(m.shape)}"
        return Prepared(fn, {"mask": how})
    return Impl(label, prepare)


# ---- FlexAttention -----------------------------------------------------------------------------

@functools.cache
def _compiled_flex() -> Callable:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    # every (shape, mod) recompiles; past the default limit dynamo would silently run eager
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 4096))
    return torch.compile(flex_attention, dynamic=False)


def _eager_flex(*args: Any, **kwargs: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():  # "called without torch.compile": the point, in smoke mode
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(*args, **kwargs)


def _prepare_flex(case: Case) -> Prepared:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention: {e}") from None
    device = case.q.device
    if device.type != "cuda" and not case.smoke:
        raise Unavailable("no CUDA")
    variant, L = case.variant, case.shape.L
    if variant.flex_reason is not None:
        raise Unavailable(variant.flex_reason)
    # the mods here read neither b nor h in their masks: one block mask for every (b, h)
    block_mask = (create_block_mask(variant.mask_mod, None, None, L, L, device=device)
                  if variant.mask_mod is not None else None)
    flex = _compiled_flex() if device.type == "cuda" else _eager_flex
    q, k, v, score_mod = case.q, case.k, case.v, variant.score_mod
    mode = "torch.compile" if device.type == "cuda" else "eager (smoke: no torch.compile)"
    return Prepared(lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask),
                    {"mode": mode})


PEERS: tuple[Impl, ...] = (
    sdpa_peer("sdpa-flash", "FLASH_ATTENTION"),
    sdpa_peer("sdpa-efficient", "EFFICIENT_ATTENTION"),
    sdpa_peer("sdpa-cudnn", "CUDNN_ATTENTION"),
    sdpa_peer("sdpa-math", "MATH"),
    Impl("flex", _prepare_flex),
)
