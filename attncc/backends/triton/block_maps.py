"""Run-time block maps: per query tile, the lists of partial and full kv tiles the kernel visits.

A block map is a kernel argument, so new mask values (parameters, captured tensors, a new
permutation) never recompile. `BlockMaps` builds one per call shape with the builder the
choose-tile-source pass named, and keeps the last few where reuse is certain: same shapes, tile
sizes and parameter values, and captured tensors EQUAL by value to the ones the map was built
from (a data pointer and version are no identity); see `BlockMaps`.

Layout (`kv_tile_lists`): int32 [Gb, Gh, nM, 2, 1 + nN], where Gb is B when the mask reads the
batch index (else 1), Gh likewise for heads, handed to the kernel expanded to [B, Hq, ...]
(stride 0 where Gb or Gh is 1); `[..., 0, :]` lists the
partial tiles (count, then indices in ascending order), `[..., 1, :]` the full ones.
"""

from __future__ import annotations

from typing import Any, Mapping

import sympy
import torch

from attncc.backends.triton.forward import TritonForward, argument_values
from attncc.backends.triton.launch_spec import block_map_launch_arguments
from attncc.backends.triton.render import block_map_arguments
from attncc.ir.positions import DATA_ORDERS
from attncc.value_cache import ValueCache, keep, on_host
from attncc.ir.plan import KernelPlan
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, LK, LQ, Q_IDX
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.passes.canonicalize import rewrite
from attncc.passes.classify_blocks import classify_blocks

CACHED_MAPS = 8  # per compiled kernel: enough for the shapes of a training or serving loop


def group_sizes(plan: KernelPlan, B: int, Hq: int) -> tuple[int, int]:
    """(Gb, Gh): the batch and head extents the mask actually distinguishes."""
    expr = plan.spec.mask.expr
    return (B if expr.has(B_IDX) else 1), (Hq if expr.has(H_IDX) else 1)


def kv_tile_lists(classes: torch.Tensor, Lk: int, block_n: int) -> torch.Tensor:
    """int8 classes [Gb, Gh, nM, nN] -> the kernel's int32 lists. Device ops only, no sync.

    A full tile that runs past Lk is listed as partial: the kernel masks the missing columns
    only on partial tiles."""
    classes = classes.clone()
    if Lk % block_n:
        last = classes[..., -1]
        last[last == FULL] = PARTIAL
    out = torch.empty(*classes.shape[:3], 2, 1 + classes.shape[3], dtype=torch.int32,
                      device=classes.device)
    for slot, kind in enumerate((PARTIAL, FULL)):
        hit = classes == kind
        # stable sort of "not hit": the listed tiles first, in ascending kv order
        out[..., slot, 1:] = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices
        out[..., slot, 0] = hit.sum(-1)
    return out


def topk_classes(plan: KernelPlan, *, B: int, Hq: int, Lq: int, Lk: int, block_m: int,
                 block_n: int, params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                 ) -> torch.Tensor | None:
    """M16: the index tensor `block_idx[b, h, I, :]` names the kv blocks of query block
    I = qp // block (plus the diagonal block), so its entries become kv tiles directly:
    O(B Hq nM (k + nN)) device work. Needs tiles nested in blocks (block a multiple of both
    tile sizes, and the query offset Lk - Lq a non-negative multiple of block, so a query
    tile's aligned positions stay in one block and none is negative); None otherwise."""
    block = int(params["block"])
    if block % block_m or block % block_n or Lk < Lq or (Lk - Lq) % block:
        return None
    idx = tensors["block_idx"][:B, :Hq].long()
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    per_block = block // block_n
    # the aligned position qp = q + Lk - Lq of each query tile's first row picks its block
    q_block = (torch.arange(n_m, device=idx.device) * block_m + Lk - Lq) // block
    picks = idx[:, :, q_block.clamp(max=idx.shape[2] - 1), :]  # [B, Hq, nM, k]
    # a query block past the index tensor reads 0s (the IR's out-of-range rule): kv block 0
    picks = torch.where((q_block < idx.shape[2]).view(1, 1, -1, 1), picks, 0)
    picks = torch.cat([picks, q_block.view(1, 1, -1, 1).expand(*picks.shape[:3], 1)], -1)
    tiles = picks.unsqueeze(-1) * per_block + torch.arange(per_block, device=idx.device)
    tiles = tiles.flatten(-2)
    valid = (picks >= 0).repeat_interleave(per_block, -1) & (tiles < n_n)
    chosen = torch.zeros(*tiles.shape[:3], n_n + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, torch.where(valid, tiles, n_n), True)
    chosen = chosen[..., :n_n]
    causal = _causal_classes(Lq, Lk, block_m, block_n, idx.device) if _is_causal(plan) else None
    full = torch.full((n_m, n_n), FULL, dtype=torch.int8, device=idx.device)
    return torch.where(chosen, causal if causal is not None else full,
                       torch.tensor(EMPTY, dtype=torch.int8, device=idx.device))


