"""Property: a call with one bad or unusual argument either raises a clear ValueError/TypeError
naming the argument (before any launch), or returns the correct result: never an error from
inside a kernel, a NaN, or a wrong answer.

Mutations of a valid call: wrong dtype, wrong rank, Hq % Hkv != 0, mismatched head dims /
lengths / batch, a tensor on the 'meta' device, a non-finite or non-float scale, empty sizes
(B, H, Lq, Lk, D = 0), odd strides (stride 0, step 3, mixed layouts in one call), a bad layout
string, unknown or ill-typed runtime keywords, bad replacement captured tensors.
Correct results are checked against the brute force of `tests/fuzz_support.dense_softmax`
with `tests/fuzz_support.TOL`.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st

import attncc
from tests.fuzz_exprs import _mask_data, build_mask, dense_mask
from tests.fuzz_support import (TOL, Shape, assert_close, dense_softmax, fuzz_settings,
                                log_example)

MUTATIONS = {
    "dtype": st.tuples(st.sampled_from("qkv"),
                       st.sampled_from(["float64", "int32", "bool", "bfloat16", "float16"])),
    "rank": st.tuples(st.sampled_from("qkv"), st.sampled_from(["squeeze", "unsqueeze"])),
    "heads": st.tuples(st.sampled_from([0, 3, 5])),
    "dim": st.tuples(st.sampled_from("kv"), st.sampled_from([0, 8, 300])),
    "length": st.tuples(st.sampled_from("qv"), st.sampled_from([0, 3])),
    "batch": st.tuples(st.sampled_from("kv"), st.sampled_from([0, 2])),
    "device": st.tuples(st.sampled_from(["q", "k", "v", "all"])),
    "scale": st.tuples(st.sampled_from(["nan", "inf", "-inf", "true", "str", "tensor", "neg"])),
    "empty": st.tuples(st.sampled_from(["B", "Hq", "Lq", "Lk", "D"])),
    "strides": st.tuples(st.sampled_from(["kv_expand_len", "kv_expand_heads", "q_step3",
                                          "k_bshd_storage", "v_dstride3"])),
    "layout": st.tuples(st.sampled_from(["BHSD", "bsdh", "", "thd"])),
    "keyword": st.tuples(st.sampled_from(["unknown", "float_window", "bool_window",
                                          "neg_window", "str_window", "nan_window",
                                          "doc_dtype", "doc_rank", "doc_short", "doc_meta",
                                          "doc_strided", "doc_expanded"])),
}


@st.composite
def bad_calls(draw):
    mutation = draw(st.sampled_from(sorted(MUTATIONS)))
    detail = draw(MUTATIONS[mutation])
    L = draw(st.integers(1, 24))
    shape = Shape(B=1, Hq=2, Hkv=draw(st.sampled_from([1, 2])), Lq=L, Lk=L, D=16, Dv=16,
                  dtype=draw(st.sampled_from(["float32", "float16"])), layout="bhsd",
                  strides="contig", scale=None)
    mask = draw(st.sampled_from([("causal",), ("sw", 3), ("doc", 7, 3)]))
    return shape, mask, mutation, detail, draw(st.integers(0, 999))


def _mutate(shape: Shape, mutation: str, detail: tuple, tensors: dict, call: dict
            ) -> tuple[str, Shape]:
    """Apply the mutation in place; return the argument name an error must mention and the
    shape of the call as it now is (for a valid call's expected result)."""
    what = detail[0]
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if mutation == "dtype":
        tensors[what] = tensors[what].to(getattr(torch, detail[1]))
        return "q|k|v", shape
    if mutation == "rank":
        t = tensors[what]
        tensors[what] = t[0] if detail[1] == "squeeze" else t.unsqueeze(0)
        return what, shape
    if mutation == "heads":
        tensors["k"] = torch.randn(1, what, shape.Lk, shape.D).to(k.dtype)
        tensors["v"] = torch.randn(1, what, shape.Lk, shape.Dv).to(v.dtype)
        return "k|v", shape
    if mutation == "dim":
        t = tensors[what]
        tensors[what] = torch.randn(*t.shape[:-1], detail[1]).to(t.dtype)
        return "q|k|v", shape
    if mutation == "length":  # q of another length is valid (Lq != Lk); v must match k
        t = tensors[what]
        tensors[what] = torch.randn(t.shape[0], t.shape[1], detail[1], t.shape[3]).to(t.dtype)
        # a new q length may outgrow a captured tensor indexed by q_idx: `doc` must say so
        return "v|doc", shape._replace(Lq=detail[1]) if what == "q" else shape
    if mutation == "batch":
        t = tensors[what]
        tensors[what] = torch.randn(detail[1], *t.shape[1:]).to(t.dtype)
        return "k|v", shape
    if mutation == "device":
        for n in ("qkv" if what == "all" else what):
            tensors[n] = tensors[n].to("meta")
        return "q|k|v|device|meta", shape
    if mutation == "scale":
        call["scale"] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "true": True,
                         "str": "0.5", "tensor": torch.tensor(0.5), "neg": -0.25}[what]
        return "scale", shape._replace(scale=-0.25)
    if mutation == "empty":
        sizes = dict(B=shape.B, Hq=shape.Hq, Lq=shape.Lq, Lk=shape.Lk, D=shape.D)
        sizes[what] = 0
        hkv = 0 if what == "Hq" else shape.Hkv
        tensors["q"] = torch.randn(sizes["B"], sizes["Hq"], sizes["Lq"], sizes["D"]).to(q.dtype)
        tensors["k"] = torch.randn(sizes["B"], hkv, sizes["Lk"], sizes["D"]).to(q.dtype)
        tensors["v"] = torch.randn(sizes["B"], hkv, sizes["Lk"], shape.Dv).to(q.dtype)
        return "q|k|v", shape._replace(B=sizes["B"], Hq=sizes["Hq"], Hkv=hkv, Lq=sizes["Lq"],
                                       Lk=sizes["Lk"], D=sizes["D"])
    if mutation == "strides":
        if what == "kv_expand_len":
            tensors["k"] = k[:, :, :1].expand_as(k)
            tensors["v"] = v[:, :, :1].expand_as(v)
        elif what == "kv_expand_heads":
            tensors["k"] = k[:, :1].expand(1, shape.Hq, shape.Lk, shape.D)
            tensors["v"] = v[:, :1].expand(1, shape.Hq, shape.Lk, shape.Dv)
            shape = shape._replace(Hkv=shape.Hq)
        elif what == "q_step3":
            big = torch.randn(shape.B, shape.Hq, 3 * shape.Lq, shape.D).to(q.dtype)
            big[:, :, ::3] = q
            tensors["q"] = big[:, :, ::3]
        elif what == "k_bshd_storage":
            tensors["k"] = k.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            big = torch.randn(*v.shape[:-1], 3 * shape.Dv).to(v.dtype)
            big[..., ::3] = v
            tensors["v"] = big[..., ::3]
        return "", shape
    if mutation == "layout":
        call["layout"] = what
        return "layout", shape
    if what == "doc_strided":  # valid: the same ids as a stride-2 view
        ids = _mask_data(("doc", 7, 3), shape)
        big = torch.full((2 * ids.numel(),), 99, dtype=ids.dtype)
        big[::2] = ids
        call["doc"] = big[::2]
        return "doc", shape
    if what == "doc_expanded":  # valid: one document (stride 0), so `doc` is just causal
        call["doc"] = torch.zeros((), dtype=torch.long).expand(shape.Lq)
        return "doc", shape
    bad = {"unknown": ("windw", 3), "float_window": ("window", 2.5),
           "bool_window": ("window", True), "neg_window": ("window", -1),
           "str_window": ("window", "3"), "nan_window": ("window", math.nan),
           "doc_dtype": ("doc", torch.zeros(shape.Lq)), "doc_rank": ("doc", torch.zeros(
               1, shape.Lq, dtype=torch.long)), "doc_short": ("doc", torch.zeros(
                   max(shape.Lq - 1, 0), dtype=torch.long)),
           "doc_meta": ("doc", torch.zeros(shape.Lq, dtype=torch.long, device="meta"))}[what]
    call[bad[0]] = bad[1]
    return re.escape(bad[0]) + "|window|doc", shape


