"""The linear-recurrence ("memory") axis: how a per-head state `S [Dk, Dv]` is updated (CATALOG 5).

One node, `LinearState`, covers L1-L7; its `rule` picks the update. `Hybrid` (L8) pairs a
softmax part with a linear part. The reference semantics live in the reference backend (its
recurrent loop, decode step and chunked form).

State layout: `S [B, H, F, Dv]` with `F = feature_dim(Dk)` (Dk after the feature map). With
`normalize=True` the normaliser `z` rides along as one extra value column: `S [B, H, F, Dv + 1]`,
`S[..., :Dv]` is the numerator state and `S[..., Dv]` is `z` (the state of `v` augmented by 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# rule name -> catalogue id; the update each rule performs (S in R^{F x Dv}):
#   linear        L1  S_t = S_{t-1} + phi(k_t) v_t^T            (optional z_t = z_{t-1} + phi(k_t))
#   decay         L2  S_t = lambda_h S_{t-1} + k_t v_t^T         (lambda_h constant per head)
#   scalar_gate   L3  S_t = exp(g_t) S_{t-1} + k_t v_t^T         (g [B, H, L], g <= 0)
#   vector_gate   L4  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T   (g [B, H, L, Dk], g <= 0)
#   delta         L5  S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T  (beta [B,H,L])
#   gated_delta   L6  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
#   block_causal  L7  S advances once per block of `block` tokens; a token reads the state after
#                     its own whole block (earlier blocks plus its block, bidirectionally)
RULES: dict[str, str] = {
    "linear": "L1",
    "decay": "L2",
    "scalar_gate": "L3",
    "vector_gate": "L4",
    "delta": "L5",
    "gated_delta": "L6",
    "block_causal": "L7",
}

# identity: phi(x) = x                                  F = D
# elu1:     phi(x) = elu(x) + 1 (elementwise, > 0)      F = D
# taylor2:  phi(x) = [1, x, flatten(x (x) x) / sqrt(2)] F = 1 + D + D^2, so that
#           phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2, the 2nd-order Taylor expansion of exp(q.k).
#           BASED's code also divides x by D^(1/4) (i.e. exp(q.k / sqrt(D))); here that
#           rescaling is left to the caller (fold it into q and k).
FEATURE_MAPS: tuple[str, ...] = ("identity", "elu1", "taylor2")

_PHI_RULES = ("linear", "block_causal")  # rules that take a feature map and a normaliser
_G_RULES = ("scalar_gate", "vector_gate", "gated_delta")
_BETA_RULES = ("delta", "gated_delta")


def _fmt_float(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True, slots=True)
class LinearState:
    """A linear-attention state update (CATALOG L1-L7).

    rule: one of `RULES`. feature_map: one of `FEATURE_MAPS`, applied to q and k (L1, L7 only).
    normalize: divide the output by `scale * z_t . phi(q_t)` (L1, L7 only).
    decay: L2 only, required; `lambda` in (0, 1], one float for all heads or a tuple with one per
    head (length H, checked at run time). block: L7 only, required; block size `c >= 1`.
    """

    rule: str
    feature_map: str = "identity"
    normalize: bool = False
    decay: float | tuple[float, ...] | None = None
    block: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {sorted(RULES)}, got {self.rule!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map: expected one of {list(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.feature_map != "identity" and self.rule not in _PHI_RULES:
            raise ValueError(f"feature_map: expected 'identity' for rule {self.rule!r} (feature "
                             f"maps apply to {list(_PHI_RULES)}), got {self.feature_map!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: expected a bool, got {self.normalize!r}")
        if self.normalize and self.rule not in _PHI_RULES:
            raise ValueError(f"normalize: expected False for rule {self.rule!r} "
                             f"(the normaliser applies to {list(_PHI_RULES)}), got True")
        object.__setattr__(self, "decay", self._checked_decay())
        if self.rule == "block_causal":
            if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
                raise ValueError(f"block: expected an int >= 1 for rule 'block_causal', "
                                 f"got {self.block!r}")
        elif self.block is not None:
            raise ValueError(f"block: expected None for rule {self.rule!r}, got {self.block!r}")

    def _checked_decay(self) -> float | tuple[float, ...] | None:
        if self.rule != "decay":
            if self.decay is not None:
                raise ValueError(f"decay: expected None for rule {self.rule!r}, got {self.decay!r}")
            return None
        values = self.decay if isinstance(self.decay, tuple) else (self.decay,)
        ok = len(values) > 0 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and 0 < x <= 1 for x in values)
        if not ok:
            raise ValueError("decay: expected a float in (0, 1] or a non-empty tuple of them "
                             f"(one per head) for rule 'decay', got {self.decay!r}")
        if isinstance(self.decay, tuple):
            return tuple(float(x) for x in values)
        return float(self.decay)

    @property
    def catalog_id(self) -> str:
        """The catalogue entry, `L1` .. `L7`."""
        return RULES[self.rule]

    def text(self) -> str:
        """Canonical text, e.g. `linear(rule=gated_delta, phi=identity, normalize=False)`."""
        parts = [f"rule={self.rule}", f"phi={self.feature_map}", f"normalize={self.normalize}"]
        if isinstance(self.decay, tuple):
            parts.append("decay=(" + ", ".join(_fmt_float(x) for x in self.decay) + ")")
        elif self.decay is not None:
            parts.append(f"decay={_fmt_float(self.decay)}")
        if self.block is not None:
            parts.append(f"block={self.block}")
        return "linear(" + ", ".join(parts) + ")"

    @property
    def key(self) -> str:
        """sha256 hex digest of `text()`: the content key."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    def extra_inputs(self) -> tuple[tuple[str, str], ...]:
        """Per-token tensors this rule reads besides q, k, v: `(name, shape)` pairs.

        `g`: log-decay gate, `<= 0` ([B, H, L] for L3/L6, [B, H, L, Dk] for L4);
        `beta`: delta-rule write strength [B, H, L] (L5/L6). L2's constant decay is `self.decay`.
        """
        out: list[tuple[str, str]] = []
        if self.rule in _G_RULES:
            out.append(("g", "[B, H, L, Dk]" if self.rule == "vector_gate" else "[B, H, L]"))
        if self.rule in _BETA_RULES:
            out.append(("beta", "[B, H, L]"))
        return tuple(out)

    def feature_dim(self, dk: int) -> int:
        """F, the key dimension of the state, for inputs of head dim `dk`."""
        return 1 + dk + dk * dk if self.feature_map == "taylor2" else dk

    def state_dv(self, dv: int) -> int:
        """Value dimension of the state: `dv`, plus one column for `z` when normalising."""
        return dv + 1 if self.normalize else dv


