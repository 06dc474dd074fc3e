"""What the serving path's always-on index checks cost in a paged decode step.

    python -m benchmarks.decode_checks            # CUDA GPU: decode shapes, do_bench medians
    python -m benchmarks.decode_checks --smoke    # CPU (Triton interpreter), tiny shapes

The decode benchmark family of `benchmarks.run` has not landed (`workloads.PENDING`), so this
is its own small table. For each shape it times `attn.run(plan, ...)` with the checks (the
kernel's CHECK constexpr: clamped page ids and lengths plus the error record, then one
`torch._assert_async` on that record) and without them (`serving_run._unchecked`, the old
unchecked kernel and no assert; a switch for this measurement only), and, on its own, the host
time of the check after the launch (`serving_run.raise_errors`: the one async assert), which is
the whole host-side cost a GPU pays, next to the host time of a whole run() with its kernel
launches stubbed out (argument assembly and checks of shapes). Both runs' outputs must be
equal, or the row fails. Under the interpreter the kernel runs on the CPU and its time says
nothing about a GPU; the host-side columns do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# (B, Hq, Hkv, D, page size, kv length): a decode step (Lq = 1) over a paged cache
SHAPES = ((32, 32, 8, 128, 16, 4096), (8, 32, 8, 128, 16, 32768), (128, 32, 8, 128, 16, 1024))
SMOKE_SHAPES = ((2, 4, 2, 16, 16, 40),)


@dataclass(frozen=True)
class Row:
    shape: tuple[int, ...]
    checked_us: float  # run() with the checks, µs per call
    unchecked_us: float  # run() without them
    host_check_us: float  # the host-side check after the launch, on its own
    host_run_us: float  # run() with its launches stubbed out (what the host does per call)

    @property
    def overhead(self) -> float:
        return self.checked_us / self.unchecked_us - 1.0


def _median_us(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def _inputs(shape: tuple[int, ...], device: str) -> tuple:
    B, Hq, Hkv, D, P, L = shape
    g = torch.Generator().manual_seed(0)
    pages = -(-L // P)
    dt = torch.float16 if device == "cuda" else torch.float32
    kc = torch.randn(B * pages, P, Hkv, D, generator=g).to(device, dt)
    vc = torch.randn(B * pages, P, Hkv, D, generator=g).to(device, dt)
    table = torch.randperm(B * pages, generator=g).view(B, pages).int().to(device)
    kv_len = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dt)
    return q, kc, vc, table, kv_len


def measure(shape: tuple[int, ...], device: str, reps: int) -> Row:
    import attncc
    from attncc.backends.triton import serve_run as serving_run
    from attncc.backends.triton.serve import FIXED_ARGS

    B, Hq, Hkv, D, P, _ = shape
    q, kc, vc, table, kv_len = _inputs(shape, device)
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(P)))
    plan = attn.plan(batch=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                     max_pages=table.shape[1], dtype=q.dtype, device=device)

    def step() -> None:
        attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)

    def unchecked_step() -> None:
        with serving_run._unchecked():
            step()

    step()
    checked = plan.o.clone()
    unchecked_step()
    if not torch.equal(plan.o, checked):
        raise AssertionError(f"{shape}: the checked and unchecked runs disagree")
    if device == "cuda":
        from benchmarks.harness import cuda_timer
        checked_us, unchecked_us = cuda_timer(step) * 1e3, cuda_timer(unchecked_step) * 1e3
    else:  # interleaved, so that the load of a shared machine drifts alike for both
        pairs = [(_median_us(step, 1), _median_us(unchecked_step, 1)) for _ in range(reps)]
        checked_us, unchecked_us = (sorted(x)[reps // 2] for x in zip(*pairs))
    args = {n: 0 for n, _ in FIXED_ARGS} | {"num_pages": kc.shape[0], "kv_cap": 0,
                                            "cap_what": ""}
    host_us = _median_us(lambda: serving_run.raise_errors(plan, args), max(reps, 1000))
    launch = serving_run.launch
    serving_run.launch = lambda *a, **kw: None  # the host's own work: no kernel runs
    try:
        host_run_us = _median_us(step, max(reps, 1000))
    finally:
        serving_run.launch = launch
    return Row(shape, checked_us, unchecked_us, host_us, host_run_us)


def table(rows: list[Row], device: str) -> str:
    lines = [f"paged decode (causal, Lq = 1) on {device}: run() per call, with / without the "
             "index checks",
             "| B | Hq | Hkv | D | P | kv_len | checked µs | unchecked µs | overhead | "
             "host check µs | host run() µs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(map(str, r.shape)) + f" | {r.checked_us:.1f} | "
                     f"{r.unchecked_us:.1f} | {100 * r.overhead:+.1f}% | "
                     f"{r.host_check_us:.2f} | {r.host_run_us:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per median (CPU)")
    args = parser.parse_args(argv)
    if args.smoke:  # before attncc loads: its kernels run under Triton's CPU interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("the decode timings need a CUDA GPU; use --smoke on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    rows = [measure(s, device, args.reps) for s in (SMOKE_SHAPES if args.smoke else SHAPES)]
    print(table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
