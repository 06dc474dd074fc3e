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
"""

from __future__ import annotations

import dataclasses

from attncc.ir.nodes import DenseMemory, Param
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import LK, LQ, Q_IDX

__all__ = ["SHARD_OFFSET", "at_query_offset", "offset_names"]

# the runtime parameter that holds a shard's first global query position
SHARD_OFFSET = "shard_q_offset"


def at_query_offset(spec: AttentionSpec) -> AttentionSpec:
    """`spec` with every query index read at global position `q_idx + shard_q_offset`.

    Requires: dense memory, no reorder, no parameter or capture already named
    `shard_q_offset` or `shard_q_offset_s`. Ensures: the mask reads `shard_q_offset`, the score
    `shard_q_offset_s` (one namespace of parameters per spec); a node that reads neither
    `q_idx` nor `Lq` is kept as is, and when none does the spec comes back unchanged and takes
    no offset (`offset_names` lists what a call sets)."""
    if not isinstance(spec.memory, DenseMemory):
        raise ValueError(f"sharded queries: memory {spec.memory.text()!r} is not a dense "
                         "sequence; context parallelism runs dense softmax specs only")
    if spec.reorder is not None:
        raise ValueError(f"sharded queries: reorder {spec.reorder.text()} is not supported yet "
                         "(a rank's rows would need their original positions)")
    names = {x.name for x in (*spec.params, *spec.captures)}
    if {SHARD_OFFSET, SHARD_OFFSET + "_s"} & names:
        raise ValueError(f"sharded queries: the spec already has a parameter or tensor named "
                         f"{SHARD_OFFSET!r} or {SHARD_OFFSET + '_s'!r}, the names the shard "
                         "offset takes; rename it")
    changes = {}
    for axis, name in (("mask", SHARD_OFFSET), ("score", SHARD_OFFSET + "_s")):
        node = getattr(spec, axis)
        if node is not None and node.expr.free_symbols & {Q_IDX, LQ}:
            # parameters are declared per node and must not repeat: the score's has its own name
            offset = Param(name, "int", 0)
            subs = {Q_IDX: Q_IDX + offset.symbol, LQ: LK}
            changes[axis] = dataclasses.replace(node, expr=node.expr.subs(subs, simultaneous=True),
                                                params=(*node.params, offset))
    return spec.replace(**changes) if changes else spec


def offset_names(spec: AttentionSpec) -> tuple[str, ...]:
    """The parameters of a spec from `at_query_offset` that take the shard's offset (none, the
    mask's, the score's or both): a call passes the same value to each."""
    return tuple(p.name for p in spec.params if p.name.startswith(SHARD_OFFSET))