def _is_causal(plan: KernelPlan) -> bool:
    """Whether the top-k mask is `... & causal()` (block_topk(causal=True))."""
    causal = rewrite(sympy.Le(KV_IDX, Q_IDX + LK - LQ))
    return causal in sympy.And.make_args(plan.spec.mask.expr)


def _causal_classes(Lq: int, Lk: int, block_m: int, block_n: int,
                    device: torch.device) -> torch.Tensor:
    """M1 classes per tile pair: `kv <= q + Lk - Lq` is monotone, so two comparisons decide."""
    q_first = torch.arange(0, Lq, block_m, device=device) + Lk - Lq
    q_last = torch.clamp(q_first + block_m - 1, max=Lk - 1)
    kv_first = torch.arange(0, Lk, block_n, device=device)
    kv_last = torch.clamp(kv_first + block_n - 1, max=Lk - 1)
    full = kv_last[None, :] <= q_first[:, None]
    some = kv_first[None, :] <= q_last[:, None]
    return torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def device_classes(forward: TritonForward, *, Gb: int, Gh: int, Lq: int, Lk: int, Hq: int, Hkv: int,
                   block_m: int, block_n: int, params: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor],
                   positions: tuple[torch.Tensor, torch.Tensor] | None,
                   device: torch.device, prebuilt_for: tuple[str, int, int] | None = None
                   ) -> torch.Tensor:
    """Launch the generated block-map kernel: one program per (query tile, group). It
    classifies from per-row key intervals or at every pair, as `plan.block_map.rows` says
    (`attncc.backends.triton.render.render_block_map`).
    `prebuilt_for`: the (dtype, Dqk, Dv) of the forward or backward launch the map is for; on
    a GPU the prebuilt block-map binary at these tiles runs (`attncc.backends.triton.prebuilt`),
    otherwise Triton's JIT (`TritonForward.launch_block_map` decides)."""
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    classes = torch.empty(Gb, Gh, n_m, n_n, dtype=torch.int8, device=device)
    values = block_map_values(forward.plan, classes, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv,
                              block_m=block_m, block_n=block_n, params=params, tensors=tensors,
                              positions=positions)
    forward.launch_block_map((n_m, Gb * Gh), values, device, prebuilt_for, (block_m, block_n))
    return classes


def block_map_values(plan: KernelPlan, classes: torch.Tensor, *, Lq: int, Lk: int, Hq: int,
                     Hkv: int, block_m: int, block_n: int, params: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor],
                     positions: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """The block-map kernel's arguments (either form: both take the same ones) for a launch
    on grid (nM, Gb * Gh) that writes `classes` (int8 [Gb, Gh, nM, nN])."""
    arguments = block_map_launch_arguments() + block_map_arguments(plan)
    values = dict(zip((name for name, _ in arguments), [
        classes, *classes.stride()[:3], classes.shape[1], Lq, Lk, Hq, Hkv,
        *argument_values(plan, params, tensors, None, positions,
                         block_map_arguments(plan))], strict=True))
    values.update(BLOCK_M=block_m, BLOCK_N=block_n)
    return values


def analytic_classes(plan: KernelPlan, *, Gb: int, Gh: int, B: int, Lq: int, Lk: int, Hq: int,
                     Hkv: int, block_m: int, block_n: int, params: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor],
                     positions: tuple[torch.Tensor, torch.Tensor] | None,
                     device: torch.device) -> torch.Tensor:
    """Interval reasoning on the symbolic mask, O(number of tiles), on the host (static tables
    are read there too: they are copied to the host, and `BlockMaps` keeps the map for equal
    values)."""
    q_pos, kv_pos = (None, None) if positions is None else (p.cpu().long() for p in positions)
    result = classify_blocks(plan.spec.mask.expr, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv, B=B,
                             block_m=block_m, block_n=block_n, params=params,
                             tensors={n: t.cpu() for n, t in tensors.items()},
                             q_pos=q_pos, kv_pos=kv_pos)
    assert result.classes.shape[:2] == (Gb, Gh), (result.classes.shape, Gb, Gh)
    return result.classes.to(device)


