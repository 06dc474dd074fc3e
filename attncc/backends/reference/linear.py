"""Reference semantics of the linear-recurrence axis (docs/catalog.md): the naive loop is the spec.

Shapes: q, k [B, H, L, Dk]; v [B, H, L, Dv]; o [B, H, L, Dv]; state [B, H, F, Dv'] with
F = node.feature_dim(Dk) and Dv' = node.state_dv(Dv) (Dv + 1 when normalising: the last column
is z). Per-token inputs: g [B, H, L] (L3, L6) or [B, H, L, Dk] (L4), all entries <= 0;
beta [B, H, L] (L5, L6). A gate may be -inf (a full forget: e^g = 0 wipes the state); NaN and
+inf gates are rejected. Every other input may hold NaN or inf: the loop carries them forward
only, so token t's outputs never depend on a later token (the kernels keep to this too).

Output: o_t = scale * S_t^T phi(q_t), read AFTER token t has updated the state (inclusive);
scale defaults to 1/sqrt(Dk) with Dk the head dim of q as given (before phi, docs/semantics.md).
With normalize=True: o_t = scale * S_t^T phi(q_t) / (scale * z_t . phi(q_t)); where that
denominator is exactly 0 the output is 0 (never NaN or inf), like an empty row (docs/semantics.md).
Block-causal (L7): the state advances once per block of c tokens, counted from the first token
of the call (so `initial_state` continues a sequence only when the previous call ended on a
block boundary); token t reads the state after its whole block.

Dtypes: float64 and float32 compute in their own dtype; lower precisions compute in float32.
o is returned in q's dtype, the final state in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attncc.ir.eval import feature_map
from attncc.ir.linear import Hybrid, LinearState
from attncc.validate import check_scale
from attncc.validate.linear import check_axes, check_inputs, check_tensor, shape_of


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 and float32 stay; anything narrower computes in float32."""
    return dtype if dtype in (torch.float64, torch.float32) else torch.float32


@dataclass
class Prepared:
    """Inputs in the compute dtype, after phi and the ones column for z; shared with chunked."""

    q: Tensor  # [B, H, L, F]
    k: Tensor  # [B, H, L, F]
    v: Tensor  # [B, H, L, Dv']
    g: Tensor | None  # [B, H, L] or [B, H, L, Dk], as given
    beta: Tensor | None  # [B, H, L]
    lam: Tensor | None  # [H], L2's constant decay
    state: Tensor  # [B, H, F, Dv']
    scale: float


def prepare(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
            beta: Tensor | None, scale: float | None, initial_state: Tensor | None) -> Prepared:
    """Cast to the compute dtype, apply phi, augment v with ones when normalising."""
    check_scale(scale)
    ct = compute_dtype(q.dtype)
    B, H, L, Dk = q.shape
    qf = feature_map(q.to(ct), node.feature_map)
    kf = feature_map(k.to(ct), node.feature_map)
    vf = v.to(ct)
    if node.normalize:
        vf = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)
    lam = None
    if node.decay is not None:
        vals = node.decay if isinstance(node.decay, tuple) else (node.decay,) * H
        lam = torch.tensor(vals, dtype=ct, device=q.device)
    if initial_state is None:
        state = qf.new_zeros(B, H, qf.shape[-1], vf.shape[-1])
    else:
        state = initial_state.to(ct)
    return Prepared(qf, kf, vf, None if g is None else g.to(ct),
                    None if beta is None else beta.to(ct), lam, state,
                    1.0 / math.sqrt(Dk) if scale is None else float(scale))


def finish(o: Tensor, node: LinearState, scale: float, dtype: torch.dtype) -> Tensor:
    """Apply the scale and, when normalising, divide by the z column (0 where it is 0)."""
    o = o * scale
    if node.normalize:
        num, den = o[..., :-1], o[..., -1:]
        zero = den == 0
        o = torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1, den))
    return o.to(dtype)


# gate kind -> S decayed before token t writes: (S [B, H, F, Dv'], g_t, lam [H]) -> S'
_DECAY = {
    "none": lambda S, g, lam: S,
    "constant": lambda S, g, lam: lam[None, :, None, None] * S,
    "scalar": lambda S, g, lam: torch.exp(g)[..., None, None] * S,  # g_t [B, H]
    "vector": lambda S, g, lam: torch.exp(g)[..., None] * S,  # g_t [B, H, F]
}
# write kind -> the value row token t writes along k_t: (S', k_t, v_t, beta_t) -> [B, H, Dv']
_WRITE = {
    "additive": lambda S, k, v, beta: v,
    # (I - beta k k^T) S + beta k v^T  =  S + k (beta (v - S^T k))^T
    "delta": lambda S, k, v, beta: beta[..., None] * (v - torch.einsum("bhf,bhfv->bhv", k, S)),
}


