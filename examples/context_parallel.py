"""Context parallelism with attncc.dist: one sequence sharded over the ranks of a process group,
softmax attention by all-gather of K and V, by all-to-all between sequence and heads
(Ulysses) or by a ring of K/V chunks, and a gated delta rule (L6) by state passing, output and gradients compared with the
single-process result (docs/context_parallel.md).

    torchrun --nproc-per-node 4 examples/context_parallel.py            # gloo on the CPU
    torchrun --nproc-per-node 8 examples/context_parallel.py --L 65536  # NCCL, one GPU a rank

Every rank builds the same whole-sequence q, k, v (one seed), keeps its chunks
(`attncc.dist.shard_sequence`), runs `context_parallel_attention` forward and backward, and
compares its o, dq, dk, dv with the rows of the same compiled attention run on the whole
sequence in one process. Softmax specs, all-gather: causal + sliding window on head-tail
shards; a document mask whose documents cross the shard boundaries, on the cost-balanced shards
of `attncc.dist.greedy`. Ring: GQA causal on contiguous shards. All-to-all (one head per rank): HilbertA
(M15 in Hilbert order, a reordered spec) on an (L/16) x 16 grid. Linear: the gated delta rule
(L6) by `context_parallel_linear` on contiguous shards, o, the final state (compared on every
rank) and dq, dk, dv, dg, dbeta, on one sequence and on packed sequences crossing the shards
(varlen, `cu_seqlens`). On a CPU the kernels run under Triton's interpreter: keep L
small (the default, 256 tokens). Run it from the repository root with attncc importable
(installed, or PYTHONPATH=.). Prints one line per spec on rank 0: the largest error over ranks,
and OK / FAILED against the dtype's tolerance (fp32 1e-4, fp16 1e-2, relative to
max(1, |reference|)).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded

import attncc  # noqa: E402
from attncc.passes.shard_pairs import chunk_tiles  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def documents(L: int) -> torch.Tensor:
    """cu_seqlens of documents of uneven lengths (1/2, 1/8, 1/8, 1/4 of L): they cross shards."""
    lengths = [L // 2, L // 8, L // 8, L - L // 2 - L // 4]
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def cases(L: int, world: int) -> dict:
    doc = attncc.Attention(mask=attncc.document(cu_seqlens=documents(L)))
    block = min(64, L // (2 * world))  # chunk_tiles wants whole tiles per chunk
    tiles = chunk_tiles(doc, L, 2 * world, block_m=block, block_n=block)
    hilberta = attncc.Attention(mask=attncc.hilberta(L // 16, 16, 64, 32, 4),
                                reorder=attncc.hilbert((L // 16, 16)))
    return {  # name: (spec, sharding, strategy, Hq, Hkv, runtime)
        "causal + sliding window, head-tail": (
            attncc.Attention(mask=attncc.causal() & attncc.sliding_window(L // 4)),
            attncc.dist.head_tail(world), "all_gather", 2, 2, {}),
        "documents across shards, greedy": (doc, attncc.dist.greedy(tiles, world), "all_gather",
                                            2, 2, {}),
        "GQA causal, contiguous, ring": (attncc.Attention(mask=attncc.causal()),
                                         attncc.dist.contiguous(world), "ring", 4, 2, {}),
        "HilbertA (reordered), all-to-all": (hilberta, attncc.dist.contiguous(world),
                                             "all_to_all", world, world, {}),
    }


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


def run_gated_delta(L, D, dtype, device, rank, world, varlen=False) -> float:
    """L6 over contiguous shards by state passing: o, final state and gradients. `varlen`:
    three sequences (L/3, L/5 and the rest of the tokens) packed ([L, H, D] with cu_seqlens):
    their boundaries fall inside shards."""
    g = torch.Generator().manual_seed(0)
    H = 2
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    k = F.normalize(k, dim=-1)  # unit-norm keys, as delta-rule models have
    gate = -0.3 * torch.rand(1, H, L, generator=g)
    beta = torch.rand(1, H, L, generator=g)
    do = torch.randn(1, H, L, D, generator=g)
    x = {n: t.to(device, dtype) for n, t in zip(("q", "k", "v", "g", "beta", "do"),
                                                (q, k, v, gate, beta, do))}
    cu, dim = (torch.tensor([0, L // 3, L // 3 + L // 5, L], device=device), 0) if varlen \
        else (None, 2)
    if varlen:  # [1, H, L, ...] -> packed [L, H, ...]
        x = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items()}
    do = x.pop("do")
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(update="delta",
                                                                          decay="scalar")))
    whole = {n: t.clone().requires_grad_() for n, t in x.items()}
    o_ref, s_ref = attn(whole["q"], whole["k"], whole["v"], g=whole["g"], beta=whole["beta"],
                        return_state=True, cu_seqlens=cu)
    o_ref.backward(do)
    sharding = attncc.dist.contiguous(world)

    def mine_of(t):
        return attncc.dist.shard_sequence(t, sharding, rank, dim)

    mine = {n: mine_of(t).requires_grad_() for n, t in x.items()}
    o, s = attncc.dist.context_parallel_linear(attn, mine["q"], mine["k"], mine["v"],
                                               g=mine["g"], beta=mine["beta"],
                                               return_state=True, cu_seqlens=cu)
    o.backward(mine_of(do))
    worst = max(relative(o, mine_of(o_ref.detach())), relative(s.detach(), s_ref.detach()))
    for n, t in mine.items():
        worst = max(worst, relative(t.grad, mine_of(whole[n].grad)))
    return worst


def run(name, spec, sharding, strategy, Hq, Hkv, runtime, L, D, dtype, device, rank) -> float:
    g = torch.Generator().manual_seed(0)  # the same whole sequence on every rank
    q, k, v = (torch.randn(1, h, L, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
    do = torch.randn(1, Hq, L, D, generator=g).to(device, dtype)
    attn = attncc.compile(spec)
    # the single-process result on the whole sequence
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = attn(*whole, **runtime)
    o_ref.backward(do)
    # this rank's chunks, sharded
    mine = [attncc.dist.shard_sequence(t, sharding, rank).requires_grad_() for t in (q, k, v)]
    o = attncc.dist.context_parallel_attention(attn, *mine, sharding=sharding,
                                               strategy=strategy, **runtime)
    o.backward(attncc.dist.shard_sequence(do, sharding, rank))
    worst = 0.0
    for got, ref in [(o, o_ref)] + [(t.grad, r.grad) for t, r in zip(mine, whole)]:
        want = attncc.dist.shard_sequence(ref.detach(), sharding, rank).double()
        worst = max(worst, (got.double() - want).abs().max().item()
                    / max(1.0, want.abs().max().item()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=256, help="sequence length")
    parser.add_argument("--D", type=int, default=16, help="head dim")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    if rank == 0:
        print(f"{world} ranks, {dist.get_backend()}, L={args.L}, d={args.D}, "
              f"{str(dtype).removeprefix('torch.')}")
    failed = False
    results = {name: lambda n=name, c=c: run(n, *c, args.L, args.D, dtype, device, rank)
               for name, c in cases(args.L, world).items()}
    results["gated delta rule (L6), state passing"] = (
        lambda: run_gated_delta(args.L, args.D, dtype, device, rank, world))
    results["L6 varlen, sequences across shards"] = (
        lambda: run_gated_delta(args.L, args.D, dtype, device, rank, world, varlen=True))
    for name, result in results.items():
        err = torch.tensor([result()], device=device)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        ok = err.item() < TOL[dtype]
        failed |= not ok
        if rank == 0:
            print(f"  {name:40s} max error {err.item():.1e}  {'OK' if ok else 'FAILED'}")
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
