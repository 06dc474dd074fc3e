"""plan / run: `run` does no host-device synchronisation and no allocation; bad inputs raise
clear errors (metadata on the host, index values in the kernel, always); the serving kernels
compile for sm_80 and sm_90 with `triton.compile`."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc import config
from attncc.backends.triton import serve as triton_serve
from attncc.backends.reference.memory import paged_reference
from attncc.backends.triton.serve_aot import compile_serve_for_target
from tests.test_serving_paged import HKV, HQ, SINKS, close, cpu64, paged_inputs, specs


class HostOps(TorchDispatchMode):
    """Records every aten op run on the host outside kernel launches. Inside a launch the
    interpreter itself copies tensors to numpy and back (on a GPU the launch is one driver
    call), so a launch hook pauses recording there; the hook records the launch instead."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.launches: list[tuple[str, tuple]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def hook(self, name, grid, arguments):
        assert all(isinstance(g, int) for g in grid), "a grid read from device data"
        self.launches.append((name, grid))
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


@pytest.mark.parametrize("spec_id", ["M1", "N2"])
def test_run_has_no_sync_and_no_allocation(spec_id, monkeypatch, device):
    P, D = 16, 32
    spec = specs(attncc.paged(P))[spec_id]
    attn = attncc.compile(spec)
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=10, dtype=torch.float32, num_splits=3, return_lse=True,
                     device=device)
    recorder = HostOps()
    monkeypatch.setattr(triton_serve, "LAUNCH_HOOKS", [recorder.hook])
    outputs = []
    for seed, lens in enumerate([[17, 63], [140, 1]]):  # a replay with new tables and lengths
        kc, vc, table, kv_len = paged_inputs(lens, P, D, torch.float32, seed=seed, device=device)
        table = torch.cat([table, table.new_zeros(2, 10 - table.shape[1])], 1)
        q = torch.randn(2, HQ, 1, D).to(device)  # inputs are made (and moved) outside the mode
        with recorder:
            o, lse = attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
        outputs.append((o.data_ptr(), lse.data_ptr()))
        ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
        close(o, lse, ro, rl, torch.float32)
    # no aten op on the host but the index check's assert on the kernel's error record (no sync
    # on CUDA): nothing allocated, nothing read back (.item(), .tolist(), .cpu() and friends are
    # aten ops: _local_scalar_dense, _to_copy, ...)
    assert recorder.ops == ["aten._assert_async.msg"] * 2
    assert [n for n, _ in recorder.launches] == [attn.name, attn.name + "_merge"] * 2
    assert recorder.launches[0][1] == (2, HKV, 3)
    assert outputs[0] == outputs[1] == (plan.o.data_ptr(), plan.lse.data_ptr())


def test_the_recorder_sees_syncs_and_allocations():
    """The instrument can fail: the per-call path (plan + run) allocates and reads back."""
    recorder = HostOps()
    with recorder:
        x = torch.zeros(3)
        x.sum().item()
    assert any("zeros" in op or "empty" in op for op in recorder.ops)
    assert any("_local_scalar_dense" in op for op in recorder.ops)


def _paged_call(changes, device):
    P, D = 16, 32
    kc, vc, table, kv_len = paged_inputs([17, 40], P, D, torch.float32, device=device)
    inputs = {"q": torch.randn(2, HQ, 1, D).to(device), "k": kc, "v": vc, "page_table": table,
              "kv_len": kv_len}
    inputs.update(changes(inputs))
    attn = attncc.compile(specs(attncc.paged(P))["M1"])
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    return attn(q, k, v, **inputs)


def _bad_page(i):
    t = i["page_table"].clone()
    t[1, 0] = 10_000
    return {"page_table": t}


def _long(i):
    return {"kv_len": torch.tensor([17, i["page_table"].shape[1] * 16 + 1], dtype=torch.int32,
                                   device=i["kv_len"].device)}


INDEX_ERRORS = {  # checked by the kernel, always (ATTNCC_DEBUG=1: read back at once)
    "page-out-of-range": (_bad_page, r"page_table\[1, 0\]: expected a page id in \[0, "
                                     r"num_pages\) = \[0, \d+\) .* got 10000"),
    "kv_len-above-capacity": (_long, (r"kv_len\[1\]: expected 0 <= kv_len <= max_pages \* "
                                      r"page_size")),
}
ALWAYS_ERRORS = {  # metadata only: checked on every call
    "batch-mismatch": (lambda i: {"kv_len": torch.tensor([1, 2, 3], dtype=torch.int32,
                                                         device=i["kv_len"].device)},
                       r"kv_len: expected a int32 tensor \[B\] = \[2\]"),
    "table-dtype": (lambda i: {"page_table": i["page_table"].long()},
                    r"page_table: expected a int32 tensor \[B, max_pages\]"),
    "cache-dtype": (lambda i: {"k": i["k"].half()}, r"k_cache: expected a float32 tensor"),
    "head-dim": (lambda i: {"q": i["q"][..., :16]}, r"k_cache: expected .* = \[\?, 16, 2, 16\]"),
}


