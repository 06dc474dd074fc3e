"""Host time of attncc calls whose kernel is cached, measured without a GPU.

    python -m benchmarks.host_overhead [--cache-dir DIR] [--out FILE] [--calls N]

A fake CUDA driver (`benchmarks.fake_cuda`) stands in for the GPU: kernels are built for sm_90
into a cache directory first (as `attncc build` does), then new processes launch them from CPU
tensors, so everything a call does runs for real except the driver's own calls (module load,
`cuLaunchKernel`). Measured, in microseconds per call (best and median of several rounds):

- eager `attn(q, k, v)`: dense causal, a document mask (captured doc ids), a sliding window
  given its window as a runtime value on every call, and a score mod (causal + soft-cap);
- the raw launch alone: Triton's `CompiledKernel[grid](*arguments)` for the causal kernel
  (what any launcher pays), and attncc's checked `DirectKernel.__call__` (a variant's first
  launch; later ones hand the same arguments to the binary positionally);
- serving `plan` and `run` (paged decode, causal; `run` compiled by Triton's JIT at the first
  run, later runs launching the binary it returned with the remembered arguments);

and, each in a fresh process: `import torch`, `import attncc` beyond it (and `-X importtime`'s
self time of what it loads, by package), and the first call (compile + first launch) with the
cache warm. CPU times are this thread's (robust to other processes on the cores, though a
loaded machine still slows them); the load average before and after is recorded. Results go to
benchmarks/results/host_overhead-<machine>.json with this machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
B, H, L, D = 1, 4, 256, 64
ROUNDS = 7
# paged decode: batch, query heads, kv heads, page size, pages per request (head dim D)
SERVE = {"B": 8, "Hq": 32, "Hkv": 8, "P": 16, "M": 64}


def specs() -> dict[str, Any]:
    import torch

    import attncc
    doc = torch.arange(L, dtype=torch.int32) // 100  # three documents
    return {"causal": attncc.Attention(mask=attncc.causal()),
            "document": attncc.Attention(mask=attncc.document(doc)),
            "sliding_window": attncc.Attention(mask=attncc.sliding_window(64)),
            "softcap": attncc.Attention(mask=attncc.causal(), score=attncc.softcap(30.0))}


def build(cache_dir: str) -> None:
    """sm_90 fp16 d64 binaries of every benchmarked spec (what `attncc build` makes)."""
    import attncc
    from attncc import config
    from attncc.backends.triton import build as triton_build
    from attncc.backends.triton import prebuilt

    with config.override(ATTNCC_CACHE_DIR=cache_dir):
        for spec in specs().values():
            forward = attncc.compile(spec).kernels.kernel
            for target in triton_build.build_targets(forward, "float16", D, D, 90):
                prebuilt.load_or_compile_target(target)


def per_call(fn: Callable[[], Any], calls: int) -> dict[str, float]:
    """Microseconds per call of `fn` over ROUNDS rounds of `calls` calls: the CPU time of this
    thread (what the host path costs; robust to other processes sharing the cores) and the
    wall time (which includes being descheduled), best and median of the rounds."""
    fn()
    cpu, wall = [], []
    for _ in range(ROUNDS):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(calls):
            fn()
        cpu.append((time.thread_time_ns() - c0) / calls / 1e3)
        wall.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return {"cpu_best_us": round(min(cpu), 2), "cpu_median_us": round(statistics.median(cpu), 2),
            "wall_best_us": round(min(wall), 2),
            "wall_median_us": round(statistics.median(wall), 2)}


def child_calls(calls: int) -> dict[str, Any]:
    import torch

    import attncc
    from attncc.backends.triton import direct

    from benchmarks import fake_cuda
    fake_cuda.install()
    q, k, v = (torch.randn(B, H, L, D).half() for _ in range(3))
    out: dict[str, Any] = {}
    compiled = {name: attncc.compile(spec) for name, spec in specs().items()}
    runs = {"causal": lambda: compiled["causal"](q, k, v, backend="triton"),
            "document": lambda: compiled["document"](q, k, v, backend="triton"),
            "sliding_window": lambda: compiled["sliding_window"](q, k, v, backend="triton",
                                                                 window=128),
            "softcap": lambda: compiled["softcap"](q, k, v, backend="triton")}
    # the raw launch: the causal call's own kernel and arguments, captured at its first launch
    # (later launches of that variant hand the same arguments over positionally)
    seen: list = []
    original = direct.DirectKernel.__call__
    direct.DirectKernel.__call__ = lambda self, grid, values: seen.append((self, grid, values))
    runs["causal"]()
    direct.DirectKernel.__call__ = original
    kernel, grid, values = seen[0]
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    arguments = [values[name] for name in kernel.spec.signature]
    for name, fn in runs.items():
        fn()  # the first call builds (block maps, positions) what later calls reuse
        before = fake_cuda.LAUNCHES[0]
        fn()
        launches = fake_cuda.LAUNCHES[0] - before
        out[f"eager_{name}"] = per_call(fn, calls) | {"launches_per_call": launches}

    out.update(serving_calls(calls))
    out["launch_triton_compiled_kernel"] = per_call(
        lambda: kernel.compiled[grid3](*arguments), calls)
    out["launch_attncc_direct_kernel"] = per_call(lambda: kernel(grid, values), calls)
    out["fake_driver_launches"] = fake_cuda.LAUNCHES[0]
    return out


def serving_calls(calls: int) -> dict[str, Any]:
    """Paged decode (causal, fp16): `plan` (all host work: work list, splits, buffers) and
    `run` (checks, arguments, the forward launch and the merge launch when the plan splits,
    the index-check assert), compiled by Triton's JIT for the fake sm_90 at the first run;
    later runs of the same input geometry launch that binary positionally."""
    import torch

    import attncc
    from benchmarks import fake_cuda
    serve = attncc.compile(attncc.Attention(mask=attncc.causal(),
                                            memory=attncc.paged(SERVE["P"])))
    Bs, Hq, Hkv, P, M = (SERVE[n] for n in ("B", "Hq", "Hkv", "P", "M"))
    k_cache, v_cache = (torch.randn(Bs * M, P, Hkv, D).half() for _ in range(2))
    page_table = torch.arange(Bs * M, dtype=torch.int32).view(Bs, M)
    kv_len = torch.full((Bs,), M * P - 5, dtype=torch.int32)
    q = torch.randn(Bs, Hq, 1, D).half()
    make = lambda: serve.plan(batch=Bs, num_heads=Hq, num_kv_heads=Hkv,  # noqa: E731
                              head_dim=D, max_q_len=1, max_pages=M, dtype=torch.float16,
                              device="cpu")
    plan = make()
    run = lambda: serve.run(plan, q, k_cache, v_cache, page_table=page_table,  # noqa: E731
                            kv_len=kv_len)
    run()  # compiles
    before = fake_cuda.LAUNCHES[0]
    run()
    launches = fake_cuda.LAUNCHES[0] - before
    return {"serve_plan": per_call(make, max(calls // 10, 1)),
            "serve_run": per_call(run, calls) | {"launches_per_call": launches,
                                                 "num_splits": plan.num_splits}}


def child_first_call() -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    import attncc
    t2 = time.perf_counter()
    from benchmarks import fake_cuda
    fake_cuda.install()
    q, k, v = (torch.randn(B, H, L, D).half() for _ in range(3))
    t3, c3 = time.perf_counter(), time.process_time()
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))  # as a user writes it
    t4, c4 = time.perf_counter(), time.process_time()
    attn(q, k, v, backend="triton")
    t5, c5 = time.perf_counter(), time.process_time()
    attn(q, k, v, backend="triton")
    t6 = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1e3, 2)  # noqa: E731
    return {"import_torch_ms": ms(t0, t1), "import_attncc_ms": ms(t1, t2),
            "compile_ms": ms(t3, t4), "first_call_ms": ms(t4, t5),
            "compile_and_first_call_ms": ms(t3, t5), "second_call_ms": ms(t5, t6),
            "compile_cpu_ms": ms(c3, c4), "first_call_cpu_ms": ms(c4, c5),
            "compile_and_first_call_cpu_ms": ms(c3, c5)}


def child_import() -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    import torch  # noqa: F401
    t1, c1 = time.perf_counter(), time.process_time()
    import attncc  # noqa: F401
    t2, c2 = time.perf_counter(), time.process_time()
    ms = lambda a, b: round((b - a) * 1e3, 2)  # noqa: E731
    return {"import_torch_ms": ms(t0, t1), "import_attncc_ms": ms(t1, t2),
            "import_torch_cpu_ms": ms(c0, c1), "import_attncc_cpu_ms": ms(c1, c2)}


def import_breakdown(env: dict[str, str]) -> dict[str, float]:
    """`python -X importtime`: the self time (ms) of every module `import attncc` loads after
    torch, summed by top-level package (sympy, triton, attncc itself, ...)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import attncc"],
                         env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300,
                         check=True)
    rows = [line[len("import time:"):].split("|") for line in run.stderr.splitlines()
            if line.startswith("import time:") and "cumulative" not in line]
    end_of_torch = max(i for i, r in enumerate(rows) if r[2].rstrip() == " torch")
    totals: dict[str, float] = {}
    for self_us, _, name in rows[end_of_torch + 1:]:
        package = name.strip().split(".")[0]
        totals[package] = totals.get(package, 0) + int(self_us) / 1e3
    top = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"total_ms": round(sum(totals.values()), 1),
            **{name: round(ms, 1) for name, ms in top if ms >= 1}}


