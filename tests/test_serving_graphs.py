"""`ServingAttention.run` is CUDA-graph capturable (issue 15, "a lean host path").

On a GPU: one decode step is captured in a `torch.cuda.CUDAGraph` and replayed with new query,
cache, page-table and length contents written into the captured tensors; every replay equals
the fp64 reference (tolerances of tests/test_serving_paged.py: fp16 2e-3 on o, 2e-4 on lse).
On the CPU: `run` calls no torch operation but the index check's `_assert_async` (the kernel
launches are replaced by a recorder): no allocation, copy or host read that a graph replay
would skip or a capture would refuse, whatever the backend's launcher does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.compiler import CompiledKernel

import attncc
from attncc.backends.reference.memory import paged_reference
from attncc.backends.triton import serve_run

from tests.test_serving_paged import HKV, HQ, close, cpu64, paged_inputs

P, D, MAX_PAGES = 16, 64, 10
LENGTHS = ([1, 17], [130, 65], [144, 0], [9, 160])  # kv_len per request, one set per replay


def _spec() -> attncc.AttentionSpec:
    return attncc.Attention(mask=attncc.causal() & attncc.sliding_window(37),
                            score=attncc.softcap(5.0), memory=attncc.paged(P))


def _step(lens: list[int], seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, page_table padded to MAX_PAGES, kv_len) for one decode step."""
    kc, vc, table, kv_len = paged_inputs(lens, P, D, torch.float16, seed=seed, spare=2,
                                         device=device)
    table = torch.cat([table, table.new_zeros(2, MAX_PAGES - table.shape[1])], 1)
    pages = 2 * MAX_PAGES + 2  # the same cache size for every step (the graph's tensors)
    kc = torch.cat([kc, kc.new_zeros(pages - kc.shape[0], *kc.shape[1:])])
    vc = torch.cat([vc, vc.new_zeros(pages - vc.shape[0], *vc.shape[1:])])
    g = torch.Generator().manual_seed(100 + seed)
    q = torch.randn(2, HQ, 1, D, generator=g).half().to(device)
    return q, kc, vc, table, kv_len


@pytest.mark.gpu
def test_run_captured_in_a_cuda_graph_replays_new_contents():
    spec = _spec()
    attn = attncc.compile(spec)
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=MAX_PAGES, dtype=torch.float16, return_lse=True, device="cuda")
    assert plan.num_splits > 1  # the merge launch is captured too
    static = [t.clone() for t in _step(LENGTHS[0], 0, "cuda")]
    q, kc, vc, table, kv_len = static
    side = torch.cuda.Stream()  # warm up (compile) off the capture stream, as torch advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
    assert o.data_ptr() == plan.o.data_ptr() and lse.data_ptr() == plan.lse.data_ptr()
    for seed, lens in enumerate(LENGTHS):
        new = _step(lens, seed, "cuda")
        for dst, src in zip(static, new):
            dst.copy_(src)
        o.fill_(float("nan"))  # a replay that wrote nothing would fail the comparison
        graph.replay()
        torch.cuda.synchronize()
        ro, rl = paged_reference(spec, *cpu64(*new[:3]), new[3].cpu(), new[4].cpu())
        close(o, lse, ro, rl, torch.float16)


