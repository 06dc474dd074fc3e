"""benchmarks/decode_checks.py: the decode step's index-check cost, with and without the checks
(smoke shape on the CPU interpreter), and that its unchecked path really skips them."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc import serving_run
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
