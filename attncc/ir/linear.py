"""The linear-recurrence axis: how a per-head state `S [Dk, Dv]` is updated (docs/catalog.md).

One node, `LinearState`, covers L1-L7 by its parts: a `gate` (how S decays before each write),
a `write` (what is added to S), and a `block` size (None: S advances every token). `RULE_TABLE`
lists the valid combinations and names each after its catalogue entry; a new combination of
existing parts is one new row there. Backends keep one table per part (gate kind -> decay code,
write kind -> update code). `Hybrid` (L8) pairs a softmax part with a linear part. The reference
semantics live in the reference backend (its recurrent loop, decode step and chunked form).

State layout: `S [B, H, F, Dv]` with `F = feature_dim(Dk)` (Dk after the feature map). With
`normalize=True` the normaliser `z` rides along as one extra value column: `S [B, H, F, Dv + 1]`,
`S[..., :Dv]` is the numerator state and `S[..., Dv]` is `z` (the state of `v` augmented by 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

# gate kind: the factor S is multiplied by before token t writes (S in R^{F x Dv})
#   none      1
#   constant  lambda_h, a constant per head (`LinearState.decay`)
#   scalar    exp(g_t), g [B, H, L] <= 0 per token
#   vector    diag(exp(g_t)), g [B, H, L, Dk] <= 0 per token and key dim
GATES: tuple[str, ...] = ("none", "constant", "scalar", "vector")
# write kind: what token t adds to the decayed state S'
#   additive  phi(k_t) v_t^T
#   delta     beta_t k_t (v_t - S'^T k_t)^T, i.e. S_t = (I - beta_t k_t k_t^T) S' + beta_t k_t v_t^T
WRITES: tuple[str, ...] = ("additive", "delta")
# block: None steps S every token; c >= 1 steps it once per block of c tokens, and a token reads
# the state after its own whole block (earlier blocks plus its block, bidirectionally)

# the per-token tensors a part reads besides q, k, v: name and axes
GATE_INPUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "scalar": ("g", ("B", "H", "L")), "vector": ("g", ("B", "H", "L", "Dk"))}
WRITE_INPUT: dict[str, tuple[str, tuple[str, ...]]] = {"delta": ("beta", ("B", "H", "L"))}


class Rule(NamedTuple):
    """One valid combination of parts, named after its catalogue entry. `phi`: it takes a feature
    map and the normaliser (the ungated additive rules only, as docs/catalog.md writes them)."""

    name: str
    catalog_id: str
    gate: str
    write: str
    blocked: bool
    phi: bool


# the valid combinations; the update each performs (S in R^{F x Dv}):
#   L1  S_t = S_{t-1} + phi(k_t) v_t^T                 (optional z_t = z_{t-1} + phi(k_t))
#   L2  S_t = lambda_h S_{t-1} + k_t v_t^T
#   L3  S_t = exp(g_t) S_{t-1} + k_t v_t^T
#   L4  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
#   L5  S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
#   L6  S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T
#   L7  L1 stepped once per block of `block` tokens
RULE_TABLE: tuple[Rule, ...] = (
    Rule("linear", "L1", "none", "additive", False, True),
    Rule("decay", "L2", "constant", "additive", False, False),
    Rule("scalar_gate", "L3", "scalar", "additive", False, False),
    Rule("vector_gate", "L4", "vector", "additive", False, False),
    Rule("delta", "L5", "none", "delta", False, False),
    Rule("gated_delta", "L6", "scalar", "delta", False, False),
    Rule("block_causal", "L7", "none", "additive", True, True),
)
RULES: dict[str, str] = {r.name: r.catalog_id for r in RULE_TABLE}  # rule name -> catalogue id
_BY_NAME: dict[str, Rule] = {r.name: r for r in RULE_TABLE}
_BY_PARTS: dict[tuple[str, str, bool], Rule] = {(r.gate, r.write, r.blocked): r
                                                for r in RULE_TABLE}

# identity: phi(x) = x                                  F = D
# elu1:     phi(x) = elu(x) + 1 (elementwise, > 0)      F = D
# taylor2:  phi(x) = [1, x, flatten(x (x) x) / sqrt(2)] F = 1 + D + D^2, so that
#           phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2, the 2nd-order Taylor expansion of exp(q.k).
#           BASED's code also divides x by D^(1/4) (i.e. exp(q.k / sqrt(D))); here that
#           rescaling is left to the caller (fold it into q and k).
FEATURE_MAPS: tuple[str, ...] = ("identity", "elu1", "taylor2")


def find_rule(gate: str, write: str, blocked: bool) -> Rule | None:
    """The table row for these parts, or None when the combination is not a rule."""
    return _BY_PARTS.get((gate, write, blocked))


def _fmt_float(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True, slots=True, init=False)
class LinearState:
    """A linear-attention state update (L1-L7, docs/catalog.md), by its parts.

    Built from a rule name, `LinearState("gated_delta")`, or from its parts,
    `LinearState(gate="scalar", write="delta")` (both give the same node).
    gate: one of `GATES`; write: one of `WRITES`; block: None, or the block size `c >= 1`
    (required by the block-causal rule, L7). feature_map: one of `FEATURE_MAPS`, applied to q and
    k; normalize: divide the output by `scale * z_t . phi(q_t)` (both for the rules whose row
    says `phi`: L1, L7). decay: gate "constant" only, required; `lambda` in (0, 1], one float for
    all heads or a tuple with one per head (length H, checked at run time).
    """

    gate: str
    write: str
    block: int | None
    feature_map: str
    normalize: bool
    decay: float | tuple[float, ...] | None

    def __init__(self, rule: str | None = None, feature_map: str = "identity",
                 normalize: bool = False, decay: float | tuple[float, ...] | None = None,
                 block: int | None = None, *, gate: str | None = None,
                 write: str | None = None) -> None:
        found = self._rule_of(rule, gate, write, block)
        for name, value in (("gate", found.gate), ("write", found.write), ("block", block),
                            ("feature_map", feature_map), ("normalize", normalize),
                            ("decay", decay)):
            object.__setattr__(self, name, value)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map: expected one of {list(FEATURE_MAPS)}, got {self.feature_map!r}")
        phi_rules = [r.name for r in RULE_TABLE if r.phi]
        if self.feature_map != "identity" and not found.phi:
            raise ValueError(f"feature_map: expected 'identity' for rule {found.name!r} (feature "
                             f"maps apply to {phi_rules}), got {self.feature_map!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: expected a bool, got {self.normalize!r}")
        if self.normalize and not found.phi:
            raise ValueError(f"normalize: expected False for rule {found.name!r} "
                             f"(the normaliser applies to {phi_rules}), got True")
        object.__setattr__(self, "decay", self._checked_decay(found))
        self._check_block(found)

    @staticmethod
    def _rule_of(rule: str | None, gate: str | None, write: str | None,
                 block: int | None) -> Rule:
        """The table row named by `rule`, or the one these parts make; ValueError otherwise.
        (Whether `block` suits the named rule is checked last, by `_check_block`.)"""
        if rule is not None:
            if gate is not None or write is not None:
                raise ValueError(f"rule: give a rule name or its parts (gate, write), not both; "
                                 f"got rule={rule!r}, gate={gate!r}, write={write!r}")
            found = _BY_NAME.get(rule) if isinstance(rule, str) else None
            if found is None:
                raise ValueError(f"rule: expected one of {sorted(RULES)}, got {rule!r}")
            return found
        gate = "none" if gate is None else gate
        write = "additive" if write is None else write
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {list(GATES)}, got {gate!r}")
        if write not in WRITES:
            raise ValueError(f"write: expected one of {list(WRITES)}, got {write!r}")
        found = find_rule(gate, write, block is not None)
        if found is None:
            valid = [(r.gate, r.write, "block" if r.blocked else "token") for r in RULE_TABLE]
            raise ValueError(f"gate={gate!r}, write={write!r}, block={block!r}: not a rule of "
                             f"docs/catalog.md (valid (gate, write, step): {valid})")
        return found

    def _check_block(self, found: Rule) -> None:
        if found.blocked:
            if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
                raise ValueError(f"block: expected an int >= 1 for rule {found.name!r}, "
                                 f"got {self.block!r}")
        elif self.block is not None:
            raise ValueError(f"block: expected None for rule {found.name!r}, got {self.block!r}")

    def _checked_decay(self, found: Rule) -> float | tuple[float, ...] | None:
        if found.gate != "constant":
            if self.decay is not None:
                raise ValueError(f"decay: expected None for rule {found.name!r}, "
                                 f"got {self.decay!r}")
            return None
        values = self.decay if isinstance(self.decay, tuple) else (self.decay,)
        ok = len(values) > 0 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and 0 < x <= 1 for x in values)
        if not ok:
            raise ValueError("decay: expected a float in (0, 1] or a non-empty tuple of them "
                             f"(one per head) for rule {found.name!r}, got {self.decay!r}")
        if isinstance(self.decay, tuple):
            return tuple(float(x) for x in values)
        return float(self.decay)

    @property
    def rule(self) -> str:
        """The rule's name in `RULE_TABLE` (derived from the parts), e.g. `gated_delta`."""
        return _BY_PARTS[(self.gate, self.write, self.block is not None)].name

    @property
    def catalog_id(self) -> str:
        """The catalogue entry, `L1` .. `L7`."""
        return _BY_PARTS[(self.gate, self.write, self.block is not None)].catalog_id

    def text(self) -> str:
        """Canonical text, e.g. `linear(rule=gated_delta, phi=identity, normalize=False)`: the
        rule name stands for its parts (one name per row of `RULE_TABLE`)."""
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

        `g`: log-decay gate, `<= 0` ([B, H, L] for a scalar gate, [B, H, L, Dk] for a vector
        one); `beta`: delta-rule write strength [B, H, L]. A constant gate is `self.decay`.
        """
        found = [GATE_INPUT.get(self.gate), WRITE_INPUT.get(self.write)]
        return tuple((name, "[" + ", ".join(axes) + "]") for name, axes in
                     (x for x in found if x is not None))

    def input_axes(self, name: str) -> tuple[str, ...] | None:
        """Axes of the per-token tensor `name` ("g" or "beta") this rule reads, e.g.
        ("B", "H", "L"); None when it reads none."""
        for x in (GATE_INPUT.get(self.gate), WRITE_INPUT.get(self.write)):
            if x is not None and x[0] == name:
                return x[1]
        return None

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
    `alpha` a float in [0, 1] (default 0.5), the same for every head and token, or a tuple with
    one float in [0, 1] per head (length H, checked at run time): `alpha_h = 1` makes head h a
    softmax head, `0` a linear head (MiniCPM-SALA-style heads of two kinds in one layer). Both
    parts see the same q, k, v; `mix_hybrid` (reference) and `attncc.compile(hybrid)` apply it.
    """

    softmax: SoftmaxPart
    linear: LinearState
    alpha: float | tuple[float, ...] = 0.5

    def __post_init__(self) -> None:
        if not callable(getattr(self.softmax, "text", None)):
            raise ValueError("softmax: expected a softmax attention spec with a text() method, "
                             f"got {type(self.softmax).__name__}")
        if not isinstance(self.linear, LinearState):
            raise ValueError(f"linear: expected a LinearState, got {type(self.linear).__name__}")
        a = self.alpha
        values = a if isinstance(a, tuple) else (a,)
        if not values or any(isinstance(x, bool) or not isinstance(x, (int, float))
                             or not 0 <= x <= 1 for x in values):
            raise ValueError("alpha: expected a float in [0, 1] or a non-empty tuple of them "
                             f"(one per head), got {a!r}")
        object.__setattr__(self, "alpha", tuple(float(x) for x in values)
                           if isinstance(a, tuple) else float(a))

    def text(self) -> str:
        """Canonical text: `hybrid(softmax=..., linear=linear(...), mix=alpha, alpha=0.5)`
        (a per-head alpha prints as a tuple)."""
        a = self.alpha
        alpha = ("(" + ", ".join(_fmt_float(x) for x in a) + ")" if isinstance(a, tuple)
                 else _fmt_float(a))
        return (f"hybrid(softmax={self.softmax.text()}, linear={self.linear.text()}, "
                f"mix=alpha, alpha={alpha})")

    def alpha_per_head(self, heads: int) -> tuple[float, ...]:
        """alpha for each of `heads` heads; ValueError when a per-head tuple has another length."""
        if not isinstance(self.alpha, tuple):
            return (self.alpha,) * heads
        if len(self.alpha) != heads:
            raise ValueError(f"alpha: expected one value per head ({heads}), got "
                             f"{len(self.alpha)}: {self.alpha!r}")
        return self.alpha

    @property
    def key(self) -> str:
        """sha256 hex digest of `text()`."""
        return hashlib.sha256(self.text().encode()).hexdigest()
