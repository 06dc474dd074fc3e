"""The SDPA graph pass: `scaled_dot_product_attention` calls become attncc ops when their mask
is analytic, the rewritten model matches the original (fp32, 1e-5), and every call left as SDPA
has a reason. CPU runs the reference backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ATTNCC_OP = torch.ops.attncc.attention_fwd.default


class Model(torch.nn.Module):
    """One SDPA call per case; `case` picks it."""

    def __init__(self, case: str, L: int):
        super().__init__()
        self.case = case
        i = torch.arange(L)
        self.register_buffer("causal_mask", i[None, :] <= i[:, None])
        self.register_buffer("window_mask", (i[None, :] <= i[:, None])
                             & (i[:, None] - i[None, :] < 4))
        self.register_buffer("odd_mask", (i[None, :] + i[:, None]) % 3 != 1)
        self.register_buffer("float_mask", torch.randn(L, L))
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v, user_mask):
        q = self.proj(q)
        c = self.case
        if c == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if c == "is_causal-Lk-shorter":
            return F.scaled_dot_product_attention(q, k[:, :, :7], v[:, :, :7], is_causal=True)
        if c == "no-mask-scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.2)
        if c == "buffer-causal":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal_mask)
        if c == "buffer-window-4d":
            return F.scaled_dot_product_attention(q, k, v, self.window_mask[None, None])
        if c == "built-window":
            L = q.shape[2]
            i = torch.arange(L)
            m = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        if c == "all-true":
            ones = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ones)
        if c == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=True,
                                                  enable_gqa=True)
        if c == "odd-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.odd_mask)
        if c == "float-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.float_mask)
        if c == "input-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=user_mask)
        if c == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        raise AssertionError(c)


REWRITTEN = {"is_causal": "causal", "is_causal-Lk-shorter": "causal (top-left",
             "no-mask-scale": "no mask", "buffer-causal": "causal",
             "buffer-window-4d": "sliding_window(4)", "built-window": "sliding_window(3)",
             "all-true": "no mask (all true)", "gqa": "causal"}
KEPT = {"odd-mask": "not all-true, causal or a sliding window", "float-mask": "torch.float32",
        "input-mask": "graph input", "dropout": "dropout_p=0.5"}


def _inputs(L=17):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 16, generator=g) for _ in range(3))
    return q, k, v, torch.rand(L, L, generator=g) > 0.5


@pytest.mark.parametrize("case", list(REWRITTEN) + list(KEPT))
def test_compile_backend_rewrites_and_matches(case):
    torch._dynamo.reset()
    args = _inputs()
    model = Model(case, 17)
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    backend = attncc.compile_backend(inner, backend="reference")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    if case == "dropout":  # random: compare the kept graph structurally only
        compiled(*args)
    else:
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    (line,) = backend.reports
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    if case in REWRITTEN:
        assert f": attncc {REWRITTEN[case]}" in line
        assert ATTNCC_OP in targets and F.scaled_dot_product_attention not in targets
        if case.startswith("buffer"):
            assert "read once as a constant mask" in line
    else:
        assert "kept SDPA" in line and KEPT[case] in line
        assert ATTNCC_OP not in targets


def test_replace_sdpa_on_a_symbolic_trace():
    model = Model("buffer-window-4d", 17)
    args = _inputs()
    gm = torch.fx.symbolic_trace(model)
    report = attncc.replace_sdpa(gm, args, backend="reference")
    assert len(report) == 1 and "attncc sliding_window(4)" in report[0]
    assert ATTNCC_OP in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_rewritten_graph_trains():
    """Gradients flow through the rewritten op like through SDPA."""
    torch._dynamo.reset()
    model = Model("built-window", 17)
    args = [t.requires_grad_() if t.is_floating_point() else t for t in _inputs()]
    compiled = torch.compile(model, fullgraph=True,
                             backend=attncc.compile_backend("aot_eager", backend="reference"))
    compiled(*args).square().sum().backward()
    got = [args[1].grad.clone(), model.proj.weight.grad.clone()]
    args[1].grad = None
    model.zero_grad()
    model(*args).square().sum().backward()
    torch.testing.assert_close(got[0], args[1].grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], model.proj.weight.grad, atol=1e-4, rtol=1e-4)
