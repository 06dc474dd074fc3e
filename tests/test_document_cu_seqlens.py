"""`document(cu_seqlens=...)` and `document_inputs` reject offsets that do not describe packed
sequences (`0 = cu[0] <= cu[1] <= ... <= cu[-1] <= total`) before anything is built or launched,
naming the argument, what was expected and what was given; and a call whose tokens do not match
the tables built from cu_seqlens is an error before any launch.

A CPU cu_seqlens is checked on the host. A device cu_seqlens with `total=` given is checked on
the device with `torch._assert_async` (no host sync); the same check runs here on a CPU tensor,
where `_assert_async` raises at once.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc.library.masks import check_cu_seqlens_async

I32 = torch.int32


class _Syncs(TorchDispatchMode):
    """Ops that read a device value back to the host."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "item"):
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


BAD = {  # id -> (cu_seqlens, total, error pattern)
    "unsorted": ([0, 100, 50, 128], None,
                 r"cu_seqlens: expected nondecreasing offsets .* got cu_seqlens\[2\] = 50 < "
                 r"cu_seqlens\[1\] = 100 in \[0, 100, 50, 128\]"),
    "unsorted-total": ([0, 100, 50, 128], 128, r"cu_seqlens\[2\] = 50 < cu_seqlens\[1\] = 100"),
    "decreasing-last": ([0, 3, 7, 6], None, r"cu_seqlens\[3\] = 6 < cu_seqlens\[2\] = 7"),
    "not-from-0": ([2, 5, 9], None, r"cu_seqlens: expected cu_seqlens\[0\] == 0 .* got "
                                    r"cu_seqlens\[0\] = 2"),
    "negative-start": ([-1, 5], 5, r"got cu_seqlens\[0\] = -1"),
    "past-total": ([0, 5, 9], 8, r"total: expected at least cu_seqlens\[-1\] = 9 .* got 8"),
}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_offsets_are_rejected_on_the_host(case, dtype):
    cu, total, words = BAD[case]
    cu = torch.tensor(cu, dtype=dtype)
    with pytest.raises(ValueError, match=words):
        attncc.document_inputs(cu, total=total)
    with pytest.raises(ValueError, match=words):
        attncc.document(cu_seqlens=cu, total=total, causal=False)


@pytest.mark.parametrize("cu,words", [
    (torch.tensor([[0, 3], [3, 7]], dtype=I32), r"cu_seqlens: expected a 1-d tensor .* got 2-d"),
    (torch.tensor([0.0, 3.0]), r"cu_seqlens: expected a 1-d tensor of dtype .*int32.*, got "
                               r"1-d torch.float32"),
    (torch.tensor([False, True]), r"got 1-d torch.bool"),
    ([0, 3, 7], r"cu_seqlens: expected a torch.Tensor, got list"),
])
def test_wrong_dtype_or_dim_is_rejected(cu, words):
    with pytest.raises((TypeError, ValueError), match=words):
        attncc.document(cu_seqlens=cu)


@pytest.mark.parametrize("case", ["unsorted-total", "negative-start", "past-total"])
def test_device_check_is_an_async_assert_with_the_message(case):
    """The device path's assertion (run on a CPU tensor, where it raises at once)."""
    cu, total, _ = BAD[case]
    with pytest.raises(RuntimeError, match=r"cu_seqlens: expected 0 = cu_seqlens\[0\] <= "
                                           rf".* <= cu_seqlens\[-1\] <= total = {total}"):
        check_cu_seqlens_async(torch.tensor(cu, dtype=I32), total)
    check_cu_seqlens_async(torch.tensor([0, 0, 5, 9], dtype=I32), 9)  # valid: passes
    check_cu_seqlens_async(torch.tensor([0], dtype=I32), 0)


def test_good_offsets_pass_and_build_without_a_device_sync():
    """Empty sequences, padding past cu[-1], a single 0: all valid; with total= the build reads
    nothing back (the existing no-sync promise is kept)."""
    for cu, total in (([0, 0, 5, 5, 9], None), ([0, 5, 9], 12), ([0], None), ([0], 4)):
        out = attncc.document_inputs(torch.tensor(cu, dtype=I32), total=total, causal=False)
        assert out["doc_start"].numel() == (cu[-1] if total is None else total)
    with _Syncs() as rec:
        attncc.document_inputs(torch.tensor([0, 5, 9], dtype=I32), total=9)
    assert rec.syncs == []


def test_unsorted_offsets_never_reach_the_kernel(device):
    """The issue's example: [0, 100, 50, 128] gave a decreasing doc_start the kernel trusts."""
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 50 < cu_seqlens\[1\] = 100"):
        attncc.compile(attncc.Attention(mask=attncc.document(
            cu_seqlens=torch.tensor([0, 100, 50, 128], dtype=I32))))


def test_tables_longer_than_the_call_are_an_error_before_launch(device):
    """cu_seqlens describing 12 tokens on a call of 8 (e.g. last batch's offsets)."""
    attn = attncc.compile(attncc.Attention(mask=attncc.document(
        cu_seqlens=torch.tensor([0, 4, 8], dtype=I32))))
    q = torch.randn(1, 1, 8, 16, device=device)
    stale = attncc.document_inputs(torch.tensor([0, 5, 12], dtype=I32).to(device), total=12)
    visits = torch.zeros(1, 1, 1, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match=r"doc_start: expected one entry per token, at most "
                                         r"max\(Lq, Lk\) = 8, got 12"):
        attn(q, q, q, backend="triton", _visits=visits, **stale)
    assert int(visits.sum()) == 0  # nothing ran
    with pytest.raises(ValueError, match=r"max\(Lq, Lk\) = 8, got 12"):
        attn(q, q, q, backend="reference", **stale)
    o = attn(q, q, q, backend="reference")  # the spec's own tables fit: 8 tokens
    assert o.shape == q.shape
