"""The Triton backend's linear-recurrence family: the recurrent (one token per step) and
chunked (prefill) kernels of one `LinearState`, and its backward kernels, built on first use.

The backward is picked by rule (`backward_kernel`): the chunked matrix form
(`backward_chunked.TritonChunkedLinearBackward`) for the additive rules L1-L4 with phi identity
or elu1, the chunked WY form (`backward_delta.TritonDeltaChunkedBackward`) for the delta rules
L5, L6; taylor2 and L7 have neither (`no_backward`: the caller differentiates the reference,
with a warning). The token-at-a-time reverse sweep (`backward.TritonLinearBackward`) takes the
combinations outside the catalog that neither chunked form covers (a delta write with a vector
gate). docs/performance.md lists the same routing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attncc.backends.base import Unsupported
from attncc.backends.triton.linear.backward import TritonLinearBackward, unsupported
from attncc.backends.triton.linear.backward_chunked import (TritonChunkedLinearBackward,
                                                            unsupported_chunked)
from attncc.backends.triton.linear.backward_delta import (TritonDeltaChunkedBackward,
                                                          unsupported_delta)
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.ir.linear import LinearState

if TYPE_CHECKING:
    from attncc.backends.base import Backend

Backward = TritonChunkedLinearBackward | TritonDeltaChunkedBackward | TritonLinearBackward


class TritonLinear:
    """`LinearFamily` of the Triton backend. `recurrent` / `chunked`: the kernels (either may
    be None, not both); `no_backward`: why there is no backward kernel, or None."""

    def __init__(self, backend: Backend, node: LinearState) -> None:
        why = []
        try:
            self.recurrent: TritonRecurrentLinear | None = TritonRecurrentLinear(node)
        except NotImplementedError as e:  # L7: no one-token form; the chunked kernel covers it
            self.recurrent, why = None, why + [str(e)]
        try:
            self.chunked: TritonChunkedLinear | None = TritonChunkedLinear(node)
        except NotImplementedError as e:  # the recurrent kernel covers the rule alone
            self.chunked, why = None, why + [str(e)]
        if self.recurrent is None and self.chunked is None:
            raise Unsupported("; ".join(why))
        self.backend, self.node = backend, node
        self.name = (self.recurrent or self.chunked).name
        self.no_backward = unsupported(node)
        self._backward: Backward | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None,
                beta: Tensor | None, scale: float | None, initial_state: Tensor | None,
                cu_seqlens: Tensor | None, return_state: bool) -> tuple[Tensor, Tensor | None]:
        """The chunked kernel for prefill (more than one token per sequence), the recurrent
        one for decode, or whichever exists."""
        args: dict[str, Any] = {"g": g, "beta": beta, "scale": scale,
                                "initial_state": initial_state}
        if cu_seqlens is not None:  # more tokens than sequences: some sequence is a prefill
            args["cu_seqlens"] = cu_seqlens
            many = isinstance(q, torch.Tensor) and q.dim() == 3 and \
                q.shape[0] > cu_seqlens.numel() - 1
        else:
            many = isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] > 1
        use_chunked = self.chunked is not None and (many or self.recurrent is None)
        kernel = self.chunked if use_chunked else self.recurrent
        out = kernel(q, k, v, return_state=return_state, **args)
        return out if return_state else (out, None)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, o: Tensor | None,
                 g: Tensor | None, beta: Tensor | None, scale: float | None,
                 initial_state: Tensor | None, d_final_state: Tensor | None,
                 cu_seqlens: Tensor | None) -> dict[str, Tensor | None]:
        """The rule's backward kernels (`backward_kernel`, built on first use); the caller
        checks `no_backward` first."""
        if self.no_backward is not None:
            raise Unsupported(self.no_backward)
        if self._backward is None:
            self._backward = backward_kernel(self.node)
        return self._backward(q, k, v, do, o=o, g=g, beta=beta, scale=scale,
                              initial_state=initial_state, d_final_state=d_final_state,
                              cu_seqlens=cu_seqlens)


def backward_kernel(node: LinearState) -> Backward:
    """The backward for `node`, by rule: the chunked form for L1-L4 (phi identity or elu1),
    the chunked WY form for L5, L6, else the token sweep (whose constructor rejects the rules
    that have no backward kernel)."""
    if unsupported_chunked(node) is None:
        return TritonChunkedLinearBackward(node)
    if unsupported_delta(node) is None:
        return TritonDeltaChunkedBackward(node)
    return TritonLinearBackward(node)
