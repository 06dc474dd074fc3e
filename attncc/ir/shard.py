"""Global positions for a shard of queries (docs/context_parallel.md).

Context parallelism runs a rank's queries, a slice `[offset, offset + Lq)` of a sequence of
`Lk` tokens, against every key. On the whole sequence (`Lq == Lk`) a query row's position is
its row: named masks read the aligned position `q_idx + Lk - Lq`, traced functions, documents,
trees and biases read the raw row `q_idx` (docs/semantics.md, "Query positions when
Lq != Lk"); both mean the same there. On a shard they do not, and neither is the global
position. `at_query_offset` rewrites a spec so that both read `q_idx + offset`: `q_idx` becomes
`q_idx + offset` and `Lq` becomes `Lk` (the whole sequence has as many queries as keys), with
`offset` a runtime int parameter (`SHARD_OFFSET`): one kernel serves every shard, and a mask,
a score or a captured tensor indexed by the query means on a shard what it means on the whole
sequence. Keys are not rewritten: every rank holds all of them in sequence order (all-gather).

`at_head_offset` is the same idea along heads, for the all-to-all (Ulysses) strategy: a rank
runs the whole sequence for a slice `[offset, offset + Hq / W)` of the query heads, so `h`
becomes `h + shard_head_offset` and `Hq`, `Hkv` the whole model's head counts (`shard_hq`,
`shard_hkv`), all runtime int parameters: per-head ALiBi slopes, per-head masks (M18) and
captured tensors indexed by head read the rank's GLOBAL heads. The sink normaliser's `sink[h]`
is not an expression: the caller slices the sink tensor instead.

`at_pair_offset` is the ring's rewrite: a rank runs a chunk of queries against a chunk of keys,
neither of them the whole sequence, so both indices move: `q_idx -> q_idx + shard_q_offset`,
`kv_idx -> kv_idx + shard_kv_offset`, and `Lq`, `Lk` become the whole sequence's length
`shard_len`. All three are runtime int parameters: one kernel serves every (query chunk, key
chunk) pair of every rank.
"""

from __future__ import annotations

import dataclasses

from attncc.ir.nodes import DenseMemory, Param
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_IDX

__all__ = ["HEAD_PARAMS", "PAIR_PARAMS", "SHARD_OFFSET", "at_head_offset", "at_pair_offset",
           "at_query_offset", "head_names", "offset_names", "pair_names"]

# the runtime parameter that holds a shard's first global query position
SHARD_OFFSET = "shard_q_offset"
# the runtime parameters of a head slice: its first global query head, the global Hq and Hkv
HEAD_PARAMS = ("shard_head_offset", "shard_hq", "shard_hkv")
# the runtime parameters of a (query chunk, key chunk) pair: the first global query position,
# the first global key position, the whole sequence's length
PAIR_PARAMS = ("shard_q_offset", "shard_kv_offset", "shard_len")


def at_query_offset(spec: AttentionSpec) -> AttentionSpec:
    """`spec` with every query index read at global position `q_idx + shard_q_offset`.

    Requires: dense memory, no reorder, no parameter or capture already named
    `shard_q_offset` or `shard_q_offset_s`. Ensures: the mask reads `shard_q_offset`, the score
    `shard_q_offset_s` (one namespace of parameters per spec); a node that reads neither
    `q_idx` nor `Lq` is kept as is, and when none does the spec comes back unchanged and takes
    no offset (`offset_names` lists what a call sets)."""
    _require_dense(spec, "sharded queries")
    if spec.reorder is not None:
        raise ValueError(f"sharded queries: reorder {spec.reorder.text()} is not supported yet "
                         "(a rank's rows would need their original positions)")
    names = {x.name for x in (*spec.params, *spec.captures)}
    if {SHARD_OFFSET, SHARD_OFFSET + "_s"} & names:
        raise ValueError(f"sharded queries: the spec already has a parameter or tensor named "
                         f"{SHARD_OFFSET!r} or {SHARD_OFFSET + '_s'!r}, the names the shard "
                         "offset takes; rename it")

    def rule(read, suffix):
        if not read & {Q_IDX, LQ}:
            return None
        offset = Param(SHARD_OFFSET + suffix, "int", 0)
        return (offset,), {Q_IDX: Q_IDX + offset.symbol, LQ: LK}
    return _rewritten(spec, rule)


def offset_names(spec: AttentionSpec) -> tuple[str, ...]:
    """The parameters of a spec from `at_query_offset` that take the shard's offset (none, the
    mask's, the score's or both): a call passes the same value to each."""
    return tuple(p.name for p in spec.params if p.name.startswith(SHARD_OFFSET))


