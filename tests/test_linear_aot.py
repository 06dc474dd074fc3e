"""Every linear-state kernel variant goes through Triton's whole pipeline (ptxas included) for
sm_80 and sm_90 with no GPU: the chunked templates (additive with scalar / vector gates, delta,
block-causal with small and large blocks, taylor2), the recurrent one with taylor2, and varlen.
The recurrent kernel's other rules compile in tests/test_triton_linear.py, the chunked L1-L3
ones in tests/test_triton_linear_chunked.py. Register use and spills (stack bytes) are printed
(`pytest -s`) for the record. Spill-free on sm_90 (asserted): the vector gate (chunk 32, 32 value
columns), block-causal and 16-bit gated-delta (Dk <= 128) kernels. The chunked L1-L6 forward
is three kernels (WY for the delta rules, sweep, output), each compiled here; their registers
and loop spills at d128 are in benchmarks/results/static."""

from __future__ import annotations

import pytest

from attncc.backends.triton.linear.aot import compile_linear_for_target
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.backends.triton.linear.chunked import TritonChunkedLinear, compile_chunked_for_target
from attncc.ir.linear import LinearState

NODES = {
    "vector_gate": LinearState("vector_gate"),
    "delta": LinearState("delta"),
    "gated_delta": LinearState("gated_delta"),
    "block4_elu1_norm": LinearState("block_causal", feature_map="elu1", normalize=True, block=4),
    "block128": LinearState("block_causal", block=128),  # > chunk 64: the two-pass schedule
    "taylor2_norm": LinearState("linear", feature_map="taylor2", normalize=True),
}
# (form, node, arch, dtype, dk, dv, varlen)
CASES = [
    ("chunked", "vector_gate", 80, "bfloat16", 64, 64, False),
    ("chunked", "vector_gate", 90, "float16", 128, 128, False),
    ("chunked", "delta", 80, "float16", 128, 128, False),
    ("chunked", "gated_delta", 90, "bfloat16", 128, 128, False),
    ("chunked", "gated_delta", 80, "float32", 64, 64, False),
    ("chunked", "gated_delta", 90, "bfloat16", 256, 64, False),
    ("chunked", "gated_delta", 90, "float16", 64, 64, True),
    ("chunked", "block4_elu1_norm", 90, "float16", 64, 64, False),
    ("chunked", "block128", 80, "bfloat16", 128, 128, False),
    ("chunked", "taylor2_norm", 90, "float16", 16, 64, False),
    ("recurrent", "taylor2_norm", 80, "bfloat16", 16, 64, False),
    ("recurrent", "gated_delta", 90, "bfloat16", 128, 128, True),
]


@pytest.mark.parametrize("form,name,arch,dtype,dk,dv,varlen", CASES, ids=[
    f"{f}-{n}-sm{a}-{d}-{k}x{v}{'-varlen' if vl else ''}" for f, n, a, d, k, v, vl in CASES])
def test_compiles_for_gpu(form, name, arch, dtype, dk, dv, varlen):
    node = NODES[name]
    if form == "chunked":  # every kernel of the chunked forward ([wy], sweep, output; L7: one)
        kernel = TritonChunkedLinear(node)
        arts = compile_chunked_for_target(kernel, arch, dtype, dk, dv, varlen=varlen)
        assert [a.name for a in arts] == kernel.function_names()
    else:
        arts = [compile_linear_for_target(TritonRecurrentLinear(node), arch, dtype, dk, dv,
                                          varlen=varlen)]
    for art in arts:
        assert art.arch == arch and len(art.cubin) > 0 and f".target sm_{arch}" in art.ptx
        print(f"{art.name} sm_{arch} {dtype} {dk}x{dv}: {art.n_regs} regs, "
              f"{art.stack_bytes} stack bytes, {art.shared_bytes} shared bytes")
        # the split delta-rule kernels (WY, sweep, output) at 16 bits and Dk <= 128 too
        spill_free = name in ("vector_gate", "block4_elu1_norm") or (
            name == "gated_delta" and dk <= 128 and dtype != "float32")
        if arch == 90 and form == "chunked" and spill_free:
            assert art.stack_bytes in (None, 0), f"{art.name}: {art.stack_bytes} bytes of spills"
        assert art.shared_bytes <= 227 * 1024  # launchable on sm_90 (sm_80's 163 KiB below)
