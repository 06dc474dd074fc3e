"""L8 hybrid from the user API (docs/catalog.md, "Linear rules"): one head computed as a softmax
part and a linear part on the same q, k, v, mixed by `alpha` (a float, or one per head).

    node = attncc.hybrid(attncc.Attention(mask=attncc.sliding_window(64)),
                         attncc.recurrent_state(feature_map="taylor2", normalize=True))
    attn = attncc.compile(node)
    o, state = attn(q, k, v, return_state=True)

Each part runs its own compiled object (`CompiledAttention`: the softmax kernel with its tile
classification; `CompiledLinearAttention`: the chunked / recurrent linear kernels), so each part
keeps its own warnings (a reference fallback says so) and differentiability; the mix is three
elementwise torch operations.

With one alpha per head, a part runs only on the heads that use it: the linear part on the
heads with alpha < 1 (always possible: its per-head inputs are sliced, a per-head decay
included), the softmax part on the heads with alpha > 0 when its spec does not depend on the
head (no head index or head count in the mask or score, no captured tensor, no sink); a spec
that does (block top-k indices per head, ALiBi, per-head classes) runs on every head.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.ir.linear import Hybrid, LinearState
from attncc.ir.nodes import DenseMemory, Normaliser
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import H_IDX, HKV, HQ
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.ops.softmax.compiled import CompiledAttention


def _head_free(spec: AttentionSpec) -> bool:
    """True when the softmax spec computes the same for a head whatever its index and the
    number of heads (so it may run on a subset of heads)."""
    if spec.captures:
        return False
    exprs = [node.expr for node in (spec.mask, spec.score) if node is not None]
    return not any(e.free_symbols & {H_IDX, HQ, HKV} for e in exprs)


def _subset_node(node: LinearState, heads: list[int], num_heads: int) -> LinearState:
    """`node` for the given heads only: a per-head decay keeps those heads' entries."""
    decay = node.decay
    if isinstance(decay, tuple):
        if len(decay) != num_heads:
            raise ValueError(f"linear.decay: expected one value per head ({num_heads}, as "
                             f"alpha has), got {len(decay)}: {decay!r}")
        decay = tuple(decay[h] for h in heads)
    return LinearState(feature_map=node.feature_map, normalize=node.normalize, decay=decay,
                       block=node.block, gate=node.gate, write=node.write)


class CompiledHybrid:
    """attn(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, return_state=False,
    backend=None, **softmax_inputs) for an L8 `Hybrid` whose softmax part is an AttentionSpec.
    q, k [B, H, L, Dk], v [B, H, L, Dv] (Hq == Hkv and Lq == Lk: the linear part needs both);
    g, beta, initial_state go to the linear part, `softmax_inputs` (runtime values, captured
    tensors such as block top-k `block_idx`) to the softmax part; `scale`, if given, to both.
    Returns o [B, H, L, Dv], and with `return_state=True` the linear state [B, H, F, Dv'] (a
    head with alpha = 1 runs no linear part: its entry is its initial state, or zeros).
    `linear_heads` / `softmax_heads`: the heads each part runs on (None: every head)."""

    def __init__(self, node: Hybrid, backend: str = "auto") -> None:
        if not isinstance(node, Hybrid):
            raise ValueError(f"node: expected a Hybrid, got {type(node).__name__}")
        soft = node.softmax
        if not isinstance(soft, AttentionSpec) or soft.normaliser.kind == "none" \
                or not isinstance(soft.memory, DenseMemory):
            raise ValueError("node.softmax: expected a dense softmax AttentionSpec (attncc."
                             f"Attention(mask=..., score=...)), got {soft.text()}")
        self.node = node
        alpha = node.alpha if isinstance(node.alpha, tuple) else None
        self.linear_heads = self.softmax_heads = None
        if alpha is not None:
            lin = [h for h, a in enumerate(alpha) if a < 1]
            if len(lin) < len(alpha):
                self.linear_heads = lin
            sm = [h for h, a in enumerate(alpha) if a > 0]
            if len(sm) < len(alpha) and _head_free(soft):
                self.softmax_heads = sm
        linear = node.linear if self.linear_heads is None or not self.linear_heads else \
            _subset_node(node.linear, self.linear_heads, len(alpha))
        self.softmax = CompiledAttention(soft, backend)
        no_softmax = Normaliser("none")  # N3: the linear part (as `attncc.Attention` builds it)
        self.linear = CompiledLinearAttention(AttentionSpec(memory=linear,
                                                            normaliser=no_softmax), backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 g: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                 scale: float | None = None, initial_state: torch.Tensor | None = None,
                 return_state: bool = False, backend: str | None = None,
                 **softmax_inputs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or not isinstance(q, torch.Tensor) or \
                    x.dim() != 4 or q.dim() != 4 or x.shape[1:3] != q.shape[1:3]:
                raise ValueError(f"{name}: expected [B, H, L, D] with q's heads and length "
                                 f"(the linear part of a hybrid needs Hq == Hkv, Lq == Lk), "
                                 f"got q {_shape(q)}, {name} {_shape(x)}")
        alpha = self.node.alpha_per_head(q.shape[1])  # checked before anything runs
        o_soft = self._softmax(q, k, v, scale, backend, softmax_inputs)
        o_lin, state = self._linear(q, k, v, g, beta, scale, initial_state, backend)
        if isinstance(self.node.alpha, tuple):
            a = torch.tensor(alpha, dtype=o_soft.dtype, device=o_soft.device)[:, None, None]
        else:
            a = self.node.alpha
        o = a * o_soft + (1 - a) * o_lin
        return (o, state) if return_state else o

    def _softmax(self, q, k, v, scale, backend, inputs) -> torch.Tensor:
        heads = self.softmax_heads
        if heads is None:
            return self.softmax(q, k, v, scale=scale, backend=backend, **inputs)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        if heads:
            idx = torch.tensor(heads, device=q.device)
            part = self.softmax(*(x.index_select(1, idx) for x in (q, k, v)), scale=scale,
                                backend=backend, **inputs)
            out = out.index_copy(1, idx, part)
        return out

    def _linear(self, q, k, v, g, beta, scale, initial_state, backend):
        heads = self.linear_heads
        if heads is None:
            return self.linear(q, k, v, g=g, beta=beta, scale=scale,
                               initial_state=initial_state, return_state=True, backend=backend)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        F = self.node.linear.feature_dim(q.shape[-1])
        state = (initial_state.clone() if isinstance(initial_state, torch.Tensor) else
                 torch.zeros(q.shape[0], q.shape[1], F, self.node.linear.state_dv(v.shape[-1]),
                             dtype=torch.float32, device=q.device))
        if heads:
            idx = torch.tensor(heads, device=q.device)
            pick = (lambda x: x.index_select(1, idx) if isinstance(x, torch.Tensor) else x)
            part, s = self.linear(pick(q), pick(k), pick(v), g=pick(g), beta=pick(beta),
                                  scale=scale, initial_state=pick(initial_state),
                                  return_state=True, backend=backend)
            out = out.index_copy(1, idx, part)
            state = state.index_copy(1, idx, s.to(state.dtype))
        return out, state

    def __repr__(self) -> str:
        return f"CompiledHybrid({self.node.text()})"


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
