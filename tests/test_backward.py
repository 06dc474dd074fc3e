"""The Triton backward kernels against fp64 autograd through the reference (interpreter on CPU).

`attention_backward(..., backend="triton")` gives dq, dk, dv and the gradients of captured
tensors; the oracle is `reference_backward` on the same inputs in fp64 (autograd through
`attention_reference`, itself checked by `torch.autograd.gradcheck` below). The kernels get o and
lse from the Triton forward, as in training.

Tolerances (max abs error against fp64, divided by max(1, max |reference|); inputs rounded to
the tested dtype first): fp32 (IEEE dots) 1e-4; fp16 1e-2 (p and dS are rounded to fp16 before
their dots, o is fp16 in delta = rowsum(o * do)); bf16 (interpreter: upcast before tl.dot) 5e-2.
Capture gradients sum up to B*Hq*Lq*Lk terms, hence the relative scale.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import attncc
from attncc.ir.positions import split_reorder_inputs
from attncc.backends.reference.forward import attention_reference
from attncc.backends.reference.softmax import reference_backward
from attncc.backends.triton.backward import kernel as backward_kernel
from attncc.ops.softmax.backward import attention_backward
from attncc.validate import split_runtime
from tests.catalog_cases import masks, scores

# the general capture-gradient path warns (tested once in test_general_path_warns)
pytestmark = pytest.mark.filterwarnings("ignore:captured tensor .* general path")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, dv or D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def _backward(attn, q, k, v, *, grads=None, permuted=False, dlse=True, seed=1, **call):
    """Forward (Triton), then the Triton backward and the fp64 reference backward.
    Returns (kernel Gradients, reference Gradients, names of the capture grads)."""
    runtime = dict(call)
    reorder_inputs = split_reorder_inputs(attn.spec.reorder, runtime, permuted)
    params, tensors = split_runtime(attn.spec, runtime)
    grads = ([c.name for c in attn.spec.captures if tensors[c.name].is_floating_point()]
             if grads is None else grads)
    o, lse = attn(q, k, v, return_lse=True, backend="triton", permuted=permuted, **call)
    g = torch.Generator().manual_seed(seed)
    # do as a non-contiguous view (BSHD memory), as autograd may hand it over
    do = torch.randn(o.shape[0], o.shape[2], o.shape[1], o.shape[3], generator=g)
    do = do.to(q.dtype).to(q.device).transpose(1, 2)
    dl = torch.randn(lse.shape, generator=g).to(q.device) if dlse else None
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    got = attention_backward(attn, q, k, v, o, lse, do, dl, sm_scale=sm_scale, params=params,
                             tensors=tensors, reorder_inputs=reorder_inputs,
                             grad_captures=grads, backend="triton", permuted=permuted)
    ref = attention_backward(
        attn, *(t.double().cpu() for t in (q, k, v, o)), lse.double().cpu(), do.double().cpu(),
        None if dl is None else dl.double().cpu(), sm_scale=sm_scale, params=params,
        tensors={n: t.double().cpu() if t.is_floating_point() else t.cpu()
                 for n, t in tensors.items()},
        reorder_inputs={n: t.cpu() for n, t in reorder_inputs.items()}, grad_captures=grads,
        backend="reference", permuted=permuted)
    return got, ref, grads


def _assert_close(got, ref, grads, dtype):
    pairs = [("dq", got.dq, ref.dq), ("dk", got.dk, ref.dk), ("dv", got.dv, ref.dv)]
    pairs += [(n, got.captures[n], ref.captures[n]) for n in grads]
    for name, a, b in pairs:
        assert a.shape == b.shape, name
        assert name not in ("dq", "dk", "dv") or a.dtype == dtype, name
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = (a.double().cpu() - b).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
        assert err <= TOL[dtype] * scale, \
            f"{name}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def check(spec, B, Hq, Hkv, Lq, Lk, D, dtype, device, dv=None, grads=None, **call):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, dv)
    attn = attncc.compile(spec)
    got, ref, grads = _backward(attn, q, k, v, grads=grads, **call)
    _assert_close(got, ref, grads, dtype)
    return got


MASK_SHAPE = (1, 2, 1, 63, 90, 32, torch.float32)  # GQA, Lq != Lk, odd lengths
MASKS = masks(1, 2, 63, 90)


@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize("mask_id", list(MASKS), ids=[f"{m}-B1-Hq2-Hkv1-L63x90-d32-fp32-t32x16"
                                                      for m in MASKS])
def test_every_mask(mask_id, device):
    """32 x 16 tiles (a user-fixed schedule applies to both directions): 2 x 6 tiles of every
    class, so dk/dv's per-tile classification is exercised against the forward's."""
    spec = attncc.Attention(mask=MASKS[mask_id], schedule=attncc.Schedule(block_m=32,
                                                                          block_n=16))
    check(spec, *MASK_SHAPE, device)


PIECE_MASKS = ["M1-causal", "M2-sliding-window", "M3-bidirectional", "M5-prefix-lm",
               "M6-sinks-window", "M7-chunked", "M8-block-causal", "M18-per-head",
               "M11-cu-seqlens"]  # closed-form tile pieces (no block map)


@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize("mask_id", PIECE_MASKS, ids=[f"{m}-L63x90-t16x32" for m in PIECE_MASKS])
def test_dkdv_query_tile_intervals(mask_id, device):
    """16 x 32 tiles: 4 query tiles per kv tile, so the dk/dv kernel's bisection for each
    piece's partial and full query-tile intervals (`render._dkdv_piece`) has ranges to find,
    with one to three pieces and Lq != Lk."""
    assert mask_id in MASKS
    spec = attncc.Attention(mask=MASKS[mask_id], schedule=attncc.Schedule(block_m=16,
                                                                          block_n=32))
    check(spec, *MASK_SHAPE, device)


SCORES = scores(2, 2, 65, 65)


@pytest.mark.filterwarnings("ignore:divide by zero")  # S8 takes log(0) on padding columns
@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("score_id", list(SCORES), ids=[f"{s}-B2-Hq2-mqa-L65-d64-fp16"
                                                        for s in SCORES])
def test_every_score_mod_and_its_capture_grads(score_id, device):
    """Every learnable capture of S3-S8 gets its gradient (S5's bias broadcasts over b)."""
    spec = attncc.Attention(mask=attncc.causal(), score=SCORES[score_id])
    check(spec, 2, 2, 1, 65, 65, 64, torch.float16, device)


@pytest.mark.parametrize("mask_id", ["M1-causal", "M6-sinks-window", "M11-document"])
def test_sink_logit_gradient(mask_id, device):
    """N2: dsink[h] = -sum_{b,i} exp(sink[h] - lse) delta, against autograd."""
    sinks = torch.tensor([0.5, -1.0, 2.0, 8.0])
    spec = attncc.Attention(mask=masks(1, 4, 70, 70)[mask_id], normaliser=attncc.sink(sinks))
    check(spec, 1, 4, 2, 70, 70, 32, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: _SHORT[d])
@pytest.mark.parametrize("L,D", [(1, 32), (65, 16), (65, 40), (130, 64)],
                         ids=lambda x: str(x))
def test_lengths_head_dims_dtypes(L, D, dtype, device):
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(50),
                            score=attncc.softcap(20.0))
    check(spec, 1, 2, 1, L, L, D, dtype, device)


