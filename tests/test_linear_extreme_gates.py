"""Linear-state kernels on legal but extreme gates and on non-finite inputs (CATALOG 5).

Extreme gates: a log-gate of -inf (a full forget: e^g = 0) or -1e5 / -1e9 at the first, a middle
or the last token of a chunk, or on a chunk boundary, must give what the one-token recurrence
gives (the fp64 `recurrent_reference`, where e^-inf = 0), in the chunked, recurrent and varlen
forms. Non-finite inputs: a NaN or inf at token t must leave every output before t exactly as
the reference on the prefix gives it (finite), must not leak into another packed sequence, and
later outputs must be non-finite exactly where the reference's are (and close elsewhere).
The backward kernel with extreme gates: finite and close wherever the recurrence's gradient is.

Chunk 16 under the interpreter, L = 40: three chunks, the last one partial. Tolerances (max
error relative to max(reference max magnitude, 1)): fp32 1e-4, fp16 2e-2 (q, k, v rounded to
16 bits; g, beta and the state stay fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_chunked import chunked_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import LinearState
from tests.test_linear_backward import NODES as BNODES
from tests.test_linear_backward import kernel as bkernel
from tests.test_linear_backward import make_inputs, oracle

NODES = {
    "linear": LinearState("linear"),
    "linear_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "decay": LinearState("decay", decay=(0.9, 0.6)),
    "scalar_gate": LinearState("scalar_gate"),
    "vector_gate": LinearState("vector_gate"),
    "delta": LinearState("delta"),
    "gated_delta": LinearState("gated_delta"),
    "block4": LinearState("block_causal", block=4),
}
GATED = ("scalar_gate", "vector_gate", "gated_delta")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
CHUNK, L, DK, DV = 16, 40, 16, 24
# (token, value): first / middle / last token of chunk 0, first of chunk 1, a later chunk
GATE_CASES = [(0, float("-inf")), (7, float("-inf")), (15, float("-inf")), (16, float("-inf")),
              (33, float("-inf")), (7, -1e5), (7, -1e9), (16, -1e9)]
_KERNELS: dict[tuple[str, str], object] = {}


def kernel(name: str, form: str):
    if (name, form) not in _KERNELS:
        node = NODES[name]
        _KERNELS[name, form] = (TritonChunkedLinear(node, chunk=CHUNK) if form == "chunked"
                                else TritonRecurrentLinear(node))
    return _KERNELS[name, form]


def inputs(name: str, lead: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v (fp32) and g, beta for `name`'s rule, laid out as lead + [D] (lead = (B, H, L)
    dense or (T, H) packed), and a random initial state [B or N, H, Dk, Dv']."""
    node = NODES[name]
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*lead, DK, generator=gen) for _ in range(2))
    v = torch.randn(*lead, DV, generator=gen)
    if node.rule in ("delta", "gated_delta"):
        k = F.normalize(k, dim=-1)
    out = {"q": q, "k": k, "v": v}
    if node.rule in ("scalar_gate", "gated_delta"):
        out["g"] = -0.5 * torch.rand(*lead, generator=gen)
    if node.rule == "vector_gate":
        out["g"] = -0.5 * torch.rand(*lead, DK, generator=gen)
    if node.rule in ("delta", "gated_delta"):
        out["beta"] = torch.rand(*lead, generator=gen)
    return out