class BlockMaps:
    """The block maps of one compiled kernel, built on demand and kept for reuse.

    A map is reused only when it is certain to hold (see `attncc.value_cache`):
    - a mask that reads no tensor (and tokens in a fixed order): cached by shapes, tiles and
      parameter values;
    - tensors on the host, or the host builder ("analytic", which copies them there anyway):
      cached with copies of the tensors, reused when they compare equal (`torch.equal`; on a
      GPU the analytic path pays one device-to-host copy per call for this);
    - device tensors with a device builder ("topk", "device"): rebuilt on every call, a few
      kernel launches and no host sync, so asynchronous execution and CUDA graphs keep working.
    """

    def __init__(self, forward: TritonForward) -> None:
        self.forward = forward
        self.plan: KernelPlan = forward.plan
        self.builds = 0  # how many maps were built (tests: an unchanged call builds none)
        self._maps: ValueCache[torch.Tensor] = ValueCache(CACHED_MAPS)
        # the mask's captured tensors by name, in sorted order (the map's key and data order)
        self._reads = tuple(sorted({c.name for c in self.plan.spec.mask.captures}))

    def get(self, *, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, block_m: int, block_n: int,
            params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
            positions: tuple[torch.Tensor, torch.Tensor] | None,
            device: torch.device, prebuilt_for: tuple[str, int, int] | None = None
            ) -> torch.Tensor:
        """The block map for one call; `prebuilt_for`: see `device_classes`."""
        reads = {name: tensors[name] for name in self._reads}
        data = list(reads.values())
        # a grid order's positions follow from (Lq, Lk, device) alone; R5 / R6 from tensors
        if positions is not None and isinstance(self.plan.spec.reorder, DATA_ORDERS):
            data += list(positions)
        key = (B, Hq, Hkv, Lq, Lk, block_m, block_n, device,
               tuple(sorted(params.items())) if params else (), self._reads)
        cacheable = on_host(data) or self.plan.block_map.source == "analytic"
        if cacheable:
            hit = self._maps.get(key, data)
            if hit is not None:
                return hit
            kept = keep(data)
        lists = self._build(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, block_m=block_m,
                            block_n=block_n, params=params, tensors=tensors, reads=reads,
                            positions=positions, device=device, prebuilt_for=prebuilt_for)
        if cacheable:
            self._maps.put(key, kept, lists)
        return lists

    def _build(self, *, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, block_m: int,
               block_n: int, params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
               reads: Mapping[str, torch.Tensor],
               positions: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
               prebuilt_for: tuple[str, int, int] | None) -> torch.Tensor:
        source = self.plan.block_map.source
        Gb, Gh = group_sizes(self.plan, B, Hq)
        shape = dict(Lq=Lq, Lk=Lk, block_m=block_m, block_n=block_n, params=params)
        classes = None
        if source == "topk":
            classes = topk_classes(self.plan, B=B, Hq=Hq, tensors=tensors, **shape)
        if classes is None and source in ("topk", "device"):
            classes = device_classes(self.forward, Gb=Gb, Gh=Gh, Hq=Hq, Hkv=Hkv, tensors=tensors,
                                     positions=positions, device=device,
                                     prebuilt_for=prebuilt_for, **shape)
        if classes is None:
            classes = analytic_classes(self.plan, Gb=Gb, Gh=Gh, B=B, Hq=Hq, Hkv=Hkv,
                                       tensors=reads, positions=positions, device=device,
                                       **shape)
        self.builds += 1
        # groups the mask does not distinguish broadcast with stride 0
        return kv_tile_lists(classes, Lk, block_n).expand(B, Hq, -1, -1, -1)


def q_tile_lists(kv_tiles: torch.Tensor) -> torch.Tensor:
    """The transposed block map for the backward's dk/dv kernel: int32 [B, Hq, nN, 2, 1 + nM],
    per kv tile the query tiles that visit it, partial ones `[..., 0, :]` then full ones
    `[..., 1, :]` (count, then indices in ascending order), with exactly the classes of
    `kv_tiles` (int32 [B, Hq, nM, 2, 1 + nN] from `kv_tile_lists`). Device ops only, no sync;
    batch or head axes broadcast with stride 0 in `kv_tiles` stay broadcast, and nothing of size
    Lq x Lk is built (only the nM x nN tile classes)."""
    base = kv_tiles[:1] if kv_tiles.stride(0) == 0 else kv_tiles
    base = base[:, :1] if base.stride(1) == 0 else base
    n_n = base.shape[-1] - 1
    # one spare column takes the unused list slots
    classes = torch.full((*base.shape[:3], n_n + 1), EMPTY, dtype=torch.int8,
                         device=kv_tiles.device)
    slot_range = torch.arange(n_n, device=kv_tiles.device)
    for slot, kind in enumerate((PARTIAL, FULL)):
        listed = slot_range < base[..., slot, :1].long()
        where = torch.where(listed, base[..., slot, 1:].long(), n_n)
        classes.scatter_(-1, where, kind)
    classes = classes[..., :n_n].transpose(-1, -2)  # [Gb, Gh, nN, nM]
    out = torch.empty(*classes.shape[:3], 2, 1 + classes.shape[3], dtype=torch.int32,
                      device=kv_tiles.device)
    for slot, kind in enumerate((PARTIAL, FULL)):
        hit = classes == kind
        out[..., slot, 1:] = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices
        out[..., slot, 0] = hit.sum(-1)
    return out.expand(kv_tiles.shape[0], kv_tiles.shape[1], -1, -1, -1)
