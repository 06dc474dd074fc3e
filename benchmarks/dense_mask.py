"""SDPA's dense `attn_mask` for a masked workload, built from its FlexAttention-style mods.

bool [1 | H, L, L] from the mask_mod, or an additive bias in the inputs' dtype from the score_mod
(`score_mod(0, b, h, q, kv)`, -inf where the mask_mod forbids): the "SDPA with a dense mask" peer
in benchmarks/README.md. Built a chunk of query rows at a time (small temporaries); a mask above
BUDGET_BYTES is not built at all and the peer records why.
"""

from __future__ import annotations

import torch

from benchmarks.workloads import DTYPES, Case

BUDGET_BYTES = 4 << 30
ROWS = 1024  # query rows per chunk


class TooLarge(Exception):
    """The dense mask would exceed BUDGET_BYTES."""


def _indices(case: Case, r0: int, r1: int) -> tuple[torch.Tensor, ...]:
    dev, H, L = case.device, case.shape.H, case.shape.L
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    q = torch.arange(r0, r1, device=dev).view(1, 1, -1, 1)
    kv = torch.arange(L, device=dev).view(1, 1, 1, L)
    return b, h, q, kv


def _rows(case: Case, r0: int, r1: int) -> torch.Tensor:
    """The mask (bool) or bias (float32) of query rows [r0, r1), broadcast over what it ignores."""
    variant, (b, h, q, kv) = case.variant, _indices(case, r0, r1)
    allowed = variant.mask_mod(b, h, q, kv) if variant.mask_mod is not None else None
    if variant.score_mod is None:
        return allowed
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=case.device)
    bias = variant.score_mod(zero, b, h, q, kv).float()
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias


def dense_mask(case: Case) -> torch.Tensor:
    """[1, H | 1, L, L]: bool (mask only) or the inputs' dtype (a bias); cached on the case."""
    if "dense_mask" in case.cache:
        return case.cache["dense_mask"]
    L = case.shape.L
    probe = _rows(case, 0, 1)
    heads = probe.shape[1] if probe.dim() == 4 else 1
    dtype = torch.bool if probe.dtype == torch.bool else DTYPES[case.shape.dtype]
    nbytes = heads * L * L * (1 if dtype == torch.bool else torch.finfo(dtype).bits // 8)
    if nbytes > BUDGET_BYTES:
        raise TooLarge(f"a dense {'mask' if dtype == torch.bool else 'bias'} [1, {heads}, {L}, "
                       f"{L}] needs {nbytes / 2**30:.1f} GiB, over the {BUDGET_BYTES >> 30} GiB "
                       "budget of dense_mask.py")
    out = torch.empty(1, heads, L, L, dtype=dtype, device=case.device)
    for r0 in range(0, L, ROWS):
        r1 = min(r0 + ROWS, L)
        out[:, :, r0:r1] = _rows(case, r0, r1).expand(1, heads, r1 - r0, L)
    case.cache["dense_mask"] = out
    return out