@pytest.mark.parametrize("Lq,Lk", [(1, 257), (63, 130), (130, 63), (257, 257)],
                         ids=lambda x: str(x))
def test_lq_differs_from_lk_with_alibi(Lq, Lk, device):
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.alibi(torch.rand(3) + 0.1))
    check(spec, 1, 3, 1, Lq, Lk, 32, torch.float32, device)


@pytest.mark.parametrize("D,Dv", [(40, 24), (16, 64)], ids=lambda x: str(x))
def test_head_dims_differ(D, Dv, device):
    check(attncc.Attention(mask=attncc.causal()), 1, 2, 2, 70, 70, D, torch.float32, device,
          dv=Dv)


def test_traced_score_mod_reading_a_tensor_twice_and_a_scalar(device):
    """slope[h] read twice (one sympy node, squared), a 0-d scalar, and one table read at two
    different indices (two loads whose gradients add up)."""
    g = torch.Generator().manual_seed(3)
    slope = (torch.rand(4, generator=g) + 0.1).to(device)
    temp = torch.tensor(0.7).to(device)
    pos = (0.1 * torch.randn(63, generator=g)).to(device)

    def mod(score, b, h, q_idx, kv_idx):
        return (score * temp + slope[h] * (kv_idx - q_idx) - 0.5 * slope[h] * slope[h]
                + pos[kv_idx] - pos[q_idx])

    spec = attncc.Attention(mask=attncc.causal(), score=mod)
    got = check(spec, 1, 4, 2, 63, 63, 32, torch.float32, device)
    assert set(got.captures) == {"temp", "slope", "pos"}
    assert got.captures["temp"].shape == ()


def test_grad_of_a_subset_of_captures(device):
    """Only the captures asked for are returned; another set renders another variant."""
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.alibi(torch.rand(2)).then(
        attncc.head_bias(torch.randn(2))))
    got = check(spec, 1, 2, 1, 40, 40, 16, torch.float32, device, grads=["head_bias"])
    assert list(got.captures) == ["head_bias"]
    check(spec, 1, 2, 1, 40, 40, 16, torch.float32, device, grads=[])


