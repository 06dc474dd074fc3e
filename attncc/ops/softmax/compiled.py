"""`CompiledAttention`: the callable that `attncc.compile` returns.

Compiling runs the spec passes and renders (or loads from the disk cache) the Triton source.
A call checks its arguments, binds runtime parameters and captured tensors, and runs the custom
op `attncc::attention_fwd` (`attncc.ops.softmax.custom_op`: differentiable, one node under torch.compile),
which launches: on CUDA tensors the compiled kernel, on CPU tensors the same kernel under
Triton's interpreter when TRITON_INTERPRET=1, otherwise the PyTorch reference (with a warning:
it is the slow path).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from attncc import config
from attncc.backends.triton.block_maps import BlockMaps
from attncc.ir.positions import Positions, split_reorder_inputs
from attncc.backends.reference.forward import attention_reference, compute_dtype
from attncc.backends.triton.forward import TritonForward
from attncc.ops.softmax.binding import CallSignature, bind
from attncc.ir.reorder import inverse
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import TileClasses
from attncc.passes.pipeline import run_spec_passes
from attncc.ops.softmax.custom_op import calling, register, run_forward
from attncc.validate import LAYOUTS, check_qkv, check_scale, to_bhsd
from attncc.warn import warn_user

if TYPE_CHECKING:
    from attncc.backends.triton.aot import CompiledArtifact

BACKENDS = ("auto", "triton", "reference")


class CompiledAttention:
    """attn(q, k, v, *, return_lse=False, scale=None, layout="bhsd", backend="auto", **runtime)

    q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv] (layout="bshd": [B, L, H, D]).
    Returns o with q's layout and dtype (and lse fp32 [B, Hq, Lq], natural log, when asked).
    `runtime` overrides parameter values (`window=512`) or captured tensors (`doc=new_doc`)
    for this call; neither recompiles.
    """

    def __init__(self, spec: AttentionSpec, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.plan = run_spec_passes(spec)
        self.spec = (spec if self.plan.spec.reorder is spec.reorder  # else "auto", resolved
                     else spec.replace(reorder=self.plan.spec.reorder))
        self.triton = TritonForward(self.plan) if spec.memory.text() == "dense" else None
        self.block_maps = (BlockMaps(self.triton) if self.triton and self.plan.block_map
                           else None)
        self.positions = (Positions(self.spec.reorder) if self.spec.reorder is not None
                          else None)
        self._warned_reference = False
        self.signature = CallSignature.of(self.spec)
        self.key = register(self)  # the name attncc::attention_fwd finds this kernel by

    @property
    def name(self) -> str:
        return self.triton.name if self.triton else "reference"

    @property
    def tiles(self) -> TileClasses:
        return self.plan.tiles

    def _choose(self, backend: str, device: torch.device) -> str:
        if backend != "auto":
            return backend
        if device.type == "cuda" or config.triton_interpret():
            return "triton"
        if not self._warned_reference:
            warn_user(f"{self.name}: CPU tensors and TRITON_INTERPRET is not set, so this runs "
                      "the PyTorch reference (slow path, in fp32 for fp16/bf16 inputs). Use CUDA "
                      "tensors for the compiled kernel or TRITON_INTERPRET=1 to run it on the "
                      "CPU.")
            self._warned_reference = True
        return "reference"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 return_lse: bool = False, scale: float | None = None, layout: str = "bhsd",
                 permuted: bool = False, backend: str | None = None,
                 _visits: torch.Tensor | None = None,
                 **runtime: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`permuted=True` (with a reorder): q/k/v are already in the reordered token order and
        o (and lse) come back in it too: the layout contract for models that keep tokens
        permuted across layers. Otherwise tokens are in the original order, and the kernel
        gathers rows and scatters o back itself.

        Arguments are checked here, in Python, before anything runs; the work is the custom op
        `attncc::attention_fwd` (`attncc.ops.softmax.custom_op`), so o and lse are differentiable (q, k, v
        and floating captured tensors) and torch.compile sees one graph node. A runtime value
        given as a one-element CPU tensor (`window=torch.tensor(512)`) is op data: changing it
        never recompiles a compiled graph.

        Non-finite inputs (docs/semantics.md): a nan or inf in k_j or v_j reaches exactly the rows
        the mask allows to attend to key j (their o, and for k their lse, become non-finite);
        every other row is computed as if key j were absent, whatever the tiling."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
        qb, kb, vb = (to_bhsd(n, t, layout) for n, t in (("q", q), ("k", k), ("v", v)))
        check_qkv(qb, kb, vb)
        check_scale(scale)
        runtime = dict(runtime)
        reorder = split_reorder_inputs(self.spec.reorder, runtime, permuted)
        B, Hq, Lq, dqk = qb.shape
        scale = scale if scale is not None else self.spec.scale
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(dqk)
        captures, params = bind(self.signature, runtime, sm_scale, q.device,
                                {"B": B, "Hq": Hq, "Lq": Lq, "Lk": kb.shape[2]})
        chosen = backend or self.backend
        if chosen not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {chosen!r}")
        reorder_inputs = [reorder[n] for n in self.signature.reorder_keys]
        if _visits is not None:  # a debugging counter the kernel writes: not an op input
            o, lse = run_forward(self, q, k, v, captures, params, reorder_inputs, layout,
                                 permuted, chosen, visits=_visits)
        else:
            args = (self.key, q, k, v, captures, params, reorder_inputs, layout, permuted, chosen)
            if torch.compiler.is_compiling():  # the graph names the kernel by its key
                o, lse = torch.ops.attncc.attention_fwd(*args)
            else:  # eager: run this object (its caches), not another compile of the spec
                with calling(self):
                    o, lse = torch.ops.attncc.attention_fwd(*args)
        return (o, lse) if return_lse else o

    def precompile(self, dtype: Any, head_dim_qk: int, head_dim_v: int | None = None,
                   arch: int | str | None = None, *, backward: bool = False
                   ) -> CompiledArtifact:
        """The compiled kernel for GPU sm_<arch> (None: this machine's; "sm_90" or 90 names one,
        no GPU needed) and one signature: loaded from the cache if `attncc build` made it, else
        compiled now (one WARNING log line); with ATTNCC_OFFLINE=1 a missing kernel raises
        `attncc.backends.triton.prebuilt.NotPrebuiltError`. `backward`: the gradient kernels too. See
        `attncc.backends.triton.prebuilt`."""
        from attncc.backends.triton.build import precompile
        if self.triton is None:
            raise ValueError(f"precompile: memory {self.spec.memory.text()!r} has no kernel")
        return precompile(self.triton, dtype, head_dim_qk, head_dim_v, arch, backward=backward)

    def _reference(self, q, k, v, sm_scale, params, tensors, reorder_inputs, permuted_positions):
        """The PyTorch reference in fp32 (fp64 for fp64 inputs; the caller casts o back to q's
        dtype), as the kernel accumulates; with `permuted=True`, un-permute in and permute out."""
        ct = compute_dtype(q.dtype)
        q, k, v = (t.to(ct) for t in (q, k, v))
        tensors = {n: t.to(ct) if t.is_floating_point() else t for n, t in tensors.items()}
        if permuted_positions is not None:
            q_pos, kv_pos = (p.long() for p in permuted_positions)
            q, k, v = q[:, :, inverse(q_pos)], k[:, :, inverse(kv_pos)], v[:, :, inverse(kv_pos)]
        o, lse = attention_reference(self.spec, q, k, v, scale=sm_scale, params=params,
                                     captures=tensors, reorder_inputs=reorder_inputs)
        if permuted_positions is not None:
            o, lse = o[:, :, q_pos], lse[:, :, q_pos]
        return o, lse

    def __repr__(self) -> str:
        return f"CompiledAttention({self.name})"
