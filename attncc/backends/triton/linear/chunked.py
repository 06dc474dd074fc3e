"""The chunked form of the linear-recurrence axis (docs/catalog.md) as generated Triton kernels.

Three templates, one family: `attncc/backends/triton/templates/linear_chunked.py.j2` (additive updates: L1-L4),
`linear_chunked_delta.py.j2` (L5, L6 by the WY / UT representation) and
`linear_chunked_block.py.j2` (L7), all starting with `linear_chunked_prologue.py.j2`. This
module picks the template by write kind and step (`_WRITES`) and the lines by gate kind
(`_GATES`); the semantics are `reference_linear.recurrent_reference` (the spec and the test
oracle) and the maths is `reference_linear_chunked`. Same API as `TritonRecurrentLinear`, whose decode step continues
a state this kernel leaves (and the other way round).

Every rule has a chunked kernel: linear (L1; phi identity, elu1 or taylor2; optional
normaliser), decay (L2), scalar_gate (L3), vector_gate (L4), delta (L5), gated_delta (L6) and
block_causal (L7, `linear_chunked_block.py.j2`; phi and normaliser as L1); dense [B, H, L, D] or
packed varlen inputs (`cu_seqlens`); Dk up to 256 (the key dim is never split; taylor2 up to
head dim 16, F = 273), any Dv (split across programs).

Kernel: grid (B * H or N * H, cdiv(Dv, DV_BLOCK)); each program loops over chunks of CHUNK tokens
with its slice of the state S [F, DV_BLOCK] in fp32 registers; the last chunk is partial under
masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from attncc import config
from attncc.backends.triton.aot import compile_artifact
from attncc.backends.triton.linear import recurrent
from attncc.backends.triton.linear.aot import linear_signature
from attncc.backends.triton.linear.launch import prepare_launch
from attncc.backends.triton.source import CachedSource, GeneratedKernel
from attncc.backends.triton.templating import environment
from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import (CHUNKED_NUM_WARPS, chunked_chunk,
                                               chunked_value_block, gpu_chunk)

BACKEND = "triton-linear-chunked"
TEMPLATE = "linear_chunked.py.j2"
TEMPLATE_DELTA = "linear_chunked_delta.py.j2"
TEMPLATE_BLOCK = "linear_chunked_block.py.j2"
# every file a source depends on (all three templates: one key recipe for the family)
TEMPLATES = (TEMPLATE, TEMPLATE_DELTA, TEMPLATE_BLOCK, "linear_chunked_prologue.py.j2",
             "helpers.py.j2")
DK_MAX = 256  # S [256, 32] fp32 per program; the key dim is not tiled
F_MAX = recurrent.F_MAX  # taylor2 up to head dim 16: F = 273, padded to 512

# elu1 masked so that padded lanes and rows stay 0 (elu1(0) would be 1)
_ELU1 = "{x}_c = tl.where(mask_q, tl.where({x}_c > 0, {x}_c + 1.0, tl.exp({x}_c)), 0.0)"
_LOAD = ("{x}_c = tl.load({x}_base + rows[:, None] * stride_{x}l, mask=mask_q, other=0.0)"
         ".to(tl.float32)")
# taylor2: f = 0 -> 1; 1 <= f <= D -> x[f - 1]; f > D -> x[a] x[b] / sqrt 2, f - 1 - D = a D + b
_TAYLOR_SETUP = [
    "quad = tl.maximum(offs_k - 1 - D_K, 0)",
    "lin_f = (offs_k >= 1) & (offs_k <= D_K)",
    "quad_f = (offs_k > D_K) & mask_k",
    "fa = tl.where(lin_f, offs_k - 1, quad // D_K)",
    "fb = quad % D_K",
]
_TAYLOR_LOAD = [
    ("{x}_a = tl.load({x}_row + rows[:, None] * stride_{x}l + fa[None, :] * stride_{x}d, "
     "mask=mask_t[:, None] & (lin_f | quad_f)[None, :], other=0.0).to(tl.float32)"),
    ("{x}_b = tl.load({x}_row + rows[:, None] * stride_{x}l + fb[None, :] * stride_{x}d, "
     "mask=mask_t[:, None] & quad_f[None, :], other=0.0).to(tl.float32)"),
    ("{x}_c = tl.where((offs_k == 0)[None, :] & mask_t[:, None], 1.0, "
     "tl.where(quad_f[None, :], {x}_a * {x}_b * 0.7071067811865476, {x}_a))"),
]
_LOAD_G = ("g_c = tl.load(g_base + rows * stride_gl, mask=mask_t, other=0.0)"
           ".to(tl.float32)")
_LOAD_G_VEC = ("g_c = tl.load(g_base + rows[:, None] * stride_gl + offs_k[None, :] * stride_gd, "
               "mask=mask_q, other=0.0).to(tl.float32)")
# Gates are summed clamped at -GATE_FLOOR: e^{-128} is 0 in fp32, so every decay factor across
# a clamped gate is still exactly 0 (as the recurrence's e^g S is in fp32), a -inf gate never
# meets another in (-inf) - (-inf) = NaN, and a huge one (-1e9) cannot swamp the small gates
# after it in the fp32 sums (the differences b_i - b_j stay within |b| <= CHUNK * GATE_FLOOR)
GATE_FLOOR = 128.0
_CUMSUM = (f"b = tl.cumsum(tl.maximum(g_c, -{GATE_FLOOR}), 0)  # inclusive: token i has "
           "decayed by its own gate")
_LOG_LAM = "log_lam = tl.log(tl.load(LAM + off_h).to(tl.float32))"


class GateLines(NamedTuple):
    """How one gate kind enters a chunked template: `flag` picks the template's decay branch
    ("none", "scalar": one log-decay per token, "vector": one per key dim), `setup` and `chunk`
    are lines before the chunk loop and per chunk (they leave the cumulative log-decay in `b`)."""

    flag: str
    setup: list[str]
    chunk: list[str]


# gate kind -> its lines
_GATES: dict[str, GateLines] = {
    "none": GateLines("none", [], []),
    "constant": GateLines("scalar", [_LOG_LAM], ["g_c = tl.where(mask_t, log_lam, 0.0)", _CUMSUM]),
    "scalar": GateLines("scalar", [], [_LOAD_G, _CUMSUM]),
    "vector": GateLines("vector", [], [_LOAD_G_VEC, _CUMSUM]),
}


class WriteTemplate(NamedTuple):
    """The template of one write kind (per step form: every token, or per block), the gate kinds
    it implements, and the setup lines it needs when no gate is loaded."""

    template: str
    gates: tuple[str, ...]
    ungated: list[str]


# (write kind, steps per block) -> its template; a combination not here has no chunked kernel
_WRITES: dict[tuple[str, bool], WriteTemplate] = {
    ("additive", False): WriteTemplate(TEMPLATE, ("none", "constant", "scalar", "vector"), []),
    # the delta template always reads b: with no gate, b = 0 and every decay factor is e^0 = 1
    ("delta", False): WriteTemplate(TEMPLATE_DELTA, ("none", "scalar"),
                                    ["b = tl.zeros([CHUNK], dtype=tl.float32)"]),
    ("additive", True): WriteTemplate(TEMPLATE_BLOCK, ("none",), []),
}


def _write_template(node: LinearState) -> WriteTemplate:
    """The template for `node`; NotImplementedError when no chunked template covers its parts."""
    found = _WRITES.get((node.write, node.block is not None))
    if found is None or node.gate not in found.gates:
        raise NotImplementedError(
            f"TritonChunkedLinear: no chunked template for rule {node.rule!r} (gate "
            f"{node.gate!r}, write {node.write!r}, block {node.block!r}); use the recurrent "
            "kernel")
    return found


def _loads(node: LinearState, x: str) -> list[str]:
    """Lines loading phi(x) of one tile as `{x}_c` [CHUNK, DK_PAD] fp32 (0 in padded rows)."""
    if node.feature_map == "taylor2":
        return [line.format(x=x) for line in _TAYLOR_LOAD]
    lines = [_LOAD.format(x=x)]
    if node.feature_map == "elu1":
        lines.append(_ELU1.format(x=x))
    return lines


def _lines(node: LinearState) -> tuple[list[str], list[str]]:
    """(setup lines before the chunk loop, lines per chunk after the loads) for `node`'s parts."""
    setup: list[str] = list(_TAYLOR_SETUP) if node.feature_map == "taylor2" else []
    gate = _GATES[node.gate]
    if node.gate == "none":
        setup += _write_template(node).ungated
    return setup + gate.setup, list(gate.chunk)