@pytest.mark.parametrize("permuted", [False, True], ids=["original-order", "permuted"])
def test_reordered_block_map_kernel(permuted, device):
    """M12 on a 7x9 grid in Hilbert order: the block map is transposed for dk/dv, rows are
    gathered (or already permuted), the relative bias and the per-key log count see original
    positions."""
    g = torch.Generator().manual_seed(6)
    spec = attncc.Attention(mask=attncc.neighbourhood_2d(7, 9, 3, 5),
                            score=attncc.relative_bias(torch.randn(2, 9, generator=g)).then(
                                attncc.log_count(torch.rand(63, generator=g).log())),
                            reorder=attncc.Hilbert2D(7, 9))
    q, k, v = _inputs(1, 2, 1, 63, 63, 32, torch.float32, device)
    attn = attncc.compile(spec)
    if permuted:
        perm = attncc.Hilbert2D(7, 9).permutation(63, device=device)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    got, ref, grads = _backward(attn, q, k, v, permuted=permuted)
    _assert_close(got, ref, grads, torch.float32)


def test_dq_and_dkdv_at_their_own_tiles(monkeypatch, device):
    """dq at 16 x 32 and dk/dv at 32 x 16 (on a GPU they differ by default): a document mask's
    block map is built once at each kernel's tiles (dq reads it, dk/dv its transpose), and
    ALiBi's per-program slope sums are laid out by dq's query tiles."""
    tiles = {"dq": (16, 32), "dkdv": (32, 16)}
    monkeypatch.setattr(backward_kernel, "choose_backward",
                        lambda target, dtype, dqk, dv, kernel: attncc.Schedule(
                            *tiles[kernel], num_warps=4, num_stages=1))
    doc = torch.tensor([0] * 13 + [1] * 30 + [2] * 27, dtype=torch.int32)
    spec = attncc.Attention(mask=attncc.document(doc), score=attncc.alibi(torch.rand(2) + 0.1))
    q, k, v = _inputs(1, 2, 1, 70, 70, 32, torch.float32, device)
    attn = attncc.compile(spec)
    got, ref, grads = _backward(attn, q, k, v)
    assert attn.block_maps.builds == 3  # the forward's map and one per kernel's tiles
    _assert_close(got, ref, grads, torch.float32)


