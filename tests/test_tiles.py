"""Tile classification: sound against brute force for every analytic mask, exact for single
interval masks, and what the kernel visits is exactly what the classification says."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc.ir.eval import evaluate
from attncc.ir.nodes import Schedule
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_IDX
from attncc.ir.tiles import FULL, PARTIAL, tile_map
from attncc.passes.pipeline import run_spec_passes
from tests.catalog_cases import masks


def brute_force(spec: AttentionSpec, Lq: int, Lk: int, bm: int, bn: int, h: int = 0):
    """int8[nM, nN] from the dense mask: 2 if every pair allowed, 1 if some, 0 if none.
    Columns past Lk count as masked (a ragged last kv tile needs its bounds check), rows past
    Lq do not exist (their results are never stored)."""
    env = {LQ: Lq, LK: Lk, HQ: 4, HKV: 4, B_IDX: 0, H_IDX: h,
           Q_IDX: torch.arange(Lq).view(-1, 1), KV_IDX: torch.arange(Lk).view(1, -1)}
    env.update({p.symbol: p.value for p in spec.params})
    dense = torch.as_tensor(evaluate(spec.mask.expr, env, {c.name: c.tensor
                                                           for c in spec.captures}))
    return tiles_of_dense(dense.bool().expand(Lq, Lk), bm, bn)


def tiles_of_dense(dense: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """int8[nM, nN] of a bool [Lq, Lk] mask: 2 every pair allowed, 1 some, 0 none; columns
    past Lk count as masked."""
    Lq, Lk = dense.shape
    n_m, n_n = -(-Lq // bm), -(-Lk // bn)
    dense = torch.nn.functional.pad(dense, (0, n_n * bn - Lk))
    out = torch.zeros(n_m, n_n, dtype=torch.int8)
    for m in range(n_m):
        for n in range(n_n):
            tile = dense[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
            out[m, n] = FULL if tile.all() else PARTIAL if tile.any() else 0
    return out


def classified(spec, Lq, Lk, bm, bn, h=0):
    plan = run_spec_passes(spec)
    return tile_map(plan.tiles, Lq=Lq, Lk=Lk, Hq=4, Hkv=4, block_m=bm, block_n=bn, h=h,
                    params={p.name: p.value for p in plan.spec.params},
                    tensors={c.name: c.tensor for c in plan.spec.captures})


# One interval per row: exact. Unions (M5, M6) are sound but may call a tile partial when only
# the union of two pieces covers it.
EXACT = ["M1-causal", "M2-sliding-window", "M3-bidirectional", "M7-chunked", "M8-block-causal"]
SHAPES = [(63, 63, 16, 16), (200, 257, 32, 16), (257, 200, 16, 64), (1, 257, 16, 32),
          (130, 130, 64, 32)]


SOUND_CASES = [(m, *shape) for shape in SHAPES for m in masks(1, 4, shape[0], shape[1])]


@pytest.mark.parametrize("mask_id,Lq,Lk,bm,bn", SOUND_CASES,
                         ids=[f"{m}-Lq{a}-Lk{b}-{c}x{d}" for m, a, b, c, d in SOUND_CASES])
def test_classification_is_sound(mask_id, Lq, Lk, bm, bn):
    """Never skips a tile with an allowed pair; never marks full a tile with a masked pair."""
    spec = attncc.Attention(mask=masks(1, 4, Lq, Lk)[mask_id])
    for h in (0, 1):
        truth, ours = brute_force(spec, Lq, Lk, bm, bn, h), classified(spec, Lq, Lk, bm, bn, h)
        assert torch.all((truth == 0) | (ours > 0)), f"skipped an allowed tile\n{truth}\n{ours}"
        assert torch.all((ours != FULL) | (truth == FULL)), f"false full\n{truth}\n{ours}"
        if mask_id in EXACT:
            assert torch.equal(truth, ours), f"not exact\n{truth}\n{ours}"


@pytest.mark.parametrize("window", [1, 16, 37, 300])
@pytest.mark.parametrize("Lq,Lk", [(200, 200), (63, 257)])
def test_sliding_window_exact_for_many_windows(window, Lq, Lk):
    spec = attncc.Attention(mask=attncc.sliding_window(window))
    assert torch.equal(brute_force(spec, Lq, Lk, 16, 32), classified(spec, Lq, Lk, 16, 32))


VISIT_MASKS = {"M1": attncc.causal(), "M2": attncc.sliding_window(40),
               "M6": attncc.sinks_window(4, 40), "M7": attncc.chunked(48)}


@pytest.mark.parametrize("Lq,Lk", [(257, 257), (100, 230)])
@pytest.mark.parametrize("mask_id", list(VISIT_MASKS))
def test_kernel_visits_exactly_the_classified_tiles(mask_id, Lq, Lk, device):
    bm = bn = 32
    spec = attncc.Attention(mask=VISIT_MASKS[mask_id], schedule=Schedule(block_m=bm, block_n=bn))
    attn = attncc.compile(spec)
    B, H = 1, 2
    n_m, n_n = -(-Lq // bm), -(-Lk // bn)
    visits = torch.zeros(B * H, n_m, n_n, dtype=torch.int8, device=device)
    q = torch.randn(B, H, Lq, 32, device=device)
    k, v = torch.randn(B, H, Lk, 32, device=device), torch.randn(B, H, Lk, 32, device=device)
    attn(q, k, v, backend="triton", _visits=visits)
    expected = classified(spec, Lq, Lk, bm, bn)
    truth = brute_force(spec, Lq, Lk, bm, bn)
    for bh in range(B * H):
        assert torch.equal(visits[bh].cpu(), expected), f"{visits[bh]}\n{expected}"
    assert torch.equal(expected > 0, truth > 0), "visited tiles != tiles with an allowed pair"
    assert torch.all((expected != FULL) | (truth == FULL))
    print(f"{mask_id} Lq={Lq} Lk={Lk}: visited {int((expected > 0).sum())}/{n_m * n_n} tiles, "
          f"{int((expected == FULL).sum())} full")


class _LargestAllocation(TorchDispatchMode):
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mask_id", list(VISIT_MASKS))
def test_no_lq_by_lk_allocation(mask_id, device):
    L, D = 640, 16
    attn = attncc.compile(attncc.Attention(mask=VISIT_MASKS[mask_id]))
    q, k, v = (torch.randn(1, 1, L, D, device=device) for _ in range(3))
    with _LargestAllocation():  # warm: module load, lazy imports and (on GPU) compile
        attn(q, k, v, backend="triton")
    tracemalloc.start()
    with _LargestAllocation() as mode:
        attn(q, k, v, backend="triton")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mode.largest < L * L // 4, f"a torch tensor of {mode.largest} elements was allocated"
    assert peak < L * L, f"host peak {peak} bytes >= one byte per (q, kv) pair"


def test_window_change_reuses_the_compiled_kernel(device):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(64)))
    fn = attn.kernels.kernel.jit_function()
    q = torch.randn(1, 1, 130, 32, device=device)
    outs = [attn(q, q, q, backend="triton", window=w) for w in (64, 17, 100)]
    assert attn.kernels.kernel.jit_function() is fn
    source = attn.kernels.kernel.source
    assert '"p_window"' in source.split("def attn_fwd")[0] + source
    assert not torch.equal(outs[0], outs[1])
    again = attncc.compile(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(999)))
    # same cache entry, new value
    assert again.kernels.kernel.entry.path == attn.kernels.kernel.entry.path


@pytest.mark.gpu
def test_window_change_does_not_recompile_on_gpu():
    attn = attncc.compile(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(64)))
    q = torch.randn(1, 2, 500, 64, device="cuda", dtype=torch.float16)
    attn(q, q, q, window=64)
    fn = attn.kernels.kernel.jit_function()
    before = sum(len(c[0]) for c in fn.device_caches.values())
    for w in (17, 100, 333):
        attn(q, q, q, window=w)
    assert sum(len(c[0]) for c in fn.device_caches.values()) == before