def _token_step(S: Tensor, q: Tensor, k: Tensor, v: Tensor, node: LinearState,
                g: Tensor | None, beta: Tensor | None, lam: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """One token: S [B, H, F, Dv'], q, k [B, H, F], v [B, H, Dv'] -> (S_t^T q_t, S_t)."""
    S = _DECAY[node.gate](S, g, lam)
    v = _WRITE[node.write](S, k, v, beta)
    S = S + k[..., :, None] * v[..., None, :]
    return torch.einsum("bhf,bhfv->bhv", q, S), S


def _recurrent(p: Prepared, node: LinearState) -> tuple[Tensor, Tensor]:
    """The spec loop on prepared inputs: unscaled o [B, H, L, Dv'] and the final state."""
    S = p.state
    L = p.q.shape[2]
    o = p.v.new_zeros(*p.v.shape)
    if node.block is not None:
        if (node.gate, node.write) != ("none", "additive"):  # no gated or delta block step yet
            raise NotImplementedError(f"{node.text()}: the block step is additive and ungated")
        for s in range(0, L, node.block):
            blk = slice(s, min(s + node.block, L))
            S = S + torch.einsum("bhlf,bhlv->bhfv", p.k[:, :, blk], p.v[:, :, blk])
            o[:, :, blk] = torch.einsum("bhlf,bhfv->bhlv", p.q[:, :, blk], S)
        return o, S
    for t in range(L):
        g_t = None if p.g is None else p.g[:, :, t]
        b_t = None if p.beta is None else p.beta[:, :, t]
        o[:, :, t], S = _token_step(S, p.q[:, :, t], p.k[:, :, t], p.v[:, :, t], node, g_t,
                                    b_t, p.lam)
    return o, S


def recurrent_reference(
    q: Tensor, k: Tensor, v: Tensor, state_node: LinearState, *, g: Tensor | None = None,
    beta: Tensor | None = None, scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One token at a time (L7: one block at a time), exactly as docs/catalog.md writes it.

    Returns (o [B, H, L, Dv] in q's dtype, final state [B, H, F, Dv'] or None).
    """
    check_inputs(q, k, v, state_node, g, beta, initial_state)
    p = prepare(q, k, v, state_node, g, beta, scale, initial_state)
    o, S = _recurrent(p, state_node)
    return finish(o, state_node, p.scale, q.dtype), (S if output_final_state else None)


def decode_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Tensor | None, state_node: LinearState, *,
    g_t: Tensor | None = None, beta_t: Tensor | None = None, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: returns (o_t, new_state).

    q_t, k_t [B, H, Dk]; v_t [B, H, Dv]; g_t [B, H] or [B, H, Dk]; beta_t [B, H];
    state [B, H, F, Dv'] or None for zeros. Block-causal (L7) has no one-token step (a token
    reads later tokens of its block), so its step is one block: q_t, k_t [B, H, n, Dk],
    v_t [B, H, n, Dv], 1 <= n <= block, and o_t [B, H, n, Dv]; only the last block may be short.
    """
    if state_node.block is not None:
        for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if not isinstance(x, Tensor) or x.dim() != 4 or not 1 <= x.shape[2] <= state_node.block:
                got = shape_of(x) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected a block [B, H, n, D] with 1 <= n <= "
                                 f"{state_node.block} for rule {state_node.rule!r}, got {got}")
        o, S = recurrent_reference(q_t, k_t, v_t, state_node, scale=scale, g=g_t, beta=beta_t,
                                   initial_state=state, output_final_state=True)
        return o, S
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = shape_of(x) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a tensor [B, H, D] (one token), got {got}")
    B, H, Dk = q_t.shape
    if g_t is not None:
        axes = tuple(a for a in state_node.input_axes("g") or ("B", "H") if a != "L")
        check_axes("g_t", g_t, axes, {"B": B, "H": H, "Dk": Dk})  # one token: no L axis
        g_t = g_t[:, :, None]
    if beta_t is not None:
        check_tensor("beta_t", beta_t, [B, H], "[B, H]")
        beta_t = beta_t[:, :, None]
    q, k, v = q_t[:, :, None], k_t[:, :, None], v_t[:, :, None]
    check_inputs(q, k, v, state_node, g_t, beta_t, state, state_name="state")
    p = prepare(q, k, v, state_node, g_t, beta_t, scale, state)
    o, S = _recurrent(p, state_node)
    return finish(o, state_node, p.scale, q_t.dtype)[:, :, 0], S


def mix_hybrid(node: Hybrid, o_softmax: Tensor, o_linear: Tensor) -> Tensor:
    """L8 mix: `alpha * o_softmax + (1 - alpha) * o_linear`, both [B, H, L, Dv]; a per-head
    alpha (a tuple of H floats) weighs head h by `alpha[h]`."""
    if not isinstance(node, Hybrid):
        raise ValueError(f"node: expected a Hybrid, got {type(node).__name__}")
    if shape_of(o_softmax) != shape_of(o_linear):
        raise ValueError(f"o_linear: expected o_softmax's shape {shape_of(o_softmax)}, "
                         f"got {shape_of(o_linear)}")
    if not isinstance(node.alpha, tuple):
        return node.alpha * o_softmax + (1 - node.alpha) * o_linear
    alpha = torch.tensor(node.alpha_per_head(o_softmax.shape[1]), dtype=o_softmax.dtype,
                         device=o_softmax.device)[:, None, None]
    return alpha * o_softmax + (1 - alpha) * o_linear
