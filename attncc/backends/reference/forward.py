"""The reference backend: plain PyTorch execution of an `AttentionSpec` (the oracle, and the CPU
path). Tests run it in fp64. It walks queries and keys in chunks and merges partial results with
the LSE merge (`attncc.backends.merge`, docs/semantics.md), so it never holds more than
`q_chunk x kv_chunk` scores per head.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from attncc.backends.merge import merge_pair
from attncc.ir.eval import evaluate
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_IDX, SCORE


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference's working precision for inputs of `dtype`: fp64 stays, the rest run in
    fp32 (what the kernels accumulate in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted_values(p: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
                     ) -> torch.Tensor:
    """`p @ v`, except that a non-finite value of v reaches only the rows allowed to attend to
    its key (docs/semantics.md, "Non-finite inputs"): a masked key has p = 0, yet 0 * nan = nan
    would poison the row. Allowed rows keep the plain product (inf, or nan from 0 * inf)."""
    out = p @ v
    bad = ~torch.isfinite(v)
    if allowed is None or not bool(bad.any()):
        return out
    clean = p @ v.masked_fill(bad, 0)
    sees = allowed.expand(*p.shape).to(p.dtype) @ bad.to(p.dtype) > 0
    return torch.where(sees, out, clean)


def _index_env(spec: AttentionSpec, shapes: dict, params: Mapping[str, float | int]) -> dict:
    env = {LQ: shapes["Lq"], LK: shapes["Lk"], HQ: shapes["Hq"], HKV: shapes["Hkv"]}
    for p in spec.params:
        env[p.symbol] = params.get(p.name, p.value)
    return env


def _tensors(spec: AttentionSpec, captures: Mapping[str, torch.Tensor]) -> dict:
    out = {c.name: c.tensor for c in spec.captures}
    out.update(captures)
    return out


def attention_reference(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        *, scale: float | None = None, params: Mapping[str, float | int] = {},
                        captures: Mapping[str, torch.Tensor] = {},
                        reorder_inputs: Mapping[str, torch.Tensor] = {},
                        q_chunk: int = 128, kv_chunk: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `spec` on dense q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv].

    Returns `(o [B,Hq,Lq,Dv], lse [B,Hq,Lq])` in the inputs' dtype. `lse` is the natural log of
    the softmax denominator (with N2 it includes the sink term). Rows with no allowed key give
    o = 0 (and lse = -inf without a sink).
    """
    if spec.normaliser.kind == "none":
        raise ValueError("attention_reference: normaliser 'none' is linear attention; "
                         "use attncc.backends.reference.linear")
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = spec.scale if scale is None else scale
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_pos = torch.arange(Lq, device=q.device)
    kv_pos = torch.arange(Lk, device=q.device)
    if spec.reorder is not None:  # attend in the permuted order, masks see original positions
        q_pos = spec.reorder.permutation(Lq, device=q.device, **reorder_inputs)
        kv_pos = spec.reorder.permutation(Lk, device=q.device, **reorder_inputs)
        q, k, v = q[:, :, q_pos], k[:, :, kv_pos], v[:, :, kv_pos]
    env = _index_env(spec, {"Lq": Lq, "Lk": Lk, "Hq": Hq, "Hkv": Hkv}, params)
    env[B_IDX] = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    env[H_IDX] = torch.arange(Hq, device=q.device).view(1, Hq, 1, 1)
    tensors = _tensors(spec, captures)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)

    o_rows, lse_rows = [], []
    for q0 in range(0, Lq, q_chunk):
        qc = q[:, :, q0:q0 + q_chunk]
        rows = qc.shape[2]
        env[Q_IDX] = q_pos[q0:q0 + rows].view(1, 1, rows, 1)
        o = torch.zeros(B, Hq, rows, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((B, Hq, rows), -math.inf, dtype=q.dtype, device=q.device)
        for k0 in range(0, Lk, kv_chunk):
            kc, vc = k[:, :, k0:k0 + kv_chunk], v[:, :, k0:k0 + kv_chunk]
            env[KV_IDX] = kv_pos[k0:k0 + kc.shape[2]].view(1, 1, 1, -1)
            s = scale * (qc @ kc.transpose(-1, -2))
            if spec.score is not None:
                s = torch.as_tensor(evaluate(spec.score.expr, {**env, SCORE: s}, tensors),
                                    dtype=s.dtype).expand_as(s)
            allowed = None
            if spec.mask is not None:
                allowed = torch.as_tensor(evaluate(spec.mask.expr, env, tensors)).bool()
                s = s.masked_fill(~allowed.expand_as(s), -math.inf)
            part_lse = torch.logsumexp(s, dim=-1)
            safe = torch.where(torch.isfinite(part_lse), part_lse, torch.zeros_like(part_lse))
            part_o = _weighted_values(torch.exp(s - safe[..., None]), vc, allowed)
            o, lse = merge_pair(o, lse, part_o, part_lse)
        o_rows.append(o)
        lse_rows.append(lse)
    if Lq == 0:  # no query chunk ran
        o_rows = [torch.zeros(B, Hq, 0, v.shape[-1], dtype=q.dtype, device=q.device)]
        lse_rows = [torch.zeros(B, Hq, 0, dtype=q.dtype, device=q.device)]
    o, lse = torch.cat(o_rows, dim=2), torch.cat(lse_rows, dim=2)
    if spec.normaliser.kind == "softmax_sink":
        sink = tensors[spec.normaliser.sink.name].to(lse.dtype).view(1, Hq, 1)
        total = torch.logaddexp(lse, sink.expand_as(lse))
        o = o * torch.exp(lse - total)[..., None]
        lse = total
    if spec.reorder is not None:
        inv = torch.empty_like(q_pos)
        inv[q_pos] = torch.arange(Lq, device=q.device)
        o, lse = o[:, :, inv], lse[:, :, inv]
    return o, lse
