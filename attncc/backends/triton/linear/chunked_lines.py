"""The lines the chunked linear-state templates lay out (attncc/backends/triton/templates/
linear_split_*.py.j2 for L1-L6, linear_chunked_block.py.j2 for L7): phi's loads, the gates'
cumulative log decay, the intra-chunk products and the state updates, per rule part. The
templates hold no logic; each function here returns the lines of one slot.

Names the lines share with the templates: `rows` (token indices of the chunk), `mask_t`,
`mask_q` ([CHUNK, DK_PAD]), `mask_cv` ([CHUNK, DV_BLOCK]), `q_c` / `k_c` (phi(q), phi(k)),
`v_c`, `b` (the inclusive cumulative log decay), `S` (the fp32 state), `DT` (the dot operand
dtype).
"""

from __future__ import annotations

from typing import NamedTuple

from attncc.ir.linear import LinearState

# elu1 masked so that padded lanes and rows stay 0 (elu1(0) would be 1)
_ELU1 = "{x}_c = tl.where(mask_q, tl.where({x}_c > 0, {x}_c + 1.0, tl.exp({x}_c)), 0.0)"
_LOAD = ("{x}_c = tl.load({x}_base + rows[:, None] * stride_{x}l, mask=mask_q, other=0.0)"
         ".to(tl.float32)")
# identity phi straight into the dot dtype: no fp32 round trip on a GPU
_LOAD_DT = "{x}_c = tl.load({x}_base + rows[:, None] * stride_{x}l, mask=mask_q, other=0.0).to(DT)"
# taylor2: f = 0 -> 1; 1 <= f <= D -> x[f - 1]; f > D -> x[a] x[b] / sqrt 2, f - 1 - D = a D + b
TAYLOR_SETUP = [
    "quad = tl.maximum(offs_k - 1 - D_K, 0)",
    "lin_f = (offs_k >= 1) & (offs_k <= D_K)",
    "quad_f = (offs_k > D_K) & mask_k",
    "fa = tl.where(lin_f, offs_k - 1, quad // D_K)",
    "fb = quad % D_K",
]
_TAYLOR_LOAD = [
    ("{x}_a = tl.load({x}_row + rows[:, None] * stride_{x}l + fa[None, :] * stride_{x}d, "
     "mask=mask_t[:, None] & (lin_f | quad_f)[None, :], other=0.0).to(tl.float32)"),
    ("{x}_b = tl.load({x}_row + rows[:, None] * stride_{x}l + fb[None, :] * stride_{x}d, "
     "mask=mask_t[:, None] & quad_f[None, :], other=0.0).to(tl.float32)"),
    ("{x}_c = tl.where((offs_k == 0)[None, :] & mask_t[:, None], 1.0, "
     "tl.where(quad_f[None, :], {x}_a * {x}_b * 0.7071067811865476, {x}_a))"),
]
_LOAD_G = ("g_c = tl.load(g_base + rows * stride_gl, mask=mask_t, other=0.0)"
           ".to(tl.float32)")
_LOAD_G_VEC = ("g_c = tl.load(g_base + rows[:, None] * stride_gl + offs_k[None, :] * stride_gd, "
               "mask=mask_q, other=0.0).to(tl.float32)")
# Gates are summed clamped at -GATE_FLOOR: e^{-128} is 0 in fp32, so every decay factor across
# a clamped gate is still exactly 0 (as the recurrence's e^g S is in fp32), a -inf gate never
# meets another in (-inf) - (-inf) = NaN, and a huge one (-1e9) cannot swamp the small gates
# after it in the fp32 sums (the differences b_i - b_j stay within |b| <= CHUNK * GATE_FLOOR)
GATE_FLOOR = 128.0
_CUMSUM = (f"b = tl.cumsum(tl.maximum(g_c, -{GATE_FLOOR}), 0)  # inclusive: token i has "
           "decayed by its own gate")
_LOG_LAM = "log_lam = tl.log(tl.load(LAM + off_h).to(tl.float32))"
_NO_GATE = "b = tl.zeros([CHUNK], dtype=tl.float32)"


