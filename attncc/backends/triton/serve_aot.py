"""Ahead-of-time compilation of the serving kernels for a named NVIDIA GPU, with no GPU present.

The same child-process pipeline as `triton_aot.compile_for_target` (TTIR .. ptxas), with the
signature and constexprs that `attncc.backends.triton.serve_run` passes for one memory layout
variant. The serving kernels launch through Triton's JIT, which specialises each launch on its
own: unit strides become constexprs and strides that are multiples of 16 carry that hint.
`aligned_strides` (the default) compiles what the JIT makes of contiguous tensors whose strides
are multiples of 16, as a serving cache's [pages, page_size, heads, 16k] layout has; False, what
it makes of arbitrary strides.
"""

from __future__ import annotations

from typing import Any

from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.backends.triton.serve import TritonServe, signature
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import choose_serving, padded

LAYOUT_FLAGS = {  # variant -> constexprs that differ from the dense default
    "dense": {},
    "paged": {"KV_MODE": 1, "HAS_KV_LEN": True},
    "ragged": {"KV_MODE": 2, "RAGGED_Q": True},
    "persistent": {"HAS_SLOTS": True},
    "per_head_lengths": {"HEAD_LENGTHS": True},
    "streaming_heads": {"STREAM": True},
    "streaming_heads_paged": {"STREAM": True, "KV_MODE": 1, "HAS_KV_LEN": True},
    "cascade_suffix": {"KV_MODE": 1, "HAS_KV_LEN": True, "HAS_LK_MASK": True},
}
# the head-dim strides (1 in a contiguous launch, a JIT constexpr then) and the other strides of
# the 16-bit tensors (multiples of 16 in such a launch)
UNIT_STRIDES = tuple(f"stride_{x}d" for x in ("q", "k", "v", "o", "ks", "vs", "mk", "mv"))
ROW_STRIDES = (tuple(f"stride_{x}{d}" for x, dims in (("q", "bmh"), ("k", "bnh"), ("v", "bnh"),
                                                        ("o", "bmh"), ("ks", "bnh"),
                                                        ("vs", "bnh")) for d in dims)
               + ("stride_mkh", "stride_mks", "stride_mvh", "stride_mvs"))


def forward_constexprs(variant: str, head_dim: int, block_m: int, block_n: int,
                       num_splits: int, slots: int = 1) -> dict[str, Any]:
    """The forward kernel's constexprs in its argument order, as `serving_run` sets them on a
    GPU (UPCAST_DOT off, no visit counting, lse written, index checks on)."""
    cx = {"D_QK": head_dim, "D_V": head_dim, "D_QK_PAD": padded(head_dim),
          "D_V_PAD": padded(head_dim), "BLOCK_M": block_m, "BLOCK_N": block_n,
          "SLOTS_PAD": padded(slots), "DOT_PRECISION": "ieee", "UPCAST_DOT": False,
          "KV_MODE": 0, "RAGGED_Q": False, "HAS_KV_LEN": False, "HAS_LK_MASK": False,
          "HEAD_LENGTHS": False, "HAS_SLOTS": False, "STREAM": False, "NUM_SPLITS": num_splits,
          "WRITE_PARTIAL": num_splits > 1, "WRITE_LSE": True, "COUNT_VISITS": False,
          "CHECK": True}
    cx.update(LAYOUT_FLAGS[variant])
    return cx


def compile_serve_for_target(kernels: TritonServe, arch: int, dtype: str = "float16",
                             head_dim: int = 128, variant: str = "paged", block_m: int = 16,
                             num_splits: int = 4, merge: bool = False,
                             aligned_strides: bool = True) -> CompiledArtifact:
    """Compile the forward kernel (or, with `merge`, the merge kernel) of `kernels` for
    sm_<arch> with the tile size and warps a GPU launch uses (`select_tiles.choose_serving`);
    raises `AOTCompileError` with Triton's message when it does not compile."""
    block_n, num_warps = choose_serving(head_dim, interpreter=False)
    sig = signature(kernels.plan, dtype, merge=merge)
    name = kernels.name + ("_merge" if merge else "")
    if merge:
        cx: dict[str, Any] = {"D_V": head_dim, "D_V_PAD": padded(head_dim), "WRITE_LSE": True}
        launch = Schedule(num_warps=1, num_stages=3)
    else:
        cx = forward_constexprs(variant, head_dim, block_m, block_n, num_splits)
        launch = Schedule(num_warps=num_warps, num_stages=2)
    aligned = [n for n, t in sig.items() if t.startswith("*")]
    job = {"path": str(kernels.entry.files["kernel.py"]), "name": name, "aligned": aligned}
    if aligned_strides and not merge:
        cx.update({n: 1 for n in UNIT_STRIDES})
        job["divisible"] = list(ROW_STRIDES)
    what = f"{variant}, {dtype}, head dim {head_dim}, splits {num_splits}"
    return compile_artifact(job, arch, sig, cx, launch, what,
                            dtype=dtype, head_dims=(head_dim, head_dim))
