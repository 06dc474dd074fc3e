"""benchmarks/decode_checks.py: the decode step's index-check cost, with and without the checks
(smoke shape on the CPU interpreter), and that its unchecked path really skips them."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.triton import serve_run as serving_run
from benchmarks import decode_checks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")


def test_smoke_row_times_both_paths_and_the_host_check():
    row = decode_checks.measure(decode_checks.SMOKE_SHAPES[0], "cpu", reps=1)
    assert row.checked_us > 0 and row.unchecked_us > 0
    assert 0 < row.host_check_us < row.host_run_us  # the check is a part of run()'s host work
    text = decode_checks.table([row], "cpu")
    assert "| checked µs | unchecked µs | overhead | host check µs | host run() µs |" in text
    assert text.splitlines()[-1].startswith("| 2 | 4 | 2 | 16 | 16 | 40 |")


def test_the_unchecked_switch_turns_the_checks_off():
    """A negative kv_len reads nothing either way; only the checked run reports it."""
    q, kc, vc, table, kv_len = decode_checks._inputs(decode_checks.SMOKE_SHAPES[0], "cpu")
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(16)))
    plan = attn.plan(batch=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_pages=table.shape[1], dtype=q.dtype)
    bad = torch.tensor([40, -1], dtype=torch.int32)
    with serving_run._unchecked():
        attn.run(plan, q, kc, vc, page_table=table, kv_len=bad)
    with pytest.raises(ValueError, match=r"kv_len\[1\]: expected 0 <= kv_len"):
        attn.run(plan, q, kc, vc, page_table=table, kv_len=bad)


@pytest.mark.parametrize("variant", ["paged", "ragged", "per_head_lengths"])
def test_checked_kernel_spills_no_more_than_unchecked(variant, tmp_path, monkeypatch):
    """ptxas for sm_90, fp16, head dim 128 (8 warps, the GPU schedule): the checks add no stack
    (spills). A masked page load with an atomic report spilled 64-120 B on the paged kernel."""
    from attncc.backends.triton import serve_aot as aot

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(16)))
    forward_constexprs = aot.forward_constexprs
    stack = {}
    for check in (True, False):
        monkeypatch.setattr(aot, "forward_constexprs", lambda *a, _c=check, **k: {
            **forward_constexprs(*a, **k), "CHECK": _c})
        art = aot.compile_serve_for_target(attn.kernels, 90, "float16", 128, variant,
                                           num_splits=1)
        if art.stack_bytes is None:
            pytest.skip("cuobjdump is not available: no register report")
        stack[check] = art.stack_bytes
    assert stack[True] <= stack[False]
