"""Named masks and scores read the aligned query position `qp = q_idx + Lk - Lq` when Lq != Lk
(docs/semantics.md, "Query positions when Lq != Lk"): decode (Lq = 1) and chunked prefill
(Lq < Lk), odd sizes, for M3, M4, M7, M9, M10, M16, M17, S3 and S4.

The oracle is a brute-force predicate per (b, h, q, kv), written here from the catalogue formula
with qp in plain Python, fed to the dense fp64 softmax of tests/dense_oracle.py. Each named
constructor is checked three ways: its expression evaluated pointwise, the reference backend
(fp64), and the Triton kernel (interpreter on CPU: fp32 and fp16, 32 x 32 tiles) whose visited
tiles are checked sound against the predicate (a skipped tile holds no allowed pair, a tile run
as full holds only allowed ones) with at least one tile skipped.

Tolerances (max abs error against fp64 on inputs rounded to the tested dtype): fp32 (IEEE dots)
2e-5 on o and lse; fp16 2e-3 on o (p is rounded to fp16 before p @ v), 1e-4 on lse.
"""

from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.ir.eval import evaluate
from attncc.ir.nodes import Schedule
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_IDX
from attncc.ir.tiles import FULL
from tests.dense_oracle import dense_attention

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-4)}
B, HQ_, HKV_, D = 1, 2, 1, 16
LK_ = 131
SHAPES = {"decode-Lq1-Lk131": (1, LK_), "prefill-Lq35-Lk131": (35, LK_)}  # 131 - 35 = 3 * 32
TILE = 32  # kernel tiles: top-k blocks of 32 nest in them (its direct block-map path)

