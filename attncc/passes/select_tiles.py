"""Select tiles: block sizes, warps and stages for one signature.

Requires: a plan with a signature. Ensures: a fully filled `Schedule` that fits the target's
shared memory (K and V tiles for every pipeline stage plus the Q tile), keeping any field the
user fixed in `spec.schedule`.

Every tile table of the softmax family lives here: the forward's (`choose`), the backward's
(`choose_backward`) and the serving kernel's (`choose_serving`); the linear family's chunk and
value-block tables are in `attncc.passes.select_tiles_linear`.
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
    """Forward: the resident q tile plus k and v tiles per pipeline stage."""
    return elem * (bm * dqk + stages * bn * (dqk + dv))


def _shared_bytes_backward(kernel: str, bm: int, bn: int, stages: int, dqk: int, dv: int,
                           elem: int) -> int:
    """A backward kernel's tiles in shared memory: dk/dv keeps k, v resident and streams q, do
    per pipeline stage; dq keeps q, do resident and streams k, v."""
    resident, streamed = (bn, bm) if kernel == "dkdv" else (bm, bn)
    return elem * (dqk + dv) * (resident + stages * streamed)


BACKWARD_KERNELS = ("dq", "dkdv")


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
    """Default tiles; the interpreter gets small tiles because it runs on the CPU. Read from
    ptxas for sm_80/sm_90 (causal, 16-divisible strides, docs/performance.md): d64 128 x 64 at
    4 warps sits at 255 registers and spills 16 B on sm_90 inside the partial-tile loop; at 8
    warps 175 (sm_90) / 189 (sm_80) registers, no spill."""
    if target == "interpreter":
        return Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1)
    d, elem = max(padded(dqk), padded(dv)), 4 if dtype == "float32" else 2
    if d <= 64:
        bm, bn, warps, stages = 128, 64, 8 if elem == 2 else 4, 3
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


def choose_backward(target: str, dtype: str, dqk: int, dv: int, kernel: str) -> Schedule:
    """Tiles of one backward kernel ("dq" or "dkdv") by head dim (BLOCK_M query rows, BLOCK_N
    keys), shrunk until that kernel fits the target's shared memory; the interpreter gets
    64 x 64 tiles for both (fewer, larger tiles run faster on the CPU). Each kernel has its own
    tiles because their multiplies differ: dk/dv's rows are keys, dq's are queries, and Hopper's
    warpgroup MMA (HGMMA) needs 64 rows. Not tuned on a GPU yet (none was lent): chosen from
    ptxas's register and spill counts and the SASS instructions per loop iteration (causal,
    bf16, 16-divisible strides; docs/performance.md).

    dk/dv: d <= 64: 32 x 128 at 8 warps, as the Triton tutorial's dk/dv (sm_90: 202
    registers, 277 instructions per full iteration and warp; 64 x 64 needs 451, at 4 warps it
    spills). d128 on sm_90: 32 x 128, 3 stages (255 registers but no spill, 350; 64 x 64 spills
    72 B around the loops, 558; 16 x 128 has 234 registers at 1.4x the instructions per pair);
    elsewhere 64 x 64 (sm_80: 182 registers; 32 x 128 spills in the loop). d256: 32 x 32,
    8 warps, 2 stages (sm_90 / sm_80: 186 / 176 registers, pipelined).

    dq: 128 query rows (two 64-row warpgroup MMAs on sm_90), as the tutorial's dq (128 x 32);
    instructions per 4096 (query, key) pairs over all warps, full / partial tiles. d <= 128 on
    sm_90: 128 x 64, 8 warps, 2 stages (d64: 167 registers, 1140 / 2696; 128 x 32 1512 / 2920,
    64 x 64 at 4 warps 1200 / 2848, the shared 32 x 128 on mma.sync 1944 / 3696; d128: 239
    registers, no spill, 1416 / 3012; 128 x 32 at 3 stages 1992 / 3776, 32 x 128 3168 / 5320,
    64 x 64 3224 / 6512, 128 x 64 at 3 stages 244 registers). Elsewhere 128 x 32, 8 warps,
    2 stages (sm_80 d64: 172 registers, 1448 / 3000, 32 x 128 1936 / 4232, at 4 warps 8 B of
    stack; d128: 191 registers, 2264 / 4264, 64 x 64 2752 / 5000, 128 x 64 spills 32 B).
    d256: 32 x 32, 8 warps, 2 stages (sm_90 / sm_80: 141 / 166 registers, pipelined; at
    1 stage nothing is pipelined and it needs 254)."""
    if kernel not in BACKWARD_KERNELS:
        raise ValueError(f"kernel: expected one of {BACKWARD_KERNELS}, got {kernel!r}")
    if target == "interpreter":
        return Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1)
    d, elem = max(padded(dqk), padded(dv)), 4 if dtype == "float32" else 2
    if kernel == "dq":
        if d <= 128:
            bm, bn, warps, stages = 128, 64 if target == "sm90" else 32, 8, 2
        else:
            bm, bn, warps, stages = 32, 32, 8, 2
    elif d <= 64:
        bm, bn, warps, stages = 32, 128, 8, 2
    elif d <= 128 and target == "sm90":
        bm, bn, warps, stages = 32, 128, 8, 3
    elif d <= 128:
        bm, bn, warps, stages = 64, 64, 8, 2
    else:
        bm, bn, warps, stages = 32, 32, 8, 2
    if elem == 4:
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    return fit_shared_memory(Schedule(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages),
                             target, lambda sc: _shared_bytes_backward(
                                 kernel, sc.block_m, sc.block_n, sc.num_stages, padded(dqk),
                                 padded(dv), elem))


def choose_serving(head_dim_max: int, interpreter: bool) -> tuple[int, int]:
    """The serving kernel's (BLOCK_N, num_warps). Measured with ptxas for sm_80/sm_90, fp16,
    paged, BLOCK_M 16-64: head dim 128 at 4 warps spills (255 registers + 600 B stack), at 8
    warps it does not (202); head dim 256 spills at BLOCK_N 64 even with 8 warps, not at 32.
    The interpreter takes 32 so short test sequences still cross several kv tiles."""
    if interpreter:
        return 32, 4
    return (64 if head_dim_max <= 128 else 32), (8 if head_dim_max >= 128 else 4)


def block_map_kv_tiles(pieces: int) -> int:
    """kv tiles the row-interval block-map kernel classifies at once: one vector of tile
    bounds; the exact count for undecided tiles works on BLOCK_M x this many (row, tile) pairs
    per intersection of pieces (2^pieces - 1 of them). Read from ptxas (128 x 64 tiles, 4 warps,
    sm_90 / sm_80): one piece at 32, 65-121 registers, no spill; two pieces (M5, M6) at 16 spill
    16 B on sm_80, at 8 take 72-80 registers; three (M18) at 32 take 255 and spill 136 B on
    sm_90, at 8 161-163 and none."""
    return 32 if pieces == 1 else 8

SERVING_SMS = 132  # programs to fill an H100; the split count aims at this many
SERVING_MAX_SPLITS = 32


def serving_block_m(max_rows: int) -> int:
    """The serving kernel's BLOCK_M for `max_rows` query rows of one kv head in the longest
    request (query length times the GQA group): 16 for decode-sized work, else 64."""
    return 16 if max_rows <= 16 else 64


def serving_splits(programs: int, kv_tiles: int) -> int:
    """Split-KV parts when the caller gives none: enough programs to fill the GPU, no more
    splits than kv tiles."""
    if programs >= SERVING_SMS:
        return 1
    return min(kv_tiles, -(-SERVING_SMS // programs), SERVING_MAX_SPLITS)


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
