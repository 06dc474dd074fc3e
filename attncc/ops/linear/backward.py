"""Autograd for the linear-recurrence family (docs/catalog.md, L1-L7).

The autograd formula lives with the custom ops (`attncc.ops.linear.custom_op`): the op
`attncc::linear_bwd` runs the chosen backend's backward (generated kernels: the chunked matrix
form for L1-L4, the chunked WY form for L5, L6; or autograd through the reference loop;
docs/performance.md#linear-backward), so o and the final state are differentiable with respect
to q, k, v, g, beta and the initial state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def needs_grad(*tensors: Any) -> bool:
    """True when autograd is recording and some tensor among `tensors` requires a gradient."""
    return torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in tensors)
