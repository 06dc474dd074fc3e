"""The LSE merge of partial attention results, in PyTorch: the one implementation.

Softmax attention over a key set split into disjoint parts is recovered from each part's output
`o_i` and log-sum-exp `lse_i` (docs/semantics.md):

    lse = logaddexp(lse_1, lse_2, ...)        o = sum_i e^(lse_i - lse) o_i

Split-KV decode, cascade attention, persistent memory slots and context parallelism all combine
their parts this way. A part with no allowed key (`o_i = 0`, `lse_i = -inf`) weighs nothing; a
row empty in every part stays `o = 0`, `lse = -inf`, never NaN.

It lives here, in `attncc.backends` but in no backend, because both sides need it: the reference
backend merges its key chunks with it (a backend may not import `attncc.ops`), and everything
above the backends reaches it through its documented front, `attncc.ops.merge` (which may not
import a concrete backend).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_pair(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine results over disjoint key sets: `lse = logaddexp(lse1, lse2)`,
    `o = e^(lse1 - lse) o1 + e^(lse2 - lse) o2`; rows empty on both sides stay (0, -inf).
    o* [..., Dv], lse* [...]; the result has their promoted dtype."""
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    # an all-empty row has lse = -inf: exp(-inf - -inf) would be nan, so weigh it 0 instead
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w1 = torch.where(finite, torch.exp(lse1 - safe), torch.zeros_like(lse))
    w2 = torch.where(finite, torch.exp(lse2 - safe), torch.zeros_like(lse))
    return w1[..., None] * o1 + w2[..., None] * o2, lse


def merge(o_parts: Sequence[torch.Tensor] | torch.Tensor,
          lse_parts: Sequence[torch.Tensor] | torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of n >= 1 parts: `o_parts[i]` [..., Dv] and `lse_parts[i]` [...] (a sequence,
    or tensors with the parts on dim 0). Folds `merge_pair` from the empty result (0, -inf),
    which it leaves exactly unchanged, so one part comes back as itself (as a new tensor)."""
    if len(o_parts) != len(lse_parts) or len(o_parts) == 0:
        raise ValueError(f"merge: expected as many o parts as lse parts, at least one, got "
                         f"{len(o_parts)} and {len(lse_parts)}")
    o = torch.zeros_like(o_parts[0])
    lse = torch.full_like(lse_parts[0], -torch.inf)
    for o_i, lse_i in zip(o_parts, lse_parts):
        o, lse = merge_pair(o, lse, o_i, lse_i)
    return o, lse