@runtime_checkable
class SoftmaxPart(Protocol):
    """Anything describing a softmax attention (e.g. an M2 / M6 mask spec): it prints itself."""

    def text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Hybrid:
    """L8: one head computed as a softmax part and a linear part, mixed.

    Mix (`mix=alpha`, the only rule so far): `o = alpha * o_softmax + (1 - alpha) * o_linear`,
    `alpha` a float in [0, 1] (default 0.5), the same for every head and token. Both parts see
    the same q, k, v; the reference backend's `mix_hybrid` applies the mix.
    """

    softmax: SoftmaxPart
    linear: LinearState
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not callable(getattr(self.softmax, "text", None)):
            raise ValueError("softmax: expected a softmax attention spec with a text() method, "
                             f"got {type(self.softmax).__name__}")
        if not isinstance(self.linear, LinearState):
            raise ValueError(f"linear: expected a LinearState, got {type(self.linear).__name__}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"alpha: expected a float in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))

    def text(self) -> str:
        """Canonical text: `hybrid(softmax=..., linear=linear(...), mix=alpha, alpha=0.5)`."""
        return (f"hybrid(softmax={self.softmax.text()}, linear={self.linear.text()}, "
                f"mix=alpha, alpha={_fmt_float(self.alpha)})")

    @property
    def key(self) -> str:
        """sha256 hex digest of `text()`."""
        return hashlib.sha256(self.text().encode()).hexdigest()
