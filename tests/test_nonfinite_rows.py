"""Non-finite inputs (docs/semantics.md, "Non-finite inputs"): a NaN or inf in k_j or v_j reaches
exactly the rows allowed to attend to key j, whatever the tiling. A masked pair has p_ij = 0, and
0 * nan = nan, so a kernel that multiplies P @ V over a partial tile would poison masked rows of
that tile only: which rows then depended on the tile sizes.

Checked on the reference and the forward kernel, for causal (closed-form tiles), a sliding window
and a document mask (block map), at several tile sizes and lengths: the set of non-finite entries
of o and lse is the expected one, and every finite entry matches fp64 with the bad key present.
Tolerances (max abs on finite entries): fp32 2e-5, fp16 2e-3 on o (inputs rounded first).
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference

DOC = torch.arange(200) // 23
MASKS = {
    "causal": (attncc.causal(), lambda i, j: j <= i),
    "window": (attncc.sliding_window(13), lambda i, j: (j <= i) & (i - j < 13)),
    "document": (attncc.document(DOC), lambda i, j: (DOC[i] == DOC[j]) & (j <= i)),
}
BAD = ["v-nan", "v-inf", "k-nan", "k-inf"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3}
_g = torch.Generator().manual_seed(0)


def _inputs(L: int, bad: str, j: int, dtype: torch.dtype, D: int = 16):
    q, k, v = (torch.randn(1, 2, L, D, generator=_g).to(dtype) for _ in range(3))
    target = v if bad.startswith("v") else k
    target[:, 0, j, 3] = float("nan") if bad.endswith("nan") else float("inf")
    return q, k, v


def _check(attn, allowed, L: int, bad: str, dtype: torch.dtype, backend: str) -> None:
    j = L // 2 + 3  # inside a diagonal (partial) tile for every tile size tested
    q, k, v = _inputs(L, bad, j, dtype)
    if backend == "reference":
        o, lse = attention_reference(attn.spec, q.double(), k.double(), v.double())
    else:
        o, lse = attn(q, k, v, return_lse=True, backend="triton")
    ro, rlse = attention_reference(attn.spec, q.double(), k.double(), v.double())
    i = torch.arange(L)
    sees = torch.zeros(1, 2, L, dtype=torch.bool)  # rows allowed to attend to the bad key
    sees[:, 0] = allowed(i, torch.tensor(j))  # (only head 0 has one)
    bad_o = ~torch.isfinite(o)
    bad_rows = bad_o.any(-1)
    assert not (bad_rows & ~sees).any(), f"rows {torch.nonzero(bad_rows & ~sees).tolist()}"
    if bad == "v-nan":  # every row that sees j, at least in column 3 (which entries: unspecified)
        assert torch.equal(bad_rows, sees) and torch.equal(bad_o[..., 3], sees)
        assert torch.isfinite(lse).all()
    elif bad == "k-nan":  # the whole row and its lse
        assert torch.equal(bad_rows, sees)
        assert torch.equal(~torch.isfinite(lse), sees)
    else:  # inf: a row may still be finite (score -inf: key j is skipped), as in fp64
        assert torch.equal(bad_rows, ~torch.isfinite(ro).all(-1))
        assert torch.equal(torch.isfinite(lse), torch.isfinite(rlse))
    ok = torch.isfinite(ro).all(-1, keepdim=True).expand_as(ro)  # rows untouched by bad values
    err = (o.double() - ro)[ok].abs().max().item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("mask_id", list(MASKS))
def test_reference(mask_id):
    mask, allowed = MASKS[mask_id]
    attn = attncc.compile(attncc.Attention(mask=mask))
    for bad in BAD:
        _check(attn, allowed, 77, bad, torch.float64, "reference")


@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (64, 64)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("mask_id", list(MASKS))
def test_forward_kernel(mask_id, tiles):
    mask, allowed = MASKS[mask_id]
    spec = attncc.Attention(mask=mask, schedule=attncc.Schedule(block_m=tiles[0],
                                                                block_n=tiles[1]))
    attn = attncc.compile(spec)
    for L in (40, 77):
        for bad in BAD:
            _check(attn, allowed, L, bad, torch.float32, "triton")


def test_forward_kernel_fp16():
    mask, allowed = MASKS["causal"]
    attn = attncc.compile(attncc.Attention(mask=mask))
    for bad in BAD:
        _check(attn, allowed, 77, bad, torch.float16, "triton")


def _dq(attn, q, k, v, do):
    q = q.clone().requires_grad_()
    o = attn(q, k, v, backend="triton")
    (o * do).sum().backward()
    return q.grad


@pytest.mark.parametrize("mask_id", list(MASKS))
def test_backward_dq_of_rows_that_cannot_see_the_bad_key(mask_id, tiles=(16, 16)):
    """dq_i of a row that cannot see key j does not depend on k_j or v_j: it equals dq with the
    bad value replaced by a finite one (the backward kernels, fp32, 2e-5)."""
    mask, allowed = MASKS[mask_id]
    spec = attncc.Attention(mask=mask, schedule=attncc.Schedule(block_m=tiles[0],
                                                                block_n=tiles[1]))
    attn = attncc.compile(spec)
    L, j = 45, 45 // 2 + 3
    sees = allowed(torch.arange(L), torch.tensor(j))
    for bad in ("v-nan", "k-nan"):
        q, k, v = _inputs(L, bad, j, torch.float32)
        do = torch.randn(q.shape, generator=_g)
        got = _dq(attn, q, k, v, do)
        k0, v0 = k.nan_to_num(posinf=0.0), v.nan_to_num(posinf=0.0)
        clean = _dq(attn, q, k0, v0, do)
        assert torch.isfinite(got[:, 1]).all()  # head 1 has no bad key
        rows = got[:, 0, ~sees]
        assert torch.isfinite(rows).all(), f"{bad}: nan dq in rows that cannot see key {j}"
        assert (rows - clean[:, 0, ~sees]).abs().max().item() < 2e-5
