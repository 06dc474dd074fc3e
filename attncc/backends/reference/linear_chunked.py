"""Chunked form of the linear recurrences (docs/catalog.md): a second formulation of the same maths.

The sequence is cut into chunks of C tokens (the last may be shorter). Inside a chunk the output
is a masked C x C product with the decay matrix; between chunks only the state S is carried.
Let b_t be the cumulative log-decay inside the chunk (b_t = g_1 + ... + g_t, per key dim for L4)
and S the state at the chunk start.

L1-L4, L7 (gated linear attention form, as in flash-linear-attention's naive chunk GLA):
    o_t   = (phi(q_t) * e^{b_t}) S  +  sum_{s in mask(t)} (sum_d q_td k_sd e^{b_td - b_sd}) v_s
    S_new = e^{b_C} * S + sum_s (k_s * e^{b_C - b_s}) v_s^T
  mask(t) = {s <= t}, or {block(s) <= block(t)} for L7 (chunks start on block boundaries).
L5-L6 (delta rule via the UT transform, as in flash-linear-attention's naive chunk delta rule):
  with u_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t), the update is S_t = e^{g_t} S_{t-1} + k_t u_t^T,
  and the u's of a chunk solve the unit lower-triangular system
    (I + A) U = diag(beta) V - diag(beta e^b) K S,   A_ts = beta_t (k_t . k_s) e^{b_t - b_s}, s < t.
  So U = U0 - W S with U0 = T diag(beta) V, W = T diag(beta e^b) K, T = (I + A)^{-1} (one
  triangular solve per chunk), and
    o_t   = e^{b_t} S^T q_t + sum_{s <= t} e^{b_t - b_s} (q_t . k_s) u_s
    S_new = e^{b_C} S + sum_s e^{b_C - b_s} k_s u_s^T.
Decay exponents are masked to -inf before exp, so nothing here ever computes e^{-b}. The gates
are summed clamped at -GATE_FLOOR (per compute dtype), below which e^g is exactly 0: a -inf gate
(a full forget) never meets another in (-inf) - (-inf), and every factor across it stays 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.backends.reference.linear import Prepared, finish, prepare
from attncc.validate.linear import check_inputs
from attncc.ir.linear import LinearState


# e^-128 and e^-1024 round to 0 in fp32 and fp64, and clamped sums stay small enough that the
# differences b_t - b_s of small gates keep their precision
GATE_FLOOR = {torch.float32: 128.0, torch.float64: 1024.0}


def _constant_log_decay(p: Prepared) -> Tensor:
    B, H, L = p.q.shape[:3]
    return torch.log(p.lam)[None, :, None, None].expand(B, H, L, 1)


# gate kind -> per-token log-decay: [B, H, L, 1] (one per token) or [B, H, L, Dk] (per key dim);
# None when there is no gate
_LOG_DECAY = {
    "none": lambda p: None,
    "constant": _constant_log_decay,
    "scalar": lambda p: p.g[..., None],
    "vector": lambda p: p.g,
}


def _decay_matrix(b: Tensor, mask: Tensor) -> Tensor:
    """e^{b_t - b_s} where mask[t, s], else 0: b [B, H, C, G] -> [B, H, C, C, G]."""
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]
    return torch.exp(diff.masked_fill(~mask[:, :, None], float("-inf")))


def _gla_chunk(S: Tensor, q: Tensor, k: Tensor, v: Tensor, b: Tensor, mask: Tensor,
               beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """One chunk of the additive write (L1-L4, L7): b [B, H, C, G] with G in (1, F), mask [C, C]
    the pairs (t, s) that meet (beta is unused); returns (o, S_new)."""
    D = _decay_matrix(b, mask)
    A = (q[:, :, :, None, :] * k[:, :, None, :, :] * D).sum(-1)  # [B, H, C, C]
    o = (q * torch.exp(b)) @ S + A @ v
    b_last = b[:, :, -1:]
    S_new = torch.exp(b_last[:, :, 0])[..., None] * S + (k * torch.exp(b_last - b)).transpose(
        -1, -2) @ v
    return o, S_new


def _delta_chunk(S: Tensor, q: Tensor, k: Tensor, v: Tensor, b: Tensor, causal: Tensor,
                 beta: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of the delta write (L5, L6) by the UT transform: b [B, H, C, 1] cumulative
    log-decay, one per token; causal [C, C] the pairs s <= t."""
    if b.shape[-1] != 1 or not bool(causal.equal(causal.tril())):  # no vector gate, no blocks
        raise NotImplementedError("the chunked delta rule takes one gate per token and steps "
                                  "the state every token")
    b = b[..., 0]
    strict = causal.tril(-1)
    D_strict = _decay_matrix(b[..., None], strict)[..., 0]
    D_causal = _decay_matrix(b[..., None], causal)[..., 0]
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * D_strict
    eye = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)
    M = eye + A
    gamma = torch.exp(b)
    U0 = torch.linalg.solve_triangular(M, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(M, (beta * gamma)[..., None] * k, upper=False,
                                      unitriangular=True)
    U = U0 - W @ S
    o = gamma[..., None] * (q @ S) + ((q @ k.transpose(-1, -2)) * D_causal) @ U
    decay_to_end = torch.exp(b[:, :, -1:] - b)  # [B, H, C]
    S_new = gamma[:, :, -1, None, None] * S + (k * decay_to_end[..., None]).transpose(-1, -2) @ U
    return o, S_new


# write kind -> one chunk: (S, q, k, v, b, mask, beta) -> (o, S_new)
_CHUNK = {"additive": _gla_chunk, "delta": _delta_chunk}


def chunked_reference(
    q: Tensor, k: Tensor, v: Tensor, state_node: LinearState, *, chunk: int,
    g: Tensor | None = None, beta: Tensor | None = None, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form of `recurrent_reference` (same arguments, plus `chunk` = C >= 1).

    For block_causal (L7) `chunk` must be a multiple of the block size, so that no block
    straddles two chunks. Returns (o [B, H, L, Dv], final state [B, H, F, Dv'] or None).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    check_inputs(q, k, v, state_node, g, beta, initial_state)
    if state_node.block is not None and chunk % state_node.block != 0:
        raise ValueError(f"chunk: expected a multiple of block = {state_node.block} for rule "
                         f"{state_node.rule!r}, got {chunk}")
    p = prepare(q, k, v, state_node, g, beta, scale, initial_state)
    log_decay = _LOG_DECAY[state_node.gate](p)
    S = p.state
    L = p.q.shape[2]
    o = p.v.new_zeros(*p.v.shape)
    for start in range(0, L, chunk):
        sl = slice(start, min(start + chunk, L))
        qc, kc, vc = p.q[:, :, sl], p.k[:, :, sl], p.v[:, :, sl]
        C = qc.shape[2]
        if log_decay is None:
            b = qc.new_zeros(*qc.shape[:3], 1)
        else:
            floor = GATE_FLOOR[log_decay.dtype]
            b = torch.cumsum(log_decay[:, :, sl].clamp(min=-floor), dim=2)
        idx = torch.arange(C, device=qc.device)
        blk = idx if state_node.block is None else idx // state_node.block
        mask = blk[None, :] <= blk[:, None]  # causal, or block-causal (L7)
        o[:, :, sl], S = _CHUNK[state_node.write](S, qc, kc, vc, b, mask,
                                                  None if p.beta is None else p.beta[:, :, sl])
    return finish(o, state_node, p.scale, q.dtype), (S if output_final_state else None)
