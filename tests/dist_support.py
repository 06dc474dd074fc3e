"""The harness of the multi-process context-parallel tests (tests/test_dist*.py).

`spawn_ranks` starts `world` processes with the spawn method, each running the test module's
`worker(rank, init_file, out_dir)`, waits for them with a deadline (a rank that hangs in a
collective fails the test instead of blocking the run) and returns each rank's JSON results.
`run_rank` is what a worker does: join a gloo group through a shared file, run every case
(an exception is reported, not raised, so the other ranks still finish), run the bad-input
checks, leave the group and write its results.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.distributed as dist

# the compiled kernels must run (interpreted), never the reference's slow path
REFERENCE_FALLBACK_WARNINGS = (".*runs the PyTorch reference", ".*running the PyTorch reference")


def run_rank(rank: int, world: int, init_file: str, out_dir: str, cases: Iterable[str],
             run_case: Callable[[str, int, Any], dict[str, float]],
             bad_inputs: Callable[[int, Any], dict[str, Any]]) -> None:
    for message in REFERENCE_FALLBACK_WARNINGS:
        warnings.filterwarnings("error", message=message)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    results: dict[str, Any] = {}
    for name in cases:
        start = time.time()
        try:
            results[name] = {"errors": run_case(name, rank, group)}
        except Exception:  # noqa: BLE001 - reported to the parent
            results[name] = {"exception": traceback.format_exc()}
        results[name]["seconds"] = round(time.time() - start, 2)
    results["bad-inputs"] = bad_inputs(rank, group)
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def spawn_ranks(worker: Callable[[int, str, str], None], world: int,
                deadline_s: float) -> list[dict[str, Any]]:
    mp = pytest.importorskip("torch.multiprocessing")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch")
    with tempfile.TemporaryDirectory() as tmp:
        # CPU tensors run the kernels under the interpreter, also on a machine with a GPU: the
        # children inherit the environment when they start (this process's is restored)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            ctx = mp.start_processes(worker, args=(os.path.join(tmp, "init"), tmp),
                                     nprocs=world, join=False, start_method="spawn")
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        deadline = time.time() + deadline_s
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} gloo processes did not finish in {deadline_s} s "
                            "(a rank hung in a collective?)")
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out.append(json.load(f))
    return out


def try_calls(calls: dict[str, Callable[[], Any]], group: Any) -> dict[str, str]:
    """Run each bad-input call on this rank and record how it ended ("no error" or
    "<ExceptionType>: <message>"); then one all-reduce shows the group is still usable: no rank
    was left waiting in a collective."""
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - reported; the test asserts on the text
            out[name] = f"{type(e).__name__}: {e}"
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    out["after"] = f"all_reduce {t.item()}"
    return out
