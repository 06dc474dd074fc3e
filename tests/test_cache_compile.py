"""The kernel cache end to end, through `attncc.compile`: a new process renders and builds
nothing, four racing processes leave one entry, a truncated source is rebuilt, and a runtime
parameter never re-renders, reloads or (with `do_not_specialize`) recompiles the kernel.

Subprocesses run with TRITON_INTERPRET=1 so the kernel itself runs on the CPU; in-process tests
set it with monkeypatch before the kernel module is loaded (Triton reads it at `@triton.jit`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attncc
from attncc.backends import cache
from attncc.backends.triton import render as triton_render
from attncc.backends.reference.forward import attention_reference
from attncc.backends.triton.render import kernel_arguments

# The child compiles the spec, runs the kernel once and checks it against the fp64 reference.
CHILD = textwrap.dedent("""
    import json, os, sys, time, warnings
    warnings.simplefilter("error")  # a silent fall-back to the reference path would fail here
    import torch
    import attncc
    from attncc.backends import cache
    from attncc.backends.triton import render as triton_render
    from attncc.backends.reference.forward import attention_reference

    go = os.environ.get("GO_FILE")
    deadline = time.time() + 60
    while go and not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.005)  # start line: racing children compile at the same moment
    spec = attncc.Attention(mask=attncc.sliding_window(5), score=attncc.softcap(20.0))
    attn = attncc.compile(spec)
    torch.manual_seed(int(sys.argv[1]))
    q, k, v = (torch.randn(1, 1, 17, 16) for _ in range(3))
    o = attn(q, k, v)
    ref, _ = attention_reference(spec, q.double(), k.double(), v.double())
    print(json.dumps({
        "renders": triton_render.RENDERS[0], "hits": cache.stats.hits,
        "builds": cache.stats.builds, "rebuilt": cache.stats.rebuilt_corrupt,
        "err": (o.double() - ref).abs().max().item(), "entry": str(attn.kernels.kernel.entry.path),
        "runner": type(attn.kernels.kernel.jit_function()).__name__,
    }))
