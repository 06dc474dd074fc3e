"""Shared pieces of the property-based (hypothesis) tests `tests/test_fuzz_*.py`.

Profiles: `attncc-ci` (the default: few examples per test, derandomized so CI is reproducible,
no example database, the whole fuzz suite in about a minute on two cores) and `attncc-long`
(`ATTNCC_FUZZ=long`: thousands of random examples, `ATTNCC_FUZZ_EXAMPLES=n` per test instead,
failures kept in `.hypothesis/` and replayed first next time).

Every defect class these tests found (named-mask query alignment, traced-function gaps, a
block map reused for a fresh tensor at a freed one's address, broadcast biases, ITE, `// 1` of
an int read) is fixed; their shrunk failures stay as explicit `@example`s (`regressions`), and
captured tensors are freed between examples so address reuse keeps being exercised.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, Phase, example, settings

settings.register_profile(
    "attncc-ci", max_examples=10, deadline=None, derandomize=True, database=None,
    # no shrinking in CI: an example costs 0.1-1 s; failures shrink under the long profile
    print_blob=False, phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "attncc-long", max_examples=2000, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the database (failures replayed first next time) only under the long profile
LONG = os.environ.get("ATTNCC_FUZZ", "") == "long"
PROFILE = settings.get_profile("attncc-long" if LONG else "attncc-ci")

def regressions(*cases: tuple):
    """`@example(case)` for each case: shrunk failures found by these tests, kept as
    regressions that run in every profile."""
    def apply(test):
        for case in reversed(cases):
            test = example(case)(test)
        return test
    return apply


def fuzz_settings(ci_examples: int, long_examples: int = 2000) -> settings:
    """The active profile with a per-test example count (`ATTNCC_FUZZ_EXAMPLES` overrides the
    long profile's, to fit a time budget)."""
    if not LONG:
        return settings(PROFILE, max_examples=ci_examples)
    return settings(PROFILE, max_examples=int(os.environ.get("ATTNCC_FUZZ_EXAMPLES",
                                                             long_examples)))


def log_example(test: str, case: object) -> None:
    """With `ATTNCC_FUZZ_LOG=path`, append one line per example run (long runs cut short by a
    timeout still say how many examples ran, and the last one shows what was running)."""
    path = os.environ.get("ATTNCC_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{test}\t{case!r}\n")


DTYPES = {"float16": torch.float16, "float32": torch.float32}
# max |error| allowed against fp64 on inputs already rounded to the dtype (atol = rtol):
# fp32 runs IEEE fp32 dots; fp16 rounds p to fp16 before p @ v (o), lse stays fp32.
TOL = {"float32": (3e-5, 3e-5), "float16": (3e-3, 2e-4)}


class Shape(NamedTuple):
    """One call's geometry. layout: bhsd | bshd; strides: contig | dstride2 (every tensor's
    head dim has stride 2) | padded (a slice of a longer sequence and more heads); tiles:
    (block_m, block_n), or None for the interpreter's default 64 x 64 (one tile at L <= 40:
    small tiles make the tile classification and skipping run)."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    dtype: str
    layout: str
    strides: str
    scale: float | None
    tiles: tuple[int, int] | None = None


def _place(t: torch.Tensor, layout: str, strides: str, gen: torch.Generator) -> torch.Tensor:
    """t is BHSD; return it in `layout` with the requested stride pattern (same values)."""
    if strides == "dstride2":
        big = torch.randn(*t.shape[:-1], 2 * t.shape[-1], generator=gen, dtype=t.dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    elif strides == "padded":
        B, H, L, D = t.shape
        big = torch.randn(B, H + 1, L + 3, D, generator=gen, dtype=t.dtype)
        big[:, 1:, 2:L + 2] = t
        t = big[:, 1:, 2:L + 2]
    return t.transpose(1, 2) if layout == "bshd" else t


def make_qkv(shape: Shape, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as the kernel gets them (dtype, layout, strides) and their fp64 BHSD values."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[shape.dtype]
    q = torch.randn(shape.B, shape.Hq, shape.Lq, shape.D, generator=gen).to(dt)
    k = torch.randn(shape.B, shape.Hkv, shape.Lk, shape.D, generator=gen).to(dt)
    v = torch.randn(shape.B, shape.Hkv, shape.Lk, shape.Dv, generator=gen).to(dt)
    placed = [_place(t, shape.layout, shape.strides, gen) for t in (q, k, v)]
    return (*placed, q.double(), k.double(), v.double())


def to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def dense_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                  s_mod, scale: float | None, sink: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force fp64 softmax attention (CATALOG Section 0), independent of attncc.

    allowed: bool broadcastable to [B, Hq, Lq, Lk]; s_mod maps the scaled scores
    [B, Hq, Lq, Lk] to the modified ones (or None); sink: float[Hq] (N2)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kf = torch.stack([k[:, h // group] for h in range(Hq)], 1)
    vf = torch.stack([v[:, h // group] for h in range(Hq)], 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q, kf)
    if s_mod is not None:
        s = s_mod(s).expand(B, Hq, Lq, Lk).to(torch.float64)
    m = allowed.expand(B, Hq, Lq, Lk) & (s > -math.inf)
    s = torch.where(m, s, torch.full_like(s, -math.inf))
    zero = torch.zeros(B, Hq, Lq, dtype=torch.float64)
    top = torch.where(m.any(-1), s.amax(-1), zero) if Lk else zero
    e = torch.where(m, torch.exp(s - top[..., None]), torch.zeros_like(s))
    den = e.sum(-1)
    if sink is not None:
        den = den + torch.exp(sink.double().view(1, Hq, 1) - top)
    ok = den > 0
    safe = torch.where(ok, den, torch.ones_like(den))
    o = torch.where(ok[..., None], torch.einsum("bhqk,bhkd->bhqd", e, vf) / safe[..., None],
                    torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float64))
    lse = torch.where(ok, torch.log(safe) + top, torch.full_like(den, -math.inf))
    return o, lse


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got = got.double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's output"
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