def to(x: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """q, k, v in `dtype` on `device`; g and beta stay fp32."""
    return {n: t.to(device, dtype if n in "qkv" else torch.float32) for n, t in x.items()}


def reference(name: str, x: dict[str, torch.Tensor], state: torch.Tensor | None,
              cu: torch.Tensor | None = None):
    """fp64 reference (o, final state) on the CPU, from `x` as the kernel saw it."""
    x = {n: t.double().cpu() for n, t in x.items()}
    s = None if state is None else state.double().cpu()
    if cu is not None:
        return varlen_reference(x.pop("q"), x.pop("k"), x.pop("v"), NODES[name],
                                cu_seqlens=cu.cpu(), initial_state=s, output_final_state=True,
                                **x)
    return recurrent_reference(x.pop("q"), x.pop("k"), x.pop("v"), NODES[name],
                               initial_state=s, output_final_state=True, **x)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Finite where the reference is, non-finite where it is not, and close where finite."""
    actual = actual.double().cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), (
        f"non-finite entries at {(torch.isfinite(actual) != finite).nonzero()[:4].tolist()} "
        "(first mismatches) differ from the reference's")
    err = (actual - expected)[finite].abs().max().item() if finite.any() else 0.0
    ref = expected[finite].abs().max().item() if finite.any() else 0.0
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


def set_gate(name: str, g: torch.Tensor, token: int, value: float) -> None:
    """g[..., token] = value; for the vector gate on every other key channel (the rest keep
    their small gates, so channels forget independently)."""
    if NODES[name].rule == "vector_gate":
        g[..., token, ::2] = value
    else:
        g[..., token] = value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("token,value", GATE_CASES, ids=[f"t{t}_{v:g}" for t, v in GATE_CASES])
@pytest.mark.parametrize("name", GATED)
def test_extreme_gate_matches_recurrence(name, token, value, form, dtype, device):
    x = inputs(name, (1, 2, L))
    set_gate(name, x["g"], token, value)
    state = torch.randn(1, 2, DK, DV, generator=torch.Generator().manual_seed(1))
    x = to(x, device, dtype)
    o, s = kernel(name, form)(**x, initial_state=state.to(device), return_state=True)
    ro, rs = reference(name, x, state)
    assert_near(o, ro, TOL[dtype])
    assert_near(s, rs, TOL[dtype])


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", GATED)
def test_extreme_gates_varlen(name, form, device):
    # -inf on the first token of sequence 1 and mid-chunk of sequence 2, -1e9 in sequence 0
    seqlens = [17, 3, 40]
    x = inputs(name, (sum(seqlens), 2))
    for token, value in ((17, float("-inf")), (20 + 9, float("-inf")), (5, -1e9)):
        g = x["g"]
        if NODES[name].rule == "vector_gate":
            g[token, :, ::2] = value
        else:
            g[token] = value
    cu = torch.tensor([0, 17, 20, 60], dtype=torch.int32)
    state = torch.randn(3, 2, DK, DV, generator=torch.Generator().manual_seed(1))
    x = to(x, device, torch.float32)
    o, s = kernel(name, form)(**x, initial_state=state.to(device), return_state=True,
                              cu_seqlens=cu.to(device))
    ro, rs = reference(name, x, state, cu)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


# (tensor, value): each at one entry of token T_BAD (mid-chunk: rows before it share its chunk)
T_BAD = 21
POISONS = [("q", float("nan")), ("k", float("nan")), ("v", float("nan")), ("v", float("inf")),
           ("k", float("-inf")), ("beta", float("nan"))]


def _poison_cases():
    for name in NODES:
        for form in ("chunked", "recurrent"):
            if form == "recurrent" and NODES[name].rule == "block_causal":
                continue  # L7 has no one-token form
            for tensor, value in POISONS:
                if tensor == "beta" and NODES[name].rule not in ("delta", "gated_delta"):
                    continue
                yield name, form, tensor, value


@pytest.mark.parametrize("name,form,tensor,value", list(_poison_cases()),
                         ids=[f"{n}-{f}-{t}_{v}" for n, f, t, v in _poison_cases()])
def test_non_finite_input_is_causal(name, form, tensor, value, device):
    x = inputs(name, (1, 2, L))
    x[tensor][0, 1, T_BAD, ...].view(-1)[3 % x[tensor][0, 1, T_BAD].numel()] = value
    state = torch.randn(1, 2, DK, NODES[name].state_dv(DV),
                        generator=torch.Generator().manual_seed(1))
    if NODES[name].normalize:
        state[..., -1] = state[..., -1].abs()
    x = to(x, device, torch.float32)
    o, s = kernel(name, form)(**x, initial_state=state.to(device), return_state=True)
    # before T_BAD (L7: before T_BAD's block): exactly the reference on the clean prefix
    first = T_BAD - T_BAD % NODES[name].block if NODES[name].rule == "block_causal" else T_BAD
    prefix = {n: t[:, :, :first] for n, t in x.items()}
    ro_prefix, _ = reference(name, prefix, state)
    assert torch.isfinite(o[:, :, :first]).all()
    assert_near(o[:, :, :first], ro_prefix, 1e-4)
    # from T_BAD on: non-finite where the recurrence is, and close elsewhere (head 0 is clean)
    ro, rs = reference(name, x, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", ["scalar_gate", "vector_gate", "gated_delta", "linear"])
def test_non_finite_input_stays_in_its_sequence(name, form, device):
    seqlens = [21, 2, 37]
    x = inputs(name, (sum(seqlens), 2))
    bad = 21 + 2 + 19  # sequence 2, mid-chunk
    x["v"][bad, 0, 5] = float("nan")
    x["k"][bad, 1, 2] = float("nan")
    cu = torch.tensor([0, 21, 23, 60], dtype=torch.int32)
    x = to(x, device, torch.float32)
    o = kernel(name, form)(**x, cu_seqlens=cu.to(device))
    assert torch.isfinite(o[:bad]).all()  # sequences 0, 1 and the start of 2 (both heads)
    clean = {n: t[:bad] for n, t in x.items()}
    ro_clean, _ = reference(name, clean, None, torch.tensor([0, 21, 23, bad], dtype=torch.int32))
    assert_near(o[:bad], ro_clean, 1e-4)
    ro, _ = reference(name, x, None, cu)
    assert_near(o, ro, 1e-4)


def test_non_finite_gate_is_rejected(device):
    x = inputs("scalar_gate", (1, 2, L))
    for value in (float("nan"), float("inf")):
        x["g"][0, 0, 5] = value
        with pytest.raises(ValueError, match=r"^g: expected all entries <= 0"):
            kernel("scalar_gate", "chunked")(**to(x, device, torch.float32))


BACKWARD = {"scalar_gate": "L3", "vector_gate": "L4", "gated_delta": "L6"}


@pytest.mark.parametrize("token,value", [(0, float("-inf")), (16, float("-inf")), (7, -1e9)],
                         ids=["t0_-inf", "t16_-inf", "t7_-1e9"])
@pytest.mark.parametrize("name", GATED)
def test_extreme_gate_gradients(name, token, value, device):
    # the backward kernel (reverse-time recurrent form) against autograd through the fp64 spec
    # loop: finite, and close, wherever the recurrence's gradient is
    node = BNODES[BACKWARD[name]]
    x, do, ds = make_inputs(node, 1, 2, 33, DK, DV, initial=True)
    set_gate(name, x["g"], token, value)
    on = {n: t.to(device) for n, t in x.items()}
    got = bkernel(BACKWARD[name])(on.pop("q"), on.pop("k"), on.pop("v"), do.to(device), **on,
                                  d_final_state=ds.to(device))
    want = oracle(node, x, do, ds)
    for n in x:
        assert torch.isfinite(want[n]).all()
        assert_near(got[n], want[n], 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("token,value", GATE_CASES, ids=[f"t{t}_{v:g}" for t, v in GATE_CASES])
@pytest.mark.parametrize("name", GATED)
def test_chunked_reference_on_extreme_gates(name, token, value, dtype):
    # the PyTorch chunked maths (attncc.backends.reference.linear_chunked) as well
    x = inputs(name, (1, 2, L))
    set_gate(name, x["g"], token, value)
    x = {n: t.to(dtype) for n, t in x.items()}
    rest = {n: t for n, t in x.items() if n not in "qkv"}
    o, s = chunked_reference(x["q"], x["k"], x["v"], NODES[name], chunk=CHUNK,
                             output_final_state=True, **rest)
    ro, rs = reference(name, x, None)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_near(o, ro, tol)
    assert_near(s, rs, tol)
