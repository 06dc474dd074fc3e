"""Kernels whose tiles come from a run-time block map, and reordered kernels, against fp64.

Covers the grid and data-dependent masks (M9-M18) with and without each reorder (R1-R6), GQA and
Lq != Lk (1-D masks; a grid order is defined for Lq == Lk == grid size), the `permuted=True`
layout contract, and that the kernel visits exactly the tiles its block map lists.

Tolerances (max abs error against fp64, inputs rounded to the tested dtype first): fp32 (IEEE
dots) 2e-5 on o and lse; fp16 2e-3 on o, 1e-4 on lse (as tests/test_triton_forward.py).
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.backends.triton.render import RENDERS
from attncc.ir.tiles import EMPTY, FULL

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-4)}
_g = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.rand(*shape, generator=_g)


def _orders(grid: tuple[int, ...], length: int) -> dict[str, object]:
    """Every reorder that applies to a grid of `grid` cells (or to a 1-D sequence)."""
    out: dict[str, object] = {"none": None, "user-perm": attncc.UserPermutation()}
    if len(grid) == 2:
        out["hilbert"] = attncc.Hilbert2D(*grid)
        out["morton"] = attncc.Morton2D(*grid)
        out["tiles"] = attncc.TileMajor(grid, (4, 4))
    if len(grid) == 3:
        out["hilbert3d"] = attncc.Hilbert3D(*grid)
        out["tiles3d"] = attncc.TileMajor(grid, (2, 4, 4))
    if len(grid) == 1:
        out["segment-sort"] = attncc.SegmentSort(48)
    return out


def _mask_cases() -> list[tuple[str, object, tuple[int, ...]]]:
    L = 200
    n_blocks = -(-L // 16)
    return [
        ("M9-strided-heads", attncc.strided_heads(16, 2, 3, 1), (L,)),
        ("M10-global", attncc.global_tokens(9, _rand(L) < 0.08), (L,)),
        ("M11-document", attncc.document(torch.sort(torch.randint(0, 5, (L,), generator=_g))[0]),
         (L,)),
        ("M12-7x7-16x16", attncc.neighbourhood_2d(16, 16, 7, 7), (16, 16)),
        ("M12-5x3-15x13", attncc.neighbourhood_2d(15, 13, 5, 3), (15, 13)),
        ("M13-4x8x8", attncc.neighbourhood_3d(4, 8, 8, (3, 3, 5)), (4, 8, 8)),
        ("M13-sta", attncc.neighbourhood_3d(4, 8, 8, (1, 3, 3), tile=(2, 4, 4)), (4, 8, 8)),
        ("M14-15x13", attncc.criss_cross(15, 13), (15, 13)),
        ("M15-hilberta", attncc.hilberta(16, 16, 16, 8, 4), (16, 16)),
        ("M17-bigbird", attncc.bigbird(16, 1, _rand(n_blocks) < 0.2,
                                       attncc.bigbird_random_blocks(n_blocks, 2, 3)), (L,)),
        ("M18-per-head", attncc.per_head_classes(torch.tensor([0, 1, 1, 0]), 4, 30), (L,)),
    ]


MASKS = {name: (mask, grid) for name, mask, grid in _mask_cases()}
CASES = [(name, order) for name, (_, grid) in MASKS.items()
         for order in _orders(grid, int(torch.tensor(grid).prod()))]


def _reference(spec, q, k, v, **call):
    params = {p.name: p.value for p in spec.params}
    tensors = {c.name: c.tensor for c in spec.captures}
    return attention_reference(spec, q.double(), k.double(), v.double(), params=params,
                               captures=tensors, q_chunk=64, kv_chunk=64, **call)


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device):
    q = torch.randn(B, Hq, Lq, D, generator=_g).to(dtype).to(device)
    k = torch.randn(B, Hkv, Lk, D, generator=_g).to(dtype).to(device)
    v = torch.randn(B, Hkv, Lk, D, generator=_g).to(dtype).to(device)
    return q, k, v


def _reorder_call(order, L: int) -> tuple[dict, dict]:
    """(kernel call arguments, reference `reorder_inputs`) for orders that take a tensor."""
    if isinstance(order, attncc.UserPermutation):
        perm = torch.randperm(L, generator=_g)
        return {"perm": perm}, {"perm": perm}
    if isinstance(order, attncc.SegmentSort):
        score = torch.randn(L, generator=_g)
        return {"key_score": score}, {"key_score": score}
    return {}, {}


@pytest.mark.parametrize("name,order_name", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_mask_with_each_reorder(name, order_name, device):
    mask, grid = MASKS[name]
    L = int(torch.tensor(grid).prod())
    order = _orders(grid, L)[order_name]
    spec = attncc.Attention(mask=mask, reorder=order)
    attn = attncc.compile(spec)
    assert attn.plan.block_map is not None or order is None
    Hq, Hkv = 4, 2  # GQA
    q, k, v = _inputs(1, Hq, Hkv, L, L, 32, torch.float32, device)
    call, ref_inputs = _reorder_call(order, L)
    o, lse = attn(q, k, v, return_lse=True, backend="triton",
                  **{n: t.to(device) for n, t in call.items()})
    ro, rl = _reference(attn.plan.spec, q.cpu(), k.cpu(), v.cpu(), reorder_inputs=ref_inputs)
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double().cpu(), rl, atol=2e-5, rtol=2e-5)


ONE_D = ["M9-strided-heads", "M10-global", "M11-document", "M17-bigbird", "M18-per-head"]


@pytest.mark.parametrize("name", ONE_D)
@pytest.mark.parametrize("Lq,Lk", [(77, 200), (200, 131)])
def test_lq_differs_from_lk_fp16(name, Lq, Lk, device):
    mask, _ = MASKS[name]
    spec = attncc.Attention(mask=mask)
    q, k, v = _inputs(1, 4, 2, Lq, Lk, 40, torch.float16, device)
    o, lse = attncc.compile(spec)(q, k, v, return_lse=True, backend="triton")
    ro, rl = _reference(spec, q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double().cpu(), rl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block,Lq,Lk", [(64, 256, 256), (128, 200, 300), (16, 100, 100)])
def test_block_topk(block, Lq, Lk, causal, device):
    """Blocks that nest the 64-token tiles are read straight from the index tensor (source
    'topk'); block 16 does not nest, so the generated block-map kernel classifies instead."""
    n_q, n_k = -(-Lq // block), -(-Lk // block)
    idx = torch.randint(-1, n_k, (2, 2, n_q - 1, 3), generator=_g)  # the last query block reads 0s
    spec = attncc.Attention(mask=attncc.block_topk(idx.to(device), block, causal=causal))
    attn = attncc.compile(spec)
    assert attn.plan.block_map.source == "topk"
    q, k, v = _inputs(2, 2, 1, Lq, Lk, 32, torch.float32, device)
    o = attn(q, k, v, backend="triton")
    ro, _ = _reference(attn.plan.spec, q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Lk", [(100, 100), (37, 130)])
def test_block_topk_per_token(Lq, Lk, causal, device):
    """MoBA's per-token gate: one index row per query, tiles from the generated block-map
    kernel (a query tile reads the union of its rows' blocks)."""
    idx = torch.randint(-1, -(-Lk // 16), (2, 2, Lq, 2), generator=_g)
    spec = attncc.Attention(mask=attncc.block_topk(idx.to(device), 16, causal=causal,
                                                   per_token=True))
    attn = attncc.compile(spec)
    assert attn.plan.block_map.source == "device"
    q, k, v = _inputs(2, 2, 1, Lq, Lk, 32, torch.float32, device)
    o, lse = attn(q, k, v, backend="triton", return_lse=True)
    ro, rl = _reference(attn.plan.spec, q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double().cpu(), rl, atol=2e-5, rtol=2e-5)


def test_permuted_layout_contract(device):
    """permuted=True: q/k/v and o stay in the reordered order; equal to permuting outside."""
    mask, grid = MASKS["M12-7x7-16x16"]
    spec = attncc.Attention(mask=mask, reorder=attncc.Hilbert2D(*grid))
    attn = attncc.compile(spec)
    q, k, v = _inputs(1, 2, 2, 256, 256, 32, torch.float32, device)
    perm = attncc.Hilbert2D(*grid).permutation(256, device=device)
    o_orig = attn(q, k, v, backend="triton")
    o_perm = attn(q[:, :, perm], k[:, :, perm], v[:, :, perm], permuted=True, backend="triton")
    torch.testing.assert_close(o_perm, o_orig[:, :, perm], atol=1e-6, rtol=1e-6)
    o_ref = attn(q[:, :, perm], k[:, :, perm], v[:, :, perm], permuted=True, backend="reference")
    torch.testing.assert_close(o_perm, o_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,order_name", [("M12-5x3-15x13", "hilbert"),
                                             ("M11-document", "none"), ("M13-sta", "tiles3d")])
def test_kernel_visits_exactly_the_block_map(name, order_name, device):
    mask, grid = MASKS[name]
    L = int(torch.tensor(grid).prod())
    attn = attncc.compile(attncc.Attention(mask=mask, reorder=_orders(grid, L)[order_name]))
    q, k, v = _inputs(1, 1, 1, L, L, 16, torch.float32, device)
    n = -(-L // 64)
    visits = torch.zeros(1, n, n, dtype=torch.int8, device=device)
    attn(q, k, v, backend="triton", _visits=visits)
    (lists,) = attn.block_maps._maps.values()
    expected = torch.zeros(n, n, dtype=torch.int8)
    for m in range(n):
        for slot, kind in enumerate((1, FULL)):
            count = int(lists[0, 0, m, slot, 0])
            expected[m, lists[0, 0, m, slot, 1:1 + count].long().cpu()] = kind
    assert torch.equal(visits[0].cpu(), expected)
    assert int((expected != EMPTY).sum()) < n * n  # something was skipped


def test_new_values_rebuild_the_map_without_recompiling(device):
    n_blocks = 13
    rnd = attncc.bigbird_random_blocks(n_blocks, 2, seed=1)
    spec = attncc.Attention(mask=attncc.bigbird(16, 1, torch.zeros(n_blocks, dtype=torch.bool),
                                                rnd))
    attn = attncc.compile(spec)
    q, k, v = _inputs(1, 1, 1, 200, 200, 16, torch.float32, device)
    attn(q, k, v, backend="triton")
    attn(q, k, v, backend="triton")
    # equal host tensors reuse the map; device tensors rebuild it per call (no host sync)
    reused = device == "cpu"
    assert attn.block_maps.builds == (1 if reused else 2)
    renders = RENDERS[0]
    builds = attn.block_maps.builds
    other = attncc.bigbird_random_blocks(n_blocks, 2, seed=2).to(device)
    o = attn(q, k, v, backend="triton", random_blocks=other)
    assert attn.block_maps.builds == builds + 1 and RENDERS[0] == renders
    spec2 = attncc.Attention(mask=attncc.bigbird(16, 1, torch.zeros(n_blocks, dtype=torch.bool),
                                                 other.cpu()))
    ro, _ = _reference(spec2, q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)
    rnd_dev = other.clone()
    attn(q, k, v, backend="triton", random_blocks=rnd_dev)
    builds = attn.block_maps.builds
    rnd_dev[0, 5] = ~rnd_dev[0, 5]  # in place: the version counter moves, the map is rebuilt
    attn(q, k, v, backend="triton", random_blocks=rnd_dev)
    assert attn.block_maps.builds == builds + 1


def test_reorder_errors():
    mask = attncc.neighbourhood_2d(16, 16, 3, 3)
    q = torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match="permuted=True: this spec has no reorder"):
        attncc.compile(attncc.Attention(mask=mask))(q, q, q, permuted=True)
    with pytest.raises(ValueError, match=r"perm: the reorder user_permutation\(perm\) needs it"):
        attncc.compile(attncc.Attention(mask=mask, reorder=attncc.UserPermutation()))(q, q, q)
    with pytest.raises(ValueError, match="length must equal the grid size 8x8 = 64, got 256"):
        attncc.compile(attncc.Attention(mask=mask, reorder=attncc.Hilbert2D(8, 8)))(q, q, q)
    bad = torch.zeros(256, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly once"):
        attncc.compile(attncc.Attention(mask=mask, reorder=attncc.UserPermutation()))(
            q, q, q, perm=bad)