def at_head_offset(spec: AttentionSpec) -> AttentionSpec:
    """`spec` with every head index read at global head `h + shard_head_offset` and `Hq`, `Hkv`
    read as the global head counts `shard_hq`, `shard_hkv`.

    Requires: dense memory, no parameter or capture already named like those (or with the
    score's `_s` suffix). Reorders are kept: they permute positions, not heads. Ensures: each of
    mask and score gets only the parameters it reads (the score's carry the suffix `_s`: one
    namespace per spec); when neither reads `h`, `Hq` or `Hkv` the spec comes back unchanged
    (`head_names` lists what a call sets)."""
    _require_dense(spec, "sharded heads")
    _refuse_taken(spec, HEAD_PARAMS, "sharded heads", "a name the head offset takes")

    def rule(read, suffix):
        used = [(sym, name) for sym, name in zip((H_IDX, HQ, HKV), HEAD_PARAMS) if sym in read]
        if not used:
            return None
        # the offset may be 0, the head counts are positive
        params = {sym: Param(name + suffix, "int", 0 if sym is H_IDX else 1,
                             positive=sym is not H_IDX) for sym, name in used}
        subs = {sym: (H_IDX + p.symbol if sym is H_IDX else p.symbol) for sym, p in params.items()}
        return tuple(params.values()), subs
    return _rewritten(spec, rule)


def head_names(spec: AttentionSpec) -> dict[str, int]:
    """name -> index into (first head, Hq, Hkv) of each parameter of a spec from
    `at_head_offset` (the mask's and the score's): what a call sets."""
    return _call_names(spec, HEAD_PARAMS)


def at_pair_offset(spec: AttentionSpec) -> AttentionSpec:
    """`spec` with every query index read at `q_idx + shard_q_offset`, every key index at
    `kv_idx + shard_kv_offset`, and `Lq`, `Lk` read as the whole sequence's length `shard_len`.

    Requires: dense memory, no reorder, no parameter or capture already named like those (or
    with the score's `_s` suffix). Ensures: each of mask and score gets only the parameters it
    reads (the score's carry the suffix `_s`); when neither reads a position or a length the
    spec comes back unchanged (`pair_names` lists what a call sets)."""
    _require_dense(spec, "sharded pairs")
    if spec.reorder is not None:
        raise ValueError(f"sharded pairs: reorder {spec.reorder.text()} is not supported yet "
                         "(a rank's rows and keys would need their original positions)")
    _refuse_taken(spec, PAIR_PARAMS, "sharded pairs", "a name the shard offsets take")
    q_off, kv_off, length = PAIR_PARAMS

    def rule(read, suffix):
        params = {}
        if Q_IDX in read or LQ in read:  # named masks read q_idx + Lk - Lq
            params[q_off] = Param(q_off + suffix, "int", 0)
        if KV_IDX in read:
            params[kv_off] = Param(kv_off + suffix, "int", 0)
        if read & {LQ, LK}:
            params[length] = Param(length + suffix, "int", 1, positive=True)
        if not params:
            return None
        subs = {}
        if q_off in params:
            subs[Q_IDX] = Q_IDX + params[q_off].symbol
        if kv_off in params:
            subs[KV_IDX] = KV_IDX + params[kv_off].symbol
        if length in params:
            subs[LQ] = subs[LK] = params[length].symbol
        return tuple(params.values()), subs
    return _rewritten(spec, rule)


def pair_names(spec: AttentionSpec) -> dict[str, int]:
    """name -> index into (query offset, key offset, length) of each parameter of a spec from
    `at_pair_offset` (the mask's and the score's): what a call sets."""
    return _call_names(spec, PAIR_PARAMS)


def _require_dense(spec: AttentionSpec, kind: str) -> None:
    if not isinstance(spec.memory, DenseMemory):
        raise ValueError(f"{kind}: memory {spec.memory.text()!r} is not a dense sequence; "
                         "context parallelism runs dense softmax specs only")


def _refuse_taken(spec: AttentionSpec, params: tuple[str, ...], kind: str, what: str) -> None:
    """A clear error when the spec already names a parameter or tensor like one of `params`
    (or with the score's suffix `_s`)."""
    names = {x.name for x in (*spec.params, *spec.captures)}
    taken = sorted(names & {n + suffix for n in params for suffix in ("", "_s")})
    if taken:
        raise ValueError(f"{kind}: the spec already has a parameter or tensor named "
                         f"{taken[0]!r}, {what}; rename it")


def _rewritten(spec: AttentionSpec, rule) -> AttentionSpec:
    """`spec` with `rule(symbols the node reads, suffix)` applied to its mask (suffix "") and
    its score (suffix "_s": parameters are declared per node and must not repeat), where `rule`
    gives (parameters to add, substitutions) or None to keep the node as is; the spec itself
    when no node changes."""
    changes = {}
    for axis, suffix in (("mask", ""), ("score", "_s")):
        node = getattr(spec, axis)
        rewrite = rule(node.expr.free_symbols, suffix) if node is not None else None
        if rewrite is not None:
            params, subs = rewrite
            changes[axis] = dataclasses.replace(node, expr=node.expr.subs(subs, simultaneous=True),
                                                params=(*node.params, *params))
    return spec.replace(**changes) if changes else spec


def _call_names(spec: AttentionSpec, params: tuple[str, ...]) -> dict[str, int]:
    """name -> index into `params` of each parameter of `spec` that is one of them (the mask's,
    or the score's with the suffix `_s`)."""
    return {p.name: params.index(p.name.removesuffix("_s")) for p in spec.params
            if p.name.removesuffix("_s") in params}
