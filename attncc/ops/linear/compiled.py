"""Linear-recurrence attention from the user API (L1-L7 in docs/catalog.md, "Linear rules").

    spec = attncc.Attention(memory=attncc.recurrent_state(update="delta", decay="scalar"))
    attn = attncc.compile(spec)
    o, final_state = attn(q, k, v, g=g, beta=beta, initial_state=s0, return_state=True)

`recurrent_state` names the update in the catalogue's terms and returns the IR's `LinearState`.
`CompiledLinearAttention` runs the generated Triton kernels: the chunked kernel where it covers
the rule and more than one token per sequence is processed, the recurrent kernel otherwise
(decode: L = 1 with a state in). Packed varlen inputs ([T, H, D] with `cu_seqlens` [N + 1], as
K3 `RaggedMemory`) run the same kernels, one program per sequence and head. Every rule L1-L7
has a kernel (L7 only the chunked one: it has no one-token form); the PyTorch reference runs
only when asked for (`backend="reference"`) or when the kernels cannot run (CPU tensors without
TRITON_INTERPRET=1), then with a warning naming why. Outputs are differentiable (o and the final
state, with respect to q, k, v, g, beta, initial_state) through the custom ops
`attncc::linear_fwd` / `attncc::linear_bwd` (`attncc.ops.linear.custom_op`): L1-L6 by the generated
backward kernel, the reference path by autograd through the spec loop; the rules with
no backward kernel (taylor2, L7) differentiate the reference, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from attncc.backends import registry
from attncc.backends.base import LinearFamily, Unsupported
from attncc.ir.linear import LinearState
from attncc.ir.spec import AttentionSpec
from attncc.ops.linear import custom_op as torch_ops_linear
from attncc.ops.linear.backward import needs_grad

class CompiledLinearAttention:
    """attn(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, return_state=False,
    cu_seqlens=None, backend="auto") for a spec whose memory is a `LinearState`. q, k
    [B, H, L, Dk], v [B, H, L, Dv]; the state is fp32 [B, H, F, Dv'] (see `attncc.ir.linear`).
    With `cu_seqlens` (int [N + 1]): q, k [T, H, Dk], v [T, H, Dv] packed, states [N, H, F, Dv']
    (as the reference's varlen form: one sequence after another)."""

    def __init__(self, spec: AttentionSpec, backend: str = "auto") -> None:
        self.backend = registry.check_name(backend)
        self.spec = spec
        self.node: LinearState = spec.memory
        # every backend's family for this rule, or the Unsupported error saying why it has none
        self.families: dict[str, LinearFamily | Unsupported] = registry.families(
            lambda b: b.linear(self.node))
        self.kernels: LinearFamily | None = registry.compiled_family(self.families)
        self.why_not = registry.why_none(self.families)  # why no backend has kernels, or None
        self._no_backward = self.kernels.no_backward if self.kernels is not None else None
        self.key = torch_ops_linear.register(self)  # the name attncc::linear_fwd finds it by

    @property
    def name(self) -> str:
        return self.kernels.name if self.kernels is not None else "reference"

    @property
    def recurrent(self) -> Any:
        """The generated one-token (decode) kernel, or None."""
        return self.kernels.recurrent if self.kernels is not None else None

    @property
    def chunked(self) -> Any:
        """The generated chunked (prefill) kernel, or None."""
        return self.kernels.chunked if self.kernels is not None else None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 g: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                 scale: float | torch.Tensor | None = None,
                 initial_state: torch.Tensor | None = None, return_state: bool = False,
                 cu_seqlens: torch.Tensor | None = None, backend: str | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The work is the custom op `attncc::linear_fwd` (`attncc.ops.linear.custom_op`): o and
        the final state are differentiable and torch.compile sees one graph node. `scale` may
        be a one-element CPU tensor: a new value then never recompiles a compiled graph."""
        scale = scale if scale is not None else self.spec.scale
        chosen = backend or self.backend
        if chosen != "reference" and self._no_backward is not None and \
                needs_grad(q, k, v, g, beta, initial_state):
            # no backward kernel for this rule: run and differentiate the spec's reference
            warnings.warn(f"{self.node.text()}: running the PyTorch reference (slow path) "
                          f"for gradients: {self._no_backward}", stacklevel=2)
            chosen = "reference"
        o, state = torch_ops_linear.linear(self, q, k, v, g, beta, initial_state, cu_seqlens,
                                           scale, return_state, chosen)
        return (o, state) if return_state else o

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None,
            beta: torch.Tensor | None, scale: float | None, initial_state: torch.Tensor | None,
            cu_seqlens: torch.Tensor | None, return_state: bool, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The op's implementation (no autograd): choose the backend and run its family (the
        generated kernels pick chunked for prefill, recurrent for decode); returns (o, final
        state or None)."""
        return self.family(backend, q.device).forward(
            q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
            cu_seqlens=cu_seqlens, return_state=return_state)

    def family(self, backend: str, device: torch.device, *, warn: bool = True) -> LinearFamily:
        """The family a call on `device` runs. "auto": the generated kernels where they run,
        else the reference with a warning naming why (`warn=False`: the backward, whose forward
        warned already); a named backend without kernels for this rule raises ValueError."""
        if backend != "auto":
            family = self.families[registry.check_name(backend)]
            if isinstance(family, Unsupported):
                raise ValueError(f"backend {backend!r}: {family}; use backend='reference'")
            return family
        choice = registry.resolve(backend, device)
        if self.kernels is not None and choice.why is None:
            return self.families[choice.name]
        why = self.why_not or (f"{choice.why} (use CUDA tensors, or TRITON_INTERPRET=1 to run "
                               "the kernel on the CPU)")
        if warn:
            warnings.warn(f"{self.node.text()}: running the PyTorch reference (slow path): {why}",
                          stacklevel=3)
        return self.families[registry.FALLBACK]

    def __repr__(self) -> str:
        return f"CompiledLinearAttention({self.node.text()})"

