"""attncc.dist: attention over a sequence sharded across the ranks of a `torch.distributed`
process group (context parallelism, docs/context_parallel.md).

Implemented: softmax attention by all-gather of K and V, by all-to-all between sequence and
heads (Ulysses), or by a ring of K/V chunks (point-to-point hops overlapped with each step's
compute, LSE merge of the partial results, fully masked chunk pairs skipped, a backward that
rotates K/V with their gradients), forward and backward, with contiguous, head-tail or any
`Sharding` of the sequence; linear recurrences (L1-L6) by state passing (one all-gather of each
shard's affine map), also varlen (packed sequences crossing shard edges, `attncc.dist.varlen`
plans each shard), forward and backward. The collectives are PyTorch's functional collectives, so the all-gather and all-to-all
strategies and state passing run inside `torch.compile` (the ring's point-to-point hops and the
varlen final-state all-reduce are eager only); `attncc.nn` modules take a process group or a
device mesh (`context_parallel_plan` checks those arguments). Planned (issue 16): p2p to
non-empty shard pairs only, the prefix scan.
"""

from attncc.dist.collectives import (gather_sequence, heads_to_sequence, sequence_to_heads,
                                    shard_sequence)
from attncc.dist.group import context_parallel_plan
from attncc.dist.linear import context_parallel_linear
from attncc.dist.softmax import (STRATEGIES, choose_strategy, context_parallel_attention,
                                 sharding_for)
from attncc.passes.shard_balance import contiguous, greedy, head_tail
from attncc.passes.shard_pairs import Sharding

__all__ = ["STRATEGIES", "Sharding", "choose_strategy", "context_parallel_attention",
           "context_parallel_linear", "context_parallel_plan", "contiguous", "gather_sequence",
           "greedy", "head_tail", "heads_to_sequence", "sequence_to_heads", "shard_sequence", "sharding_for"]
