"""The LSE merge (`attncc.ops.merge`) against a direct fp64 softmax over the concatenated keys:
parts of any size (empty included), rows fully masked in some parts or in all of them
(docs/semantics.md: such a row is o = 0, lse = -inf, never NaN), large scores, and the checks."""

from __future__ import annotations

import math

import pytest
import torch

from attncc.backends import merge as backend_merge
from attncc.backends.reference import forward as reference_forward
from attncc.ops.merge import merge, merge_pair

B, H, LQ, D, DV = 2, 3, 7, 8, 5


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 softmax attention over the allowed keys: o [B, H, Lq, Dv], lse [B, H, Lq]; a row
    with no allowed key is o = 0, lse = -inf."""
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), 0.0)
    return p @ v, lse


def split_case(sizes: list[int], seed: int, scale: float = 1 / math.sqrt(D)):
    """Keys cut into parts of `sizes`; the mask leaves row 0 empty everywhere, row 1 allowed
    only in the last non-empty part, the rest random. Returns (parts, whole)."""
    g = torch.Generator().manual_seed(seed)
    lk = sum(sizes)
    q = torch.randn(B, H, LQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, lk, DV, generator=g, dtype=torch.float64)
    allowed = torch.rand(B, H, LQ, lk, generator=g) < 0.5
    allowed[:, :, 0] = False
    last = max(i for i, n in enumerate(sizes) if n)
    allowed[:, :, 1] = False
    allowed[:, :, 1, sum(sizes[:last])] = True
    parts, start = [], 0
    for n in sizes:
        cut = slice(start, start + n)
        parts.append(attend(q, k[:, :, cut], v[:, :, cut], allowed[..., cut], scale))
        start += n
    return parts, attend(q, k, v, allowed, scale)


def check(merged: tuple[torch.Tensor, torch.Tensor], whole: tuple[torch.Tensor, torch.Tensor]):
    (o, lse), (want_o, want_lse) = merged, whole
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    assert (o[:, :, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()


@pytest.mark.parametrize("sizes", [[9, 4, 13], [1, 1], [0, 6, 0, 11], [17]],
                         ids=lambda s: "parts" + "-".join(map(str, s)))
def test_merge_equals_softmax_over_the_concatenated_keys(sizes):
    parts, whole = split_case(sizes, seed=len(sizes))
    o_parts, lse_parts = zip(*parts)
    check(merge(list(o_parts), list(lse_parts)), whole)
    # the same parts stacked on dim 0, and in another order
    check(merge(torch.stack(o_parts), torch.stack(lse_parts)), whole)
    check(merge(list(o_parts[::-1]), list(lse_parts[::-1])), whole)


def test_rows_masked_in_every_part_and_empty_parts_stay_zero_and_minus_inf():
    parts, whole = split_case([5, 0, 7], seed=3)
    empty = parts[1]  # no keys at all: o = 0, lse = -inf on every row
    assert (empty[0] == 0).all() and torch.isneginf(empty[1]).all()
    o, lse = merge_pair(*empty, *empty)
    assert (o == 0).all() and torch.isneginf(lse).all()
    # row 1 has its only allowed key in the last part: the others are fully masked there
    assert torch.isneginf(parts[0][1][:, :, 1]).all()
    check(merge_pair(*parts[0], *merge_pair(*parts[1], *parts[2])), whole)


def test_large_scores_do_not_overflow():
    parts, whole = split_case([6, 10, 3], seed=5, scale=400.0)
    # e^lse itself is past fp64's range: the merge must weigh by e^(lse_i - lse)
    assert whole[1][:, :, 2:].max() > 710
    o_parts, lse_parts = zip(*parts)
    check(merge(list(o_parts), list(lse_parts)), whole)


def test_one_part_is_itself_and_fp32_parts_merge_in_fp32():
    (part,), whole = split_case([12], seed=7)
    o, lse = merge([part[0]], [part[1]])
    assert torch.equal(o, part[0]) and torch.equal(lse, part[1]) and o is not part[0]
    parts, whole = split_case([8, 8], seed=8)
    o, lse = merge([p[0].float() for p in parts], [p[1].float() for p in parts])
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(o, whole[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole[1].float(), rtol=1e-5, atol=1e-6)


def test_the_reference_backend_merges_with_the_same_code():
    assert reference_forward.merge_pair is backend_merge.merge_pair


@pytest.mark.parametrize("o_shapes, lse_shapes, match", [
    ([], [], "at least one"),
    ([(2, 3, 4)], [(2, 3), (2, 3)], "as many o parts as lse parts"),
    ([(2, 3, 4), (2, 4, 4)], [(2, 3), (2, 4)], r"part 1: expected o \[\*rows, Dv\]"),
    ([(2, 3, 4), (2, 3, 5)], [(2, 3), (2, 3)], "part 1: o has Dv = 5"),
    ([(2, 3)], [(2, 3)], r"part 0: expected o \[\*rows, Dv\]"),
])
def test_parts_that_do_not_fit_are_named(o_shapes, lse_shapes, match):
    with pytest.raises(ValueError, match=match):
        merge([torch.zeros(s) for s in o_shapes], [torch.zeros(s) for s in lse_shapes])


def test_integer_parts_are_refused():
    with pytest.raises(ValueError, match="part 0: expected floating-point"):
        merge([torch.zeros(2, 3, dtype=torch.int32)], [torch.zeros(2)])
