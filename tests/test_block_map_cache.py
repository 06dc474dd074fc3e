"""A cached block map (or positions, or interval table) is reused only for the same VALUES.

A data pointer and an in-place version are no identity: the allocator hands a fresh tensor the
address of a freed one (its version restarts at 0), and `t.data.copy_` or a numpy view writes
without moving the version counter. Each test alternates two document layouts in tensors that
share an address or a version, and checks every call against fp64.

Tolerance: fp32 (IEEE dots) 2e-5 max abs on o, as tests/test_block_map_forward.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.ir.intervals import range_table

L, D = 96, 16
LAYOUTS = (torch.zeros(L, dtype=torch.int64),  # one document: every causal tile is full
           torch.arange(L, dtype=torch.int64) // 8)  # documents of 8 tokens: most tiles empty
_g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(1, 2, L, D, generator=_g) for _ in range(3))


def _traced():
    doc = LAYOUTS[0].clone()

    @attncc.compile
    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    return doc_causal, "doc"


def _named():
    return attncc.compile(attncc.Attention(mask=attncc.document(LAYOUTS[0].clone()))), None


def _check(attn, name: str, doc: torch.Tensor) -> None:
    o = attn(Q, K, V, backend="triton", **{name: doc})
    ro, _ = attention_reference(attn.spec, Q.double(), K.double(), V.double(),
                                captures={name: doc.clone()})
    err = (o.double() - ro).abs().max().item()
    assert err < 2e-5, f"layout {doc[:20].tolist()}: max abs error {err:.3g}"


def _capture_name(attn, name):
    return name or attn.signature.captures[0].name


@pytest.mark.parametrize("make", [_traced, _named], ids=["traced", "document"])
def test_fresh_tensor_at_a_reused_address(make):
    """torch.from_numpy over one buffer: every call gets a new tensor (version 0) at the same
    address, as the caching allocator does for a freed tensor of the same size."""
    attn, name = make()
    name = _capture_name(attn, name)
    buffer = np.empty(L, dtype=np.int64)
    for i in range(4):
        buffer[:] = LAYOUTS[i % 2].numpy()
        _check(attn, name, torch.from_numpy(buffer))


def test_allocate_free_allocate():
    attn, name = _traced()
    for i in range(4):
        doc = LAYOUTS[i % 2].clone()  # freed at the end of the iteration
        _check(attn, name, doc)
        del doc


@pytest.mark.parametrize("write", ["data-copy", "numpy-view"])
def test_writes_that_bypass_the_version_counter(write):
    attn, name = _named()
    name = _capture_name(attn, name)
    doc = LAYOUTS[0].clone()
    for i in range(4):
        if write == "data-copy":
            doc.data.copy_(LAYOUTS[i % 2])
        else:
            doc.numpy()[:] = LAYOUTS[i % 2].numpy()
        _check(attn, name, doc)


def test_equal_values_reuse_the_map():
    """A fresh tensor with the same values (on the CPU, compared without a device sync) reuses
    the map; new values rebuild it."""
    attn, name = _named()
    name = _capture_name(attn, name)
    for doc in (LAYOUTS[1].clone(), LAYOUTS[1].clone()):
        attn(Q, K, V, backend="triton", **{name: doc})
    assert attn.block_maps.builds == 1
    attn(Q, K, V, backend="triton", **{name: LAYOUTS[0].clone()})
    assert attn.block_maps.builds == 2


def test_range_table_follows_the_values():
    values = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    assert range_table(values).read_range(torch.tensor(0), torch.tensor(7))[1].item() == 9
    values.data.copy_(torch.arange(8))  # same object, same version, new values
    lo, hi = range_table(values).read_range(torch.tensor(0), torch.tensor(7))
    assert (lo.item(), hi.item()) == (0, 7)


def test_reorder_permutation_at_a_reused_address():
    """R6 with `permuted=True` (q/k/v and o in the permuted order, so the permutation matters):
    the positions and the analytic block map built from them follow the permutation's values,
    not its address: two permutations alternate in one numpy buffer."""
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(9),
                                           reorder=attncc.UserPermutation()))
    ro, _ = attention_reference(attncc.Attention(mask=attncc.sliding_window(9)), Q.double(),
                                K.double(), V.double())
    perms = (torch.randperm(L, generator=_g), torch.arange(L).flip(0))
    buffer = np.empty(L, dtype=np.int64)
    for i in range(4):
        buffer[:] = perms[i % 2].numpy()
        perm = torch.from_numpy(buffer)
        idx = perms[i % 2]
        o = attn(Q[:, :, idx], K[:, :, idx], V[:, :, idx], backend="triton", perm=perm,
                 permuted=True)
        assert (o.double() - ro[:, :, idx]).abs().max().item() < 2e-5, i
