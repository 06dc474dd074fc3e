"""Context-parallel scaling model: per-rank FLOPs, bytes communicated and predicted step time of
one attention layer's forward pass sharded over W GPUs, for each strategy; picks the fastest.

    python -m benchmarks.cp_model --spec causal --L 1048576 --world 64
    python -m benchmarks.cp_model --spec gated-delta --L 2097152 --world 64
    python -m benchmarks.cp_model --table          # writes benchmarks/results/cp_model.md

This is a MODEL, not a measurement (no multi-GPU machine was available): every number follows
from the assumptions below. docs/context_parallel.md describes the strategies and reads the table.

Assumptions
- Hardware: H100 SXM, dense 16-bit tensor-core peak 989 TFLOP/s (fp32 inputs: 495, tf32), times
  an efficiency factor (`--efficiency`, default 0.6) for every kernel, softmax and linear alike.
  NVLink 900 GB/s per GPU inside a node of 8 GPUs; beyond 8 GPUs every collective that leaves the
  node runs at the InfiniBand bandwidth of 50 GB/s per GPU. Latency per message: 5 us on NVLink,
  10 us on IB. Communication that is overlapped runs on copy engines / NCCL channels and takes
  no compute time.
- One forward pass of one attention layer, batch 1, Hq query heads, Hkv kv heads (GQA), head dim
  D for q, k and v; 16-bit inputs unless `--dtype float32`; states of linear recurrences fp32.
- Softmax FLOPs: 4 * D FLOPs per (q, kv) position of every COMPUTED tile (two matrix products),
  per query head; tiles are the forward kernel's (`attncc.passes.select_tiles.choose` for
  sm_90), empty tiles are skipped and a partial tile costs as much as a full one. Tile counts per
  shard pair come from attncc's own tile classification (`attncc.passes.shard_pairs`); only
  head 0 of a per-head mask is counted.
- Sharding for ring and all-gather: the assignment with the least loaded busiest rank among
  contiguous, head-tail and greedy over 2W chunks (`attncc.passes.shard_balance`).
- ring (Megatron `p2p`, ring attention): W steps; at step s rank r computes its queries against
  the kv shard of rank r - s while sending that shard on; steps are lockstep (a step lasts as
  long as its slowest rank), communication overlaps the step's compute, the last step sends
  nothing. Bytes per rank: (W - 1) kv shards. Across nodes, the ring's inter-node hop sets the
  pace (IB bandwidth for W > 8).
- all-gather: one ring all-gather of the kv shards (W - 1 steps, not overlapped), then the
  busiest rank's compute. Bytes per rank: (W - 1) kv shards; memory: the whole sequence's K, V.
- p2p non-empty (what the shard-pair classification allows; MagiAttention's idea): a rank
  receives the kv shards of only those ranks whose pair with its queries is not empty, all at
  once over its links (NVLink from its node, IB from other nodes, both in parallel), while it
  computes its own pair, then computes the rest: time = own + max(rest, receive or send); no
  lockstep. Best time over the three assignments. Optimistic where many shards arrive at once.
- all-to-all (Ulysses, Megatron `a2a`): q, k, v sequence -> heads and o heads -> sequence, four
  all-to-alls not overlapped; each rank then runs the whole sequence for Hq / W heads (exactly
  balanced). Needs W | Hq, and W | Hkv or Hkv | W (kv heads repeated up to W). A rank sends
  (W - 1) / W of each tensor; the share to ranks of other nodes, (W - 8) / W, goes over IB.
- Linear recurrences, chunked like fla's kernels with the chunk c of
  `attncc.passes.select_tiles_linear.gpu_chunk`; FLOPs per token and head (Dk = Dv = D):
  - gated delta rule (L6): 2c(3Dk + 2Dv) + c^2 + 6 Dk Dv on one GPU (K K^T, Q K^T, the UT
    transform, W = T K, U = T V, the state read, the intra-chunk output, the state update). Of
    it, 2c(Dk + Dv) + 2 Dk Dv (Q K^T, the output, the state read) does not depend on the
    incoming state. A context-parallel rank also builds its shard's affine map
    S_out = M S_in + U, M dense Dk x Dk: 2 Dk^2 + 2 Dk^3 / c, and once S_in is known corrects
    its outputs: 4 Dk Dv + 2c Dv + 2 Dk^2 Dv / c (S_in through the chunks, the state read and
    the output). Maps are (Dk^2 + Dk Dv) fp32 per head.
  - scalar-gated linear attention (L3, LASP-2's setting): 2c(Dk + Dv) + 4 Dk Dv; M is one
    scalar per head (the gate product), so a map is Dk Dv + 1 fp32; correction 2 Dk Dv.
  A rank builds its map, then exchanges maps while it computes the intra-chunk outputs
  (overlapped), then applies the correction. Exchanges:
  - LASP-2: one all-gather of every rank's (M, U), then rank r applies r maps to the zero
    state (W - 1 applications, 2 Dk^2 Dv each for L6, for the last rank).
  - prefix scan: ceil(log2 W) rounds of one p2p of (M, U) and one map composition.
  - ring (LASP-1): the state travels rank to rank, W - 1 dependent hops of one p2p of S
    (Dk Dv fp32) and one map application.
  - all-to-all: as softmax (plus the gates g, beta), then whole sequences for Hq / W heads,
    no state passing and no extra FLOPs.
  Every dependent step (a ring step, a scan round, a hop, the correction) also pays a kernel
  launch and a wait, 10 us.
- The catalogue: causal, full, sliding window of 8192, documents of 64K tokens (cu_seqlens),
  gated delta (L6), scalar-gated linear attention (L3). The fastest strategy is the one with
  the least predicted time; a strategy that cannot run (all-to-all when heads do not split) is
  reported with its reason and never picked.
- Not modelled: the backward pass (about 2.5x the forward's FLOPs; ring sends dK, dV back),
  memory limits (all-gather holds the whole K and V on every rank), hierarchical schemes
  (all-to-all inside a node + ring across nodes), contention with other traffic, the other
  layers of a model.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import attncc
from attncc.ir.spec import AttentionSpec
from attncc.passes import shard_balance
from attncc.passes.select_tiles import choose
from attncc.passes.select_tiles_linear import gpu_chunk
from attncc.passes.shard_pairs import ChunkTiles, Sharding, chunk_tiles

RESULTS = Path(__file__).parent / "results" / "cp_model.md"
K = 1024
TABLE_L = (128 * K, 512 * K, 1024 * K, 2048 * K)
TABLE_WORLD = (8, 32, 64, 256)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Hardware:
    peak_flops: float = 989e12  # H100 SXM dense bf16 / fp16
    efficiency: float = 0.6
    nvlink: float = 900e9  # bytes/s per GPU inside a node
    ib: float = 50e9  # bytes/s per GPU between nodes
    node: int = 8  # GPUs per node
    latency_nvlink: float = 5e-6
    latency_ib: float = 10e-6
    step_overhead: float = 10e-6  # a kernel launch and a wait between dependent steps

    def flops_per_s(self, dtype: str) -> float:
        return self.peak_flops * self.efficiency * (0.5 if dtype == "float32" else 1.0)

    def link(self, world: int) -> tuple[float, float]:
        """(bandwidth, latency) of the slowest hop of a ring over `world` GPUs."""
        if world <= self.node:
            return self.nvlink, self.latency_nvlink
        return self.ib, self.latency_ib

    def p2p(self, nbytes: float, world: int) -> float:
        bw, lat = self.link(world)
        return lat + nbytes / bw

    def all_gather(self, nbytes: float, world: int) -> float:
        """Ring all-gather of `nbytes` per rank: W - 1 steps of one shard each."""
        bw, lat = self.link(world)
        return (world - 1) * (lat + nbytes / bw)

    def all_to_all(self, nbytes: float, world: int) -> float:
        """All-to-all of a local tensor of `nbytes`: 1/W stays, the rest goes to the others,
        to ranks of other nodes over IB (both links at once)."""
        inside = min(world, self.node)
        intra = nbytes * (inside - 1) / world / self.nvlink
        inter = nbytes * (world - inside) / world / self.ib
        return (self.latency_ib if world > self.node else self.latency_nvlink) + max(intra, inter)


@dataclass(frozen=True)
class Shape:
    L: int
    world: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if min(self.L, self.world, self.heads, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"shape: every size must be positive, got {self}")
        if self.heads % self.kv_heads:
            raise ValueError(f"GQA: kv heads ({self.kv_heads}) must divide query heads "
                             f"({self.heads})")

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        """Tokens per rank."""
        return self.L // self.world


@dataclass(frozen=True)
class Strategy:
    name: str
    seconds: float
    bytes_per_rank: float  # bytes each rank sends in the step
    flops_per_rank: float  # the busiest rank's FLOPs
    note: str = ""


def ulysses_kv_heads(shape: Shape) -> int:
    """kv heads each all-to-all moves (repeated up to W); a clear error when heads don't split."""
    w = shape.world
    if shape.heads % w:
        raise ValueError(f"all-to-all (Ulysses): the world size {w} must divide the "
                         f"{shape.heads} query heads (sequence <-> heads needs whole heads per "
                         f"rank)")
    if shape.kv_heads % w and w % shape.kv_heads:
        raise ValueError(f"all-to-all (Ulysses): {shape.kv_heads} kv heads can neither be split "
                         f"over nor repeated to the world size {w}")
    return max(shape.kv_heads, w)


