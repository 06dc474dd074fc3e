"""`attncc::linear_fwd` / `attncc::linear_bwd` (linear-recurrence attention as custom ops):
opcheck, values and gradients through the op against fp64 autograd of the spec loop,
torch.compile(fullgraph=True) of a small gated-delta (L6) model against eager with zero graph
breaks and zero recompiles for new gates / states / scale, and torch.export of that model.

Kernels run under Triton's interpreter on the CPU (fp32 inputs: exact dots there); some opcheck
cases use backend="reference" (varlen, the normaliser, L7) to keep the repeated calls cheap.
Tolerances: against the fp64 oracle, max error <= 1e-4 * max(1, |reference|) in fp32 (as
tests/test_linear_backward.py); compiled vs eager run the same kernels: 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from tests.test_linear_backward import assert_near, make_inputs


class CountingBackend:
    """Counts graphs compiled to the end: dynamo may call a backend a second time for one graph
    when AOTAutograd asks it to restart (TensorifyScalarRestartAnalysis, raised out of the first
    call); a recompile for new guards is a second completed compile and is counted."""

    def __init__(self, inner="aot_eager"):
        self.compiles, self.inner = 0, torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        compiled = self.inner(gm, example_inputs)
        self.compiles += 1
        return compiled

pytestmark = pytest.mark.filterwarnings("ignore:.*running the PyTorch reference:UserWarning")

RULES = {
    "L6": {"update": "delta", "decay": "scalar"},
    "L5": {"update": "delta"},
    "L4": {"decay": "vector"},
    "L1_elu1_norm": {"feature_map": "elu1", "normalize": True},
    "L7": {"block": 4},
}
CASES = {  # id -> (rule, L, initial state, varlen cu_seqlens or None, backend)
    "L6-B1H2-L17-d16-state-triton": ("L6", 17, True, None, "triton"),
    "L5-B1H2-L1-d16-decode-triton": ("L5", 1, True, None, "triton"),
    "L4-B1H2-L17-d16-nostate-triton": ("L4", 17, False, None, "triton"),
    "L1_elu1_norm-T20-cu0,7,20-d16-reference": ("L1_elu1_norm", 20, True, [0, 7, 20],
                                                "reference"),
    "L7-B1H2-L9-d16-reference": ("L7", 9, False, None, "reference"),
}


def _case(case, device):
    """(attn, inputs, do, d_state, cu_seqlens, backend), tensors drawn on the CPU generator and
    moved to `device` (values do not depend on the device)."""
    rule, L, initial, cu, backend = CASES[case]
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(**RULES[rule])))
    x, do, ds = make_inputs(attn.node, 1, 2, L, 16, 16, initial=initial, seed=3)
    if cu is not None:  # packed [T, H, D]; states [N, H, F, Dv']
        x = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items() if n != "initial_state"}
        do = do[0].transpose(0, 1).contiguous()
        n_seq = len(cu) - 1
        gen = torch.Generator().manual_seed(4)
        shape = (n_seq, 2, 16, attn.node.state_dv(16))
        x["initial_state"], ds = torch.rand(*shape, generator=gen), torch.randn(*shape,
                                                                                generator=gen)
        cu = torch.tensor(cu).to(device)
    x = {n: t.to(device) for n, t in x.items()}
    return attn, x, do.to(device), ds.to(device), cu, backend


def _op_args(attn, x, cu, backend, return_state=True, scale=None):
    return (attn.key, x["q"], x["k"], x["v"], x.get("g"), x.get("beta"),
            x.get("initial_state"), cu, scale, return_state, backend)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_opcheck_linear_fwd(case, device):
    attn, x, _, _, cu, backend = _case(case, device)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    return_state = "decode" not in case  # the decode case returns o only (state: empty [0])
    opcheck(torch.ops.attncc.linear_fwd.default,
            _op_args(attn, leaves, cu, backend, return_state=return_state))


def test_opcheck_linear_bwd(device):
    attn, x, do, ds, _, _ = _case("L6-B1H2-L17-d16-state-triton", device)
    scale = torch.tensor(0.3, dtype=torch.float64)
    args = (attn.key, x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], None,
            scale, None, do, ds, "triton")
    opcheck(torch.ops.attncc.linear_bwd.default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_values_and_gradients_match_fp64_oracle(case, device):
    """o, the final state and every input's gradient through the op, against fp64."""
    attn, x, do, ds, cu, backend = _case(case, device)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    o, state = attn(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                    beta=leaves.get("beta"), initial_state=leaves.get("initial_state"),
                    cu_seqlens=cu, return_state=True, backend=backend)
    ((o * do).sum() + (state * ds).sum()).backward()
    x, do, ds = {n: t.cpu() for n, t in x.items()}, do.cpu(), ds.cpu()  # oracles on the CPU
    cu = None if cu is None else cu.cpu()
    f64 = {n: t.double() for n, t in x.items()}
    run = varlen_reference if cu is not None else recurrent_reference
    extra = {"cu_seqlens": cu} if cu is not None else {}
    ro, rs = run(f64["q"], f64["k"], f64["v"], attn.node, g=f64.get("g"), beta=f64.get("beta"),
                 initial_state=f64.get("initial_state"), output_final_state=True, **extra)
    assert_near("o", o, ro, 1e-4)
    assert_near("state", state, rs, 1e-4)
    from attncc.backends.reference.linear_backward import reference_backward
    want = reference_backward(x["q"], x["k"], x["v"], attn.node, do, g=x.get("g"),
                              beta=x.get("beta"), initial_state=x.get("initial_state"),
                              d_final_state=ds, cu_seqlens=cu)
    for n, t in leaves.items():
        assert_near(n, t.grad, want[n], 1e-4)


