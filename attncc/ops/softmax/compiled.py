"""`CompiledAttention`: the callable that `attncc.compile` returns.

Compiling runs the spec passes and asks every backend (`attncc.backends.registry`) for its
softmax family: the Triton backend renders (or loads from the disk cache) its source.
A call checks its arguments, binds runtime parameters and captured tensors, and runs the custom
op `attncc::attention_fwd` (`attncc.ops.softmax.custom_op`: differentiable, one node under torch.compile),
which launches: on CUDA tensors the compiled kernel, on CPU tensors the same kernel under
Triton's interpreter when TRITON_INTERPRET=1, otherwise the PyTorch reference (with a warning:
it is the slow path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attncc.backends import registry
from attncc.backends.base import SoftmaxFamily, Unsupported
from attncc.ir.positions import Positions, split_reorder_inputs
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import TileClasses
from attncc.ops.softmax.binding import (CallSignature, bind_numbers, bind_row, pack_row,
                                        unpack_row)
from attncc.ops.softmax.custom_op import calling, register, run_forward
from attncc.passes.pipeline import run_spec_passes
from attncc.validate import LAYOUTS, check_qkv, check_scale, to_bhsd
from attncc.warn import warn_user



def _direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, captures: list[torch.Tensor],
            reorder_inputs: list[torch.Tensor]) -> bool:
    """Whether an eager call may run the op's implementation without the dispatcher, with the
    same result: nothing would record it (no gradient wanted, no torch function or dispatch
    mode, no functorch transform, not compiling, not under torch.jit.trace) and every tensor is a plain one with data (a
    subclass or a meta tensor has its own dispatch)."""
    C = torch._C
    if (torch.compiler.is_compiling() or C._len_torch_function_stack()
            or C._len_torch_dispatch_stack() or C._are_functorch_transforms_active()
            or C._get_tracing_state() is not None):  # torch.jit.trace records ops too
        return False
    grad = torch.is_grad_enabled()
    for t in (q, k, v, *captures, *reorder_inputs) if captures or reorder_inputs else (q, k, v):
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return q.device.type != "meta"


class CompiledAttention:
    """attn(q, k, v, *, return_lse=False, scale=None, layout="bhsd", backend="auto", **runtime)

    q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv] (layout="bshd": [B, L, H, D]).
    Returns o with q's layout and dtype (and lse fp32 [B, Hq, Lq], natural log, when asked).
    `runtime` overrides parameter values (`window=512`) or captured tensors (`doc=new_doc`)
    for this call; neither recompiles.
    """

    def __init__(self, spec: AttentionSpec, backend: str = "auto") -> None:
        self.backend = registry.check_name(backend)
        self.plan = run_spec_passes(spec)
        self.spec = (spec if self.plan.spec.reorder is spec.reorder  # else "auto", resolved
                     else spec.replace(reorder=self.plan.spec.reorder))
        self.positions = (Positions(self.spec.reorder) if self.spec.reorder is not None
                          else None)
        # every backend's family for this spec, or the Unsupported error saying why it has none
        self.families: dict[str, SoftmaxFamily | Unsupported] = registry.families(
            lambda b: b.softmax(self.plan, self.spec, self.positions))
        # the generated kernels "auto" runs where they can run (None: reference only)
        self.kernels: SoftmaxFamily | None = registry.compiled_family(self.families)
        self._warned_reference = False
        self.signature = CallSignature.of(self.spec)
        self.key = register(self)  # the name attncc::attention_fwd finds this kernel by
        # (layout, shapes, dtypes, devices) of q/k/v that passed `_check`, and the family each
        # (backend, device type) resolved to where that cannot change (`family`)
        self._checked: set[tuple] = set()
        self._resolved: dict[tuple[str, str], SoftmaxFamily] = {}

    @property
    def name(self) -> str:
        return self.kernels.name if self.kernels else "reference"

    @property
    def block_maps(self) -> Any:
        """The run-time block maps of the generated kernels, or None."""
        return self.kernels.block_maps if self.kernels else None

    @property
    def tiles(self) -> TileClasses:
        return self.plan.tiles

    def family(self, backend: str, device: torch.device, what: str = "kernel yet"
               ) -> SoftmaxFamily:
        """The family a call on `device` runs: "auto" resolved by the registry (once per object,
        a warning when it falls back to the reference); ValueError when the chosen backend has
        no `what` ("kernel yet", "backward kernel") for this spec."""
        family = self._resolved.get((backend, device.type))
        if family is not None:
            return family
        choice = registry.resolve(backend, device)
        if choice.why is not None and not self._warned_reference:
            warn_user(f"{self.name}: {choice.why}, so this runs the PyTorch reference (slow "
                      "path, in fp32 for fp16/bf16 inputs). Use CUDA tensors for the compiled "
                      "kernel or TRITON_INTERPRET=1 to run it on the CPU.")
            self._warned_reference = True
        family = self.families[choice.name]
        if isinstance(family, Unsupported):
            raise ValueError(f"backend {choice.name!r}: memory {self.spec.memory.text()!r} has "
                             f"no {what}; use backend='reference'")
        if backend != "auto" or device.type == "cuda":  # else it reads TRITON_INTERPRET
            self._resolved[(backend, device.type)] = family
        return family

    @staticmethod
    def _check(q: Any, k: Any, v: Any, layout: str) -> None:
        """The q/k/v checks of every call (`attncc.validate`): they read only the layout and
        q/k/v's types, shapes, dtypes and devices."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
        check_qkv(to_bhsd("q", q, layout), to_bhsd("k", k, layout), to_bhsd("v", v, layout))

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
        never recompiles a compiled graph. An eager call that nothing would record (no
        gradient wanted, no torch function or dispatch mode, no functorch transform, plain
        tensors) runs the op's implementation directly, with the same checks and results: the
        dispatcher's round trip is most of a cached call's host time.

        Non-finite inputs (docs/semantics.md): a nan or inf in k_j or v_j reaches exactly the rows
        the mask allows to attend to key j (their o, and for k their lse, become non-finite);
        every other row is computed as if key j were absent, whatever the tiling."""
        if torch.compiler.is_compiling() or not (type(q) is type(k) is type(v) is torch.Tensor):
            self._check(q, k, v, layout)
        else:  # what the checks read is in the key: a combination that passed once passes
            key = (layout, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device,
                   k.device, v.device)
            if key not in self._checked:
                self._check(q, k, v, layout)
                if len(self._checked) >= 256:
                    self._checked.clear()
                self._checked.add(key)
        check_scale(scale)
        reorder = split_reorder_inputs(self.spec.reorder, runtime, permuted)  # pops from it
        if layout == "bshd":
            B, Lq, Hq, dqk = q.shape
            Lk = k.shape[1]
        else:
            B, Hq, Lq, dqk = q.shape
            Lk = k.shape[2]
        scale = scale if scale is not None else self.spec.scale
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(dqk)
        # runtime values that are plain numbers (`window=128`): checked and bound as one
        # dict fill (`bind_numbers`), else the general binding
        numbers = bind_numbers(self.signature, runtime, sm_scale) if runtime else None
        if numbers is not None:
            captures, row = [], [numbers[0], *numbers[1].values()]
        else:
            captures, row = bind_row(self.signature, runtime, sm_scale, q.device,
                                     {"B": B, "Hq": Hq, "Lq": Lq, "Lk": Lk})
        chosen = self.backend if backend is None else registry.check_name(backend)
        reorder_inputs = ([reorder[n] for n in self.signature.reorder_keys] if reorder
                          else [])
        if _visits is not None or _direct(q, k, v, captures, reorder_inputs):
            # no autograd, no mode, no tracer, plain tensors: the op's dispatcher would only
            # hand these same arguments to its implementation (`_direct` says when that holds)
            bound = numbers if numbers is not None else unpack_row(self.signature, row)
            o, lse = run_forward(self, q, k, v, captures, bound,
                                 reorder_inputs, layout, permuted, chosen, visits=_visits)
        else:
            params = pack_row(row)
            args = (self.key, q, k, v, captures, params, reorder_inputs, layout, permuted, chosen)
            if torch.compiler.is_compiling():  # the graph names the kernel by its key
                o, lse = torch.ops.attncc.attention_fwd(*args)
            else:  # eager: run this object (its caches), not another compile of the spec
                with calling(self):
                    o, lse = torch.ops.attncc.attention_fwd(*args)
        return (o, lse) if return_lse else o

    def precompile(self, dtype: Any, head_dim_qk: int, head_dim_v: int | None = None,
                   arch: int | str | None = None, *, backward: bool = False) -> Any:
        """The compiled kernel (the backend's artefact, a `CompiledArtifact` for Triton) for GPU
        sm_<arch> (None: this machine's; "sm_90" or 90 names one, no GPU needed) and one
        signature: loaded from the cache if `attncc build` made it, else compiled now (one
        WARNING log line); with ATTNCC_OFFLINE=1 a missing kernel raises `NotPrebuiltError`.
        `backward`: the gradient kernels too. See the kernel backend's `precompile`
        (`attncc.backends.base.Backend`)."""
        kernels = self.kernels
        if self.backend != "auto" and registry.BACKENDS[self.backend].compiles:
            kernels = self.families[self.backend]  # compile(spec, backend="cuda"): its cubins
            if isinstance(kernels, Unsupported):
                raise ValueError(f"precompile: backend {self.backend!r}: {kernels}")
        if kernels is None:
            raise ValueError(f"precompile: memory {self.spec.memory.text()!r} has no kernel")
        return kernels.backend.precompile(kernels, dtype, head_dim_qk, head_dim_v, arch,
                                          backward=backward)

    def __repr__(self) -> str:
        return f"CompiledAttention({self.name})"