# ----------------------------------------------------------------------------- softmax


SPECS: dict[str, Callable[[int], AttentionSpec]] = {
    "causal": lambda L: attncc.Attention(mask=attncc.causal()),
    "full": lambda L: attncc.Attention(mask=attncc.full()),
    "sliding-window": lambda L: attncc.Attention(mask=attncc.sliding_window(8192)),
    # documents of 64K tokens (the last one shorter): cu_seqlens as a packed batch would give
    "document": lambda L: attncc.Attention(mask=attncc.document(cu_seqlens=torch.tensor(
        sorted({*range(0, L, 64 * K), L}), dtype=torch.int32))),
}
LINEAR = {"gated-delta": "L6", "linear-attention": "L3"}


def softmax_tiles(spec: AttentionSpec, shape: Shape, n_chunks: int) -> ChunkTiles:
    sched = choose("sm90", shape.dtype, shape.head_dim, shape.head_dim)
    return chunk_tiles(spec, shape.L, n_chunks, block_m=sched.block_m, block_n=sched.block_n,
                       Hq=shape.heads, Hkv=shape.kv_heads)


def _tile_flops(tiles: ChunkTiles, shape: Shape) -> float:
    return 4.0 * tiles.block_m * tiles.block_n * shape.head_dim * shape.heads