class GatedDeltaBlock(torch.nn.Module):
    """x [B, L, 32] -> q/k/v/gate/beta projections -> L6 over 2 heads of 16 -> out proj."""

    def __init__(self, backend="auto"):
        super().__init__()
        torch.manual_seed(0)
        self.H, self.D = 2, 16
        self.qkv = torch.nn.Linear(32, 3 * 32, bias=False)
        self.gb = torch.nn.Linear(32, 2 * self.H)
        self.out = torch.nn.Linear(32, 32, bias=False)
        self.attn = attncc.compile(attncc.Attention(
            memory=attncc.recurrent_state(update="delta", decay="scalar")), backend=backend)

    def forward(self, x, state, scale):
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, self.H, self.D).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        g, beta = self.gb(x).view(B, L, 2, self.H).permute(2, 0, 3, 1)
        o, s = self.attn(q, F.normalize(k, dim=-1), v, g=F.logsigmoid(g), beta=beta.sigmoid(),
                         initial_state=state, scale=scale, return_state=True)
        return self.out(o.transpose(1, 2).reshape(B, L, -1)), s


def _block_inputs(seed, device, L=17):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, L, 32, generator=gen).to(device),
            torch.randn(1, 2, 16, 16, generator=gen).to(device))


def test_fullgraph_l6_model_matches_eager_with_gradients_and_never_recompiles(device):
    torch._dynamo.reset()
    model = GatedDeltaBlock().to(device)
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    params = list(model.parameters())
    for seed, scale in [(0, 0.25), (1, 0.5)]:  # new inputs, gates, states and scale: data
        x, s0 = _block_inputs(seed, device)
        s0.requires_grad_(True)
        scale_t = torch.tensor(scale, dtype=torch.float64)
        results = []
        for fn in (compiled, model):
            y, s = fn(x, s0, scale_t)
            loss = y.square().sum() + s.sum()
            results.append((y, s, torch.autograd.grad(loss, params + [s0])))
        (y1, s1, g1), (y2, s2, g2) = results
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.compiles == 1  # fullgraph=True: a graph break would have raised


def test_decode_step_compiled_matches_eager_and_reference(device):
    """L = 1 (the recurrent kernel) under torch.compile, the state carried across steps: equal
    to eager at each step, and the steps together to one fp64 reference prefill."""
    torch._dynamo.reset()
    model = GatedDeltaBlock().to(device)
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x, s0 = _block_inputs(5, device, L=3)
    scale = torch.tensor(0.25, dtype=torch.float64)
    s, s_eager, ys = s0, s0, []
    with torch.no_grad():
        for t in range(3):
            y, s = compiled(x[:, t:t + 1], s, scale)
            y_e, s_eager = model(x[:, t:t + 1], s_eager, scale)
            torch.testing.assert_close(y, y_e, atol=1e-5, rtol=1e-5)
            ys.append(y)
        y_full, s_full = GatedDeltaBlock(backend="reference").double()(
            x.double().cpu(), s0.double().cpu(), scale)
    assert_near("decode o", torch.cat(ys, 1), y_full, 1e-4)
    assert_near("decode state", s, s_full, 1e-4)
    assert counter.compiles == 1


def test_export_l6_model_runs_and_matches(device):
    model = GatedDeltaBlock().to(device)
    x, s0 = _block_inputs(0, device)
    scale = torch.tensor(0.25, dtype=torch.float64)
    ep = torch.export.export(model, (x, s0, scale))
    assert "torch.ops.attncc.linear_fwd.default('linear_gated_delta-" in ep.graph_module.code
    for seed in (0, 1):
        x, s0 = _block_inputs(seed, device)
        for got, want in zip(ep.module()(x, s0, scale), model(x, s0, scale)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(update="delta")))
    x, _, _ = make_inputs(attn.node, 1, 1, 4, 16, 16)
    with pytest.raises(ValueError, match="kernel: expected the key of a linear attention"):
        torch.ops.attncc.linear_fwd("linear_delta-nope", x["q"], x["k"], x["v"], None,
                                    x["beta"], None, None, None, False, "triton")
    with pytest.raises(TypeError, match="scale: expected a number or a one-element"):
        attn(x["q"], x["k"], x["v"], beta=x["beta"], scale=torch.ones(2))
    with pytest.raises(ValueError, match="beta"):  # checked inside the op, before a launch
        attn(x["q"], x["k"], x["v"], backend="triton")
