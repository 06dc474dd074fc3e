"""Bad index values and bad plan arguments in the serving path (issue 20, items 6-7).

Index values given to `run` (page ids, kv_len, head_kv_len, cu_seqlens) are checked always, not
only under ATTNCC_DEBUG: the kernel clamps them so that nothing is read out of range and
records where a bad one is; `run` asserts on that record (on the CPU interpreter: at once, as a
ValueError naming the argument, the expected range and the value found). Before this, a page id
of 2**30 or a kv_len above the capacity crashed the interpreter (segfault), and the others read
garbage or returned NaN. `plan` turns bad sizes, dtype and device into one clear ValueError.
Correct rows next to a bad one are checked against the fp64 references (fp32: 2e-5, as in
test_serving_paged).
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc import config
from attncc.backends.reference.memory import paged_reference, ragged_reference
from attncc.ir.nodes import DenseMemory
from attncc.ops.serving.compiled import ServingAttention
from attncc.backends.serve_checks import ASYNC_MESSAGE
from tests.test_serving_paged import HKV, HQ, close, cpu64, paged_inputs

F32 = torch.float32
P, D = 4, 16


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _async_asserts_only_on_the_cpu(device):
    """On CUDA the assert fails at the next sync and spoils the context: there these tests run
    with ATTNCC_DEBUG=1, which reads the record back and raises the same ValueError."""
    with config.override(ATTNCC_DEBUG="1" if device == "cuda" else "0"):
        yield


def _paged(lens=(5, 9)):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(P)))
    kc, vc, table, kv_len = paged_inputs(list(lens), P, D, F32)
    plan = attn.plan(batch=len(lens), num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                     max_pages=table.shape[1], dtype=F32, return_lse=True)
    return attn, plan, _randn(len(lens), HQ, 1, D), kc, vc, table, kv_len


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


PAGED = {  # id -> (change of (table, kv_len), message)
    "page-2**30": (lambda t, n: (_set(t, (1, 1), 2**30), n),
                   r"page_table\[1, 1\]: expected a page id in \[0, num_pages\) = \[0, 11\) "
                   r"\(num_pages: the k/v caches' first dim\) for the pages below kv_len, "
                   r"got 1073741824"),
    "page--1": (lambda t, n: (_set(t, (1, 0), -1), n),
                r"page_table\[1, 0\]: expected a page id in \[0, num_pages\) = \[0, 11\) .*"
                r"got -1$"),
    "kv_len-above-capacity": (lambda t, n: (t, _set(n, 1, 2**30)),
                              r"kv_len\[1\]: expected 0 <= kv_len <= max_pages \* page_size = "
                              r"16, got 1073741824"),
    "kv_len-negative": (lambda t, n: (t, _set(n, 1, -3)),
                        r"kv_len\[1\]: expected 0 <= kv_len <= max_pages \* page_size = 16, "
                        r"got -3"),
}


@pytest.mark.parametrize("case", list(PAGED))
def test_paged_bad_index_raises_and_reads_nothing_out_of_range(case):
    attn, plan, q, kc, vc, table, kv_len = _paged()
    change, message = PAGED[case]
    bad_table, bad_len = change(table, kv_len)
    with pytest.raises(ValueError, match=message):
        attn.run(plan, q, kc, vc, page_table=bad_table, kv_len=bad_len)
    # request 0 had good indices: its rows were computed as if nothing were wrong
    ro, rl = paged_reference(attn.spec, *cpu64(q, kc, vc), table, kv_len)
    close(plan.o[:1], plan.lse[:1], ro[:1], rl[:1], F32)
    # the plan stays usable: the error record was reset
    o, lse = attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len)
    close(o, lse, ro, rl, F32)


def test_a_bad_page_id_outside_the_used_pages_is_not_read():
    """Only the pages below kv_len are read: the table's spare tail may hold anything."""
    attn, plan, q, kc, vc, table, kv_len = _paged()
    o, lse = attn.run(plan, q, kc, vc, page_table=_set(table, (0, 2), 2**30), kv_len=kv_len)
    ro, rl = paged_reference(attn.spec, *cpu64(q, kc, vc), table, kv_len)
    close(o, lse, ro, rl, F32)


