"""Static speed report: attncc's kernels and their anchors compiled for sm_90 / sm_80 with no GPU,
read from the SASS side by side.

```bash
python -m benchmarks.static                          # sm_90 and sm_80 -> benchmarks/results/static/
python -m benchmarks.static --arch 90 --only fwd     # cases whose label contains "fwd"
python -m benchmarks.static --only linear --only fla --update  # re-measure those rows only
```

Every kernel goes through attncc's own ahead-of-time path (`attncc.backends.triton.aot`: Triton's
whole pipeline, ptxas included, in a child process with the interpreter off), with the signature
and constexprs its launch passes on a GPU of that arch. The anchors go through the same path: the
tutorial-style flash forward of `benchmarks/static_anchor.py` (tensor-descriptor form on sm_90,
pointer form with the stride hints the JIT would give on both) at attncc's tiles for the same
signature, and fla's gated-delta-rule forward kernels (`benchmarks/static_fla_kernels.py`).

Per kernel (`benchmarks/sass.py` reads the SASS): registers and stack per thread, spill bytes
(local stores/loads, whole kernel and inside main loops), dynamic shared memory, tensor-core
instructions by kind, global loads by kind (TMA / LDGSTS.<bits> / LDG.<bits>) and the
instructions per iteration of each main loop. Output: `<out>/sm<arch>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import attncc
from attncc.backends.triton.aot import (CompiledArtifact, compile_artifact,
                                        compile_for_target)
from attncc.backends.triton.backward.aot import compile_backward_for_target
from attncc.backends.triton.backward.kernel import TritonBackward
from attncc.backends.triton.forward import TritonForward
from attncc.backends.triton.launch_spec import forward_spec
from attncc.backends.triton.linear.aot import compile_linear_backward_for_target
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.backends.triton.linear.backward_chunked import (TritonChunkedLinearBackward,
                                                            compile_chunked_backward_for_target)
from attncc.backends.triton.linear.chunked import (TritonChunkedLinear,
                                                   compile_chunked_for_target)
from attncc.backends.triton.linear.chunked import parts as chunked_parts
from attncc.backends.triton.linear.backward_delta import (TritonDeltaChunkedBackward,
                                                          compile_delta_backward_for_target)
from attncc.backends.triton.serve_aot import compile_serve_for_target
from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles_linear import chunked_value_block, gpu_chunk
from benchmarks import sass
from benchmarks.static_fla_bwd import FLA_BWD, fla_bwd_kernel
from benchmarks.static_report import markdown, summarise

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "static"
_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    """One kernel to compile: `label` names it in the report; `family` pairs attncc rows with
    their anchors; `dense` marks the kernels the load gate applies to."""

    label: str
    family: str
    source: str  # "attncc" | "anchor: tutorial" | "anchor: fla"
    arch: int
    dense: bool
    compile: Callable[[], CompiledArtifact]
    sweep: tuple[int, int] | None = None  # a sequential state sweep: (chunk, value columns)


@cache
def causal_forward() -> TritonForward:
    return attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel


@cache
def paged_serving() -> Any:
    return attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(16))).kernels


def dense_forward(arch: int, dtype: str, d: int) -> CompiledArtifact:
    return compile_for_target(causal_forward(), dtype, d, d, arch)


def dense_backward(arch: int, kernel: str, dtype: str, d: int) -> CompiledArtifact:
    return compile_backward_for_target(TritonBackward(causal_forward(), ()), kernel, dtype, d, d,
                                       arch)


def tutorial_forward(arch: int, dtype: str, d: int, tma: bool) -> CompiledArtifact:
    """The anchor at attncc's tiles, warps and stages for the same signature. Pointers, the
    sequence length and (pointer form) the strides are passed as 16-divisible, as Triton's JIT
    specialises a contiguous [Z, H, N_CTX, D] launch with N_CTX % 16 == 0."""
    sched = forward_spec(causal_forward(), dtype, d, d, arch).schedule
    t = "*" + _TYPES[dtype]
    pointers = {"Q": t, "K": t, "V": t, "O": t, "M": "*fp32"}
    strides = [f"stride_{x}{s}" for x in "qkvo" for s in ("z", "h", "m" if x in "qo" else "n")]
    hinted = [] if tma else strides  # flash_fwd_ptr takes the strides before Z, H, N_CTX
    signature = {**pointers, "sm_scale": "fp32",
                 **dict.fromkeys([*hinted, "Z", "H", "N_CTX"], "i32")}
    aligned = [*pointers, *hinted, "N_CTX"]
    job = {"path": str(ROOT / "static_anchor.py"),
           "name": "flash_fwd_tma" if tma else "flash_fwd_ptr", "aligned": aligned}
    constexprs = {"HEAD_DIM": d, "BLOCK_M": sched.block_m, "BLOCK_N": sched.block_n}
    return compile_artifact(job, arch, signature, constexprs, sched, f"{dtype} d{d}",
                            dtype=dtype, head_dims=(d, d))


# fla's gated-delta-rule chunk forward at K = V = 128, chunk 64, bf16 q/k/v (g fp32 after
# fla's chunk_local_cumsum, the triangular solve's A in bf16, kkt's A in fp32, states fp32):
# (pointer types, constexprs, num_warps, num_stages). One autotune config each, from fla's
# lists for a non-Blackwell NVIDIA GPU (no GPU here to autotune on).
_FLA = {
    "chunk_scaled_dot_kkt_fwd_kernel": (
        {"k": "*bf16", "g": "*fp32", "beta": "*bf16", "A": "*fp32"},
        {"cu_seqlens": None, "chunk_indices": None, "H": 16, "HV": 16, "K": 128, "BT": 64,
         "BK": 64, "IS_VARLEN": False, "USE_G": True}, 4, 3),
    "merge_16x16_to_64x64_inverse_kernel": (  # solve_tril: (I + A)^-1 of kkt's fp32 A, bf16 out
        {"A": "*fp32", "Ai": "*bf16"},
        {"cu_seqlens": None, "chunk_indices": None, "H": 16, "BT": 64, "USE_TMA": False,
         "IS_VARLEN": False, "DOT_PRECISION": "ieee"}, 4, 3),
    "recompute_w_u_fwd_kernel": (
        {"k": "*bf16", "v": "*bf16", "beta": "*bf16", "w": "*bf16", "u": "*bf16", "A": "*bf16",
         "g": "*fp32"},
        {"cu_seqlens": None, "chunk_indices": None, "H": 16, "HV": 16, "K": 128, "V": 128,
         "BT": 64, "BK": 64, "BV": 64, "USE_G": True, "IS_VARLEN": False}, 4, 3),
    "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": (
        {"k": "*bf16", "v": "*bf16", "w": "*bf16", "v_new": "*bf16", "g": "*fp32",
         "h": "*bf16", "h0": "*fp32", "ht": "*fp32"},
        {"gk": None, "cu_seqlens": None, "chunk_offsets": None, "H": 16, "HV": 16, "K": 128,
         "V": 128, "BT": 64, "BV": 64, "USE_G": True, "USE_GK": False, "USE_INITIAL_STATE": True,
         "STORE_FINAL_STATE": True, "SAVE_NEW_VALUE": True, "STATE_V_FIRST": False,
         "IS_VARLEN": False}, 4, 2),
    "chunk_fwd_kernel_o": (
        {"q": "*bf16", "k": "*bf16", "v": "*bf16", "h": "*bf16", "g": "*fp32", "o": "*bf16"},
        {"g_gamma": None, "cu_seqlens": None, "chunk_indices": None, "H": 16, "HV": 16,
         "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 64, "USE_G": True, "USE_G_GAMMA": False,
         "STATE_V_FIRST": False, "IS_VARLEN": False}, 4, 3),
}
FLA_SWEEP = "chunk_gated_delta_rule_fwd_kernel_h_blockdim64"  # fla's sequential state sweep
_FLA_ARGS = {  # each kernel's argument order (fla 0.6.0); scalars not listed above are T / scale
    "chunk_scaled_dot_kkt_fwd_kernel": "k g beta A cu_seqlens chunk_indices T H HV K BT BK "
                                       "IS_VARLEN USE_G",
    "merge_16x16_to_64x64_inverse_kernel": "A Ai cu_seqlens chunk_indices T H BT USE_TMA "
                                           "IS_VARLEN DOT_PRECISION",
    "recompute_w_u_fwd_kernel": "k v beta w u A g cu_seqlens chunk_indices T H HV K V BT BK BV "
                                "USE_G IS_VARLEN",
    "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": "k v w v_new g gk h h0 ht cu_seqlens "
    "chunk_offsets T H HV K V BT BV USE_G USE_GK USE_INITIAL_STATE STORE_FINAL_STATE "
    "SAVE_NEW_VALUE STATE_V_FIRST IS_VARLEN",
    "chunk_fwd_kernel_o": "q k v h g g_gamma o cu_seqlens chunk_indices scale T H HV K V BT BK BV "
                          "USE_G USE_G_GAMMA STATE_V_FIRST IS_VARLEN",
}


NOTES = [
    "Tutorial anchor: `benchmarks/static_anchor.py` at attncc's tiles, warps and stages for the "
    "same signature; it assumes contiguous [Z, H, N_CTX, D] with N_CTX a multiple of BLOCK_M "
    "(no bounds checks), as the tutorial does. The TMA form is compiled on sm_90 only.",
    "fla anchors: fla 0.6.0's `chunk_gated_delta_rule` forward at K = V = 128, chunk 64, bf16, "
    "H = 16; one autotune config each (kkt BK 64 w4 s3; solve_tril's 64x64 merge w4 s3 ieee, "
    "pointer path: its TMA path, which fla takes on sm_90, does not compile with triton 3.9 "
    "('Expected a 32-bit integer' at the first descriptor load); recompute_w_u w4 s3; "
    "fwd_kernel_h BV 64 w4 s2; chunk_fwd_kernel_o BK = BV = 64 w4 s3): with no GPU fla's "
    "autotuner cannot choose. Not compiled: `chunk_local_cumsum` "
    "and l2norm (elementwise, no matrix products).",
    "Linear backward: attncc's chunked form is three kernels (`states`: the forward state "
    "sweep and the reverse gradient sweep, one chunk per iteration; `dqk` and `dv`: parallel "
    "over chunks); fla's L3 backward is four (`chunk_fwd_kernel_h`, `chunk_bwd_kernel_dh`: the "
    "sweeps; `chunk_bwd_kernel_dqkwg`, `chunk_bwd_kernel_dv`), compiled at one config of its "
    "autotune lists (`benchmarks/static_fla_bwd.py`). The token sweep's loops run once per "
    "token (no tensor cores: its loop counts are not in the main-loop column).",
    "Linear backward L6: attncc's chunked WY form is four kernels (`wy`: T, W, U and P^T dO per "
    "chunk; `states`: the sweeps, one chunk per iteration; `dqk`: dq, dk', dW; `wy_bwd`: the WY "
    "backward), all but `states` parallel over chunks (fla: `chunk_gated_delta_rule_bwd`); no "
    "fla anchor for it yet.",
    "attncc's L1-L6 forward is fla's structure: the delta rules' WY kernel (kkt, the "
    "triangular solve by forward substitution, W and U in one chunk-parallel kernel), the "
    "sequential state sweep (grid batch-head x value block) and the chunk-parallel output "
    "kernel. Linear kernels are compiled as Triton's JIT specialises a contiguous launch "
    "(unit last-dim strides, 16-divisible token and head strides), as fla's constexpr H and K "
    "give fla's kernels. Sweep cost per token: insts/iter x warps / chunk (warp-instructions "
    "per token for one program's value columns), and x programs per head at Dv = 128.",
]


def fla_kernel(arch: int, name: str) -> CompiledArtifact:
    """One of fla's kernels with the arguments fla's `chunk_gated_delta_rule` passes; pointers
    16-byte aligned as the JIT sees torch's allocations; T is `do_not_specialize` in fla."""
    pointers, constexprs, warps, stages = _FLA[name]
    scalars = {"T": "i32", "scale": "fp32"}
    signature = {a: pointers.get(a) or scalars.get(a) or "constexpr"
                 for a in _FLA_ARGS[name].split()}
    job = {"path": str(ROOT / "static_fla_kernels.py"), "name": name, "aligned": list(pointers)}
    return compile_artifact(job, arch, signature, constexprs,
                            Schedule(num_warps=warps, num_stages=stages), "fla bf16 K=V=128",
                            dtype="bfloat16", head_dims=(128, 128))