class GateLines(NamedTuple):
    """How one gate kind enters a chunked template: `flag` the decay form ("none", "scalar":
    one log-decay per token, "vector": one per key dim), `setup` and `chunk` the lines before
    the chunk loop and per chunk (they leave the cumulative log-decay in `b`)."""

    flag: str
    setup: list[str]
    chunk: list[str]


# gate kind -> its lines
GATES: dict[str, GateLines] = {
    "none": GateLines("none", [], []),
    "constant": GateLines("scalar", [_LOG_LAM], ["g_c = tl.where(mask_t, log_lam, 0.0)", _CUMSUM]),
    "scalar": GateLines("scalar", [], [_LOAD_G, _CUMSUM]),
    "vector": GateLines("vector", [], [_LOAD_G_VEC, _CUMSUM]),
}

# the intra-chunk products of the output kernel: A [CHUNK, CHUNK] (causal, decay-weighted) and
# q_in, the query rows that read the chunk's starting state, per decay form
_PRODUCTS = {
    "none": [
        "A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), input_precision=DOT_PRECISION)",
        "A = tl.where(causal, A, 0.0)",
        "q_in = q_c",
    ],
    "scalar": [
        "A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), input_precision=DOT_PRECISION)",
        "diff = tl.where(causal, b[:, None] - b[None, :], 0.0)  # <= 0 where kept",
        "A = tl.where(causal, A * tl.exp(diff), 0.0)",
        "q_in = q_c * tl.exp(b)[:, None]",
    ],
    # the decay differs per key channel: A one key column at a time, each exponent relative
    # to that key (rows i < j are clamped, then dropped)
    "vector": [
        "A = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)",
        "for j in range(0, CHUNK):",
        "    sel = offs_c == j",
        "    k_j = tl.sum(tl.where(sel[:, None], k_c, 0.0), 0)",
        "    b_j = tl.sum(tl.where(sel[:, None], b, 0.0), 0)",
        "    col = tl.sum(q_c * k_j[None, :] * tl.exp(tl.minimum(b - b_j[None, :], 0.0)), 1)",
        "    A = tl.where(sel[None, :] & causal, col[:, None], A)",
        "q_in = q_c * tl.exp(b)",
    ],
}

# the sweep's state update S <- e^{b_last} S + (k e^{b_last - b})^T v, per decay form; padded
# rows carry g = 0, so the last (smallest) b is the last real token's. A scalar decay scales
# the [CHUNK, DV_BLOCK] values (k goes into the dot as loaded, as fla does); a vector one
# the keys
_UPDATES = {
    "none": ["S = tl.dot(tl.trans(k_c.to(DT)), v_c.to(DT), S, input_precision=DOT_PRECISION)"],
    "scalar": [
        "b_last = tl.min(b, 0)",
        "v_w = (v_c * tl.exp(b_last - b)[:, None]).to(DT)",
        "S = S * tl.exp(b_last) + tl.dot(tl.trans(k_c.to(DT)), v_w, "
        "input_precision=DOT_PRECISION)",
    ],
    "vector": [
        "b_last = tl.min(b, 0)  # [DK_PAD]",
        "k_w = (k_c * tl.exp(b_last[None, :] - b)).to(DT)",
        "S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(k_w), v_c.to(DT), "
        "input_precision=DOT_PRECISION)",
    ],
}