def test_dense_kv_len_above_lk():
    attn = ServingAttention(attncc.Attention(mask=attncc.causal(), memory=DenseMemory()))
    q, k, v = _randn(2, HQ, 1, D), _randn(2, HKV, 7, D, seed=1), _randn(2, HKV, 7, D, seed=2)
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_capacity=7,
                     dtype=F32)
    for bad, got in [(8, "8"), (-1, "-1")]:
        kv_len = torch.tensor([7, bad], dtype=torch.int32)
        with pytest.raises(ValueError, match=rf"kv_len\[1\]: expected 0 <= kv_len <= Lk of k = "
                                             rf"7, got {got}"):
            attn.run(plan, q, k, v, kv_len=kv_len)


def _ragged(cq=(0, 2, 3, 5), ck=(0, 4, 6, 11)):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.ragged()))
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in (cq, ck))
    plan = attn.plan(batch=3, num_heads=HQ, num_kv_heads=HKV, head_dim=D, cu_seqlens_q=cq,
                     kv_capacity=8, dtype=F32, return_lse=True)
    q = _randn(int(cq[-1]), HQ, D)
    k, v = _randn(int(ck[-1]), HKV, D, seed=1), _randn(int(ck[-1]), HKV, D, seed=2)
    return attn, plan, q, k, v, cq, ck


RAGGED = {  # id -> (cu_seqlens_k, message)
    "decreasing": ([0, 4, 2, 11],
                   r"cu_seqlens_k\[2\]: expected nondecreasing offsets from 0 to total_k = 11 "
                   r"\(k.shape\[0\]\), got 2"),
    "last-too-big": ([0, 4, 6, 12], r"cu_seqlens_k\[3\]: expected .* total_k = 11 .*got 12"),
    "last-too-small": ([0, 4, 6, 10], r"cu_seqlens_k\[3\]: expected .* total_k = 11 .*got 10"),
    "overlong-middle": ([0, 4, 2**30, 11], r"cu_seqlens_k\[3\]: expected .*got 11"),
    "first-not-zero": ([1, 4, 6, 11], r"cu_seqlens_k\[0\]: expected .*got 1"),
}


@pytest.mark.parametrize("case", list(RAGGED))
def test_ragged_bad_cu_seqlens_k(case):
    attn, plan, q, k, v, cq, ck = _ragged()
    bad, message = RAGGED[case]
    with pytest.raises(ValueError, match=message):
        attn.run(plan, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor(bad, dtype=torch.int32))
    o, lse = attn.run(plan, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
    close(o, lse, *ragged_reference(attn.spec, *cpu64(q, k, v), cq, ck), F32)


def test_ragged_run_with_other_query_lengths_than_planned():
    """Item 7: the work list was built for the planned query offsets; other offsets with the
    same total left rows unwritten (stale buffer contents) before."""
    attn, plan, q, k, v, cq, ck = _ragged()
    other = torch.tensor([0, 1, 3, 5], dtype=torch.int32)
    message = (r"cu_seqlens_q\[1\]: expected the offsets the plan was made for, \[0, 2, 3, 5\], "
               r"got 1 \(cu_seqlens_q = \[0, 1, 3, 5\]; plan again")
    with pytest.raises(ValueError, match=message):
        attn.run(plan, q, k, v, cu_seqlens_q=other, cu_seqlens_k=ck)
    # a different total is caught on the host, from q's shape
    with pytest.raises(ValueError, match=r"q: expected a float32 tensor \[total_q, Hq, Dqk\] = "
                                         r"\[5, 4, 16\]"):
        attn.run(plan, _randn(6, HQ, D), k, v, cu_seqlens_q=torch.tensor(
            [0, 2, 3, 6], dtype=torch.int32), cu_seqlens_k=ck)


@pytest.mark.parametrize("bad,got", [(-2, "-2"), (8, "8")])
def test_per_head_lengths_out_of_range(bad, got):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(),
                                           memory=attncc.per_head_lengths()))
    q, k, v = _randn(1, HQ, 1, D), _randn(1, HKV, 7, D, seed=1), _randn(1, HKV, 7, D, seed=2)
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_capacity=7,
                     dtype=F32)
    with pytest.raises(ValueError, match=rf"head_kv_len\[1\]: expected 0 <= head_kv_len <= "
                                         rf"Lk of k = 7, got {got}"):
        attn.run(plan, q, k, v, head_kv_len=torch.tensor([7, bad], dtype=torch.int32))


