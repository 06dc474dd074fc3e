"""TMA tensor maps of K and V for the sm_90a forward, encoded on the host.

A tensor map describes a BHSD tensor as 4-D (head dim, sequence, head, batch) to the copy
engine; the kernel copies one (64 head dims x BLOCK_N keys) box per instruction into 128-byte
swizzled shared memory (the layout its wgmma reads), and the engine zero-fills the rows past the
sequence's end (what a partial last tile needs). `driver.encode_tensor_map` calls
cuTensorMapEncodeTiled; the map goes to the kernel as a 128-byte __grid_constant__ parameter.
"""

from __future__ import annotations

import torch

from attncc.backends.cuda import driver

NONE = bytes(128)  # the parameter of a cp.async launch (the kernel does not read it)
BOX_HEAD_DIMS = 64  # 128 bytes of 2-byte elements: one swizzle row
# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion (cuda.h)
DATA_TYPES = {torch.float16: 6, torch.bfloat16: 9}
SWIZZLE_128B = 3
L2_PROMOTION_128B = 2
MAX_STRIDE = 1 << 40


def allows(t: torch.Tensor) -> bool:
    """Whether a tensor map can describe the BHSD tensor `t`: a known 2-byte dtype, a
    contiguous head dim that is a multiple of 64, a 16-byte aligned pointer, and batch, head
    and sequence strides that are positive multiples of 16 bytes below 2^40 (a broadcast,
    stride-0 dimension is left to cp.async)."""
    size = t.element_size()
    return (t.dtype in DATA_TYPES and t.dim() == 4 and t.stride(3) == 1
            and t.shape[3] % BOX_HEAD_DIMS == 0 and t.data_ptr() % 16 == 0
            and all(0 < s * size < MAX_STRIDE and s * size % 16 == 0 for s in t.stride()[:3]))


def encode_bhsd(t: torch.Tensor, block_n: int) -> bytes:
    """The 128-byte tensor map of the BHSD tensor `t` (`allows(t)`), boxes of 64 head dims x
    `block_n` rows of one (batch, head)."""
    B, H, L, D = t.shape
    size = t.element_size()
    sb, sh, sn, _ = t.stride()
    return driver.encode_tensor_map(DATA_TYPES[t.dtype], t.data_ptr(), dims=(D, L, H, B),
                                    strides=(sn * size, sh * size, sb * size),
                                    box=(BOX_HEAD_DIMS, block_n, 1, 1), swizzle=SWIZZLE_128B,
                                    l2_promotion=L2_PROMOTION_128B)
