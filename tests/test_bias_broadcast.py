"""S5: a bias dim of size 1 when the spec is built broadcasts (the kernel indexes it with 0), so
a call tensor with that dim larger is an error before any launch, never a silent slice.

Tolerance for the accepted calls: fp32 (IEEE dots) 2e-5 max abs on o against fp64."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference

B, H, L, D = 2, 2, 24, 16
_g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(B, H, L, D, generator=_g) for _ in range(3))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("built", [(1, 1, L, L), (B, 1, L, L), (1, H, 1, L)],
                         ids=lambda s: "x".join(map(str, s)))
def test_full_size_bias_for_a_broadcast_spec_is_an_error(built, backend):
    attn = attncc.compile(attncc.Attention(score=attncc.bias(torch.zeros(built))))
    name = attn.signature.captures[0].name
    full = torch.randn(B, H, L, L, generator=_g)
    with pytest.raises(ValueError) as err:
        attn(Q, K, V, backend=backend, **{name: full})
    axis = built.index(1)
    text = str(err.value)
    assert text.startswith(f"{name}: dimension {axis}") and str(built) in text
    assert str(tuple(full.shape)) in text


def test_same_broadcast_pattern_is_accepted():
    attn = attncc.compile(attncc.Attention(score=attncc.bias(torch.zeros(1, H, L, L))))
    name = attn.signature.captures[0].name
    new = torch.randn(1, H, L, L, generator=_g)
    o = attn(Q, K, V, backend="triton", **{name: new})
    spec = attncc.Attention(score=attncc.bias(new))
    ro, _ = attention_reference(spec, Q.double(), K.double(), V.double(),
                                captures={name: new.double()})
    assert (o.double() - ro).abs().max().item() < 2e-5