def test_deterministic(device):
    """Two backward runs give bitwise-equal dq, dk, dv and capture gradients (GQA group summed
    in-program; capture gradients reduced without atomics)."""
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.alibi(torch.rand(4)).then(
        attncc.relative_bias(torch.randn(4, 9))).then(attncc.bias(torch.randn(1, 4, 70, 70))))
    q, k, v = _inputs(1, 4, 2, 70, 70, 32, torch.float16, device)
    attn = attncc.compile(spec)
    first, _, grads = _backward(attn, q, k, v)
    second, _, _ = _backward(attn, q, k, v)
    for name in ("dq", "dk", "dv"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert grads
    for name in grads:
        assert torch.equal(first.captures[name], second.captures[name]), name


def test_rows_with_no_allowed_key_get_zero_gradients(device):
    doc_q = torch.tensor([0, 0, 5, 5, 1, 1, 1]).to(device)
    doc_k = torch.tensor([0, 0, 1, 1, 1, 1, 1]).to(device)
    hb = torch.randn(1).to(device)

    def mask(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    def score(s, b, h, q_idx, kv_idx):
        return s + hb[h]

    q, k, v = _inputs(1, 1, 1, 7, 7, 16, torch.float32, device)
    attn = attncc.compile(attncc.Attention(mask=mask, score=score))
    got, ref, grads = _backward(attn, q, k, v, grads=["hb"])
    assert torch.all(got.dq[0, 0, 2:4] == 0)
    _assert_close(got, ref, grads, torch.float32)


def test_gradcheck_of_the_reference_path():
    """Finite differences agree with autograd through attention_reference (fp64), the path
    `reference_backward` takes, for q, k, v and learnable captures (incl. the sink)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Lq, Lk, D = 1, 2, 1, 5, 7, 4
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.alibi(torch.rand(Hq)).then(
        attncc.bias(torch.randn(1, Hq, Lq, Lk))), normaliser=attncc.sink(torch.randn(Hq)))
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    slopes, bias, sink = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                          for s in ((Hq,), (1, Hq, Lq, Lk), (Hq,)))

    def f(q, k, v, slopes, bias, sink):
        return attention_reference(spec, q, k, v, captures={"alibi_slopes": slopes,
                                                            "bias": bias, "sink": sink})

    assert torch.autograd.gradcheck(f, (q, k, v, slopes, bias, sink))
    do, dlse = torch.randn(B, Hq, Lq, D, dtype=torch.float64), torch.randn(B, Hq, Lq,
                                                                           dtype=torch.float64)
    grads = reference_backward(spec, q, k, v, do, dlse, sm_scale=D ** -0.5,
                               tensors={"alibi_slopes": slopes, "bias": bias, "sink": sink},
                               grad_captures=["alibi_slopes", "bias", "sink"])
    o, lse = f(q, k, v, slopes, bias, sink)
    want = torch.autograd.grad((o, lse), (q, slopes, sink), (do, dlse))
    for a, b in zip((grads.dq, grads.captures["alibi_slopes"], grads.captures["sink"]), want):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_before_any_launch(device):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(),
                                           score=attncc.alibi(torch.rand(2))))
    q, k, v = _inputs(1, 2, 1, 9, 9, 16, torch.float32, device)
    o, lse = attn(q, k, v, return_lse=True, backend="triton")
    params, tensors = split_runtime(attn.spec, {})
    kw = {"sm_scale": 0.25, "params": params, "tensors": tensors, "backend": "triton"}
    with pytest.raises(ValueError, match=r"do: expected shape \[1, 2, 9, 16\]"):
        attention_backward(attn, q, k, v, o, lse, o[:, :, :4], **kw)
    with pytest.raises(ValueError, match="grad_captures: 'nope' is not a captured tensor"):
        attention_backward(attn, q, k, v, o, lse, o, grad_captures=["nope"], **kw)


@pytest.mark.parametrize("shape", [(1, 2, 33, 41), (2, 1, 40, 50), (2, 1, 1, 41)],
                         ids=lambda s: "bias" + "x".join(map(str, s)))
def test_bias_gradient_exact_extents_and_larger_tensor(shape, device):
    """S5 on a tensor of the call's extents (its scratch is the gradient), on a larger one
    (the general scatter path; rows and columns past Lq, Lk get 0), and a key-padding bias
    [B, 1, 1, Lk] (summed per key in the dk/dv kernel)."""
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(device)
    spec = attncc.Attention(mask=attncc.sliding_window(20), score=attncc.bias(bias))
    got = check(spec, 2, 2, 1, 33, 41, 16, torch.float32, device)
    if shape[2] > 33:
        assert torch.all(got.captures["bias"][:, :, 33:] == 0)


def test_strided_views_and_no_lse_gradient(device):
    """bshd-style views (non-contiguous BHSD) for q/k/v (do is one in every test), and
    dlse=None."""
    B, H, L, D = 1, 2, 45, 32
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in _inputs(B, H, H, L, L, D, torch.float32, device))
    assert not q.is_contiguous()
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), score=attncc.softcap(5.0)))
    got, ref, grads = _backward(attn, q, k, v, dlse=False)
    _assert_close(got, ref, grads, torch.float32)


@pytest.mark.filterwarnings("ignore:divide by zero")  # S8 takes log(0) on padding columns
@pytest.mark.filterwarnings("ignore:invalid value")
def test_general_path_warns_identity_bias_and_per_key_do_not(device):
    table = torch.randn(2, 5)
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.relative_bias(table))
    q, k, v = _inputs(1, 2, 1, 20, 20, 16, torch.float32, device)
    with pytest.warns(UserWarning, match=r"'rel_table'.*general path, a \[B, Hq, Lq, Lk\]"):
        _backward(attncc.compile(spec), q, k, v)
    for score in (attncc.bias(torch.randn(1, 2, 20, 20)), attncc.calibration(torch.rand(20))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            _backward(attncc.compile(attncc.Attention(mask=attncc.causal(), score=score)),
                      q, k, v)


@pytest.mark.parametrize("order", ["R5-segment-sort", "R6-permutation"])
def test_call_time_reorders(order, device):
    """R5 (key_score=) and R6 (perm=): the reorder's call arguments reach the backward."""
    g = torch.Generator().manual_seed(4)
    if order == "R5-segment-sort":
        reorder, call = attncc.SegmentSort(16), {"key_score": torch.randn(50, generator=g)}
    else:
        reorder, call = attncc.UserPermutation(), {"perm": torch.randperm(50, generator=g)}
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(20),
                            score=attncc.alibi(torch.rand(2, generator=g)), reorder=reorder)
    q, k, v = _inputs(1, 2, 1, 50, 50, 16, torch.float32, device)
    got, ref, grads = _backward(attncc.compile(spec), q, k, v,
                                **{n: t.to(device) for n, t in call.items()})
    _assert_close(got, ref, grads, torch.float32)