def cases(arch: int) -> list[Case]:
    """The report's kernels for sm_<arch>, attncc first within each family."""
    out = []
    for d in (64, 128):
        for dtype in ("float16", "bfloat16"):
            fam = f"dense fwd causal d{d} {_TYPES[dtype]}"
            out.append(Case(f"attncc fwd causal d{d} {_TYPES[dtype]}", fam, "attncc", arch, True,
                            lambda a=arch, t=dtype, d=d: dense_forward(a, t, d)))
            if arch >= 90:
                out.append(Case(f"tutorial fwd TMA d{d} {_TYPES[dtype]}", fam,
                                "anchor: tutorial", arch, True,
                                lambda a=arch, t=dtype, d=d: tutorial_forward(a, t, d, True)))
            out.append(Case(f"tutorial fwd ptr d{d} {_TYPES[dtype]}", fam, "anchor: tutorial",
                            arch, True,
                            lambda a=arch, t=dtype, d=d: tutorial_forward(a, t, d, False)))
    for d in (64, 128):
        for kernel in ("dq", "dkdv"):
            out.append(Case(f"attncc bwd {kernel} causal d{d} bf16", f"dense bwd {kernel}",
                            "attncc", arch, True,
                            lambda a=arch, k=kernel, d=d: dense_backward(a, k, "bfloat16", d)))
    out.append(Case("attncc serve decode paged d128 bf16", "serving decode", "attncc", arch,
                    False, lambda a=arch: compile_serve_for_target(paged_serving(), a,
                                                                   "bfloat16", 128, "paged")))
    for rule, lid in (("scalar_gate", "L3"), ("gated_delta", "L6")):
        node = LinearState(rule)
        for part in chunked_parts(node):
            sweep = (gpu_chunk(node, 128), chunked_value_block(128, 128, None, rule, arch)) \
                if part == "sweep" else None
            out.append(Case(f"attncc linear {lid} {rule} {part} d128 bf16", f"linear {lid}",
                            "attncc", arch, False,
                            lambda a=arch, n=node, p=part: compile_chunked_for_target(
                                TritonChunkedLinear(n), a, "bfloat16", 128, 128, only=p)[0],
                            sweep))
    for name in _FLA:
        sweep = (64, 64) if name == FLA_SWEEP else None  # BT 64, BV 64 (the config above)
        out.append(Case(f"fla {name}", "linear L6", "anchor: fla", arch, False,
                        lambda a=arch, n=name: fla_kernel(a, n), sweep))
    return out + linear_backward_cases(arch)