def test_streaming_heads_paged_full_cache_bad_page():
    """K5 compact over a paged full-head cache: the full heads' page ids are checked too."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(),
                                           memory=attncc.per_head_lengths(sink=1, window=4)))
    stream = torch.tensor([-1, 0], dtype=torch.int32)
    kc, vc = _randn(6, P, 1, D, seed=1), _randn(6, P, 1, D, seed=2)
    table = torch.tensor([[0, 1], [2, 2**30]], dtype=torch.int32)
    ks, vs = _randn(2, 1, 5, D, seed=3), _randn(2, 1, 5, D, seed=4)
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_capacity=8,
                     dtype=F32, stream_heads=stream)
    with pytest.raises(ValueError, match=r"page_table\[1, 1\]: expected a page id in \[0, "
                                         r"num_pages\) = \[0, 6\) .* got 1073741824"):
        attn.run(plan, _randn(2, HQ, 1, D), kc, vc, page_table=table,
                 kv_len=torch.tensor([5, 6], dtype=torch.int32), k_stream=ks, v_stream=vs)


PLAN = dict(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_pages=3, dtype=F32)
BAD_PLANS = {  # argument -> (value, message); before: RuntimeError, ZeroDivisionError,
    # AssertionError, TypeError, or no error at all
    "batch": (-1, r"batch: expected the number of requests \(an int >= 0\), got -1"),
    "batch-float": (2.5, r"batch: expected the number of requests \(an int >= 0\), got 2.5"),
    "num_heads": (-4, r"num_heads: expected the query heads Hq \(an int >= 1\), got -4"),
    "num_kv_heads": (0, r"num_kv_heads: expected the kv heads Hkv \(an int >= 1\), got 0"),
    "num_kv_heads-negative": (-2, r"num_kv_heads: expected .*\(an int >= 1\), got -2"),
    "head_dim": (0, r"head_dim: expected the query / key head dim Dqk \(an int >= 1\), got 0"),
    "head_dim-negative": (-16, r"head_dim: expected .*\(an int >= 1\), got -16"),
    "head_dim_v": (-1, r"head_dim_v: expected the value head dim Dv \(an int >= 1\), got -1"),
    "max_q_len": (-1, r"max_q_len: expected the query rows of every request \(an int >= 0\), "
                      r"got -1"),
    "max_pages": (-1, r"max_pages: expected the page table's width \(an int >= 0\), got -1"),
    "dtype": (torch.int32, r"dtype: expected one of \['torch.float16', 'torch.bfloat16', "
                           r"'torch.float32'\], got torch.int32"),
    "scale": ("x", r"scale: expected a float or None, got 'x'"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_arguments(case):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(P)))
    value, message = BAD_PLANS[case]
    with pytest.raises(ValueError, match=message):
        attn.plan(**{**PLAN, case.split("-")[0]: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_plan_on_cuda_without_cuda():
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(P)))
    with pytest.raises(ValueError, match=r"device: expected a device this torch can use, got "
                                         r"cuda but torch.cuda.is_available\(\) is False"):
        attn.plan(**PLAN, device="cuda")


def test_compact_paged_cache_with_page_size_zero():
    attn = attncc.compile(attncc.Attention(mask=attncc.causal(),
                                           memory=attncc.per_head_lengths(sink=1, window=4)))
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_capacity=8,
                     dtype=F32, stream_heads=torch.tensor([-1, 0], dtype=torch.int32))
    empty = torch.zeros(3, 0, 1, D)
    with pytest.raises(ValueError, match=r"k_cache: expected pages of page_size >= 1 tokens, "
                                         r"got 0"):
        attn.run(plan, _randn(1, HQ, 1, D), empty, empty,
                 page_table=torch.zeros(1, 2, dtype=torch.int32),
                 kv_len=torch.tensor([3], dtype=torch.int32), k_stream=_randn(1, 1, 5, D),
                 v_stream=_randn(1, 1, 5, D))


def test_the_async_assert_message_fits_the_cuda_assert():
    """torch copies the message into its CUDA assert kernel and refuses one of 255 characters
    or more, at once, on every run: the message must stay short."""
    assert len(ASYNC_MESSAGE) < 255
    with pytest.raises(RuntimeError, match="^attncc serving run: an index input is out of range"):
        torch._assert_async(torch.tensor([0], dtype=torch.int32), ASYNC_MESSAGE)