@fuzz_settings(40, 3000)
@given(bad_calls())
def test_fuzz_bad_inputs(case):
    log_example("bad_inputs", case)
    shape, mask, mutation, detail, seed = case
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, shape.dtype)
    tensors = {"q": torch.randn(shape.B, shape.Hq, shape.Lq, shape.D, generator=g).to(dt),
               "k": torch.randn(shape.B, shape.Hkv, shape.Lk, shape.D, generator=g).to(dt),
               "v": torch.randn(shape.B, shape.Hkv, shape.Lk, shape.Dv, generator=g).to(dt)}
    call: dict = {}
    name, valid_shape = _mutate(shape, mutation, detail, tensors, call)
    attn = attncc.compile(attncc.Attention(mask=build_mask(mask, shape)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o, lse = attn(tensors["q"], tensors["k"], tensors["v"], return_lse=True,
                          backend="triton", **call)
    except (ValueError, TypeError) as e:
        assert re.search(rf"\b({name})\b", str(e)), f"{mutation} {detail}: unclear error {e!r}"
        return
    # no error: the call was valid, so the result must be right
    q, k, v = (tensors[n] for n in "qkv")
    if q.device.type == "meta":
        assert o.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and \
            o.device.type == "meta", f"meta call: o {o.shape} on {o.device}"
        return
    vs = valid_shape
    layout = call.get("layout", "bhsd")
    assert layout in ("bhsd", "bshd"), f"layout {layout!r} accepted"
    if mask[0] == "doc" and vs.Lq != vs.Lk:
        return  # documents are defined on one token axis: nothing to compare against
    if call.get("doc") is not None and call["doc"].stride() == (0,) and mask[0] == "doc":
        mask = ("causal",)
    allowed = dense_mask(mask, vs) if vs.B * vs.Hq * vs.Lq * vs.Lk else \
        torch.zeros(vs.B, vs.Hq, vs.Lq, vs.Lk, dtype=torch.bool)
    scale = call.get("scale")
    do, dl = dense_softmax(q.double(), k.double(), v.double(), allowed, None, scale)
    o_tol, lse_tol = TOL[shape.dtype]
    assert o.shape == do.shape and lse.shape == dl.shape
    assert_close(f"{mutation} {detail} o", o, do, o_tol)
    assert_close(f"{mutation} {detail} lse", lse, dl, lse_tol)