def linear_backward_cases(arch: int) -> list[Case]:
    """The linear backward rows: attncc's chunked backward of L3 (chunk 64) and L4 (chunk 32)
    at bf16 d128, its token sweep (L3, checkpoints every 64 tokens) and fla's L3 backward."""
    out = []
    for rule, lid in (("scalar_gate", "L3"), ("vector_gate", "L4")):
        for part in ("states", "dqk", "dv"):
            out.append(Case(f"attncc linear bwd chunked {lid} {part} d128 bf16",
                            f"linear bwd {lid}", "attncc", arch, False,
                            lambda a=arch, r=rule, p=part: compile_chunked_backward_for_target(
                                TritonChunkedLinearBackward(LinearState(r)), p, a, "bfloat16",
                                128, 128)))
    for part in ("wy", "states", "dqk", "wy_bwd"):
        out.append(Case(f"attncc linear bwd chunked L6 {part} d128 bf16", "linear bwd L6",
                        "attncc", arch, False,
                        lambda a=arch, p=part: compile_delta_backward_for_target(
                            TritonDeltaChunkedBackward(LinearState("gated_delta")), p, a,
                            "bfloat16", 128, 128)))
    out.append(Case("attncc linear bwd token sweep L6 d128 bf16", "linear bwd L6", "attncc", arch,
                    False, lambda a=arch: compile_linear_backward_for_target(
                        TritonLinearBackward(LinearState("gated_delta")), a, "bfloat16", 128, 128,
                        chunk=64)))
    out.append(Case("attncc linear bwd token sweep L3 d128 bf16", "linear bwd L3",
                    "attncc", arch, False,
                    lambda a=arch: compile_linear_backward_for_target(
                        TritonLinearBackward(LinearState("scalar_gate")), a, "bfloat16", 128, 128,
                        chunk=64)))
    for name in FLA_BWD:
        out.append(Case(f"fla {name}", "linear bwd L3", "anchor: fla", arch, False,
                        lambda a=arch, n=name: fla_bwd_kernel(a, n)))
    return out


