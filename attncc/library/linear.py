"""Constructor of the linear-recurrence state (docs/catalog.md, linear rules L1-L7) for
`Attention(memory=...)`:

    spec = attncc.Attention(memory=attncc.recurrent_state(update="delta", decay="scalar"))

`recurrent_state` names the update in the catalogue's terms and returns the IR's `LinearState`
(`attncc.ir.linear`), built from its parts; the combinations it accepts are the rows of
`attncc.ir.linear.RULE_TABLE`. A spec with such a memory compiles (`attncc.compile`) to
`attncc.ops.linear.compiled.CompiledLinearAttention`. `hybrid` pairs a softmax spec with a
linear state (L8) for `attncc.compile`.
"""

from __future__ import annotations

from typing import Any

from attncc.ir.linear import Hybrid, LinearState, find_rule
from attncc.ir.nodes import DenseMemory
from attncc.ir.spec import AttentionSpec

DECAYS = ("none", "scalar", "vector")  # or a float / tuple of floats: a constant per head (L2)
UPDATES = ("additive", "delta")
# decay argument -> gate kind (a float or tuple of floats is the "constant" gate)
_GATE_OF_DECAY = {"none": "none", "scalar": "scalar", "vector": "vector"}


def recurrent_state(update: str = "additive", decay: Any = "none", *,
                    feature_map: str = "identity", normalize: bool = False,
                    block: int | None = None) -> LinearState:
    """The state update, by its parts: `update` additive (L1-L4, L7) or delta (L5, L6); `decay`
    "none", a constant per head (float, or a tuple with one per head: L2), "scalar" (a gate
    g [B, H, L] per token: L3, L6) or "vector" (g [B, H, L, Dk]: L4); `block` steps the state once
    per block of tokens (L7); `feature_map` and `normalize` apply to L1 and L7."""
    if update not in UPDATES:
        raise ValueError(f"update: expected one of {UPDATES}, got {update!r}")
    constant = isinstance(decay, (int, float, tuple)) and not isinstance(decay, bool)
    if not constant and decay not in DECAYS:
        raise ValueError(f"decay: expected one of {DECAYS}, a float or a tuple of floats, "
                         f"got {decay!r}")
    gate = "constant" if constant else _GATE_OF_DECAY[decay]
    if find_rule(gate, update, block is not None) is None:
        if block is not None:
            raise ValueError("block: block-causal stepping (L7) takes update='additive' and "
                             f"decay='none', got update={update!r}, decay={decay!r}")
        if constant:
            raise ValueError("decay: a constant decay goes with update='additive' (L2), "
                             f"got update={update!r}")
        raise ValueError(f"decay={decay!r} with update={update!r}: no catalogue rule (a vector "
                         "gate with the delta rule is not in docs/catalog.md)")
    return LinearState(feature_map=feature_map, normalize=normalize,
                       decay=decay if constant else None, block=block, gate=gate, write=update)


def hybrid(softmax: Any, linear: LinearState,
           alpha: float | tuple[float, ...] = 0.5) -> Hybrid:
    """L8: `o = alpha * o_softmax + (1 - alpha) * o_linear` on the same q, k, v. `softmax`: an
    `attncc.Attention(mask=..., score=...)` spec (softmax, dense memory), e.g. a sliding window
    (BASED) or block top-k (MiniCPM-SALA's sparse heads); `linear`: a `recurrent_state(...)`;
    `alpha`: a float in [0, 1], or a tuple with one per head (1: a softmax head, 0: a linear
    head). `attncc.compile` turns it into `attncc.ops.linear.hybrid.CompiledHybrid`."""
    if not isinstance(softmax, AttentionSpec) or softmax.normaliser.kind == "none" or \
            not isinstance(softmax.memory, DenseMemory):
        text = softmax.text() if callable(getattr(softmax, "text", None)) else \
            type(softmax).__name__
        raise ValueError("softmax: expected a dense softmax spec, attncc.Attention(mask=..., "
                         f"score=...), got {text}")
    return Hybrid(softmax, linear, alpha)
