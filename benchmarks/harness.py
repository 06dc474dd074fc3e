"""Check, then time: every output is compared with attncc's reference before it is timed.

The reference is `attncc.backends.reference.forward.attention_reference` on the same inputs: fp32 on a
GPU (fp64 is too slow at L = 32K; TF32 is off), fp64 on a CPU. It is computed for batch element 0
(all heads, all rows) and each implementation's output for that element is compared with it:
elementwise `|o - ref| <= atol + rtol * |ref|` (TOLERANCES, by the inputs' dtype). An output that
fails, or is not finite, is recorded as "wrong" with its max |o - ref| and is NOT timed.

Timing (CUDA): `triton.testing.do_bench`, median, with `rep` stretched so that at least MIN_REPS
timed runs happen (do_bench runs about rep / estimate of them; it also clears L2 between runs).
In smoke mode there is no timer: "ms" stays null.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from attncc.backends.reference.forward import attention_reference
from attncc.ir.reorder import inverse
from benchmarks.flops import mask_stats
from benchmarks.peers import Impl, Unavailable
from benchmarks.workloads import Case

TOLERANCES = {"bfloat16": (2e-2, 2e-2), "float16": (1e-2, 1e-2), "float32": (1e-4, 1e-4)}
MIN_REPS = 20
CHECKED_ON = "batch element 0, all heads, all rows"

Timer = Callable[[Callable[[], Any]], float]


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def reference(case: Case) -> torch.Tensor:
    """o [1, H, L, D] of batch element 0, in the case's token order (fp32 on CUDA, else fp64)."""
    cuda = case.q.device.type == "cuda"
    dtype = torch.float32 if cuda else torch.float64
    q, k, v = (t[:1].to(dtype) for t in (case.q, case.k, case.v))
    perm = case.variant.perm
    if perm is not None:  # the reference takes tokens in the original order
        inv = inverse(perm)
        q, k, v = (t[:, :, inv] for t in (q, k, v))
    spec = case.variant.spec
    captures = {c.name: c.tensor.to(q.device) for c in spec.captures}
    chunks = {"q_chunk": 512, "kv_chunk": 4096} if cuda else {}
    with _no_tf32():
        o, _ = attention_reference(spec, q, k, v, captures=captures, **chunks)
    return o[:, :, perm] if perm is not None else o


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> tuple[bool, float | None]:
    """(passes, max |out - ref|); a non-finite output fails with max error None."""
    atol, rtol = TOLERANCES[dtype]
    out = out.to(ref.dtype)
    if out.shape != ref.shape:
        return False, None
    if not bool(torch.isfinite(out).all()):
        return False, None
    err = (out - ref).abs()
    return bool((err <= atol + rtol * ref.abs()).all()), float(err.max())


def _failure(e: BaseException, caught: Sequence[warnings.WarningMessage]) -> dict[str, Any]:
    """An exception from preparing or the first call, as an entry; SDPA says why a backend
    refused in warnings, so they join the reason."""
    if isinstance(e, Unavailable):
        return {"status": "unavailable", "reason": str(e)}
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    first = (str(e).strip().splitlines() or [""])[0]
    notes = list(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                               if str(w.message).strip()))
    reason = f"{type(e).__name__}: {first}" + "".join(f"; {n}" for n in notes)
    status = "unavailable" if "No available kernel" in first else "error"
    return {"status": status, "reason": reason[:600]}


def measure(impl: Impl, case: Case, ref: torch.Tensor, flops: int,
            timer: Timer | None) -> dict[str, Any]:
    """One entry: prepare, run once, check against `ref`, and only then time."""
    entry: dict[str, Any] = {"status": "ok", "ms": None, "tflops": None, "max_err": None,
                             "reason": None}
    caught: list[warnings.WarningMessage] = []
    try:
        prepared = impl.prepare(case)
        entry.update(prepared.info)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = prepared.fn()
    except Exception as e:  # noqa: BLE001 - recorded in the entry, with its reason
        entry.update(_failure(e, caught))
        return entry
    for w in caught:  # a successful first call keeps its warnings visible
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ok, err = compare(out[:1], ref, case.shape.dtype)
    entry["max_err"] = err
    if not ok:
        atol, rtol = TOLERANCES[case.shape.dtype]
        what = "non-finite output" if err is None else f"max |o - ref| = {err:.3g}"
        entry.update(status="wrong", reason=f"{what}: outside atol {atol} + rtol {rtol} "
                     "x |ref|; not timed")
        return entry
    del out
    if timer is not None:
        try:
            ms = float(timer(prepared.fn))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while timing
            entry.update(_failure(e, []))
            entry["reason"] = f"checked ok, then timing failed: {entry['reason']}"
            return entry
        entry.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
    return entry


def run_case(case: Case, impls: Sequence[Impl], timer: Timer | None) -> dict[str, Any]:
    """The result of one workload at one shape: its useful work and an entry per implementation
    (the first is attncc; `speedup[peer]` = peer ms / attncc ms where both were timed)."""
    start = time.perf_counter()
    stats = mask_stats(case)
    ref = reference(case)
    entries = {impl.name: measure(impl, case, ref, stats["flops"], timer) for impl in impls}
    base = entries[impls[0].name]["ms"]
    speedup = {name: e["ms"] / base for name, e in entries.items()
               if name != impls[0].name and base and e["ms"]}
    return {"workload": case.workload.name, "family": case.workload.family,
            "about": case.workload.about, "shape": case.shape.as_dict(),
            "params": case.variant.params, **stats, "entries": entries, "speedup": speedup,
            "seconds": round(time.perf_counter() - start, 3)}


def cuda_timer(fn: Callable[[], Any]) -> float:
    """Median ms of `fn` over at least MIN_REPS timed runs (do_bench, after its warm-up)."""
    from triton.testing import do_bench
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    rep = max(100.0, 2.0 * MIN_REPS * estimate)
    ms = float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))
    if not math.isfinite(ms) or ms <= 0:
        raise RuntimeError(f"do_bench returned {ms}")
    return ms