class _Ops(TorchDispatchMode):
    """Records every torch operation dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_run_calls_no_torch_operation_but_the_index_assert(monkeypatch):
    """Everything `run` does besides its launches, recorded: only `aten._assert_async` (no
    `empty`/`zeros` allocation, `copy_`/`_to_copy`, or `_local_scalar_dense` host read).
    The check can fail: an allocation or `.item()` added to the run path shows up here."""
    launched: list[str] = []
    monkeypatch.setattr(serve_run, "launch",
                        lambda name, fn, grid, args, cx, **options: launched.append(name))
    attn = attncc.compile(_spec())
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=MAX_PAGES, dtype=torch.float16, return_lse=True, device="cpu")
    q, kc, vc, table, kv_len = _step(LENGTHS[1], 1, "cpu")
    with torch.no_grad():
        attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)  # anything lazy, made once
        with _Ops() as mode:
            attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
    assert mode.ops == ["aten._assert_async.msg"], mode.ops
    assert launched[-2:] == [attn.kernels.name, attn.kernels.name + "_merge"]

    # the recorder sees what it should: the same run plus a host read is caught
    with _Ops() as mode:
        attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
        int(kv_len[0])
    assert "aten._local_scalar_dense.default" in mode.ops


class _Binary(CompiledKernel):
    """Stands for the `CompiledKernel` Triton's JIT returns: records what its runner is given."""

    def __init__(self, name: str, log: list) -> None:  # noqa: D107 (no binary behind it)
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args: self.log.append((self.name, grid, list(args)))

    def __del__(self) -> None:  # nothing loaded to unload
        pass


def test_later_runs_of_one_geometry_launch_the_first_runs_binaries_with_its_arguments(
        monkeypatch):
    """A run's first launch of each input geometry goes through the JIT (checked); later ones
    hand the binary it returned the same arguments in the kernel's order (constexprs included,
    as `JITFunction.run` does), the new run's tensors put in, and still call no torch operation
    but the index assert. A new geometry, or a misaligned tensor, goes through the JIT again;
    a bad input is still refused."""
    jit: list = []
    fast: list = []

    def launch(name, fn, grid, args, cx, **options):
        jit.append((name, grid, list(args) + [cx[n] for n in fn.arg_names[len(args):]]))
        return _Binary(name, fast)

    monkeypatch.setattr(serve_run, "launch", launch)
    # the device Triton's JIT would launch on (no CUDA driver here)
    monkeypatch.setattr(serve_run, "driver", SimpleNamespace(
        active=SimpleNamespace(get_current_device=lambda: 0)))
    attn = attncc.compile(_spec())
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=MAX_PAGES, dtype=torch.float16, return_lse=True, device="cpu")
    q, kc, vc, table, kv_len = _step(LENGTHS[1], 1, "cpu")
    with torch.no_grad():
        attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
        assert [n for n, _, _ in jit] == [attn.kernels.name, attn.kernels.name + "_merge"]
        q2, kc2, vc2, table2, kv_len2 = _step(LENGTHS[2], 2, "cpu")
        with _Ops() as mode:
            attn.run(plan, q2, kc2, vc2, page_table=table2, kv_len=kv_len2)
        assert mode.ops == ["aten._assert_async.msg"], mode.ops
        assert len(jit) == 2 and len(fast) == 2
        swap = {id(a): b for a, b in zip((q, kc, vc, table, kv_len),
                                         (q2, kc2, vc2, table2, kv_len2))}
        for (name, grid, args), (fname, fgrid, fargs) in zip(jit, fast):
            assert fname == name and fgrid == tuple(grid) + (1,) * (3 - len(grid))
            expected = [swap.get(id(a), a) for a in args]
            assert len(fargs) == len(expected)
            assert all(x is y if isinstance(y, torch.Tensor) else x == y
                       for x, y in zip(fargs, expected, strict=True))
        assert any(x is q2 for x in fast[0][2]) and not any(x is q for x in fast[0][2])

        # q at an address 2 bytes past a 16-byte boundary: Triton specialises on alignment
        odd = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)
        attn.run(plan, odd, kc, vc, page_table=table, kv_len=kv_len)
        assert len(jit) == 4
        # a page table of the wrong width is refused, after runs of the right one were kept
        with pytest.raises(ValueError, match="page_table"):
            attn.run(plan, q, kc, vc, page_table=table[:, :-1], kv_len=kv_len)
        with pytest.raises(ValueError, match="page_table"):
            attn.run(plan, q, kc, vc, page_table=table.long(), kv_len=kv_len)
