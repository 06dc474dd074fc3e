"""The prebuilt kernels' stride variants (issue 15, item 1).

The default variant assumes what Triton's JIT would infer for a contiguous launch: 16-byte aligned
pointers, unit head-dim strides and every other stride a multiple of 16. That last hint is what
lets Triton prove each row starts on a 16-byte boundary, so Q/K/V move as 16-byte `LDGSTS`
copies, pipelined over several shared-memory buffers; without it every element is a 2-byte load.
A launch checks its strides on the host and takes the ".oddstrides" variant (compiled for any
stride) when one is not a multiple of 16; both variants are checked here:
- the host check, on the tensors a launch hands over (forward, dq and dk/dv);
- the launches it picks, run on the interpreter against the fp64 reference on odd shapes,
  unaligned and non-contiguous views;
- the default variant's sm_90 cubin moves Q/K/V with LDGSTS (ptxas and cuobjdump, no GPU), the
  ".oddstrides" one with 2-byte loads.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import attncc
from attncc.backends.triton import aot
from attncc.backends.triton import forward as triton_forward
from attncc.backends.triton.backward import kernel as triton_backward
from attncc.backends.triton.launch_spec import (ALIGNED, BACKWARD_STRIDES, DEFAULT_VARIANT,
                                                STRIDES, UNIT_STRIDES, Variant, backward_spec,
                                                choose_variant, forward_spec)
from benchmarks import sass
from tests.dense_oracle import dense_attention


def _values(q, k, v, o) -> dict:
    names = [f"stride_{x}{s}" for x in "qkvo" for s in ("b", "h", "m" if x in "qo" else "n", "d")]
    strides = [*q.stride(), *k.stride(), *v.stride(), *o.stride()]
    return dict(zip(["Q", "K", "V", "O", "LSE", "VISITS"], [q, k, v, o, o, o])) | dict(
        zip(names, strides))


def _choose(q, k, v) -> Variant:
    return choose_variant(_values(q, k, v, torch.empty_like(q)), ALIGNED, UNIT_STRIDES, STRIDES)


def test_the_host_check_reads_every_stride():
    x = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    assert _choose(x, x, x) == DEFAULT_VARIANT
    # rows 72 elements apart (head dim 72): contiguous, but no multiple of 16
    wide = torch.randn(2, 3, 40, 72, dtype=torch.float16)
    assert _choose(wide, x, x) == Variant(divisible=False)
    assert _choose(x, x, wide[..., :64]) == Variant(divisible=False)  # a slice of v
    # heads 88 elements apart, rows 16 apart: only the head stride is off
    odd_h = torch.randn(400, dtype=torch.float16).as_strided((1, 3, 5, 16), (400, 88, 16, 1))
    assert _choose(x, odd_h, x) == Variant(divisible=False)
    # BSHD views (heads inner): strides (L*H*D, D, H*D, 1), all multiples of 16
    bshd = torch.randn(2, 40, 3, 64, dtype=torch.float16).transpose(1, 2)
    assert _choose(bshd, bshd, bshd) == DEFAULT_VARIANT
    # a transposed head dim is no unit stride: the strided variant, and its stride 1 (the row
    # stride now) is no multiple of 16 either
    t = torch.randn(2, 3, 64, 40, dtype=torch.float16).transpose(2, 3)
    assert _choose(t, x, x) == Variant(contiguous=False, divisible=False)
    assert Variant(divisible=False).suffix() == ".oddstrides"
    assert len(BACKWARD_STRIDES) == 28 and len(STRIDES) == 16


def test_the_specs_hint_the_strides_the_variant_assumes():
    fwd = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
    default = forward_spec(fwd, "float16", 64, 64, 90)
    assert default.divisible == tuple(s for s in STRIDES if s not in UNIT_STRIDES)
    assert forward_spec(fwd, "float16", 64, 64, 90, Variant(divisible=False)).divisible == ()
    strided = forward_spec(fwd, "float16", 64, 64, 90, Variant(contiguous=False))
    assert strided.divisible == STRIDES and strided.aligned == ()
    bwd = triton_backward.TritonBackward(fwd, ())
    dq = backward_spec(bwd, "dq", "float16", 64, 64, 90)
    assert "stride_dkn" in dq.divisible and "stride_qd" not in dq.divisible
    assert backward_spec(bwd, "dkdv", "float16", 64, 64, 90, Variant(divisible=False)
                         ).divisible == ()


@pytest.fixture
def picked(monkeypatch) -> list[tuple[str, Variant]]:
    """Launches take the prebuilt path as on an sm_90 GPU, but each binary's launch runs the
    kernel's source on the interpreter instead: what the host check picked is recorded."""
    record: list[tuple[str, Variant]] = []

    def forward_run(self, kind, grid, values, device, signature, variant=DEFAULT_VARIANT,
                    tiles=None):
        record.append((kind, variant))
        fn = self.jit_function() if kind == "forward" else self.block_map_function()
        fn[grid](**values)

    def backward_run(self, kernel, grid, values, device, signature, variant):
        record.append((kernel, variant))
        dq_fn, dkdv_fn = self.functions()
        (dq_fn if kernel == "dq" else dkdv_fn)[grid](**values)

    monkeypatch.setattr(triton_forward, "prebuilt_arch", lambda device: 90)
    monkeypatch.setattr(triton_backward, "prebuilt_arch", lambda device: 90)
    monkeypatch.setattr(triton_forward.TritonForward, "run_prebuilt", forward_run)
    monkeypatch.setattr(triton_backward.TritonBackward, "_run_prebuilt", backward_run)
    return record


