"""`attncc::serve_run` (the serving kernels as a custom op): opcheck, a paged decode step under
torch.compile(fullgraph=True) against eager and the fp64 paged reference, zero recompiles for
new page tables / lengths, the functional form, and the op path being allocation-free too.

Kernels run under Triton's interpreter on the CPU (fp32: exact dots there). Tolerances: against
the fp64 reference `tests.test_serving_paged.TOL` (fp32 2e-5 on o); compiled vs eager run the
same kernel on the same inputs, so 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import attncc
from attncc.backends.triton import serve_run as serving_run
from attncc.ops.serving import custom_op as torch_ops_serving
from attncc.backends.triton import serve as triton_serve
from attncc.backends.reference.memory import paged_reference
from tests.test_serving_paged import HKV, HQ, close, cpu64, paged_inputs, specs
from tests.test_serving_plan import HostOps
from tests.test_torch_ops import CountingBackend

P, D, MAX_PAGES = 16, 32, 8


def _plan(attn, num_splits, device, return_lse=True, batch=2):
    return attn.plan(batch=batch, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=MAX_PAGES, dtype=torch.float32, num_splits=num_splits,
                     return_lse=return_lse, device=device)


def _step(lens, seed, device):
    kc, vc, table, kv_len = paged_inputs(lens, P, D, torch.float32, seed=seed, device=device)
    table = torch.cat([table, table.new_zeros(len(lens), MAX_PAGES - table.shape[1])], 1)
    q = torch.randn(len(lens), HQ, 1, D, generator=torch.Generator().manual_seed(seed + 9))
    return q.to(device), kc, vc, table, kv_len


def _op_args(attn, plan, q, kc, vc, table, kv_len):
    return (attn.key, plan.key, plan.o, plan.lse, plan.o_part, plan.lse_part, q, kc, vc, table,
            kv_len, None, None, None, None, None, None, None, "nhd")


OPCHECK = {  # id -> (spec id, kv lengths, splits)
    "M1-paged16-lens17,40-D32-split1": ("M1", [17, 40], 1),
    "N2-paged16-lens63,1-D32-split2": ("N2", [63, 1], 2),
}


@pytest.mark.parametrize("case", OPCHECK, ids=list(OPCHECK))
def test_opcheck_serve_run(case, device):
    spec_id, lens, splits = OPCHECK[case]
    attn = attncc.compile(specs(attncc.paged(P))[spec_id])
    plan = _plan(attn, splits, device)
    args = _op_args(attn, plan, *_step(lens, 0, device))
    opcheck(torch.ops.attncc.serve_run.default, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.ops.attncc.serve_run(*args)  # the op writes the plan's buffers: the real result
    q, kc, vc, table, kv_len = args[6:11]
    ro, rl = paged_reference(attn.spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(plan.o, plan.lse, ro, rl, torch.float32)


def test_compiled_decode_matches_eager_and_never_recompiles(device):
    """A decode step (q proj -> paged attention -> o proj) compiled with fullgraph=True: equal
    to eager and to the fp64 reference at every step; new page tables, lengths and caches are
    new data, never a recompile."""
    torch._dynamo.reset()
    attn = attncc.compile(specs(attncc.paged(P))["M2+S2"])
    plan = _plan(attn, num_splits=2, device=device)
    w = (torch.randn(D, D, generator=torch.Generator().manual_seed(3)) / D ** 0.5).to(device)

    def step(x, kc, vc, table, kv_len):
        o, lse = attn.run(plan, x @ w, kc, vc, page_table=table, kv_len=kv_len)
        return o.sum(-1) + lse

    counter = CountingBackend()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for seed, lens in enumerate([[17, 40], [33, 1], [48, 20]]):  # equal cache shapes
        x, kc, vc, table, kv_len = _step(lens, seed, device)
        got = compiled(x, kc, vc, table, kv_len).clone()
        want = step(x, kc, vc, table, kv_len)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        ro, rl = paged_reference(attn.spec, *cpu64(x @ w, kc, vc), table.cpu(), kv_len.cpu())
        torch.testing.assert_close(got.double().cpu(), ro.sum(-1) + rl, atol=1e-4, rtol=1e-4)
    assert counter.compiles == 1


def test_the_op_path_has_no_allocation_either(monkeypatch, device):
    """Called through the dispatcher (as a compiled graph calls it) the op's implementation
    runs no aten op on the host but the index check's assert (no sync on CUDA): the recorder
    records the op, then re-enters itself around the op's implementation (a mode is off inside
    its own handler, so it would see nothing)."""

    class Reentrant(HostOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused and func is torch.ops.attncc.serve_run.default:
                self.ops.append(str(func))
                with self:
                    return torch_ops_serving.serve_run._init_fn(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    attn = attncc.compile(specs(attncc.paged(P))["M1"])
    plan = _plan(attn, num_splits=2, device=device)
    recorder = Reentrant()
    monkeypatch.setattr(triton_serve, "LAUNCH_HOOKS", [recorder.hook])
    args = _op_args(attn, plan, *_step([17, 40], 0, device))
    with recorder:
        torch.ops.attncc.serve_run(*args)
    assert recorder.ops == ["attncc.serve_run.default", "aten._assert_async.msg"]
    assert [n for n, _ in recorder.launches] == [attn.name, attn.name + "_merge"]
    arguments = serving_run.arguments

    def allocating(*a, **kw):  # the control: an allocation inside the op is seen
        torch.zeros(1)
        return arguments(*a, **kw)

    monkeypatch.setattr(serving_run, "arguments", allocating)
    with recorder:
        torch.ops.attncc.serve_run(*args)
    assert recorder.ops[2:] == ["attncc.serve_run.default", "aten.zeros.default",
                                "aten._assert_async.msg"]


def test_functional_serve_leaves_the_plan_alone(device):
    attn = attncc.compile(specs(attncc.paged(P))["N2"])
    plan = _plan(attn, num_splits=2, device=device)
    q, kc, vc, table, kv_len = _step([33, 7], 1, device)
    attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
    before = plan.o.clone()
    q2, kc2, vc2, table2, kv_len2 = _step([50, 20], 2, device)
    o, lse = torch_ops_serving.serve(attn, plan, q2, kc2, vc2, page_table=table2, kv_len=kv_len2)
    assert o.data_ptr() != plan.o.data_ptr()
    assert torch.equal(plan.o, before)
    ro, rl = paged_reference(attn.spec, *cpu64(q2, kc2, vc2), table2.cpu(), kv_len2.cpu())
    close(o, lse, ro, rl, torch.float32)


def test_errors_name_the_argument(device):
    attn = attncc.compile(specs(attncc.paged(P))["M1"])
    plan = _plan(attn, num_splits=1, device=device)
    args = list(_op_args(attn, plan, *_step([17, 40], 0, device)))
    with pytest.raises(ValueError, match="plan: expected the key of a live ServePlan"):
        torch.ops.attncc.serve_run(*args[:1], "plan-nope", *args[2:])
    with pytest.raises(ValueError, match=r"o: expected a buffer like the plan's"):
        torch.ops.attncc.serve_run(*args[:2], plan.o[:1].clone(), *args[3:])
    q = args[6].clone().requires_grad_()
    with pytest.raises(ValueError, match="q: serving kernels are inference only"):
        attn.run(plan, q, *args[7:9], page_table=args[9], kv_len=args[10])
