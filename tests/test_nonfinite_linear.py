"""Non-finite inputs in chunked block-causal linear attention (L7; docs/semantics.md,
"Non-finite inputs"): a nan in v_t reaches exactly the rows allowed to see token t (from t's block
on), never an earlier row of its chunk through the zero entries of the intra-chunk product
(0 * nan is nan). Checked against the fp64 one-token-at-a-time recurrence at two chunk sizes;
the finite rows within 1e-4 relative (as tests/test_triton_linear_chunked.py)."""

from __future__ import annotations

import pytest
import torch

from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import LinearState

NODES = {  # L7; the plain / gated chunked kernel (linear_chunked.py.j2) is not covered yet:
    # the same probe there spills registers on sm_90 (tests/test_triton_linear_chunked.py)
    "block_causal": LinearState("block_causal", feature_map="elu1", normalize=True, block=4),
    "block_causal_identity": LinearState("block_causal", block=4),
}


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("name", list(NODES))
def test_nan_value_reaches_only_later_rows(name, chunk):
    node = NODES[name]
    gen = torch.Generator().manual_seed(0)
    B, H, L, D, t = 1, 2, 40, 16, 21
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    extra: dict[str, torch.Tensor] = {}
    v[0, 0, t, 3] = float("nan")
    o = TritonChunkedLinear(node, chunk=chunk)(q, k, v, **extra)
    ro = recurrent_reference(q.double(), k.double(), v.double(), node,
                             **{n: x.double() for n, x in extra.items()})
    ro = ro[0] if isinstance(ro, tuple) else ro
    first = (t // 4) * 4  # L7: the whole block of t sees it
    want = torch.zeros(B, H, L, dtype=torch.bool)
    want[0, 0, first:] = True
    assert torch.equal(~torch.isfinite(ro).all(-1), want)  # the recurrence itself
    got = ~torch.isfinite(o).all(-1)
    assert torch.equal(got, want), f"non-finite rows {torch.nonzero(got).tolist()}"
    ok = ~want
    err = (o.double() - ro)[ok].abs().max().item()
    assert err <= 1e-4 * max(ro[ok].abs().max().item(), 1.0), err
