"""Select tiles: block sizes, warps and stages for one signature.

Requires: a plan with a signature. Ensures: a fully filled `Schedule` that fits the target's
shared memory (K and V tiles for every pipeline stage plus the Q tile), keeping any field the
user fixed in `spec.schedule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from attncc.ir.nodes import Schedule
from attncc.ir.plan import KernelPlan

# Shared memory per block a kernel may use (bytes), by compute capability.
SHARED_MEMORY = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024,
                 "sm100": 227 * 1024, "sm120": 99 * 1024}
MAX_HEAD_DIM = 256


def padded(d: int) -> int:
    """Head dims run padded to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, 1 << (d - 1).bit_length())


def _shared_bytes(bm: int, bn: int, stages: int, dqk: int, dv: int, elem: int) -> int:
    return elem * (bm * dqk + stages * bn * (dqk + dv))


def fit_shared_memory(sched: Schedule, target: str, shared_bytes: Callable[[Schedule], int]
                      ) -> Schedule:
    """Shrink `sched` (stages first, then block_n, then block_m, never below 16) until
    `shared_bytes(sched)` fits the target's shared memory per block."""
    limit = SHARED_MEMORY.get(target, 99 * 1024)
    bm, bn, stages = sched.block_m, sched.block_n, sched.num_stages
    while shared_bytes(dataclasses.replace(sched, block_m=bm, block_n=bn,
                                           num_stages=stages)) > limit:
        if stages > 1:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return dataclasses.replace(sched, block_m=bm, block_n=bn, num_stages=stages)


def choose(target: str, dtype: str, dqk: int, dv: int) -> Schedule:
    """Default tiles; the interpreter gets small tiles because it runs on the CPU."""
    if target == "interpreter":
        return Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1)
    d, elem = max(padded(dqk), padded(dv)), 4 if dtype == "float32" else 2
    if d <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif d <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3 if target == "sm90" else 2
    else:
        bm, bn, warps, stages = 64, 32, 4, 2
    if elem == 4:
        bm, bn = bm // 2, bn // 2
    return fit_shared_memory(Schedule(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages),
                             target, lambda sc: _shared_bytes(sc.block_m, sc.block_n,
                                                              sc.num_stages, padded(dqk),
                                                              padded(dv), elem))


@dataclass(frozen=True)
class SelectTiles:
    name: str = "select-tiles"

    def __call__(self, plan: KernelPlan) -> KernelPlan:
        sig = plan.signature
        chosen = choose(sig.target, sig.dtype, sig.head_dim_qk, sig.head_dim_v)
        user = plan.spec.schedule
        filled = dataclasses.replace(chosen, **{
            f.name: getattr(user, f.name) for f in dataclasses.fields(user)
            if getattr(user, f.name) not in (None, False)})
        return dataclasses.replace(plan, schedule=filled)