# the normaliser z (L1, L7) rides in the state's last column (index D_V)
_Z_SETUP = [
    "z_offs = offs_k * stride_sf + D_V * stride_sv",
    "if HAS_INITIAL:",
    "    z = tl.load(S0 + s_base + z_offs, mask=mask_k, other=0.0).to(tl.float32)",
    "else:",
    "    z = tl.zeros([DK_PAD], dtype=tl.float32)",
]
_Z_CHUNK = [  # one program per sequence writes the chunk's starting z beside its state
    "if pid_v == 0:",
    "    tl.store(HS + h_row * stride_hr + off_h * stride_hh + offs_k * stride_hf",
    "             + D_V * stride_hv, z.to(DT), mask=mask_k)",
]
_Z_UPDATE = ["z = z + tl.sum(k_c.to(tl.float32), 0)"]
_Z_FINAL = [
    "if STORE_FINAL:",
    "    if pid_v == 0:  # one program writes z",
    "        tl.store(SN + s_base + z_offs, z, mask=mask_k)",
]
_Z_OUTPUT = [
    "z = tl.load(h_base + offs_k * stride_hf + D_V * stride_hv, mask=mask_k,",
    "            other=0.0).to(tl.float32)",
    "den = (tl.sum(A, 1) + tl.sum(q_in * z[None, :], 1)) * scale",
    "o_c = tl.where(den[:, None] == 0, 0.0, o_c / tl.where(den == 0, 1.0, den)[:, None])",
]


def delta(node: LinearState) -> bool:
    return node.write == "delta"


def loads(node: LinearState, x: str, *, in_dt: bool = False) -> list[str]:
    """Lines loading phi(x) of one tile as `{x}_c` [CHUNK, DK_PAD] (0 in padded rows): fp32,
    or identity phi in the dot dtype DT with `in_dt`."""
    if node.feature_map == "taylor2":
        return [line.format(x=x) for line in _TAYLOR_LOAD]
    lines = [(_LOAD_DT if in_dt and node.feature_map == "identity" else _LOAD).format(x=x)]
    if node.feature_map == "elu1":
        lines.append(_ELU1.format(x=x))
    return lines


def feature_mask(node: LinearState) -> str:
    return f"mask_k = offs_k < {'1 + D_K + D_K * D_K' if node.feature_map == 'taylor2' else 'D_K'}"


def setup(node: LinearState, *, wy: bool = False) -> list[str]:
    """Lines before the chunk loop: taylor2's index maps, the gate's constants; the WY kernel
    reads b even with no gate (b = 0: every decay factor is e^0 = 1)."""
    lines = list(TAYLOR_SETUP) if node.feature_map == "taylor2" else []
    if wy and node.gate == "none":
        lines.append(_NO_GATE)
    return lines + GATES[node.gate].setup


def gate_chunk(node: LinearState) -> list[str]:
    return list(GATES[node.gate].chunk)


def sweep_setup(node: LinearState) -> list[str]:
    return setup(node) + (_Z_SETUP if node.normalize else [])


def sweep_chunk(node: LinearState) -> list[str]:
    """One chunk of the sequential sweep: load, store the starting state, (delta rules)
    V' = U - W S written over U, update the state."""
    lines = loads(node, "k", in_dt=True)
    lines.append("v_c = tl.load(v_base + rows[:, None] * stride_vl, mask=mask_cv, other=0.0)"
                 ".to(tl.float32)")
    if delta(node):
        lines.append("w_c = tl.load(w_base + rows[:, None] * stride_wl, mask=mask_q, "
                     "other=0.0).to(DT)")
    lines += gate_chunk(node)
    lines += ["s_dt = S.to(DT)",
              "tl.store(h_base + h_row * stride_hr, s_dt, mask=mask_s)"]
    if node.normalize:
        lines += _Z_CHUNK
    if delta(node):
        lines += ["v_c = v_c - tl.dot(w_c, s_dt, input_precision=DOT_PRECISION)",
                  "tl.store(v_base + rows[:, None] * stride_vl, v_c.to(V.dtype.element_ty), "
                  "mask=mask_cv)"]
    lines += _UPDATES[GATES[node.gate].flag]
    if node.normalize:
        lines += _Z_UPDATE
    return lines


def sweep_final(node: LinearState) -> list[str]:
    return list(_Z_FINAL) if node.normalize else []


def products(node: LinearState) -> list[str]:
    return list(_PRODUCTS[GATES[node.gate].flag])


def output_normalize(node: LinearState) -> list[str]:
    return list(_Z_OUTPUT) if node.normalize else []