def in_child(what: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--child", what,
                          *extra], env=env, cwd=HERE.parent, capture_output=True, text=True,
                         timeout=900, check=False)
    if run.returncode:
        raise RuntimeError(f"{what} child failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def median_of(records: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in records), 2) for key in records[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="kernel cache (default: a temp dir)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/"
                        "host_overhead-<machine>.json)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing round")
    parser.add_argument("--fresh", type=int, default=5, help="fresh processes per cold figure")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        record = {"calls": lambda: child_calls(args.calls), "first": child_first_call,
                  "import": child_import}[args.child]()
        print(json.dumps(record))
        return

    from benchmarks import environment
    load_before = os.getloadavg()  # other processes on these cores inflate every figure
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="attncc-host-")
    env = dict(os.environ, ATTNCC_CACHE_DIR=cache_dir, TRITON_INTERPRET="0",
               TRITON_CACHE_DIR=str(Path(cache_dir) / "triton"), OMP_NUM_THREADS="1",
               ATTNCC_OFFLINE="1")  # a call that would compile fails instead of being timed
    build_in_child(env, cache_dir)
    calls = in_child("calls", env, "--calls", str(args.calls))
    imports = median_of([in_child("import", env) for _ in range(args.fresh)])
    breakdown = import_breakdown(env)
    first = median_of([in_child("first", env) for _ in range(args.fresh)])
    device = environment.device_info("cpu")
    result = {"benchmark": "host_overhead", "date": environment.now(),
              "machine": device | {"cores": os.cpu_count(), "gpu": "none: fake CUDA driver"},
              "versions": environment.versions(), "git": environment.git(),
              "shape": {"B": B, "H": H, "L": L, "D": D, "dtype": "float16", "arch": "sm_90"},
              "serving_shape": SERVE | {"D": D, "Lq": 1},
              "load_average": {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]},
              "per_call": calls, "import": imports,
              "import_self_ms_by_package": breakdown, "first_call_warm_cache": first}
    out = Path(args.out) if args.out else (
        HERE / "results" / f"host_overhead-{environment.slug(device['name'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


def build_in_child(env: dict[str, str], cache_dir: str) -> None:
    """Build in its own process (normal, no fake driver), so the timed processes start cold."""
    script = ("import sys; from benchmarks.host_overhead import build; build(sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, cache_dir], env=dict(env, ATTNCC_OFFLINE="0"),
                   cwd=HERE.parent, check=True)


if __name__ == "__main__":
    main()
