"""Random traced FlexAttention-style functions for the fuzz tests, as nested tuples.

int trees (indices b, h, q, kv; constants; `+ - * // % abs min max clamp torch.where`; reads
`tab[q_idx]` / `tab[kv_idx]` of a captured int table), bool trees (comparisons, `& | ~`) and
float trees over the score (`tanh sigmoid abs sqrt log clamp torch.where`, index terms).
`_ev` evaluates a tree with Python operators, so one tree is both the function attncc traces
and, on broadcast index tensors, its own brute force.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from tests.fuzz_support import Shape


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

# ---- traced functions: int / bool / float expression trees -------------------------------------

IDX = ("b", "h", "q", "kv")


def _int_leaf():
    """Indices, constants and reads of a captured int table `tab[q_idx]` / `tab[kv_idx]`
    (a data-dependent mask: the device block map)."""
    return st.one_of(st.sampled_from([(n,) for n in IDX] + [("q",), ("kv",)]),
                     st.tuples(st.just("c"), st.integers(-6, 9)),
                     st.tuples(st.sampled_from(["tq", "tkv"]), st.integers(0, 3)))


_TABLES: dict[tuple[int, int], torch.Tensor] = {}


def _table(seed: int, length: int) -> torch.Tensor:
    """int64[length] in [0, 5): one tensor object per (seed, length), so a traced function and
    its brute force read the same captured tensor."""
    if (seed, length) not in _TABLES:
        _TABLES[seed, length] = (torch.randint(0, 5, (length,), generator=_gen(seed)))
    return _TABLES[seed, length]


_FTABLES: dict[tuple[int, int, bool], torch.Tensor] = {}


def _ftable(seed: int, length: int, scalar: bool) -> torch.Tensor:
    """float32[length] (or a 0-d float32 when `scalar`): captured score data, one object per
    key (tensors read by a traced function are kernel arguments, never constants)."""
    key = (seed, length, scalar)
    if key not in _FTABLES:
        t = torch.randn(() if scalar else (length,), generator=_gen(seed + 7))
        _FTABLES[key] = (t)
    return _FTABLES[key]


def int_exprs(depth: int = 2):
    if depth == 0:
        return _int_leaf()
    sub = int_exprs(depth - 1)
    # attncc's verifier rejects a negative divisor by design
    divisor = st.integers(1, 7)
    return st.one_of(
        _int_leaf(),
        st.tuples(st.sampled_from(["+", "-", "*", "min", "max"]), sub, sub),
        st.tuples(st.sampled_from(["//", "%"]), sub, divisor),
        st.tuples(st.just("abs"), sub),
        st.tuples(st.just("clamp"), sub, st.integers(-5, 5), st.integers(5, 30)),
        # an int torch.where compared inside a condition becomes sympy's ITE
        st.tuples(st.just("where"), bool_exprs(depth - 1), sub, sub),
    )


def bool_exprs(depth: int = 2):
    cmp = st.tuples(st.sampled_from(["<", "<=", "==", "!=", ">", ">="]), int_exprs(depth),
                    int_exprs(depth))
    if depth == 0:
        return cmp
    sub = bool_exprs(depth - 1)
    return st.one_of(cmp, st.tuples(st.sampled_from(["&", "|"]), sub, sub),
                     st.tuples(st.just("~"), sub))


def float_exprs(depth: int = 2):
    """Float trees over the score; '*i' scales an int expression into a small float term."""
    leaf = st.one_of(st.just(("s",)), st.tuples(st.just("*i"), int_exprs(1),
                                                st.sampled_from([0.05, -0.1, 0.25])),
                     st.tuples(st.sampled_from(["fq", "fkv", "f0"]), st.integers(0, 3)))
    if depth == 0:
        return leaf
    sub = float_exprs(depth - 1)
    ops = [st.tuples(st.sampled_from(["+f", "-f"]), sub, sub),
           st.tuples(st.just("*c"), sub, st.sampled_from([0.5, -1.0, 2.0, 0.3])),
           st.tuples(st.sampled_from(["tanh", "sigmoid", "absf", "sqrt1", "log1"]), sub),
           st.tuples(st.just("wheref"), bool_exprs(1), sub, sub),
           st.tuples(st.just("clampf"), sub, st.sampled_from([-2.0, -0.5]),
                     st.sampled_from([0.5, 3.0]))]
    ops.append(st.tuples(st.just("exp"), sub))
    return st.one_of(leaf, *ops)


def _ev(node, env):
    """Evaluate a tree with Python operators: `env` maps b/h/q/kv/s to Traced values (tracing)
    or to broadcast torch tensors (brute force). Constant subtrees fold in plain Python."""
    op = node[0]
    if op in env:
        return env[op]
    if op == "c":
        return node[1]
    if op in ("tq", "tkv"):
        return _table(node[1], env["len"])[env["q" if op == "tq" else "kv"]]
    if op in ("fq", "fkv", "f0"):  # captured float data: a table read or a 0-d scalar
        t = _ftable(node[1], env["len"], op == "f0")
        t = t.double() if env["brute"] else t
        return t if op == "f0" else t[env["q" if op == "fq" else "kv"]]
    a = _ev(node[1], env) if len(node) > 1 and isinstance(node[1], tuple) else None
    py = not isinstance(a, torch.Tensor) and not hasattr(a, "expr")  # a plain Python value
    if op in ("+", "+f"):
        return a + _ev(node[2], env)
    if op in ("-", "-f"):
        return a - _ev(node[2], env)
    if op == "*":
        return a * _ev(node[2], env)
    if op == "//":
        return a // node[2]
    if op == "%":
        return a % node[2]
    if op in ("abs", "absf"):
        return abs(a)
    if op in ("min", "max"):
        b = _ev(node[2], env)
        bpy = not isinstance(b, torch.Tensor) and not hasattr(b, "expr")
        if py and bpy:
            return min(a, b) if op == "min" else max(a, b)
        if py or bpy:
            x, c = (b, a) if py else (a, b)
            return torch.clamp(x, max=c) if op == "min" else torch.clamp(x, min=c)
        return torch.minimum(a, b) if op == "min" else torch.maximum(a, b)
    if op in ("clamp", "clampf"):
        return min(max(a, node[2]), node[3]) if py else torch.clamp(a, node[2], node[3])
    if op in ("where", "wheref"):
        x, y = _ev(node[2], env), _ev(node[3], env)
        if py:
            return x if a else y
        if not isinstance(x, torch.Tensor) and not hasattr(x, "expr") and \
                not isinstance(y, torch.Tensor) and not hasattr(y, "expr") and \
                isinstance(a, torch.Tensor):  # brute force: torch.where wants one tensor
            x = torch.tensor(x)
        return torch.where(a, x, y)
    if op in ("<", "<=", "==", "!=", ">", ">="):
        b = _ev(node[2], env)
        return {"<": lambda: a < b, "<=": lambda: a <= b, "==": lambda: a == b,
                "!=": lambda: a != b, ">": lambda: a > b, ">=": lambda: a >= b}[op]()
    if op in ("&", "|"):
        b = _ev(node[2], env)
        if py and not isinstance(b, torch.Tensor) and not hasattr(b, "expr"):
            return (a and b) if op == "&" else (a or b)
        return (a & b) if op == "&" else (a | b)
    if op == "~":
        return (not a) if py else ~a
    if op == "*i":
        return a * node[2]
    if op == "*c":
        return a * node[2]
    if py and op in ("tanh", "sigmoid", "sqrt1", "log1", "exp"):
        a = torch.tensor(float(a), dtype=torch.float64)
    if op == "tanh":
        return torch.tanh(a)
    if op == "sigmoid":
        return torch.sigmoid(a)
    if op == "sqrt1":
        return torch.sqrt(abs(a) + 1.0)
    if op == "log1":
        return torch.log(abs(a) + 1.0)
    if op == "exp":
        return torch.exp(a)
    raise AssertionError(f"unknown node {node!r}")


def mask_fn(tree, shape: Shape, brute: bool = False):
    """The tree as a mask_mod; `brute`: run on index tensors, float data in fp64."""
    n = max(shape.Lq, shape.Lk)

    def fuzz_mask(b, h, q_idx, kv_idx):
        return _ev(tree, {"b": b, "h": h, "q": q_idx, "kv": kv_idx, "len": n, "brute": brute})
    return fuzz_mask


def score_fn(tree, shape: Shape, brute: bool = False):
    """The tree as a score_mod; `brute`: run on index tensors, float data in fp64."""
    n = max(shape.Lq, shape.Lk)

    def fuzz_score(score, b, h, q_idx, kv_idx):
        return _ev(tree, {"s": score, "b": b, "h": h, "q": q_idx, "kv": kv_idx, "len": n,
                          "brute": brute})
    return fuzz_score
