"""The chunked form of the linear-recurrence axis (docs/catalog.md) as generated Triton kernels.

L1-L6 run on flash-linear-attention's structure (`templates/linear_split.py.j2`): the delta
rules' WY kernel (A = strict_tril(beta K K^T * D), T = (I + A)^{-1}, W and U; chunk-parallel),
a lean sequential sweep (grid over batch-heads and value blocks: per chunk it stores the state
the chunk starts from, takes V' = U - W S for the delta rules and updates S), and the output
kernel (chunk-parallel: o = (Q e^b) S_chunk + ((Q K^T) * D) V'). L7 (block-causal) stays one
kernel (`linear_chunked_block.py.j2`). `chunked_lines` prepares every line the templates lay
out; the semantics are `reference_linear.recurrent_reference` (the spec and the test oracle),
the maths `reference_linear_chunked`. Same API as `TritonRecurrentLinear`, whose decode step
continues a state this kernel leaves (and the other way round).

Scratch (allocated per call): the per-chunk states HS [chunks, H, F, Dv'] and, for the delta
rules, W [.., L, Dk] and U (overwritten by V') [.., L, Dv], all in the dot operand dtype: the
input dtype on a GPU (16-bit tensor-core operands, fp32 accumulation and an fp32 state in
registers, as fla), fp32 for fp32 inputs and for bf16 under the interpreter (whose bf16 dot is
wrong; fp16 stays fp16 there, exact).

Every rule has a chunked kernel: linear (L1; phi identity, elu1 or taylor2; optional
normaliser), decay (L2), scalar_gate (L3), vector_gate (L4), delta (L5), gated_delta (L6) and
block_causal (L7); dense [B, H, L, D] or packed varlen inputs (`cu_seqlens`: the chunk-parallel
grids enumerate every sequence's chunks, built on the host from cu_seqlens); Dk up to 256 (the
key dim is never split; taylor2 up to head dim 16, F = 273), any Dv (split across programs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attncc import config
from attncc.backends.keys import triton_type
from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.backends.triton.linear import chunked_lines as lines
from attncc.backends.triton.linear import recurrent
from attncc.backends.triton.linear.aot import linear_signature
from attncc.backends.triton.linear.launch import LinearLaunch, prepare_launch
from attncc.backends.triton.source import CachedSource, GeneratedKernel
from attncc.backends.triton.templating import environment
from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import (CHUNKED_NUM_WARPS, chunked_chunk,
                                               chunked_value_block, gpu_chunk, split_launch)

BACKEND = "triton-linear-chunked"
TEMPLATE = "linear_split.py.j2"
TEMPLATE_BLOCK = "linear_chunked_block.py.j2"
# every file a source depends on (one key recipe for the family)
TEMPLATES = (TEMPLATE, "linear_split_wy.py.j2", "linear_split_sweep.py.j2",
             "linear_split_output.py.j2", "linear_split_chunk_prologue.py.j2", TEMPLATE_BLOCK,
             "linear_chunked_prologue.py.j2", "helpers.py.j2")
DK_MAX = 256  # S [256, 32] fp32 per program; the key dim is not tiled
F_MAX = recurrent.F_MAX  # taylor2 up to head dim 16: F = 273, padded to 512
GATE_FLOOR = lines.GATE_FLOOR

# (write kind, steps per block) -> the gate kinds its chunked kernels implement
_COVERED: dict[tuple[str, bool], tuple[str, ...]] = {
    ("additive", False): ("none", "constant", "scalar", "vector"),
    ("delta", False): ("none", "scalar"),
    ("additive", True): ("none",),
}

# each kernel's arguments before the constexprs, in order (the templates' signatures)
ARGS = {
    "wy": ("K V U W G BETA CU CIDX " + " ".join(
        f"stride_{x}{d}" for x, dims in (("k", "bhld"), ("v", "bhld"), ("u", "bhld"),
                                         ("w", "bhld"), ("g", "bhld"), ("b", "bhl"))
        for d in dims) + " H L NT").split(),
    "sweep": ("K V W G LAM S0 SN HS CU CHOFF " + " ".join(
        f"stride_{x}{d}" for x, dims in (("k", "bhld"), ("v", "bhld"), ("w", "bhld"),
                                         ("g", "bhld"), ("s", "bhfv"), ("h", "rhfv"))
        for d in dims) + " H L NT").split(),
    "output": ("Q K V O G LAM HS CU CIDX " + " ".join(
        f"stride_{x}{d}" for x, dims in (("q", "bhld"), ("k", "bhld"), ("v", "bhld"),
                                         ("o", "bhld"), ("g", "bhld"), ("h", "rhfv"))
        for d in dims) + " H L NT scale").split(),
}


def split(node: LinearState) -> bool:
    """Whether `node` runs as the split kernels (L1-L6) rather than one kernel (L7)."""
    return node.block is None


def parts(node: LinearState) -> tuple[str, ...]:
    """The split kernels of `node`, in launch order."""
    return (("wy",) if lines.delta(node) else ()) + ("sweep", "output")


def _check_covered(node: LinearState) -> None:
    """NotImplementedError when no chunked template covers `node`'s parts."""
    gates = _COVERED.get((node.write, node.block is not None), ())
    if node.gate not in gates:
        raise NotImplementedError(
            f"TritonChunkedLinear: no chunked template for rule {node.rule!r} (gate "
            f"{node.gate!r}, write {node.write!r}, block {node.block!r}); use the recurrent "
            "kernel")