def _layouts(B, H, L, D):
    """(name, base shape, view of a base tensor) of each fp16 layout: contiguous; rows D+8
    apart; one element past a 16-byte boundary; head dim transposed."""
    return [("contiguous", (B, H, L, D), lambda t: t),
            ("rows D+8 apart", (B, H, L, D + 8), lambda t: t[..., :D]),
            ("unaligned", (B * H * L * D + 1,), lambda t: t[1:].view(B, H, L, D)),
            ("transposed", (B, H, D, L), lambda t: t.transpose(2, 3))]


EXPECTED = {"contiguous": DEFAULT_VARIANT, "rows D+8 apart": Variant(divisible=False),
            "unaligned": Variant(contiguous=False, divisible=False),
            "transposed": Variant(contiguous=False, divisible=False)}


@pytest.mark.parametrize("D", [16, 24])
def test_each_variant_a_launch_picks_matches_the_fp64_reference(picked, D):
    """Odd lengths (37 rows); forward, dq and dk/dv. Head dim 24 makes even the contiguous
    layout's rows 24 elements apart: the ".oddstrides" variant."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    g = torch.Generator().manual_seed(0)
    for name, shape, view in _layouts(1, 2, 37, D):
        picked.clear()
        bases = [torch.randn(*shape, generator=g).half().requires_grad_() for _ in range(3)]
        q, k, v = (view(b) for b in bases)
        o = attn(q, k, v, backend="triton")
        do = torch.randn(o.shape, generator=g).half()
        o.backward(do)
        refs = [view(b.detach()).double().requires_grad_() for b in bases]
        ref, _ = dense_attention(*refs, allowed=torch.ones(37, 37, dtype=torch.bool).tril())
        ref.backward(do.double())
        torch.testing.assert_close(o.double(), ref, atol=2e-3, rtol=2e-3)
        for base, want in zip(bases, refs):
            torch.testing.assert_close(view(base.grad).double(), want.grad, atol=1e-2,
                                       rtol=1e-2)
        expected = EXPECTED[name] if D % 16 == 0 or name != "contiguous" else Variant(
            divisible=False)
        assert [kind for kind, _ in picked] == ["forward", "dq", "dkdv"], name
        assert picked[0][1] == expected, name
        # the backward also reads do, dq, dk, dv (laid out by autograd and attncc): its
        # variant is never more specialised than the forward's inputs allow
        for kind, variant in picked[1:]:
            assert variant.divisible <= expected.divisible, (name, kind)
            assert variant.contiguous <= expected.contiguous, (name, kind)


def test_the_default_variant_moves_qkv_with_ldgsts_on_sm90():
    """ptxas for sm_90, fp16, head dim 64: the default variant's Q/K/V loads are 16-byte
    asynchronous copies (LDGSTS.128) and it builds its pipeline; the ".oddstrides" variant of
    the same source has only 2-byte loads (what every prebuilt kernel ran before the hint)."""
    fwd = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
    bwd = triton_backward.TritonBackward(fwd, ())
    with ThreadPoolExecutor(3) as pool:  # each compile is a child process
        default, odd, dq = pool.map(lambda job: job(), [
            lambda: aot.compile_for_target(fwd, "float16", 64, 64, 90),
            lambda: aot.compile_for_target(fwd, "float16", 64, 64, 90, divisible=False),
            lambda: aot.compile_spec(backward_spec(bwd, "dq", "float16", 64, 64, 90), 90, "dq",
                                     dtype="float16", head_dims=(64, 64))])
    cuobjdump = sass.cuobjdump_path()
    if not Path(cuobjdump).exists():
        pytest.skip("cuobjdump is not shipped with this triton")
    loads = {name: _global_loads(art.cubin, cuobjdump)
             for name, art in (("default", default), ("odd", odd), ("dq", dq))}
    for name in ("default", "dq"):
        assert any(op.startswith("LDGSTS") and op.endswith(".128") for op in loads[name]), loads
        assert not any(op.endswith((".U16", ".U8")) for op in loads[name]), loads
    assert set(loads["odd"]) <= {"LDG.E.U16", "LDG.E"} and loads["odd"]["LDG.E.U16"] > 0
    # several K/V buffers in shared memory: the pipeline's stages exist
    assert default.shared_bytes >= 2 * odd.shared_bytes


def _global_loads(cubin: bytes, cuobjdump: str) -> Counter:
    """Global-memory load opcodes with their width modifiers ("LDG.E.U16") -> count."""
    functions = sass.parse_functions(sass.disassemble(cubin, cuobjdump))
    return Counter(i.op for body in functions.values() for i in body if sass.load_kind(i.op))
