"""`torch.nn` modules around compiled attention.

`Attention` is the core, organised like FlexAttention (projected q/k/v in, o out, no weights of
its own) with the spec's state kept in the module: captured tensors become parameters (the ones
named in `learnable`, e.g. per-head ALiBi slopes) or buffers, and runtime scalars (`window`)
live in one CPU float64 tensor that `set(window=...)` writes in place, so a compiled model
never recompiles when they change. `MultiHeadAttention` adds projections like
`torch.nn.MultiheadAttention` (batch-first `[B, L, E]`, GQA via `num_kv_heads`).

    attn = attncc.nn.Attention(mask=attncc.sliding_window(64),
                               score=attncc.alibi(torch.full((H,), 0.5)),
                               learnable=["alibi_slopes"])
    o = attn(q, k, v)       # q [B, Hq, L, D] (layout="bshd": [B, L, H, D])
    attn.set(window=32)     # no recompilation under torch.compile

Context parallelism (docs/context_parallel.md): with `process_group=` (or `device_mesh=`, 1-D
or with `mesh_dim=`) the module's input is this rank's shard of one sequence and its forward
runs `attncc.dist.context_parallel_attention` (`sharding=`, `strategy=`):

    mha = attncc.nn.MultiHeadAttention(E, H, mask=attncc.causal(), device_mesh=mesh,
                                       mesh_dim="cp", sharding="head-tail")
    y_r = mha(x_r)          # x_r: rank r's tokens, attncc.dist.shard_sequence(x, .., dim=1)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from attncc.api import Attention as AttentionSpecOf
from attncc.api import compile as compile_attention
from attncc.dist.group import context_parallel_plan
from attncc.dist.softmax import context_parallel_attention
from attncc.ir.derived import held_tensors
from attncc.ir.spec import AttentionSpec
from attncc.ops.softmax.compiled import CompiledAttention
from attncc.passes.shard_pairs import Sharding


class Attention(nn.Module):
    """Softmax attention of one attncc spec. `spec` (or `mask`/`score` as for
    `attncc.Attention`) fixes the kernel; `learnable` names floating captured tensors that
    become `nn.Parameter`s (the others are buffers); `scale` None means 1/sqrt(Dqk).

    Context parallelism: `process_group` (a torch.distributed ProcessGroup) or `device_mesh`
    (a DeviceMesh: 1-D, or any mesh with `mesh_dim` naming the context-parallel dimension)
    makes q, k, v this rank's tokens of one sequence (its chunks of `sharding`: "contiguous",
    the default, "head-tail" or a `Sharding`, in storage order) and the forward
    `attncc.dist.context_parallel_attention` (`strategy`: "auto", "all_gather",
    "all_to_all"); o is this rank's rows of the whole-sequence attention. Runtime tensors are
    the whole sequence's, as there. Gradients of learnable captured tensors are this rank's
    share: all-reduce them over the group (as DDP/FSDP do) for the whole sequence's. The
    arguments are checked here (one group, a mesh dimension, sharding and strategy)."""

    def __init__(self, spec: AttentionSpec | None = None, *, mask: Any = None,
                 score: Any = None, learnable: Iterable[str] = (), scale: float | None = None,
                 layout: str = "bhsd", backend: str = "auto", process_group: Any = None,
                 device_mesh: Any = None, mesh_dim: str | int | None = None,
                 sharding: str | Sharding | None = None, strategy: str | None = None) -> None:
        super().__init__()
        if spec is None:
            spec = AttentionSpecOf(mask=mask, score=score)
        elif mask is not None or score is not None:
            raise TypeError("Attention: give a spec or mask=/score=, not both")
        self.context_parallel = context_parallel_plan(process_group, device_mesh, mesh_dim,
                                                      sharding, strategy)
        self.kernel = compile_attention(spec, backend=backend)
        if not isinstance(self.kernel, CompiledAttention):  # its forward passes layout=, ...
            raise TypeError(f"Attention: attncc.nn runs softmax specs; this spec compiles to "
                            f"{type(self.kernel).__name__}: call attncc.compile(spec) directly "
                            "for a linear recurrence or a hybrid (and "
                            "attncc.dist.context_parallel_linear to shard one)")
        self.layout, self.scale = layout, scale
        # a derived capture (`buf[b].sum()`) is held as its source `buf`: reduced on each call,
        # so a learnable `buf` gets its gradient through the reduction
        captures = held_tensors(self.kernel.spec.captures)
        learnable = list(learnable)
        for name in learnable:
            if name not in captures or not captures[name].is_floating_point():
                raise ValueError(f"learnable: expected names of floating captured tensors of "
                                 f"this spec {sorted(captures)}, got {name!r}")
        self._captures = tuple(captures)
        self._capture_dtypes = tuple(t.dtype for t in captures.values())
        for name, t in captures.items():
            if name in learnable:
                self.register_parameter(name, nn.Parameter(t.detach().clone()))
            else:
                self.register_buffer(name, t, persistent=False)
        self._params = tuple(p.name for p in self.kernel.spec.params)
        # a plain attribute, not a buffer: `.to(device)` keeps it on the CPU, where the op reads it
        self.scalars = torch.tensor([float(p.value) for p in self.kernel.spec.params],
                                    dtype=torch.float64)

    def set(self, **values: float) -> None:
        """Change runtime scalars in place (`set(window=32)`): no recompilation."""
        for name, value in values.items():
            if name not in self._params:
                raise TypeError(f"set: expected one of this kernel's parameters "
                                f"{list(self._params)}, got {name!r}")
            self.scalars[self._params.index(name)] = value

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                **runtime: Any) -> torch.Tensor:
        """q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv] (layout "bhsd") ->
        o [B, Hq, Lq, Dv]; `runtime` overrides scalars or tensors for this call only."""
        args = {name: self.scalars[i] for i, name in enumerate(self._params)}
        for name, dtype in zip(self._captures, self._capture_dtypes):
            t = getattr(self, name)  # `.half()` on the model casts parameters: cast back
            args[name] = t if t.dtype == dtype else t.to(dtype)
        args.update(runtime)
        cp = self.context_parallel
        if cp is None:
            return self.kernel(q, k, v, scale=self.scale, layout=self.layout, **args)
        return context_parallel_attention(self.kernel, q, k, v, group=cp.group,
                                          sharding=cp.sharding, strategy=cp.strategy,
                                          scale=self.scale, layout=self.layout, **args)

    def extra_repr(self) -> str:
        cp = self.context_parallel
        where = "" if cp is None else (f", context parallel over {cp.sharding.world} ranks "
                                       f"({cp.sharding.name or 'sharding'}, {cp.strategy})")
        return f"{self.kernel.spec.tag}, layout={self.layout!r}{where}"


class MultiHeadAttention(nn.Module):
    """Self-attention block: x [B, L, E] -> [B, L, E], with q/k/v/out projections,
    `num_heads` query heads and `num_kv_heads` key/value heads (GQA; default num_heads).
    `spec`/`mask`/`score`/`learnable`/`backend` and the context-parallel arguments
    (`process_group` or `device_mesh` [+ `mesh_dim`], `sharding`, `strategy`) go to
    `Attention`: with a group, x [B, l, E] is this rank's tokens of the sequence and the
    output its rows; the projections' gradients are this rank's share (all-reduce them over
    the group, as DDP/FSDP do)."""

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 bias: bool = False, **attention: Any) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a multiple of num_heads={num_heads}, "
                             f"got {embed_dim}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attn = Attention(layout="bshd", **attention)

    def forward(self, x: torch.Tensor, **runtime: Any) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, **runtime)  # [B, L, H, D], no transposes: layout="bshd"
        return self.out_proj(o.reshape(B, L, -1))