def kernel_name(node: LinearState) -> str:
    """e.g. `linear_chunked_scalar_gate_identity_1a2b3c4d5e`."""
    return recurrent.kernel_name(node, "chunked")


def render(node: LinearState) -> str:
    """Triton source of the chunked kernel for `node` (dtype-, shape- and chunk-independent)."""
    setup, step = _lines(node)
    taylor = node.feature_map == "taylor2"
    return environment().get_template(_write_template(node).template).render(
        kernel_name=kernel_name(node), node_text=node.text(), normalize=node.normalize,
        gate=_GATES[node.gate].flag, block=node.block, setup_lines=setup, chunk_lines=step,
        feature_mask=f"mask_k = offs_k < {'1 + D_K + D_K * D_K' if taylor else 'D_K'}",
        load_lines=_loads(node, "q") + _loads(node, "k"), query_lines=_loads(node, "q"),
        key_lines=_loads(node, "k"))


def source_key(node: LinearState) -> str:
    return recurrent.source_key(node, TEMPLATES, BACKEND)


class TritonChunkedLinear(GeneratedKernel):
    """One LinearState's chunked kernel. Building it renders (or loads) the source on disk.

    chunk: tokens per chunk (a power of two >= 16, tl.dot's least tile side); default 64 on a
    GPU, 32 under the interpreter (`select_tiles_linear.chunked_chunk`). block_v: value columns
    per program; default `select_tiles_linear.chunked_value_block`.
    """

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise ValueError(f"node: expected a LinearState, got {type(node).__name__}")
        _write_template(node)  # NotImplementedError when no template covers the parts
        recurrent.check_power_of_two("chunk", chunk, 16)
        recurrent.check_power_of_two("block_v", block_v, 16)
        self.node = node
        self.chunk = chunk
        self.block_v = block_v
        self.kernel = CachedSource(source_key(node), kernel_name(node),
                                   lambda: {"kernel.py": render(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def chunk_for(self, device: torch.device, f_dim: int) -> int:
        if self.chunk is not None:
            return self.chunk
        interpreted = device.type != "cuda" or config.triton_interpret()
        return chunked_chunk(self.node, f_dim, interpreted)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None, return_state: bool = False,
                 cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """q, k [B, H, L, Dk]; v [B, H, L, Dv]; g, beta, initial_state as in `reference_linear`;
        or packed q, k [T, H, Dk], v [T, H, Dv] with `cu_seqlens` [N + 1] and states
        [N, H, F, Dv'] (`reference_linear_varlen`). Returns o (q's layout and dtype), and with
        `return_state` the final state in fp32 (Dv' = Dv + 1 when normalising; last column z)."""
        node = self.node
        run = prepare_launch(node, q, k, v, g, beta, scale, initial_state, return_state,
                             cu_seqlens)
        f_dim = node.feature_dim(run.dk)
        if run.dk > DK_MAX:
            raise ValueError(f"q: expected head dim Dk <= {DK_MAX} for the chunked kernel (the "
                             f"key dim is not tiled), got {run.dk}")
        if f_dim > F_MAX:
            raise ValueError(f"q: expected feature dim F <= {F_MAX} (taylor2: head dim <= 16), "
                             f"got head dim {run.dk} (F = {f_dim})")
        if run.nbh > 0 and run.dv > 0:
            dv_block = chunked_value_block(f_dim, run.dv, self.block_v, node.rule)
            grid = (run.nbh, -(-run.dv // dv_block))
            self.jit_function()[grid](
                *run.args, run.scale,
                **launch_constexprs(run.dk, f_dim, run.dv, dv_block,
                                    self.chunk_for(q.device, f_dim),
                                    dot_precision(q.dtype, q.device)),
                HAS_INITIAL=initial_state is not None, STORE_FINAL=return_state,
                VARLEN=run.varlen, num_warps=CHUNKED_NUM_WARPS,
            )
        return (run.o, run.s_out) if return_state else run.o


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tf32 for 16-bit inputs on a GPU (their 10- or 7-bit mantissas fit tf32's 10; the fp32
    decay-weighted tiles round to it, as fla rounds them to the input dtype); ieee for fp32
    inputs and under the interpreter."""
    interpreted = device.type != "cuda" or config.triton_interpret()
    return "ieee" if interpreted or dtype == torch.float32 else "tf32"


def launch_constexprs(dk: int, f_dim: int, dv: int, dv_block: int, chunk: int,
                      precision: str) -> dict[str, Any]:
    """The shape constexprs a launch passes (HAS_INITIAL, STORE_FINAL and VARLEN aside);
    DK_PAD pads the feature dim F (= dk unless phi is taylor2)."""
    return {"D_K": dk, "D_V": dv, "DK_PAD": padded(f_dim), "DV_BLOCK": dv_block, "CHUNK": chunk,
            "DOT_PRECISION": precision}


def compile_chunked_for_target(kernel: TritonChunkedLinear, arch: int, dtype: str,
                               head_dim_k: int, head_dim_v: int, *, chunk: int | None = None,
                               varlen: bool = False):
    """Compile a `TritonChunkedLinear` kernel for sm_<arch> with no GPU present, as
    `linear.aot.compile_linear_for_target` does for the recurrent one (g, beta, lam and the
    states are fp32; q/k/v/o are `dtype`). Returns a `CompiledArtifact`; raises
    `AOTCompileError`."""
    signature, pointers = linear_signature(dtype)
    f_dim = kernel.node.feature_dim(head_dim_k)
    dv_block = chunked_value_block(f_dim, head_dim_v, kernel.block_v, kernel.node.rule)
    if chunk is None:
        chunk = kernel.chunk or gpu_chunk(kernel.node, f_dim)
    precision = "ieee" if dtype == "float32" else "tf32"  # as `dot_precision` on a GPU
    constexprs = {**launch_constexprs(head_dim_k, f_dim, head_dim_v, dv_block, chunk, precision),
                  "HAS_INITIAL": True, "STORE_FINAL": True, "VARLEN": varlen}
    launch = Schedule(num_warps=CHUNKED_NUM_WARPS, num_stages=3)  # num_stages: Triton's default
    job = {"path": str(kernel.entry.files["kernel.py"]), "name": kernel.name,
           "aligned": pointers}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}, "
                            f"varlen {varlen}",
                            dtype=dtype, head_dims=(head_dim_k, head_dim_v))