def shardings(spec: AttentionSpec, shape: Shape) -> list[tuple[Sharding, ChunkTiles]]:
    """The candidate assignments: contiguous, head-tail, greedy over 2W chunks."""
    w = shape.world
    flat = softmax_tiles(spec, shape, w)
    two = softmax_tiles(spec, shape, 2 * w)
    return [(shard_balance.contiguous(w), flat), (shard_balance.head_tail(w), two),
            (shard_balance.greedy(two, w), two)]


def best_sharding(spec: AttentionSpec, shape: Shape) -> tuple[Sharding, ChunkTiles]:
    """The assignment whose busiest rank holds the fewest tiles (contiguous first on ties)."""
    return min(shardings(spec, shape),
               key=lambda o: float(shard_balance.rank_work(o[1], o[0]).max()))


def selective(sharding: Sharding, tiles: ChunkTiles, shape: Shape, hw: Hardware) -> Strategy:
    """p2p of kv shards to the ranks that need them only (the shard pair is not empty): each
    rank computes its own pair while the others arrive over its links (NVLink from its node,
    IB from others, both at once), then the rest."""
    w, rate = shape.world, hw.flops_per_s(shape.dtype)
    pairs = tiles.pairs(sharding)
    work = (pairs[..., 1] + pairs[..., 2]).double() * _tile_flops(tiles, shape) / rate
    kv_shard = 2 * shape.tokens * shape.kv_heads * shape.head_dim * shape.elem
    ranks = torch.arange(w)
    need = (work > 0) & (ranks[:, None] != ranks[None, :])  # [receiver, sender]
    same_node = (ranks[:, None] // hw.node) == (ranks[None, :] // hw.node)

    def link_time(mask: torch.Tensor) -> torch.Tensor:  # per rank, over rows of `mask`
        intra = (mask & same_node).sum(1) * kv_shard / hw.nvlink
        inter = (mask & ~same_node).sum(1) * kv_shard / hw.ib
        latency = torch.where((mask & ~same_node).any(1), hw.latency_ib, hw.latency_nvlink)
        return torch.where(mask.any(1), latency + torch.maximum(intra, inter), 0.0)

    comm = torch.maximum(link_time(need), link_time(need.T))  # receive, send
    own = work.diagonal()
    seconds = float((own + torch.maximum(work.sum(1) - own, comm)).max()) + hw.step_overhead
    busiest = float(work.sum(1).max()) * rate
    return Strategy("p2p non-empty", seconds, float(need.sum(0).max()) * kv_shard, busiest,
                    sharding.name)


def softmax_strategies(spec: AttentionSpec, shape: Shape, hw: Hardware) -> list[Strategy]:
    w, rate = shape.world, hw.flops_per_s(shape.dtype)
    sharding, tiles = best_sharding(spec, shape)
    per_tile = _tile_flops(tiles, shape)
    pairs = tiles.pairs(sharding)
    work = (pairs[..., 1] + pairs[..., 2]).double()  # [query rank, key rank] computed tiles
    kv_shard = 2 * shape.tokens * shape.kv_heads * shape.head_dim * shape.elem
    busiest = float(work.sum(1).max()) * per_tile
    out = []
    # ring: at step s rank r meets the keys of rank r - s
    ranks = torch.arange(w)
    step_send = hw.p2p(kv_shard, w)
    seconds = 0.0
    for s in range(w):
        compute = float(work[ranks, (ranks - s) % w].max()) * per_tile / rate + hw.step_overhead
        seconds += max(compute, step_send if s < w - 1 else 0.0)
    out.append(Strategy("ring", seconds, (w - 1) * kv_shard, busiest, sharding.name))
    out.append(Strategy("all-gather", hw.all_gather(kv_shard, w) + busiest / rate,
                        (w - 1) * kv_shard, busiest, sharding.name))
    out.append(min((selective(sh, t, shape, hw) for sh, t in shardings(spec, shape)),
                   key=lambda st: st.seconds))
    try:
        kv_heads = ulysses_kv_heads(shape)
    except ValueError as e:
        out.append(Strategy("all-to-all", math.inf, math.nan, math.nan, str(e)))
        return out
    whole = softmax_tiles(spec, shape, 1)
    flops = float(whole.computed().sum()) * _tile_flops(whole, shape) / w
    q = shape.tokens * shape.heads * shape.head_dim * shape.elem  # local q (and o)
    kv = shape.tokens * kv_heads * shape.head_dim * shape.elem  # local k (and v), repeated
    comm = 2 * hw.all_to_all(q, w) + 2 * hw.all_to_all(kv, w)
    out.append(Strategy("all-to-all", comm + flops / rate, (2 * q + 2 * kv) * (w - 1) / w, flops))
    return out


# ----------------------------------------------------------------------------- linear


@dataclass(frozen=True)
class LinearRule:
    """FLOPs per token and head of a chunked linear recurrence and the sizes of its shard map
    (module docstring). `map_part` + `output_part` is the single-GPU kernel; `transition` is
    what a context-parallel rank adds to build its shard's M, `correction` what it adds once
    S_in is known."""

    chunk: int
    map_part: float  # the zero-state chunk recurrence: U (and the parts of it M needs)
    output_part: float  # intra-chunk outputs and the state read: overlaps the exchange
    transition: float
    correction: float
    apply: float  # one map applied to a state, per head
    compose: float  # two maps composed, per head
    map_bytes: int  # (M, U) per head
    state_bytes: int  # S per head


def linear_rule(spec_name: str, shape: Shape) -> LinearRule:
    dk = dv = shape.head_dim
    if spec_name == "gated-delta":  # L6: M = prod (I - beta k k^T) exp(g), dense Dk x Dk
        c = gpu_chunk(attncc.recurrent_state(update="delta", decay="scalar"), dk)
        return LinearRule(chunk=c, map_part=2 * c * (2 * dk + dv) + c * c + 4 * dk * dv,
                          output_part=2 * c * (dk + dv) + 2 * dk * dv,
                          transition=2 * dk * dk + 2 * dk ** 3 / c,
                          correction=4 * dk * dv + 2 * c * dv + 2 * dk * dk * dv / c,
                          apply=2 * dk * dk * dv, compose=2 * dk ** 3 + 2 * dk * dk * dv,
                          map_bytes=4 * (dk * dk + dk * dv), state_bytes=4 * dk * dv)
    # L3: M = exp(sum g), one scalar per head: LASP-2's own setting (linear attention + decay)
    c = gpu_chunk(attncc.recurrent_state(update="additive", decay="scalar"), dk)
    return LinearRule(chunk=c, map_part=2 * dk * dv, output_part=2 * c * (dk + dv) + 2 * dk * dv,
                      transition=1, correction=2 * dk * dv, apply=2 * dk * dv,
                      compose=2 * dk * dv + 1, map_bytes=4 * (dk * dv + 1),
                      state_bytes=4 * dk * dv)


def linear_strategies(spec_name: str, shape: Shape, hw: Hardware) -> list[Strategy]:
    """Every context-parallel rank: build its map, then [exchange maps || intra-chunk outputs],
    then the correction; all-to-all instead runs whole sequences for Hq / W heads."""
    w, rate, f = shape.world, hw.flops_per_s(shape.dtype), linear_rule(spec_name, shape)
    h, n = shape.heads, shape.tokens
    before = n * h * (f.map_part + f.transition) / rate
    during = n * h * f.output_part / rate
    after = n * h * f.correction / rate + hw.step_overhead
    shard = n * h * (f.map_part + f.transition + f.output_part + f.correction)

    def timed(exchange: float) -> float:
        return before + max(during, exchange) + after

    out = []
    lasp2 = (hw.all_gather(h * f.map_bytes, w) + hw.step_overhead
             + (w - 1) * h * f.apply / rate)
    out.append(Strategy("LASP-2 all-gather", timed(lasp2), (w - 1) * h * f.map_bytes,
                        shard + (w - 1) * h * f.apply))
    rounds = math.ceil(math.log2(w)) if w > 1 else 0
    scan = rounds * (hw.p2p(h * f.map_bytes, w) + hw.step_overhead + h * f.compose / rate)
    out.append(Strategy("prefix scan", timed(scan), rounds * h * f.map_bytes,
                        shard + rounds * h * f.compose))
    hop = hw.p2p(h * f.state_bytes, w) + hw.step_overhead + h * f.apply / rate
    out.append(Strategy("ring (LASP-1)", timed((w - 1) * hop), h * f.state_bytes,
                        shard + h * f.apply))
    try:
        kv_heads = ulysses_kv_heads(replace(shape, kv_heads=shape.heads))
    except ValueError as e:
        out.append(Strategy("all-to-all", math.inf, math.nan, math.nan, str(e)))
        return out
    local = shape.L * (h // w) * (f.map_part + f.output_part)
    qkvo = 4 * n * kv_heads * shape.head_dim * shape.elem
    gates = 2 * n * h * 4  # g and beta, fp32
    comm = 4 * hw.all_to_all(qkvo / 4, w) + hw.all_to_all(gates, w)
    out.append(Strategy("all-to-all", comm + local / rate, (qkvo + gates) * (w - 1) / w, local))
    return out


def strategies(spec_name: str, shape: Shape, hw: Hardware = Hardware()) -> list[Strategy]:
    if spec_name in LINEAR:
        return linear_strategies(spec_name, shape, hw)
    if spec_name not in SPECS:
        raise ValueError(f"spec: expected one of {sorted(SPECS) + sorted(LINEAR)}, "
                         f"got {spec_name!r}")
    return softmax_strategies(SPECS[spec_name](shape.L), shape, hw)


def fastest(found: list[Strategy]) -> Strategy:
    return min(found, key=lambda s: s.seconds)


# ----------------------------------------------------------------------------- output


def _num(x: float) -> str:
    """Three significant figures, thousands separated."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(s: Strategy) -> str:
    if math.isinf(s.seconds):
        return "n/a (heads)"
    return f"{_num(s.seconds * 1e3)} ({s.bytes_per_rank / 1e9:.3g})"


def table(spec_name: str, base: Shape, hw: Hardware, Ls=TABLE_L, worlds=TABLE_WORLD) -> str:
    rows = []
    for L in Ls:
        for w in worlds:
            found = strategies(spec_name, replace(base, L=L, world=w), hw)
            best = fastest(found)
            names = [s.name for s in found]
            shard = found[0].note if spec_name not in LINEAR else "contiguous"
            rows.append(f"| {L // K}K | {w} | {shard} | {_num(best.flops_per_rank / 1e12)} | "
                        + " | ".join(_cell(s) for s in found) + f" | {best.name}"
                        + (f" ({best.note})" if best.note else "") + " |")
    head = ("| L | GPUs | sharding | TFLOP/rank (best) | "
            + " | ".join(f"{n} ms (GB/rank)" for n in names) + " | fastest |\n|"
            + "---|" * (5 + len(names)) + "\n")
    return head + "\n".join(rows) + "\n"


def report(hw: Hardware) -> str:
    softmax = Shape(L=TABLE_L[0], world=8, heads=32, kv_heads=8, head_dim=128)
    linear = Shape(L=TABLE_L[0], world=8, heads=32, kv_heads=32, head_dim=128)
    return ("# Context-parallel scaling model (a model, not a measurement)\n\n"
            "Generated by `python -m benchmarks.cp_model --table`; assumptions in the module "
            "docstring of `benchmarks/cp_model.py`, reading in docs/context_parallel.md. One "
            "forward pass of one attention layer, batch 1, H100 at "
            f"{hw.efficiency:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s, NVLink "
            f"{hw.nvlink / 1e9:.0f} GB/s within {hw.node} GPUs, IB {hw.ib / 1e9:.0f} GB/s per "
            "GPU beyond. Cells: predicted ms (GB each rank sends). n/a (heads): all-to-all "
            "needs the world size to divide the 32 heads. sharding: the assignment of the ring "
            "and all-gather columns; TFLOP/rank: the busiest rank's, for the fastest "
            "strategy.\n\n"
            "## Causal softmax, bf16, 32 query heads, 8 kv heads (GQA), head dim 128\n\n"
            + table("causal", softmax, hw)
            + "\n## Document mask (causal, documents of 64K tokens), same shapes\n\n"
            + table("document", softmax, hw)
            + "\n## Gated delta rule (L6), bf16, 32 heads, Dk = Dv = 128, fp32 states\n\n"
            + table("gated-delta", linear, hw)
            + "\n## Scalar-gated linear attention (L3, LASP-2's setting), bf16, 32 heads, "
            "Dk = Dv = 128\n\n" + table("linear-attention", linear, hw))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cp_model", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="causal", choices=sorted(SPECS) + sorted(LINEAR))
    p.add_argument("--L", type=int, default=1024 * K)
    p.add_argument("--world", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: 8 (softmax), = heads "
                   "(linear)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--efficiency", type=float, default=0.6)
    p.add_argument("--table", action="store_true", help="print the table of the module "
                   "docstring's shapes and write benchmarks/results/cp_model.md")
    args = p.parse_args(argv)
    hw = Hardware(efficiency=args.efficiency)
    if args.table:
        text = report(hw)
        RESULTS.write_text(text)
        print(text)
        return 0
    kv = args.kv_heads or (args.heads if args.spec in LINEAR else 8)
    shape = Shape(args.L, args.world, args.heads, kv, args.head_dim, args.dtype)
    found = strategies(args.spec, shape, hw)
    for s in found:
        if math.isinf(s.seconds):
            print(f"{s.name:>18}: refused: {s.note}")
            continue
        print(f"{s.name:>18}: {s.seconds * 1e3:10.2f} ms  {s.bytes_per_rank / 1e9:8.3f} GB/rank  "
              f"{s.flops_per_rank / 1e12:9.2f} TFLOP/rank  {s.note}")
    print(f"fastest: {fastest(found).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