""")


def child_env(root: Path, **extra: str) -> dict[str, str]:
    # one thread each: four children share the CPU cores with whatever else runs
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(root), TRITON_INTERPRET="1",
               TRITON_CACHE_DIR=str(root / "triton"), OMP_NUM_THREADS="1", **extra)
    return env


def start(root: Path, seed: int, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(seed)], env=child_env(root, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"child failed:\n{err[-4000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["runner"] == "InterpretedFunction"  # the Triton kernel ran, not the reference
    assert result["err"] < 1e-4, result
    return result


def entry_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "kernels").iterdir())


def test_new_process_renders_and_builds_nothing(tmp_path):
    first = finish(start(tmp_path, seed=1))
    second = finish(start(tmp_path, seed=2))
    assert (first["renders"], first["builds"], first["hits"]) == (1, 1, 0)
    assert second["renders"] == 0 and second["builds"] == 0 and second["hits"] >= 1
    assert first["entry"] == second["entry"]
    assert entry_dirs(tmp_path) == [Path(first["entry"]).name]


def test_four_racing_processes_leave_one_valid_entry(tmp_path):
    go = tmp_path / "go"
    procs = [start(tmp_path, seed=i, GO_FILE=str(go)) for i in range(4)]
    go.touch()
    results = [finish(p) for p in procs]
    assert sum(r["builds"] for r in results) == 1, results
    assert sum(r["renders"] for r in results) == 1, results
    assert all(r["builds"] == 1 or r["hits"] >= 1 for r in results), results
    assert len({r["entry"] for r in results}) == 1
    assert entry_dirs(tmp_path) == [Path(results[0]["entry"]).name]  # no stray .tmp dirs
    (entry,) = cache.list_entries(tmp_path)
    assert str(entry.path) == results[0]["entry"]


# --- in-process -----------------------------------------------------------------------------

@pytest.fixture
def interpreted(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cache.reset_stats()
    yield tmp_path
    cache.reset_stats()


def run_and_check(attn: attncc.CompiledAttention, seed: int = 0, **runtime) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=g) for _ in range(3))
    o = attn(q, k, v, **runtime)
    ref, _ = attention_reference(attn.spec, q.double(), k.double(), v.double(), params=runtime)
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=0)
    return o


def test_truncated_source_is_detected_and_rebuilt(interpreted):
    spec = attncc.Attention(mask=attncc.causal(), score=attncc.softcap(20.0))
    renders = triton_render.RENDERS[0]
    entry = attncc.compile(spec).kernels.kernel.entry
    source = entry.files["kernel.py"].read_bytes()
    entry.files["kernel.py"].write_bytes(source[: len(source) // 2])

    with pytest.warns(UserWarning, match=r"corrupt \(kernel.py does not match.*rebuilding"):
        attn = attncc.compile(spec)
    assert (cache.stats.builds, cache.stats.rebuilt_corrupt) == (2, 1)
    assert triton_render.RENDERS[0] == renders + 2
    assert attn.kernels.kernel.entry.path == entry.path and attn.kernels.kernel.entry.built
    assert entry.files["kernel.py"].read_bytes() == source
    assert entry_dirs(interpreted) == [entry.path.name]
    run_and_check(attn)


def _do_not_specialize(source: str, kernel: str) -> tuple[list[str], list[str]]:
    """(names listed in the kernel's `do_not_specialize`, the kernel's parameter names)."""
    fn = next(n for n in ast.walk(ast.parse(source))
              if isinstance(n, ast.FunctionDef) and n.name == kernel)
    (jit,) = [d for d in fn.decorator_list if isinstance(d, ast.Call)]
    (kw,) = [k for k in jit.keywords if k.arg == "do_not_specialize"]
    return [ast.literal_eval(e) for e in kw.value.elts], [a.arg for a in fn.args.args]


def test_every_runtime_scalar_is_unspecialised(interpreted):
    doc = torch.tensor([0, 0, 1, 1, 1, 2])
    attn = attncc.compile(attncc.Attention(mask=attncc.document(doc) & attncc.sliding_window(3),
                                           score=attncc.softcap(20.0)))
    scalars = {n for n, kind in kernel_arguments(attn.plan) if not kind.startswith("*")}
    assert {"p_window", "p_softcap"} <= scalars and len(scalars) > 2  # + doc's strides, sizes
    listed, params = _do_not_specialize(attn.kernels.kernel.source, attn.kernels.kernel.name)
    assert scalars | {"Lq", "Lk"} <= set(listed) <= set(params)


def test_runtime_parameter_reuses_the_kernel(interpreted, monkeypatch):
    renders = triton_render.RENDERS[0]
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(4)))
    triton, jit_fn = attn.kernels.kernel, attn.kernels.kernel.jit_function()
    outs = [run_and_check(attn), run_and_check(attn, window=2), run_and_check(attn, window=9)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert attn.kernels.kernel is triton and attn.kernels.kernel.jit_function() is jit_fn
    # another window at compile time is the same kernel: a cache hit, nothing rendered
    other = attncc.compile(attncc.Attention(mask=attncc.sliding_window(9)))
    assert other.kernels.kernel.entry.path == triton.entry.path
    assert not other.kernels.kernel.entry.built
    assert triton_render.RENDERS[0] == renders + 1 and cache.stats.builds == 1
    assert [e.path for e in cache.list_entries()] == [triton.entry.path]

    # the rendered source keeps the runtime scalars out of Triton's specialisation key
    listed, params = _do_not_specialize(triton.source, triton.name)
    assert {"Lq", "Lk", "p_window"} <= set(listed) and set(listed) <= set(params)
    assert "p_window" in jit_fn.kwargs["do_not_specialize"]  # as the interpreter loaded it
    # and a compiling (non-interpreted) @triton.jit resolves the names to those parameters
    monkeypatch.delenv("TRITON_INTERPRET")
    name = f"attncc_test_kernels.{triton.name}"
    spec = importlib.util.spec_from_file_location(name, triton.entry.files["kernel.py"])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    compiled_fn = getattr(module, triton.name)
    assert type(compiled_fn).__name__ == "JITFunction"
    unspecialised = {p.name for p in compiled_fn.params if p.do_not_specialize}
    assert {"Lq", "Lk", "p_window"} <= unspecialised
