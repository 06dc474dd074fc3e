"""L8 hybrid from the user API (docs/catalog.md, "Linear rules"): one head computed as a softmax
part and a linear part on the same q, k, v, mixed by `alpha` (a float, or one per head).

    node = attncc.hybrid(attncc.Attention(mask=attncc.sliding_window(64)),
                         attncc.recurrent_state(feature_map="taylor2", normalize=True))
    attn = attncc.compile(node)
    o, state = attn(q, k, v, return_state=True)

Each part runs its own compiled object (`CompiledAttention`: the softmax kernel with its tile
classification; `CompiledLinearAttention`: the chunked / recurrent linear kernels), so each part
keeps its own warnings (a reference fallback says so) and differentiability; the mix is three
elementwise torch operations. Heads whose alpha is 0 or 1 still run both parts (a launch over a
subset of heads is not built): the mix only drops the unused part's output.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.ir.linear import Hybrid
from attncc.ir.nodes import DenseMemory, Normaliser
from attncc.ir.spec import AttentionSpec
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.ops.softmax.compiled import CompiledAttention


class CompiledHybrid:
    """attn(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, return_state=False,
    backend=None, **softmax_inputs) for an L8 `Hybrid` whose softmax part is an AttentionSpec.
    q, k [B, H, L, Dk], v [B, H, L, Dv] (Hq == Hkv and Lq == Lk: the linear part needs both);
    g, beta, initial_state go to the linear part, `softmax_inputs` (runtime values, captured
    tensors such as block top-k `indices`) to the softmax part; `scale`, if given, to both.
    Returns o [B, H, L, Dv], and the linear part's final state with `return_state=True`."""

    def __init__(self, node: Hybrid, backend: str = "auto") -> None:
        if not isinstance(node, Hybrid):
            raise ValueError(f"node: expected a Hybrid, got {type(node).__name__}")
        soft = node.softmax
        if not isinstance(soft, AttentionSpec) or soft.normaliser.kind == "none" \
                or not isinstance(soft.memory, DenseMemory):
            raise ValueError("node.softmax: expected a dense softmax AttentionSpec (attncc."
                             f"Attention(mask=..., score=...)), got {soft.text()}")
        self.node = node
        self.softmax = CompiledAttention(soft, backend)
        no_softmax = Normaliser("none")  # N3: the linear part (as `attncc.Attention` builds it)
        self.linear = CompiledLinearAttention(AttentionSpec(memory=node.linear,
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
        o_soft = self.softmax(q, k, v, scale=scale, backend=backend, **softmax_inputs)
        o_lin, state = self.linear(q, k, v, g=g, beta=beta, scale=scale,
                                   initial_state=initial_state, return_state=True,
                                   backend=backend)
        if isinstance(self.node.alpha, tuple):
            a = torch.tensor(alpha, dtype=o_soft.dtype, device=o_soft.device)[:, None, None]
        else:
            a = self.node.alpha
        o = a * o_soft + (1 - a) * o_lin
        return (o, state) if return_state else o

    def __repr__(self) -> str:
        return f"CompiledHybrid({self.node.text()})"


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
