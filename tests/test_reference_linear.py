"""Linear-recurrence references (CATALOG 5): chunked == recurrent == decode; direct formulas."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from attncc.backends.reference.linear import (decode_step, feature_map, mix_hybrid,
                                              recurrent_reference)
from attncc.backends.reference.linear_chunked import chunked_reference
from attncc.ir.linear import Hybrid, LinearState

F64 = torch.float64
B, H, DK, DV = 2, 2, 4, 3
TOL = dict(atol=1e-10, rtol=0)

NODES = {
    "L1-identity": LinearState("linear"),
    "L1-identity-norm": LinearState("linear", normalize=True),
    "L1-elu1": LinearState("linear", feature_map="elu1"),
    "L1-elu1-norm": LinearState("linear", feature_map="elu1", normalize=True),
    "L1-taylor2": LinearState("linear", feature_map="taylor2"),
    "L1-taylor2-norm": LinearState("linear", feature_map="taylor2", normalize=True),
    "L2-scalar": LinearState("decay", decay=0.9),
    "L2-per-head": LinearState("decay", decay=(0.95, 0.7)),
    "L3": LinearState("scalar_gate"),
    "L4": LinearState("vector_gate"),
    "L5": LinearState("delta"),
    "L6": LinearState("gated_delta"),
    "L7-c2": LinearState("block_causal", block=2),
    "L7-c4-elu1-norm": LinearState("block_causal", feature_map="elu1", normalize=True, block=4),
}


def make(node: LinearState, L: int, seed: int = 0, init: bool = False) -> dict:
    """Random inputs for `node`; states that a normaliser divides by stay positive."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k, v = 0.5 * rn(B, H, L, DK), 0.5 * rn(B, H, L, DK), rn(B, H, L, DV)
    if node.normalize and node.feature_map == "identity":
        q, k = q.abs() + 0.1, k.abs() + 0.1  # z . q > 0
    if node.rule in ("delta", "gated_delta"):
        k = F.normalize(k, dim=-1)
    kw: dict = {}
    if node.rule in ("scalar_gate", "gated_delta"):
        kw["g"] = F.logsigmoid(rn(B, H, L) + 2)
    if node.rule == "vector_gate":
        kw["g"] = F.logsigmoid(rn(B, H, L, DK) + 2)
    if node.rule in ("delta", "gated_delta"):
        kw["beta"] = torch.sigmoid(rn(B, H, L))
    if init:
        fdim = node.feature_dim(DK)
        if node.normalize:  # a reachable state: phi(k')^T [v', 1] over a 5-token prefix
            kp, vp = feature_map(0.5 * rn(B, H, 5, DK), node.feature_map), rn(B, H, 5, DV)
            if node.feature_map == "identity":
                kp = kp.abs() + 0.1
            vp = torch.cat([vp, torch.ones_like(vp[..., :1])], -1)
            kw["initial_state"] = kp.transpose(-1, -2) @ vp
        else:
            kw["initial_state"] = 0.5 * rn(B, H, fdim, DV)
    return dict(q=q, k=k, v=v, **kw)


def split(x: dict, a: int, b: int) -> dict:
    """Tokens [a, b) of every per-token input."""
    return {n: (t if n == "initial_state" else t[:, :, a:b]) for n, t in x.items()}


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------- agreement of the three forms