def kernel_name(node: LinearState) -> str:
    """e.g. `linear_chunked_scalar_gate_identity_1a2b3c4d5e` (the split kernels add `_wy`,
    `_sweep`, `_output`)."""
    return recurrent.kernel_name(node, "chunked")


def render(node: LinearState) -> str:
    """Triton source of the chunked kernel(s) for `node` (dtype-, shape- and chunk-independent)."""
    common = {"kernel_name": kernel_name(node), "node_text": node.text(),
              "feature_mask": lines.feature_mask(node)}
    if not split(node):
        return environment().get_template(TEMPLATE_BLOCK).render(
            **common, normalize=node.normalize, block=node.block,
            setup_lines=lines.setup(node),
            load_lines=lines.loads(node, "q") + lines.loads(node, "k"),
            query_lines=lines.loads(node, "q"), key_lines=lines.loads(node, "k"))
    return environment().get_template(TEMPLATE).render(
        **common, wy=lines.delta(node),
        wy_setup=lines.setup(node, wy=True), wy_keys=lines.loads(node, "k"),
        gate_lines=lines.gate_chunk(node),
        sweep_setup=lines.sweep_setup(node), sweep_chunk=lines.sweep_chunk(node),
        sweep_final=lines.sweep_final(node),
        output_setup=lines.setup(node),
        output_loads=lines.loads(node, "q") + lines.loads(node, "k"),
        products=lines.products(node), output_normalize=lines.output_normalize(node))


def source_key(node: LinearState) -> str:
    return recurrent.source_key(node, TEMPLATES, BACKEND)