def measure(case: Case, cuobjdump: str) -> dict[str, Any]:
    """Compile `case` and return its row: the artifact's figures, the SASS profile, the compile
    time; a compile error is recorded as the row's `error` (the report says why it is missing)."""
    start = time.perf_counter()
    try:
        art = case.compile()
    except Exception as err:  # noqa: BLE001 - recorded in the report, never hidden
        return {"label": case.label, "family": case.family, "source": case.source,
                "arch": case.arch, "error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    functions = sass.parse_functions(sass.disassemble(art.cubin, cuobjdump))
    profile = sass.analyse(art.name, functions[art.name])
    sched = art.schedule
    return {"label": case.label, "family": case.family, "source": case.source,
            "arch": case.arch, "dense": case.dense, "kernel": art.name,
            "schedule": {"block_m": sched.block_m, "block_n": sched.block_n,
                         "num_warps": sched.num_warps, "num_stages": sched.num_stages},
            "regs": art.n_regs, "stack_bytes": art.stack_bytes, "shared_bytes": art.shared_bytes,
            "compile_s": round(time.perf_counter() - start, 1), "sass": profile.to_json(),
            **summarise(profile), **sweep_cost(case, profile, sched.num_warps)}


def sweep_cost(case: Case, profile: Any, warps: int) -> dict[str, Any]:
    """A sequential sweep's warp-instructions per token: per program (its value columns) and
    per head of Dv = 128 (every value-block program of a head walks the same tokens)."""
    if case.sweep is None or not profile.main_loops:
        return {}
    chunk, columns = case.sweep
    per_token = max(r.path[1] for _, _, r in profile.main_loops) * warps / chunk
    return {"sweep": {"chunk": chunk, "value_columns": columns,
                      "warp_insts_per_token": round(per_token, 1),
                      "warp_insts_per_token_head128": round(per_token * -(-128 // columns), 1)}}


def run(arches: list[int], only: list[str], out: Path, jobs: int,
        update: bool = False) -> list[dict[str, Any]]:
    tool = sass.cuobjdump_path()
    rows = []
    for arch in arches:
        all_cases = cases(arch)
        selected = [c for c in all_cases if not only or any(o in c.label for o in only)]
        with ThreadPoolExecutor(jobs) as pool:
            found = list(pool.map(lambda c: measure(c, tool), selected))
        out.mkdir(parents=True, exist_ok=True)
        report = found
        if update and (out / f"sm{arch}.json").exists():  # the other cases' rows stay as they were
            fresh = {r["label"]: r for r in found}
            kept = {c.label for c in all_cases} - set(fresh)
            old = json.loads((out / f"sm{arch}.json").read_text())["rows"]
            old_rows = {r["label"]: r for r in old if r["label"] in kept}
            report = [fresh.get(c.label) or old_rows[c.label] for c in all_cases
                      if c.label in fresh or c.label in old_rows]
        record = {"arch": f"sm_{arch}", "rows": report, "toolchain": sass.toolchain(tool),
                  "notes": NOTES}
        (out / f"sm{arch}.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / f"sm{arch}.md").write_text(markdown(record))
        rows += found
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="90, 80 (default both)")
    parser.add_argument("--only", action="append", default=[], help="label substring")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=2, help="compiles at a time")
    parser.add_argument("--update", action="store_true",
                        help="with --only: keep the other cases' rows of the existing report")
    args = parser.parse_args(argv)
    rows = run(args.arch or [90, 80], args.only, args.out, args.jobs, args.update)
    for row in rows:
        print(f"sm_{row['arch']} {row['label']}: " + (row.get("error", "")[:200] or
              f"{row['regs']} regs, {row['stack_bytes']} B stack, {row['mma']}, "
              f"{row['load_kind']}, {row['insts_per_iter']} insts/iter"))
    return 1 if any("error" in r and r["source"] == "attncc" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