@pytest.mark.parametrize("init", [False, True], ids=["S0=0", "S0"])
@pytest.mark.parametrize("chunk", [4, 16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("L", [1, 7, 63, 65], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("name", list(NODES))
def test_chunked_matches_recurrent(name, L, chunk, init):
    node = NODES[name]
    x = make(node, L, init=init)
    o_r, s_r = recurrent_reference(**x, state_node=node, output_final_state=True)
    o_c, s_c = chunked_reference(**x, state_node=node, chunk=chunk, output_final_state=True)
    assert o_r.shape == (B, H, L, DV) and s_r.shape == (B, H, node.feature_dim(DK),
                                                           node.state_dv(DV))
    close(o_c, o_r)
    close(s_c, s_r)


@pytest.mark.parametrize("L", [1, 7, 33], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("name", list(NODES))
def test_decode_matches_recurrent(name, L):
    node = NODES[name]
    x = make(node, L, seed=1, init=True)
    o_r, s_r = recurrent_reference(**x, state_node=node, output_final_state=True)
    step = node.block if node.rule == "block_causal" else 1  # L7 decodes one block per step
    S, outs = x["initial_state"], []
    for t in range(0, L, step):
        if node.rule == "block_causal":
            tok = split(x, t, t + step)
            o_t, S = decode_step(tok["q"], tok["k"], tok["v"], S, node)
        else:
            o_t, S = decode_step(x["q"][:, :, t], x["k"][:, :, t], x["v"][:, :, t], S, node,
                                 g_t=x["g"][:, :, t] if "g" in x else None,
                                 beta_t=x["beta"][:, :, t] if "beta" in x else None)
            o_t = o_t[:, :, None]
        outs.append(o_t)
    close(torch.cat(outs, dim=2), o_r)
    close(S, s_r)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("L", [7, 63, 65], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("name", list(NODES))
def test_split_carries_state(name, L, form):
    node = NODES[name]

    def run(**kw):
        if form == "chunked":
            return chunked_reference(**kw, state_node=node, chunk=16, output_final_state=True)
        return recurrent_reference(**kw, state_node=node, output_final_state=True)

    x = make(node, L, seed=2, init=True)
    cut = L // 2 if node.rule != "block_causal" else (L // 2) // node.block * node.block
    o_all, s_all = run(**x)
    o1, s1 = run(**split(x, 0, cut))
    second = split(x, cut, L)
    second["initial_state"] = s1
    o2, s2 = run(**second)
    close(torch.cat([o1, o2], dim=2), o_all)
    close(s2, s_all)


# ---------------------------------------------------------------- direct formulas, no recurrence

def masked_product(qf, kf, v, w, normalize=False, scale=None):
    """o = scale * ((qf kf^T) * w) v, w [.., L, L] holding mask and decay; normalised: / row sum."""
    scale = 1 / math.sqrt(DK) if scale is None else scale
    a = (qf @ kf.transpose(-1, -2)) * w
    if normalize:
        return (a @ v) / a.sum(-1, keepdim=True)
    return scale * (a @ v)


def causal(L):
    return torch.ones(L, L, dtype=F64).tril()


def test_l1_identity_is_causal_masked_product():
    node = NODES["L1-identity"]
    x = make(node, 37)
    o, _ = recurrent_reference(**x, state_node=node, scale=0.3)
    close(o, masked_product(x["q"], x["k"], x["v"], causal(37), scale=0.3))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("phi", ["identity", "elu1", "taylor2"])
def test_l1_feature_maps_direct(phi, normalize):
    node = LinearState("linear", feature_map=phi, normalize=normalize)
    x = make(node, 29)
    q, k = x["q"], x["k"]
    s = q @ k.transpose(-1, -2)
    kernel = {  # phi(q_t) . phi(k_s), written without phi
        "identity": s,
        "elu1": (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2),
        "taylor2": 1 + s + s * s / 2,
    }[phi]
    a = kernel * causal(29)
    want = (a @ x["v"]) / a.sum(-1, keepdim=True) if normalize else (a @ x["v"]) / math.sqrt(DK)
    o, _ = recurrent_reference(**x, state_node=node)
    close(o, want)


@pytest.mark.parametrize("name", ["L2-scalar", "L2-per-head"])
def test_l2_is_powers_of_lambda(name):
    node = NODES[name]
    L = 40
    x = make(node, L)
    lam = torch.tensor(node.decay if isinstance(node.decay, tuple) else (node.decay,) * H,
                       dtype=F64)
    t = torch.arange(L)
    w = lam[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0) * causal(L)  # [H, L, L]
    o, _ = recurrent_reference(**x, state_node=node)
    close(o, masked_product(x["q"], x["k"], x["v"], w))


def test_l3_is_exp_cumsum_decay_matrix():
    node, L = NODES["L3"], 45
    x = make(node, L)
    G = torch.cumsum(x["g"], dim=-1)
    w = torch.exp(G[..., :, None] - G[..., None, :]) * causal(L)
    o, _ = recurrent_reference(**x, state_node=node)
    close(o, masked_product(x["q"], x["k"], x["v"], w))


def test_l4_is_per_key_decay():
    node, L = NODES["L4"], 45
    x = make(node, L)
    G = torch.cumsum(x["g"], dim=2)  # [B, H, L, Dk]
    e = torch.exp(G[:, :, :, None, :] - G[:, :, None, :, :]) * causal(L)[..., None]
    a = torch.einsum("bhtd,bhsd,bhtsd->bhts", x["q"], x["k"], e)
    o, _ = recurrent_reference(**x, state_node=node)
    close(o, a @ x["v"] / math.sqrt(DK))


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_l5_beta_zero_keeps_state(form):
    node = NODES["L5"]
    x = make(node, 20, init=True)
    x["beta"] = torch.zeros_like(x["beta"])
    extra = {"chunk": 8} if form == "chunked" else {}
    fn = chunked_reference if form == "chunked" else recurrent_reference
    o, s = fn(**x, state_node=node, output_final_state=True, **extra)
    close(s, x["initial_state"])
    close(o, x["q"] @ x["initial_state"] / math.sqrt(DK))


@pytest.mark.parametrize("name", ["L5", "L6"])
def test_delta_equals_explicit_product(name):
    """S_t = (A_t ... A_1) S_0 + sum_s (A_t ... A_{s+1}) beta_s k_s v_s^T,
    A_j = e^{g_j} (I - beta_j k_j k_j^T), each S_t built from scratch."""
    node, L = NODES[name], 12
    x = make(node, L, seed=3, init=True)
    k, v, beta, S0 = x["k"], x["v"], x["beta"], x["initial_state"]
    g = x.get("g", torch.zeros_like(beta))
    eye = torch.eye(DK, dtype=F64)
    A = [torch.exp(g[:, :, j])[..., None, None]
         * (eye - beta[:, :, j, None, None] * torch.einsum("bhi,bhj->bhij", k[:, :, j], k[:, :, j]))
         for j in range(L)]
    want_o = []
    for t in range(L):
        prod, total = eye.expand(B, H, DK, DK), 0
        for s in range(t, -1, -1):
            total = total + prod @ (beta[:, :, s, None, None] * torch.einsum(
                "bhi,bhj->bhij", k[:, :, s], v[:, :, s]))
            prod = prod @ A[s]
        S_t = total + prod @ S0
        want_o.append(torch.einsum("bhd,bhdv->bhv", x["q"][:, :, t], S_t) / math.sqrt(DK))
    o, s = recurrent_reference(**x, state_node=node, output_final_state=True)
    close(s, S_t)
    close(o, torch.stack(want_o, dim=2))


@pytest.mark.parametrize("name", ["L7-c2", "L7-c4-elu1-norm"])
@pytest.mark.parametrize("L", [1, 9, 30], ids=lambda n: f"L{n}")
def test_l7_is_dense_block_causal(name, L):
    node = NODES[name]
    x = make(node, L)
    blk = torch.arange(L) // node.block
    w = (blk[None, :] <= blk[:, None]).to(F64)  # [t, s]: block(s) <= block(t)
    phi = (lambda z: F.elu(z) + 1) if node.feature_map == "elu1" else (lambda z: z)
    o, _ = recurrent_reference(**x, state_node=node)
    close(o, masked_product(phi(x["q"]), phi(x["k"]), x["v"], w, normalize=node.normalize))


def test_l7_block_one_is_l1():
    x = make(NODES["L1-identity"], 19)
    o1, _ = recurrent_reference(**x, state_node=LinearState("block_causal", block=1))
    o2, _ = recurrent_reference(**x, state_node=NODES["L1-identity"])
    close(o1, o2)


@dataclass(frozen=True)
class _Window:
    w: int

    def text(self) -> str:
        return f"mask(sliding_window, w={self.w})"


def test_hybrid_mixes_given_parts():
    lin = NODES["L1-taylor2"]
    node = Hybrid(_Window(4), lin, alpha=0.25)
    x = make(lin, 16)
    s = x["q"] @ x["k"].transpose(-1, -2) / math.sqrt(DK)
    t = torch.arange(16)
    allowed = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 4)
    o_soft = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ x["v"]
    o_lin, _ = recurrent_reference(**x, state_node=lin)
    close(mix_hybrid(node, o_soft, o_lin), 0.25 * o_soft + 0.75 * o_lin)
    close(mix_hybrid(Hybrid(_Window(4), lin, alpha=1), o_soft, o_lin), o_soft)
    assert node.text() == ("hybrid(softmax=mask(sliding_window, w=4), linear=linear(rule=linear, "
                           "phi=taylor2, normalize=False), mix=alpha, alpha=0.25)")
    assert Hybrid(_Window(4), lin).alpha == 0.5


# ---------------------------------------------------------------- IR text and validation

def test_ir_text_key_and_inputs():
    node = LinearState("gated_delta")
    assert node.text() == "linear(rule=gated_delta, phi=identity, normalize=False)"
    assert node.catalog_id == "L6" and node.extra_inputs() == (("g", "[B, H, L]"),
                                                               ("beta", "[B, H, L]"))
    assert LinearState("decay", decay=(1, 0.5)).text() == (
        "linear(rule=decay, phi=identity, normalize=False, decay=(1.0, 0.5))")
    assert NODES["L7-c4-elu1-norm"].text() == (
        "linear(rule=block_causal, phi=elu1, normalize=True, block=4)")
    assert LinearState("vector_gate").extra_inputs() == (("g", "[B, H, L, Dk]"),)
    assert LinearState("decay", decay=0.5) == LinearState("decay", decay=0.5)
    assert LinearState("delta").key == LinearState("delta").key != LinearState("linear").key
    assert len(LinearState("delta").key) == 64
    assert NODES["L1-taylor2"].feature_dim(4) == 21 and NODES["L1-identity-norm"].state_dv(3) == 4


@pytest.mark.parametrize("kwargs,arg", [
    (dict(rule="softmax"), "rule"),
    (dict(rule="linear", feature_map="relu"), "feature_map"),
    (dict(rule="delta", feature_map="elu1"), "feature_map"),
    (dict(rule="linear", normalize=1), "normalize"),
    (dict(rule="scalar_gate", normalize=True), "normalize"),
    (dict(rule="decay"), "decay"),
    (dict(rule="decay", decay=1.5), "decay"),
    (dict(rule="decay", decay=()), "decay"),
    (dict(rule="linear", decay=0.9), "decay"),
    (dict(rule="block_causal"), "block"),
    (dict(rule="block_causal", block=0), "block"),
    (dict(rule="linear", block=4), "block"),
])
def test_ir_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}: expected"):
        LinearState(**kwargs)


def test_hybrid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="^alpha: expected"):
        Hybrid(_Window(4), NODES["L3"], alpha=1.5)
    with pytest.raises(ValueError, match="^softmax: expected"):
        Hybrid("window", NODES["L3"])
    with pytest.raises(ValueError, match="^linear: expected"):
        Hybrid(_Window(4), "L3")


def _bad(x):
    """Mutations of a good input set `x`, each with the argument its error must name."""
    L = x["q"].shape[2]
    cases = [("k", dict(k=x["k"][..., :2]))]
    cases.append(("initial_state", dict(initial_state=torch.zeros(B, H, DK + 1, DV, dtype=F64))))
    int_state = torch.zeros(B, H, DK, DV, dtype=torch.int64)
    cases.append(("initial_state", dict(initial_state=int_state)))
    if "g" in x:
        cases += [("g", dict(g=None)), ("g", dict(g=x["g"][:, :, :-1])),
                  ("g", dict(g=x["g"].abs() + 0.1)), ("g", dict(g=x["g"].long()))]
    else:
        cases.append(("g", dict(g=torch.zeros(B, H, L, dtype=F64))))
    if "beta" in x:
        cases += [("beta", dict(beta=None)), ("beta", dict(beta=x["beta"][..., None]))]
    else:
        cases.append(("beta", dict(beta=torch.zeros(B, H, L, dtype=F64))))
    return cases


@pytest.mark.parametrize("name", ["L1-identity", "L3", "L4", "L5", "L6"])
def test_bad_inputs_name_the_argument(name):
    node = NODES[name]
    x = make(node, 6)
    for arg, change in _bad(x):
        for fn, extra in ((recurrent_reference, {}), (chunked_reference, {"chunk": 4})):
            with pytest.raises(ValueError, match=f"^{arg}: expected"):
                fn(**{**x, **change}, state_node=node, **extra)


def test_bad_misc_inputs():
    x = make(NODES["L2-per-head"], 6)
    with pytest.raises(ValueError, match="^decay: expected one value per head"):
        recurrent_reference(**x, state_node=LinearState("decay", decay=(0.9, 0.8, 0.7)))
    with pytest.raises(ValueError, match="^chunk: expected"):
        chunked_reference(**x, state_node=NODES["L2-per-head"], chunk=0)
    with pytest.raises(ValueError, match="^chunk: expected a multiple of block"):
        chunked_reference(**x, state_node=LinearState("block_causal", block=4), chunk=6)
    with pytest.raises(ValueError, match="^v: expected"):
        recurrent_reference(x["q"], x["k"], x["v"][:, :, :3], NODES["L1-identity"])
    q = x["q"][:, :, 0]
    with pytest.raises(ValueError, match="^g_t: expected"):
        decode_step(q, q, q, None, NODES["L4"], g_t=torch.zeros(B, H, dtype=F64))
    with pytest.raises(ValueError, match="^beta_t: expected"):
        decode_step(q, q, q, None, NODES["L5"], beta_t=torch.zeros(B, H, 1, dtype=F64))
    with pytest.raises(ValueError, match="^state: expected"):
        decode_step(q, q, q, torch.zeros(B, H, DK + 1, DK, dtype=F64), NODES["L1-identity"])
    with pytest.raises(ValueError, match="^q_t: expected a block"):
        decode_step(x["q"], x["k"], x["v"], None, NODES["L7-c2"])
