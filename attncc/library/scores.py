"""Named score modifications S1–S8 and normalisers N1–N2 (semantics: docs/semantics.md).

Position-dependent scores read the aligned query position `qp = q_idx + Lk - Lq` (docs/
semantics.md, "Query positions when Lq != Lk"): S3 and S4 measure the distance `kv - qp` between
token positions, so a decode row (Lq = 1) sits at Lk - 1. S5's `bias[b, h, q, kv]` is a tensor
with one row per query and stays indexed by the raw row `q_idx`.
"""

from __future__ import annotations

import sympy
import torch

from attncc.ir.nodes import Capture, Normaliser, Param, ScoreMod
from attncc.ir.symbols import B_IDX, H_IDX, HQ, KV_IDX, Q_IDX, QP, SCORE, Load, buffer_symbol


def _float(name: str, value: float, positive: bool = False) -> Param:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive float, got {value!r}")
    return Param(name, "float", float(value), positive=positive)


def _capture(name: str, value: object, ndim: int) -> Capture:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim or not value.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a {ndim}-d floating-point tensor, "
                         f"got {value.dim()}-d {value.dtype}")
    return Capture.of(name, value)


def _load(cap: Capture, *index: sympy.Basic) -> sympy.Basic:
    return Load(buffer_symbol(cap.name), *index)


def scale(factor: float) -> ScoreMod:
    """S1: `score * factor` (on top of the softmax scale; a runtime scalar)."""
    f = _float("factor", factor)
    return ScoreMod(SCORE * f.symbol, (f,), tag="scale")


def softcap(cap: float) -> ScoreMod:
    """S2 (Gemma 2, Grok): `cap * tanh(score / cap)`."""
    c = _float("softcap", cap, positive=True)
    return ScoreMod(c.symbol * sympy.tanh(SCORE / c.symbol), (c,), tag="softcap")


def alibi(slopes: torch.Tensor | None = None) -> ScoreMod:
    """S3: `score + slope[h] * (kv - qp)`; `slope[h] = 2^(-8 (h + 1) / Hq)` unless given."""
    if slopes is None:
        slope = 2 ** (-8 * (H_IDX + 1) / HQ)
        return ScoreMod(SCORE + slope * (KV_IDX - QP), tag="alibi")
    cap = _capture("alibi_slopes", slopes, 1)
    return ScoreMod(SCORE + _load(cap, H_IDX) * (KV_IDX - QP), (), (cap,), tag="alibi")


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """S4 (T5 / Music Transformer): `score + table[h, clamp(qp - kv, -m, m) + m]` for a learnable
    `table` of shape [Hq, 2m + 1] (relative distances beyond m share the edge buckets)."""
    cap = _capture("rel_table", table, 2)
    if table.shape[1] % 2 != 1:
        raise ValueError(f"rel_table: expected [Hq, 2m+1] (odd last dim), got {list(table.shape)}")
    m = Param("max_distance", "int", (table.shape[1] - 1) // 2)
    bucket = sympy.Min(sympy.Max(QP - KV_IDX, -m.symbol), m.symbol) + m.symbol
    return ScoreMod(SCORE + _load(cap, H_IDX, bucket), (m,), (cap,), tag="relbias")


def bias(tensor: torch.Tensor) -> ScoreMod:
    """S5: `score + bias[b, h, q, kv]`; a dim of size 1 broadcasts (it is indexed with 0)."""
    cap = _capture("bias", tensor, 4)
    index = [sympy.Integer(0) if n == 1 else s
             for n, s in zip(tensor.shape, (B_IDX, H_IDX, Q_IDX, KV_IDX))]
    return ScoreMod(SCORE + _load(cap, *index), (), (cap,), tag="bias")


def head_bias(values: torch.Tensor) -> ScoreMod:
    """S6: `score + hb[h]`."""
    cap = _capture("head_bias", values, 1)
    return ScoreMod(SCORE + _load(cap, H_IDX), (), (cap,), tag="headbias")


def log_count(values: torch.Tensor) -> ScoreMod:
    """S7 (RazorAttention compensation): `score + logcount[kv]`."""
    cap = _capture("logcount", values, 1)
    return ScoreMod(SCORE + _load(cap, KV_IDX), (), (cap,), tag="logcount")


def calibration(weights: torch.Tensor) -> ScoreMod:
    """S8: `score + log(lambda[kv])`: post-softmax reweighting folded into the score."""
    cap = _capture("calibration", weights, 1)
    return ScoreMod(SCORE + sympy.log(_load(cap, KV_IDX)), (), (cap,), tag="calib")


def sink(logits: torch.Tensor) -> Normaliser:
    """N2: softmax whose denominator gets `+ exp(sink[h])` (a learned per-head logit, no value)."""
    return Normaliser("softmax_sink", _capture("sink", logits, 1))
