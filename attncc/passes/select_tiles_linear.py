"""Tile tables of the linear-recurrence family: chunk sizes, value columns per program and warps
of the recurrent, chunked and backward kernels (the Triton backend's linear folder).

Each choice is made once here from the node, the feature dim F (= Dk unless phi is taylor2),
Dv and where the kernel runs; a kernel built with an explicit `chunk` or `block_v` overrides it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from attncc.ir.linear import LinearState
from attncc.passes.select_tiles import padded

# recurrent kernel: S [128, 64] fp32 is 64 registers a thread at 4 warps
DV_BLOCK_MAX = 64

# chunked kernels
CHUNK_GPU = 64
CHUNK_INTERPRETER = 32  # fewer, smaller tiles: the interpreter's cost is per element
# The split kernels (L1-L6: WY, sweep, output) at chunk 64 (sm_90 / sm_80 AOT, bf16 / fp16,
# Dk = Dv = 128; benchmarks/results/static): see SPLIT_NUM_WARPS. The vector gate keeps chunk
# 32 and 32 value columns (its output kernel builds A one key column at a time: C^2 Dk work per
# chunk); taylor2 (F_PAD 512) takes 16 to stay within shared memory (chunk 64 asks for 292 KiB)
CHUNK_GPU_RULE = {"vector_gate": 32}
BLOCK_V_RULE = {"vector_gate": 32}
# (warps, stages) of each split kernel, from the SASS at chunk 64, Dk = Dv = 128, 16-bit
# (benchmarks/results/static): 4 warps as fla's fwd_kernel_h (S [128, 64] fp32 is 64 registers
# a thread); the sweep at 2 stages (sm_90 L6 at 3: 250 registers, 137 KB shared; at 2: 228 and
# 96 KB, no spill)
SPLIT_LAUNCH = {"wy": (4, 3), "sweep": (4, 2), "output": (4, 3)}
# sm_80 (mma.sync: operands and accumulators all in registers) takes 32 value columns a
# program: at 64 the sweep spills in its loop at 4 warps (L3 255 registers, 144 B), and at 8
# warps L6's sweep and both output kernels sit at 255 registers; at 32 and 4 warps: sweep L3
# 235 / L6 223, output 182, no spill
BLOCK_V_SM80 = 32
# L7's one kernel, sm_90 AOT, Dk = Dv = 64, chunk 64: 8 warps with tf32 dots spill nothing;
# ieee fp32 dots (FMA, no tensor cores) spill ~7 KB at 8 warps and ~10 KB at 4
CHUNKED_NUM_WARPS = 8

# backward kernel
BACKWARD_CHUNK_MIN, BACKWARD_CHUNK_MAX = 16, 128  # about sqrt(L): least checkpoint + scratch
BACKWARD_TILE_MAX = 4096  # S [F_PAD, DV_BLOCK] fp32: ~6 such tiles live; 128 x 32 does not spill


def value_block(f_dim: int, dv: int, block_v: int | None = None) -> int:
    """Recurrent kernel's value columns per program: at most DV_BLOCK_MAX, and
    S [padded(F), DV_BLOCK] <= 8192 fp32 (taylor2's F = 273 takes 16 columns), unless `block_v`
    asks otherwise."""
    if block_v is None:
        block_v = max(16, min(DV_BLOCK_MAX, 8192 // padded(f_dim)))
    return min(padded(dv), block_v)


def chunked_value_block(f_dim: int, dv: int, block_v: int | None = None, rule: str = "",
                        arch: int | None = None) -> int:
    """Chunked kernel's value columns per program: the state tile S [padded(F), DV_BLOCK] stays
    <= 8192 fp32 (64 registers a thread at 4 warps), at most BLOCK_V_SM80 for the split kernels
    (every rule but L7's) on sm_<arch> below 90, unless `block_v` asks otherwise. `arch` None:
    the interpreter."""
    if block_v is None:
        most = BLOCK_V_RULE.get(rule, 64)
        if arch is not None and arch < 90 and rule != "block_causal":
            most = min(most, BLOCK_V_SM80)
        block_v = max(16, min(most, 8192 // padded(f_dim)))
    return min(padded(dv), block_v)


def split_launch(part: str) -> tuple[int, int]:
    """(num_warps, num_stages) of split kernel `part` (wy, sweep, output)."""
    return SPLIT_LAUNCH[part]


def gpu_chunk(node: LinearState, f_dim: int) -> int:
    """The chunked kernel's default chunk on a GPU: CHUNK_GPU, less for the rules in
    CHUNK_GPU_RULE and for wide features (a [CHUNK, padded(F)] tile stays <= 8192 elements)."""
    return max(16, min(CHUNK_GPU_RULE.get(node.rule, CHUNK_GPU), 8192 // padded(f_dim)))


def chunked_chunk(node: LinearState, f_dim: int, interpreted: bool) -> int:
    """The chunked kernel's default chunk: CHUNK_INTERPRETER under the interpreter, else
    `gpu_chunk`."""
    return CHUNK_INTERPRETER if interpreted else gpu_chunk(node, f_dim)


def backward_value_block(dk: int, dv: int, block_v: int | None = None) -> int:
    """Backward kernel's value columns per program: S [padded(Dk), DV_BLOCK] <=
    BACKWARD_TILE_MAX fp32 elements and at most `value_block`'s choice, unless `block_v` asks
    otherwise."""
    if block_v is None:
        block_v = max(16, min(value_block(dk, dv), BACKWARD_TILE_MAX // padded(dk)))
    return value_block(dk, dv, block_v)


def backward_chunk(length: int) -> int:
    """Backward kernel's checkpoint interval: the power of two nearest above sqrt(length), in
    [BACKWARD_CHUNK_MIN, BACKWARD_CHUNK_MAX]."""
    return min(BACKWARD_CHUNK_MAX,
               max(BACKWARD_CHUNK_MIN, padded(math.isqrt(max(length, 1) - 1) + 1)))


# chunked backward (L1-L4, attncc.backends.triton.linear.backward_chunked): tokens per chunk,
# key / value block sides, warps, stages. The vector gate's C x C x Dk loops (no tensor cores)
# take a smaller chunk, as its forward does; the interpreter's cost is per element
BACKWARD_CHUNKED_CHUNK_GPU = 64
BACKWARD_CHUNKED_CHUNK_RULE = {"vector_gate": 32}
BACKWARD_CHUNKED_CHUNK_INTERPRETER = 16
BACKWARD_CHUNKED_BLOCK = 64  # fla's BK = BV for chunk_bwd_dqkwg / chunk_bwd_dv
# sm_90 AOT, bf16, Dk = Dv = 128, chunk 64, L3 (regs / stack bytes): states 197 / 0 at 8 warps,
# 255 / 64 at 4; dqk 174 / 0 at 8, 255 / 40 at 4 with 32 value columns; dv 164 / 0 at 4
BACKWARD_CHUNKED_NUM_WARPS = {"states": 8, "dqk": 8, "dv": 4}
BACKWARD_CHUNKED_NUM_STAGES = 2  # 3 stages of the dqk loop's fp32 state tiles: 200 KB shared


class BackwardChunkedTiles(NamedTuple):
    block_k: int  # key channels per dqk program
    block_v: int  # value columns per states / dv program and per dqk loop step
    num_warps: dict[str, int]  # per kernel: "states", "dqk", "dv"
    num_stages: int


def backward_chunked_chunk(node: LinearState, interpreted: bool) -> int:
    """The chunked backward's default chunk: BACKWARD_CHUNKED_CHUNK_INTERPRETER under the
    interpreter, else BACKWARD_CHUNKED_CHUNK_GPU (less for the rules in the rule table)."""
    if interpreted:
        return BACKWARD_CHUNKED_CHUNK_INTERPRETER
    return BACKWARD_CHUNKED_CHUNK_RULE.get(node.rule, BACKWARD_CHUNKED_CHUNK_GPU)


def backward_chunked_tiles(dk: int, dv: int, block_v: int | None = None) -> BackwardChunkedTiles:
    """The chunked backward's blocks: BACKWARD_CHUNKED_BLOCK key channels and value columns, at
    most padded(dk) / padded(dv), unless `block_v` asks otherwise."""
    return BackwardChunkedTiles(min(padded(dk), BACKWARD_CHUNKED_BLOCK),
                                min(padded(dv), block_v or BACKWARD_CHUNKED_BLOCK),
                                dict(BACKWARD_CHUNKED_NUM_WARPS), BACKWARD_CHUNKED_NUM_STAGES)


# chunked delta-rule backward (L5, L6, attncc.backends.triton.linear.backward_delta): the same
# chunk and key block; value columns per program (`states`) or per loop step (the others) and
# warps per kernel ("wy": the WY representation, "states": the sweeps, "dqk": dq, dk', dW,
# "wy_bwd": the WY backward). sm_90 AOT, bf16, Dk = Dv = 128, chunk 64, L6 (regs / stack bytes):
# states 254 / 0 at 64 columns (1972 insts per chunk and program) and 239 / 0 at 32 (1616, twice
# the programs); wy_bwd 255 / 520 at 32 columns with the key dim whole, 238 / 0 in key blocks
BACKWARD_DELTA_BLOCK_V = {"wy": 32, "states": 64, "dqk": 32, "wy_bwd": 32}
BACKWARD_DELTA_NUM_WARPS = {"wy": 4, "states": 8, "dqk": 8, "wy_bwd": 8}


class BackwardDeltaTiles(NamedTuple):
    block_k: int  # key channels per dqk program and per wy_bwd loop step
    block_v: dict[str, int]  # per kernel: value columns per program (states) or loop step
    num_warps: dict[str, int]  # per kernel: "wy", "states", "dqk", "wy_bwd"
    num_stages: int


def backward_delta_tiles(dk: int, dv: int, block_v: int | None = None) -> BackwardDeltaTiles:
    """The chunked delta-rule backward's blocks: the additive backward's key block and stages,
    BACKWARD_DELTA_BLOCK_V's value columns per kernel (each at most padded(dv); all `block_v`
    if given)."""
    value = {part: min(padded(dv), block_v or n) for part, n in BACKWARD_DELTA_BLOCK_V.items()}
    return BackwardDeltaTiles(min(padded(dk), BACKWARD_CHUNKED_BLOCK), value,
                              dict(BACKWARD_DELTA_NUM_WARPS), BACKWARD_CHUNKED_NUM_STAGES)