_g = torch.Generator().manual_seed(20)
N16, N32 = -(-LK_ // 16), -(-LK_ // 32)
IS_GLOBAL = torch.zeros(LK_, dtype=torch.bool)
IS_GLOBAL[[3, 60]] = True  # two global positions, both far from the decode row
TOPK_IDX = torch.randint(-1, N32, (B, HQ_, N32, 2), generator=_g)
BB_GLOBAL = torch.zeros(N16, dtype=torch.bool)
BB_GLOBAL[1] = True
BB_RANDOM = attncc.bigbird_random_blocks(N16, 1, seed=4)


def _in(p: int, n: int) -> bool:
    return 0 <= p < n


# name -> (named mask, predicate(b, h, qp, kv) written from the catalogue formula)
MASKS = {
    "M3-biwin9": (attncc.bidirectional_window(9), lambda b, h, q, kv: abs(q - kv) <= 9),
    "M4-dilated20-3": (attncc.dilated_window(20, 3),
                       lambda b, h, q, kv: abs(q - kv) <= 20 and (q - kv) % 3 == 0),
    "M4-dilated20-3-causal": (attncc.dilated_window(20, 3, causal=True),
                              lambda b, h, q, kv: abs(q - kv) <= 20 and (q - kv) % 3 == 0
                              and kv <= q),
    "M7-chunked20": (attncc.chunked(20), lambda b, h, q, kv: q // 20 == kv // 20 and kv <= q),
    "M9-strided": (attncc.strided_heads(16, 2, 3, 1),
                   lambda b, h, q, kv: kv // 16 <= q // 16 and (
                       q // 16 - kv // 16 < 2 or (kv // 16 + h * 1 + 1) % 3 == 0)),
    "M10-global": (attncc.global_tokens(5, IS_GLOBAL),
                   lambda b, h, q, kv: abs(q - kv) <= 5 or bool(IS_GLOBAL[q]) or
                   bool(IS_GLOBAL[kv])),
    "M16-topk-causal": (attncc.block_topk(TOPK_IDX, 32),
                        lambda b, h, q, kv: (kv // 32 == q // 32 or kv // 32 in
                                             TOPK_IDX[b, h, q // 32].tolist()) and kv <= q),
    "M16-topk": (attncc.block_topk(TOPK_IDX, 32, causal=False),
                 lambda b, h, q, kv: kv // 32 == q // 32 or kv // 32 in
                 TOPK_IDX[b, h, q // 32].tolist()),
    "M17-bigbird": (attncc.bigbird(16, 1, BB_GLOBAL, BB_RANDOM),
                    lambda b, h, q, kv: abs(q // 16 - kv // 16) <= 1 or bool(BB_GLOBAL[q // 16])
                    or bool(BB_GLOBAL[kv // 16]) or bool(BB_RANDOM[q // 16, kv // 16])),
}


def allowed(pred, Lq: int, Lk: int) -> torch.Tensor:
    """bool [B, Hq, Lq, Lk]: the predicate at every pair, the query at qp = q + Lk - Lq."""
    out = torch.zeros(B, HQ_, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(HQ_):
            for q in range(Lq):
                for kv in range(Lk):
                    out[b, h, q, kv] = bool(pred(b, h, q + Lk - Lq, kv))
    return out


def _qkv(Lq: int, Lk: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ_, Lq, D, generator=g)
    k, v = torch.randn(B, HKV_, Lk, D, generator=g), torch.randn(B, HKV_, Lk, D, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def _close(o, lse, ro, rl, dtype):
    o_tol, lse_tol = TOL[dtype]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double().cpu(), ro, atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse.double().cpu(), rl, atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MASKS)
def test_mask_expression_is_the_aligned_formula(name, shape):
    mask, pred = MASKS[name]
    Lq, Lk = SHAPES[shape]
    env = {LQ: Lq, LK: Lk, HQ: HQ_, HKV: HKV_, B_IDX: torch.arange(B).view(B, 1, 1, 1),
           H_IDX: torch.arange(HQ_).view(1, HQ_, 1, 1), Q_IDX: torch.arange(Lq).view(1, 1, Lq, 1),
           KV_IDX: torch.arange(Lk).view(1, 1, 1, Lk)}
    env.update({p.symbol: p.value for p in mask.params})
    got = torch.as_tensor(evaluate(mask.expr, env, {c.name: c.tensor for c in mask.captures}))
    assert torch.equal(got.bool().expand(B, HQ_, Lq, Lk), allowed(pred, Lq, Lk))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MASKS)
def test_reference_equals_brute_force(name, shape):
    mask, pred = MASKS[name]
    Lq, Lk = SHAPES[shape]
    q, k, v = _qkv(Lq, Lk)
    o, lse = attention_reference(AttentionSpec(mask=mask), q, k, v, q_chunk=16, kv_chunk=32)
    ro, rl = dense_attention(q, k, v, allowed(pred, Lq, Lk))
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, rl, atol=1e-10, rtol=1e-10)


def _tile_truth(dense: torch.Tensor) -> torch.Tensor:
    """int8 [B*Hq, nM, nN]: 2 every pair allowed, 1 some, 0 none (columns past Lk masked)."""
    Lq, Lk = dense.shape[-2:]
    n_m, n_n = -(-Lq // TILE), -(-Lk // TILE)
    padded = torch.nn.functional.pad(dense.flatten(0, 1), (0, n_n * TILE - Lk))
    out = torch.zeros(padded.shape[0], n_m, n_n, dtype=torch.int8)
    for m in range(n_m):
        for n in range(n_n):
            t = padded[:, m * TILE:(m + 1) * TILE, n * TILE:(n + 1) * TILE].flatten(1)
            out[:, m, n] = torch.where(t.all(1), FULL, torch.where(t.any(1), 1, 0))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MASKS)
def test_triton_kernel_equals_brute_force(name, shape, dtype, device):
    mask, pred = MASKS[name]
    Lq, Lk = SHAPES[shape]
    spec = attncc.Attention(mask=mask, schedule=Schedule(block_m=TILE, block_n=TILE))
    attn = attncc.compile(spec)
    q, k, v = (t.to(device) for t in _qkv(Lq, Lk, dtype, seed=1))
    visits = torch.zeros(B * HQ_, -(-Lq // TILE), -(-Lk // TILE), dtype=torch.int8,
                         device=device)
    o, lse = attn(q, k, v, return_lse=True, backend="triton", _visits=visits)
    dense = allowed(pred, Lq, Lk)
    ro, rl = dense_attention(*(t.double().cpu() for t in (q, k, v)), dense)
    _close(o, lse, ro, rl, dtype)
    truth, visits = _tile_truth(dense), visits.cpu()
    assert torch.all((truth == 0) | (visits > 0)), f"skipped a tile with an allowed pair\n{visits}"
    assert torch.all((visits != FULL) | (truth == FULL)), f"ran a mixed tile as full\n{visits}"
    assert int((visits == 0).sum()) > 0, "no tile skipped: the test would not catch unsoundness"


def test_block_topk_reads_the_index_row_of_the_aligned_block(device):
    """Chunked prefill with Lk - Lq a multiple of the block: the block map comes straight from the
    index tensor (source 'topk'); the query rows sit in blocks 3 and 4, not 0 and 1."""
    mask, pred = MASKS["M16-topk"]
    attn = attncc.compile(attncc.Attention(mask=mask, schedule=Schedule(TILE, TILE)))
    assert attn.plan.block_map.source == "topk"
    Lq, Lk = SHAPES["prefill-Lq35-Lk131"]
    q, k, v = (t.to(device) for t in _qkv(Lq, Lk, torch.float32, seed=2))
    o, lse = attn(q, k, v, return_lse=True, backend="triton")
    ro, rl = dense_attention(*(t.double().cpu() for t in (q, k, v)), allowed(pred, Lq, Lk))
    _close(o, lse, ro, rl, torch.float32)


SLOPES = torch.tensor([0.25, 0.0625])


def _chunk50(b, h, q, kv):  # M7 with chunk 50, the mask under the score tests
    return q // 50 == kv // 50 and kv <= q


REL = torch.randn(HQ_, 2 * 40 + 1, generator=_g)
# name -> (named score, f(s, h, qp, kv) with h [1,H,1,1], qp [1,1,Lq,1], kv [1,1,1,Lk])
SCORES = {
    "S3-alibi": (attncc.alibi(), lambda s, h, q, kv: s + 2.0 ** (-8.0 * (h + 1) / HQ_) * (kv - q)),
    "S3-alibi-slopes": (attncc.alibi(SLOPES),
                        lambda s, h, q, kv: s + SLOPES.double()[h] * (kv - q)),
    "S4-relbias": (attncc.relative_bias(REL),
                   lambda s, h, q, kv: s + REL.double()[h, (q - kv).clamp(-40, 40) + 40]),
}


def _score_oracle(fn, Lq: int, Lk: int):
    h = torch.arange(HQ_).view(1, HQ_, 1, 1)
    qp = torch.arange(Lq).view(1, 1, Lq, 1) + (Lk - Lq)
    return lambda s: fn(s, h, qp, torch.arange(Lk).view(1, 1, 1, Lk))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCORES)
def test_score_reference_equals_formula(name, shape):
    mod, fn = SCORES[name]
    Lq, Lk = SHAPES[shape]
    q, k, v = _qkv(Lq, Lk, seed=3)
    q = 3.0 * q  # scores of a few units, so the position terms matter
    causal = torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1) + Lk - Lq
    o, lse = attention_reference(AttentionSpec(mask=attncc.causal(), score=mod), q, k, v,
                                 q_chunk=16, kv_chunk=32)
    ro, rl = dense_attention(q, k, v, causal, _score_oracle(fn, Lq, Lk))
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, rl, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCORES)
def test_score_triton_equals_formula(name, shape, dtype, device):
    mod, fn = SCORES[name]
    Lq, Lk = SHAPES[shape]
    attn = attncc.compile(attncc.Attention(mask=attncc.chunked(50), score=mod,
                                           schedule=Schedule(TILE, TILE)))
    q, k, v = (t.to(device) for t in _qkv(Lq, Lk, dtype, seed=4))
    o, lse = attn(q, k, v, return_lse=True, backend="triton")
    dense = allowed(_chunk50, Lq, Lk)
    ro, rl = dense_attention(*(t.double().cpu() for t in (q, k, v)), dense,
                             _score_oracle(fn, Lq, Lk))
    _close(o, lse, ro, rl, dtype)


def test_capture_indexed_by_qp_must_cover_lk():
    """is_global is read at qp (up to Lk - 1): one entry per query row is not enough."""
    Lq, Lk = SHAPES["prefill-Lq35-Lk131"]
    attn = attncc.compile(attncc.Attention(mask=attncc.global_tokens(
        5, torch.zeros(Lq, dtype=torch.bool))))
    q, k, v = _qkv(Lq, Lk, torch.float32)
    with pytest.raises(ValueError, match=r"is_global: dimension 0 .* needs size >= 131"):
        attn(q, k, v, backend="reference")


def test_decode_row_sits_at_the_last_position():
    """The catalogue's motivating case: chunked(c) in decode attends to the last chunk only."""
    q, k, v = _qkv(1, LK_)
    o = attention_reference(AttentionSpec(mask=attncc.chunked(20)), q, k, v)[0]
    want = torch.softmax((q @ k.transpose(-1, -2))[..., 120:] / math.sqrt(D), -1) @ v[..., 120:, :]
    torch.testing.assert_close(o, want, atol=1e-12, rtol=1e-12)
