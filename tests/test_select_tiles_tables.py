"""Every tile, chunk and split table lives in attncc/passes/select_tiles*.py; these values are
what the backends chose before the tables moved there (backward, serving, linear kernels)."""

from __future__ import annotations

import pytest

from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes import select_tiles as st
from attncc.passes import select_tiles_linear as sl


def _s(bm, bn, warps, stages):
    return Schedule(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("args, dq, dkdv", [
    (("sm90", "float16", 128, 128), _s(128, 64, 8, 2), _s(32, 128, 8, 3)),
    (("sm90", "bfloat16", 64, 64), _s(128, 64, 8, 2), _s(32, 128, 8, 2)),
    (("sm80", "bfloat16", 128, 128), _s(128, 32, 8, 2), _s(64, 64, 8, 2)),
    (("sm80", "float32", 256, 256), _s(16, 16, 8, 2), _s(16, 16, 8, 2)),
    (("sm86", "bfloat16", 64, 64), _s(128, 32, 8, 2), _s(32, 128, 8, 2)),
    (("sm86", "bfloat16", 128, 128), _s(128, 32, 8, 2), _s(64, 64, 8, 2)),
    (("interpreter", "float16", 64, 64), _s(64, 64, 4, 1), _s(64, 64, 4, 1)),
])
def test_backward_tiles(args, dq, dkdv):
    """dq and dk/dv take their own tiles (on sm_90, 128 query rows keep dq on the warpgroup
    MMA; 32 x 128 keeps dk/dv there); each fits the target's shared memory."""
    assert st.choose_backward(*args, "dq") == dq
    assert st.choose_backward(*args, "dkdv") == dkdv
    with pytest.raises(ValueError, match="kernel"):
        st.choose_backward(*args, "both")


def test_backward_tiles_fit_shared_memory():
    """sm_86 has 99 KB: dq's resident q, do (128 rows) plus 2 stages of k, v at d128 fit as
    they are; fp32 halves both tiles."""
    assert st._shared_bytes_backward("dq", 128, 32, 2, 128, 128, 2) <= st.SHARED_MEMORY["sm86"]
    assert st.choose_backward("sm86", "float32", 128, 128, "dq") == _s(64, 16, 8, 2)


def test_serving_tiles_and_splits():
    assert [st.choose_serving(d, False) for d in (64, 128, 256)] == [(64, 4), (64, 8), (32, 8)]
    assert st.choose_serving(64, True) == (32, 4)
    assert [st.serving_block_m(n) for n in (1, 16, 17)] == [16, 16, 64]
    assert st.serving_splits(132, 100) == 1  # the GPU is full without splitting
    assert st.serving_splits(8, 100) == 17 and st.serving_splits(8, 5) == 5
    assert st.serving_splits(1, 1000) == st.SERVING_MAX_SPLITS


def test_linear_tables():
    assert sl.value_block(273, 64) == 16 and sl.value_block(64, 200) == 64
    assert sl.backward_value_block(128, 128) == 32
    assert sl.chunked_value_block(128, 128, rule="vector_gate") == 32
    assert sl.chunked_value_block(273, 64, rule="linear") == 16
    assert sl.chunked_value_block(128, 128, rule="gated_delta") == 64
    assert sl.chunked_value_block(128, 128, rule="gated_delta", arch=80) == sl.BLOCK_V_SM80
    assert sl.chunked_value_block(64, 64, rule="block_causal", arch=80) == 64  # L7: one kernel
    gated, plain = LinearState(rule="gated_delta"), LinearState(rule="linear")
    assert sl.gpu_chunk(gated, 128) == 64 and sl.gpu_chunk(plain, 64) == 64
    assert sl.gpu_chunk(plain, 273) == 16
    assert sl.chunked_chunk(gated, 128, interpreted=True) == sl.CHUNK_INTERPRETER
    assert [sl.backward_chunk(n) for n in (1, 100, 10**5)] == [16, 16, 128]
