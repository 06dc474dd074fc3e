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

from attncc import config
from attncc.ops.linear import custom_op as torch_ops_linear
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.triton.linear.backward import unsupported
from attncc.ir.linear import LinearState
from attncc.ir.spec import AttentionSpec
from attncc.ops.linear.backward import needs_grad

class CompiledLinearAttention:
    """attn(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, return_state=False,
    cu_seqlens=None, backend="auto") for a spec whose memory is a `LinearState`. q, k
    [B, H, L, Dk], v [B, H, L, Dv]; the state is fp32 [B, H, F, Dv'] (see `attncc.ir.linear`).
    With `cu_seqlens` (int [N + 1]): q, k [T, H, Dk], v [T, H, Dv] packed, states [N, H, F, Dv']
    (see `attncc.backends.reference.linear_varlen`)."""

    def __init__(self, spec: AttentionSpec, backend: str = "auto") -> None:
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend: expected one of ('auto', 'triton', 'reference'), "
                             f"got {backend!r}")
        self.spec = spec
        self.node: LinearState = spec.memory
        self.backend = backend
        self.recurrent, self.chunked, self.why_not = _kernels(self.node)
        self._backward: Any = None  # TritonLinearBackward, built when a gradient is first needed
        self._no_backward = unsupported(self.node)  # why there is no backward kernel, or None
        self.key = torch_ops_linear.register(self)  # the name attncc::linear_fwd finds it by

    @property
    def name(self) -> str:
        kernel = self.recurrent or self.chunked
        return kernel.name if kernel is not None else "reference"

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
        """The op's implementation (no autograd): choose the backend and the kernel (chunked
        for prefill, recurrent for decode) and run it; returns (o, final state or None)."""
        args = {"g": g, "beta": beta, "scale": scale, "initial_state": initial_state}
        if cu_seqlens is not None:
            args["cu_seqlens"] = cu_seqlens
        if self._choose(backend, q.device) == "reference":
            run = varlen_reference if cu_seqlens is not None else recurrent_reference
            return run(q, k, v, self.node, output_final_state=return_state, **args)
        if cu_seqlens is not None:  # more tokens than sequences: some sequence is a prefill
            many = isinstance(q, torch.Tensor) and q.dim() == 3 and \
                q.shape[0] > cu_seqlens.numel() - 1
        else:
            many = isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] > 1
        use_chunked = self.chunked is not None and (many or self.recurrent is None)
        kernel = self.chunked if use_chunked else self.recurrent
        out = kernel(q, k, v, return_state=return_state, **args)
        return out if return_state else (out, None)

    def _backward_kernel(self) -> Any:
        """The generated backward kernel (built on first use), or None with `_no_backward`."""
        if self._backward is None and self._no_backward is None:
            from attncc.backends.triton.linear.backward import TritonLinearBackward
            self._backward = TritonLinearBackward(self.node)
        return self._backward

    def _choose(self, backend: str, device: torch.device) -> str:
        if backend == "reference":
            return backend
        if backend == "triton" and self.recurrent is None and self.chunked is None:
            raise ValueError(f"backend 'triton': {self.why_not}; use backend='reference'")
        if backend == "triton":
            return backend
        if backend != "auto":
            raise ValueError(f"backend: expected one of ('auto', 'triton', 'reference'), "
                             f"got {backend!r}")
        runs_kernels = device.type == "cuda" or config.triton_interpret()
        if (self.recurrent is not None or self.chunked is not None) and runs_kernels:
            return "triton"
        why = self.why_not or ("CPU tensors and TRITON_INTERPRET is not set (use CUDA tensors, "
                               "or TRITON_INTERPRET=1 to run the kernel on the CPU)")
        warnings.warn(f"{self.node.text()}: running the PyTorch reference (slow path): {why}",
                      stacklevel=3)
        return "reference"

    def __repr__(self) -> str:
        return f"CompiledLinearAttention({self.node.text()})"


def _kernels(node: LinearState) -> tuple[Any, Any, str | None]:
    """(recurrent kernel or None, chunked kernel or None, why there is no kernel at all)."""
    from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
    from attncc.backends.triton.linear.chunked import TritonChunkedLinear
    why = []
    try:
        recurrent = TritonRecurrentLinear(node)
    except NotImplementedError as e:  # L7: no one-token form; the chunked kernel covers it
        recurrent, why = None, why + [str(e)]
    try:
        chunked = TritonChunkedLinear(node)
    except NotImplementedError as e:  # the recurrent kernel covers the rule alone
        chunked, why = None, why + [str(e)]
    if recurrent is None and chunked is None:
        return None, None, "; ".join(why)
    return recurrent, chunked, None