@pytest.mark.parametrize("debug", ["0", "1"])
@pytest.mark.parametrize("case", list(INDEX_ERRORS))
def test_index_errors(case, debug, device):
    change, message = INDEX_ERRORS[case]
    if device == "cuda" and debug == "0":
        pytest.skip("the async assert would fail at the next sync and spoil the CUDA context")
    with config.override(ATTNCC_DEBUG=debug), pytest.raises(ValueError, match=message):
        _paged_call(change, device)


@pytest.mark.parametrize("case", list(ALWAYS_ERRORS))
def test_metadata_errors(case, device):
    change, message = ALWAYS_ERRORS[case]
    with config.override(ATTNCC_DEBUG="0"), pytest.raises(ValueError, match=message):
        _paged_call(change, device)


def test_non_monotone_cu_seqlens(device):
    attn = attncc.compile(specs(attncc.ragged())["M1"])
    cq = torch.tensor([0, 3, 2, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected N \+ 1 >= 2 non-decreasing"):
        attn.plan(batch=3, num_heads=HQ, num_kv_heads=HKV, head_dim=16, cu_seqlens_q=cq,
                  kv_capacity=8, dtype=torch.float32, device=device)
    ck = torch.tensor([0, 4, 1, 6], dtype=torch.int32, device=device)
    q, k = torch.randn(5, HQ, 16).to(device), torch.randn(6, HKV, 16).to(device)
    good = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=device)
    with config.override(ATTNCC_DEBUG="1"), pytest.raises(ValueError, match=r"cu_seqlens_k\[2\]"):
        attn(q, k, k, cu_seqlens_q=good, cu_seqlens_k=ck)


AOT = [  # (arch, spec id, layout variant, merge kernel)
    (90, "M1", "paged", False), (90, "M2+S2", "paged", False), (90, "S3", "paged", False),
    (90, "N2", "paged", False), (90, "N2", "paged", True), (90, "M1", "ragged", False),
    (90, "M1", "persistent", False), (90, "M2+S2", "per_head_lengths", False),
    (90, "M2+S2", "cascade_suffix", False), (80, "M1", "paged", False),
    (80, "M2+S2", "paged", False), (80, "N2", "paged", True), (80, "S3", "ragged", False),
]


@pytest.mark.parametrize("case", AOT, ids=lambda c: f"sm{c[0]}-{c[1]}-{c[2]}"
                         + ("-merge" if c[3] else ""))
def test_serving_kernels_compile_for_gpu(case, tmp_path, monkeypatch):
    arch, spec_id, variant, merge = case
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    memory = attncc.persistent(4) if variant == "persistent" else attncc.paged(16)
    attn = attncc.compile(specs(memory)[spec_id])
    art = compile_serve_for_target(attn.kernels, arch, "float16", 128, variant, merge=merge)
    assert len(art.cubin) > 0
    assert re.search(rf"\.entry\s+{art.name}\s*\(", art.ptx)
    assert re.search(rf"^\.target\s+sm_{arch}", art.ptx, re.MULTILINE)


def test_sinks_are_bound_per_plan(device):
    """A plan binds captured tensors: a new sink tensor at plan time changes the result."""
    spec = specs(attncc.paged(16))["N2"]
    attn = attncc.compile(spec)
    kc, vc, table, kv_len = paged_inputs([17, 40], 16, 32, torch.float32, device=device)
    q = torch.randn(2, HQ, 1, 32).to(device)
    kw = {"batch": 2, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": 32,
          "max_pages": table.shape[1], "dtype": torch.float32, "return_lse": True,
          "device": device}
    o1, _ = attn.run(attn.plan(**kw), q, kc, vc, page_table=table, kv_len=kv_len)
    new = SINKS + 3.0
    o2, lse2 = attn.run(attn.plan(**kw, sink=new), q, kc, vc, page_table=table, kv_len=kv_len)
    ro, rl = paged_reference(attncc.Attention(mask=attncc.causal(), normaliser=attncc.sink(new),
                                              memory=attncc.paged(16)),
                             *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(o2, lse2, ro, rl, torch.float32)
    assert not torch.allclose(o1, o2)


def test_cpu_without_the_interpreter_is_an_error():
    attn = attncc.compile(specs(attncc.paged(16))["M1"])
    with config.override(TRITON_INTERPRET="0"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=16, max_pages=1,
                  dtype=torch.float32)