class TritonChunkedLinear(GeneratedKernel):
    """One LinearState's chunked kernel(s). Building it renders (or loads) the source on disk.

    chunk: tokens per chunk (a power of two >= 16, tl.dot's least tile side); default 64 on a
    GPU, 32 under the interpreter (`select_tiles_linear.chunked_chunk`). block_v: value columns
    per program; default `select_tiles_linear.chunked_value_block`.
    """

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise ValueError(f"node: expected a LinearState, got {type(node).__name__}")
        _check_covered(node)
        recurrent.check_power_of_two("chunk", chunk, 16)
        recurrent.check_power_of_two("block_v", block_v, 16)
        self.node = node
        self.chunk = chunk
        self.block_v = block_v
        self.kernel = CachedSource(source_key(node), kernel_name(node),
                                   lambda: {"kernel.py": render(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def function_names(self) -> list[str]:
        """The jit functions of the source, in launch order."""
        if not split(self.node):
            return [self.name]
        return [f"{self.name}_{part}" for part in parts(self.node)]

    def part(self, name: str):
        """The jit function `<name>_<part>` of the split source."""
        return self.jit_function(f"{self.name}_{name}")

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
            arch = None
            if q.device.type == "cuda" and not config.triton_interpret():
                major, minor = torch.cuda.get_device_capability(q.device)
                arch = 10 * major + minor
            dv_block = chunked_value_block(f_dim, run.dv, self.block_v, node.rule, arch)
            chunk = self.chunk_for(q.device, f_dim)
            consts = launch_constexprs(run.dk, f_dim, run.dv, dv_block, chunk,
                                       dot_precision(q.dtype, q.device))
            flags = {"HAS_INITIAL": initial_state is not None, "STORE_FINAL": return_state,
                     "VARLEN": run.varlen}
            if split(node):
                self._launch_split(run, f_dim, dv_block, chunk, consts, flags)
            else:
                self.jit_function()[(run.nbh, -(-run.dv // dv_block))](
                    *run.args, run.scale, **consts, **flags, num_warps=CHUNKED_NUM_WARPS)
        return (run.o, run.s_out) if return_state else run.o

    def _launch_split(self, run: LinearLaunch, f_dim: int, dv_block: int, chunk: int,
                      consts: dict[str, Any], flags: dict[str, bool]) -> None:
        """Allocate the scratch and launch [wy], sweep, output (see the module docstring)."""
        node, p, st = self.node, run.pointers, run.strides
        qv, kv, vv = p["q"], p["k"], p["v"]
        n_views, H, length = run.views, qv.shape[1], qv.shape[2]
        dev, dt = qv.device, scratch_dtype(qv.dtype, qv.device)
        nv = -(-run.dv // dv_block)
        launch = {part: split_launch(part) for part in ("wy", "sweep", "output")}
        if run.varlen:  # every sequence's chunks in order: (sequence, chunk) per row of HS
            counts = (run.cu[1:] - run.cu[:-1] + chunk - 1) // chunk
            choff = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            rows = int(choff[-1])  # the one host sync: the grid's size
            seq = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts,
                                          output_size=rows)
            cidx = torch.stack([seq, torch.arange(rows, device=dev) - choff[seq]], 1)
            cidx = cidx.to(torch.int32).contiguous()
            nt, chunk_grid = 0, (rows, H)
        else:
            nt = -(-length // chunk)
            cidx = choff = run.cu if run.cu is not None else qv
            rows, chunk_grid = run.nbh // H * nt, (nt, run.nbh)
        if rows == 0:  # no tokens: the final state is the initial one
            if run.s_out is not None:
                run.s_out.copy_(p["s0"]) if flags["HAS_INITIAL"] else run.s_out.zero_()
            return
        hs = torch.empty(rows, H, f_dim, node.state_dv(run.dv), dtype=dt, device=dev)
        hst = list(hs.stride())
        cu = p["cu"]
        values, vst = vv, st["v"]
        w, wst = qv, [0] * 4
        shape = consts
        if lines.delta(node):
            w = torch.empty(n_views, H, length, run.dk, dtype=dt, device=dev)
            values = torch.empty(n_views, H, length, run.dv, dtype=dt, device=dev)  # U, then V'
            wst, vst = run.strides_of(w, 4), run.strides_of(values, 4)
            self.part("wy")[chunk_grid](
                kv, vv, values, w, p["g"], p["beta"], cu, cidx, *st["k"], *st["v"], *vst, *wst,
                *st["g"], *st["b"], H, length, nt, **shape, VARLEN=flags["VARLEN"],
                num_warps=launch["wy"][0], num_stages=launch["wy"][1])
        self.part("sweep")[(run.nbh, nv)](
            kv, values, w, p["g"], p["lam"], p["s0"], p["sn"], hs, cu, choff, *st["k"], *vst,
            *wst, *st["g"], *st["s"], *hst, H, length, nt, **shape, **flags,
            num_warps=launch["sweep"][0], num_stages=launch["sweep"][1])
        self.part("output")[(*chunk_grid, nv)](
            qv, kv, values, p["o"], p["g"], p["lam"], hs, cu, cidx, *st["q"], *st["k"], *vst,
            *st["o"], *st["g"], *hst, H, length, nt, run.scale, **shape, VARLEN=flags["VARLEN"],
            num_warps=launch["output"][0], num_stages=launch["output"][1])


def scratch_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dot operand dtype (and the scratch tensors'): the input dtype on a GPU and for fp16
    under the interpreter; fp32 for bf16 under the interpreter (its bf16 dot is wrong) and for
    fp32 inputs."""
    interpreted = device.type != "cuda" or config.triton_interpret()
    return torch.float32 if interpreted and dtype == torch.bfloat16 else dtype


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """ieee for fp32 inputs and under the interpreter (exact fp32 dots); tf32 otherwise, where
    the split kernels' operands are 16-bit and L7's fp32 tiles round to tf32's 10-bit mantissa
    (the inputs' 10 or 7 bits fit)."""
    interpreted = device.type != "cuda" or config.triton_interpret()
    return "ieee" if interpreted or dtype == torch.float32 else "tf32"


def launch_constexprs(dk: int, f_dim: int, dv: int, dv_block: int, chunk: int,
                      precision: str) -> dict[str, Any]:
    """The shape constexprs a launch passes (HAS_INITIAL, STORE_FINAL and VARLEN aside);
    DK_PAD pads the feature dim F (= dk unless phi is taylor2)."""
    return {"D_K": dk, "D_V": dv, "DK_PAD": padded(f_dim), "DV_BLOCK": dv_block, "CHUNK": chunk,
            "DOT_PRECISION": precision}


def _split_signature(part: str, dtype: str) -> dict[str, str]:
    """The pointer and scalar types of split kernel `part` for `dtype` inputs on a GPU (scratch
    in the input dtype, as `scratch_dtype` there; g, beta, lam and the states fp32)."""
    t = "*" + triton_type(dtype)
    types = {"Q": t, "K": t, "V": t, "O": t, "U": t, "W": t, "HS": t, "G": "*fp32",
             "BETA": "*fp32", "LAM": "*fp32", "S0": "*fp32", "SN": "*fp32", "CU": "*i32",
             "CIDX": "*i32", "CHOFF": "*i32", "scale": "fp32"}
    return {a: types.get(a, "i32") for a in ARGS[part]}


def _jit_specialisation(node: LinearState, part: str) -> tuple[dict[str, int], list[str]]:
    """(unit strides, strides that are multiples of 16) of split kernel `part` as Triton's JIT
    specialises a launch on contiguous inputs with 16-divisible head dims and H * D (the case a
    GPU run meets): the last dims' strides are 1 (a scalar gate's and beta's along L), the
    token and head strides of the [.., L, D] tensors multiples of 16. The state tensors and the
    gate's other strides get no hint (Dv + 1 with the normaliser; L need not divide by 16)."""
    args = ARGS[part]
    scalar_gate = node.gate in ("scalar", "constant")
    unit = {a: 1 for a in args if a[-1] == "d" and a[:-1] in ("stride_q", "stride_k", "stride_v",
                                                              "stride_o", "stride_w", "stride_u")}
    unit.update({a: 1 for a in ("stride_hv", "stride_bl") if a in args})
    unit.update({a: 1 for a in ("stride_gl",) if a in args and scalar_gate})
    unit.update({a: 1 for a in ("stride_gd",) if a in args and node.gate == "vector"})
    divisible = [a for a in args if a not in unit and a[:-1] in (
        "stride_q", "stride_k", "stride_v", "stride_o", "stride_w", "stride_u", "stride_h")]
    return unit, divisible


def compile_chunked_for_target(kernel: TritonChunkedLinear, arch: int, dtype: str,
                               head_dim_k: int, head_dim_v: int, *, chunk: int | None = None,
                               varlen: bool = False, only: str | None = None
                               ) -> list[CompiledArtifact]:
    """Compile every kernel of a `TritonChunkedLinear` (L1-L6: [wy], sweep, output; L7: its one
    kernel) for sm_<arch> with no GPU present, with the launch's constexprs and warps (`only`:
    just that split kernel). Returns the `CompiledArtifact`s in launch order; raises
    `AOTCompileError`."""
    node = kernel.node
    f_dim = node.feature_dim(head_dim_k)
    dv_block = chunked_value_block(f_dim, head_dim_v, kernel.block_v, node.rule, arch)
    if chunk is None:
        chunk = kernel.chunk or gpu_chunk(node, f_dim)
    precision = "ieee" if dtype == "float32" else "tf32"  # as `dot_precision` on a GPU
    consts = launch_constexprs(head_dim_k, f_dim, head_dim_v, dv_block, chunk, precision)
    what = f"{dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}, varlen {varlen}"
    path = str(kernel.entry.files["kernel.py"])
    if not split(node):
        signature, pointers = linear_signature(dtype)
        return [compile_artifact(
            {"path": path, "name": kernel.name, "aligned": pointers}, arch, signature,
            {**consts, "HAS_INITIAL": True, "STORE_FINAL": True, "VARLEN": varlen},
            Schedule(num_warps=CHUNKED_NUM_WARPS, num_stages=3), what, dtype=dtype,
            head_dims=(head_dim_k, head_dim_v))]
    out = []
    for part in parts(node):
        if only is not None and part != only:
            continue
        signature = _split_signature(part, dtype)
        flags = {"VARLEN": varlen} if part != "sweep" else \
            {"HAS_INITIAL": True, "STORE_FINAL": True, "VARLEN": varlen}
        unit, divisible = _jit_specialisation(node, part)
        warps, stages = split_launch(part)
        job = {"path": path, "name": f"{kernel.name}_{part}", "divisible": divisible,
               "aligned": [a for a, t in signature.items() if t.startswith("*")]}
        out.append(compile_artifact(job, arch, signature, {**consts, **flags, **unit},
                                    Schedule(num_warps=warps, num_stages=stages),
                                    what, dtype=dtype, head_dims=(head_dim_k, head_dim_v)))
    return out
