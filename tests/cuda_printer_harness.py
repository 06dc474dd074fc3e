"""Compile printed CUDA functions for the host and check them against the IR's evaluator.

One translation unit holds every case (`Case`: a plan and its captured tensors), each in its own
namespace with a driver that reads a grid of index points from stdin and prints what the
printed `attncc_mask` / `attncc_score` / `attncc_sink` / `attncc_kv_range<i>` return; a
`__global__` kernel per case calls the same functions, so nvcc compiles them for the device as
well. The binary is cached by the hash of its source (one nvcc run per source, shared by
processes). `check` evaluates the same expressions with `attncc.ir.eval.evaluate` on the same
points and raises AssertionError naming every case and function that differs, with its first
differing point.

Captured tensors travel as strided views into a larger buffer whose other elements hold a
sentinel: a read that ignores a stride, or a bounds check that lets an index through, reads the
sentinel and differs from the evaluator (which reads 0 outside the tensor).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import torch

from attncc.backends.cuda.printer import (TEMPLATES_DIR, PrintedFunctions, extra_arguments,
                                          render_functions)
from attncc.ir.eval import evaluate
from attncc.ir.plan import KernelPlan
from attncc.ir.symbols import (B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_FIRST, Q_IDX, Q_LAST,
                               SCORE, Load, buffer_symbol)

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
SENTINEL = {"float": 1234.5, "int": 77, "bool": 1}
# fp32 score math against the fp64 evaluator: a few ulps of fp32 through tanh/erf/exp, and
# captured fp16/bf16 data is read exactly on both sides
SCORE_ATOL, SCORE_RTOL = 2e-5, 2e-5


@dataclass
class Case:
    name: str
    plan: KernelPlan
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Grid:
    """Points (b, h, q_idx, kv_idx, q_first, q_last: int64 [n]; score: fp32 [n]) and shapes."""

    Lq: int
    Lk: int
    Hq: int
    Hkv: int
    b: torch.Tensor
    h: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    q_first: torch.Tensor
    q_last: torch.Tensor
    score: torch.Tensor

    @property
    def n(self) -> int:
        return self.b.numel()


# ---- the translation unit ------------------------------------------------------------------------

def _driver(case: Case, printed) -> str:
    reads = []
    for ctype, name in extra_arguments(case.plan.spec):
        if name.endswith("_ptr"):
            base = ctype.removeprefix("const ").removesuffix("*")
            reads.append(f"  std::vector<{base}> {name}_data = read_vector<{base}>();\n"
                         f"  const {base}* {name} = {name}_data.data();")
        else:
            reads.append(f"  {ctype} {name} = read_one<{ctype}>();")
    call = "b, h, q_idx, kv_idx, Lq, Lk, Hq, Hkv" + printed.extra_args
    sink = (f"    out.push_back(bits(attncc_sink(h{printed.extra_args})));\n"
            if printed.has_sink else "")
    ranges = "".join(
        f"    {{ attncc_kv_range r = attncc_kv_range{i}(b, h, q_first, q_last, Lq, Lk, Hq, Hkv"
        f"{printed.extra_args});\n      out.insert(out.end(), {{r.some_lo, r.some_hi, r.all_lo, "
        f"r.all_hi, int(r.enabled), int(r.exact)}}); }}\n"
        for i in range(printed.n_ranges))
    device_ranges = "".join(
        f"  out[3 + {i}] = float(attncc_kv_range{i}(b, h, q_idx, kv_idx, Lq, Lk, Hq, Hkv"
        f"{printed.extra_args}).some_hi);\n" for i in range(printed.n_ranges))
    device_sink = (f"  out[2] = attncc_sink(h{printed.extra_args});\n" if printed.has_sink
                   else "")
    return f"""void run() {{
{chr(10).join(reads)}
  const int Lq = read_one<int>(), Lk = read_one<int>(), Hq = read_one<int>(), Hkv = read_one<int>();
  std::vector<int> out;
  for (std::size_t k = 0; k < points_score.size(); ++k) {{
    const int* p = &points_index[6 * k];
    const int b = p[0], h = p[1], q_idx = p[2], kv_idx = p[3], q_first = p[4], q_last = p[5];
    const float score = points_score[k];
    (void)q_first, (void)q_last;
    out.push_back(int(attncc_mask({call})));
    out.push_back(bits(attncc_score(score, {call})));
{sink}{ranges}  }}
  std::fwrite(out.data(), sizeof(int), out.size(), stdout);
}}
__global__ void device_check(float* out, int b, int h, int q_idx, int kv_idx, int Lq, int Lk,
                             int Hq, int Hkv{printed.extra_params}) {{
  out[0] = attncc_score(out[1], {call}) + float(attncc_mask({call}));
{device_sink}{device_ranges}}}
"""


PRELUDE = """#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "attncc_expr.cuh"

// stdin: int32 n, int32 [n, 6] (b, h, q_idx, kv_idx, q_first, q_last), fp32 [n] scores; then
// per request an int32 case id and that case's params, captures (element count, raw elements,
// strides, sizes) and shapes. stdout: per request, per point, 4-byte words.
template <class T> static T read_one() {
  T x;
  if (std::fread(&x, sizeof(T), 1, stdin) != 1) std::exit(3);
  return x;
}
template <class T> static std::vector<T> read_vector() {
  std::vector<T> out(read_one<int>());
  if (!out.empty() && std::fread(out.data(), sizeof(T), out.size(), stdin) != out.size()) std::exit(3);
  return out;
}
static int bits(float x) { int out; std::memcpy(&out, &x, sizeof out); return out; }
static std::vector<int> points_index;
static std::vector<float> points_score;
"""


def translation_unit(cases: list[Case], printed: list[PrintedFunctions] | None = None) -> str:
    """Every case in its namespace; `printed`: the cases' functions if not printed here."""
    printed = printed or [render_functions(c.plan) for c in cases]
    parts = [PRELUDE]
    for i, (case, printed) in enumerate(zip(cases, printed)):
        parts.append(f"// case {i}: {case.name}\nnamespace case{i} {{\n{printed.source}"
                     f"{_driver(case, printed)}}}  // namespace case{i}\n")
    dispatch = "".join(f"      case {i}: case{i}::run(); break;\n" for i in range(len(cases)))
    parts.append(f"""int main() {{
  points_index = read_vector<int>();
  points_score = read_vector<float>();
  int which;
  while (std::fread(&which, sizeof which, 1, stdin) == 1) {{
    switch (which) {{
{dispatch}      default: return 2;
    }}
  }}
  return 0;
}}
""")
    return "\n".join(parts)


def build(cases: list[Case], printed: list[PrintedFunctions] | None = None) -> Path:
    """The host binary for `cases`, compiled once per source (cached in the temp dir)."""
    source = translation_unit(cases, printed)
    header = (TEMPLATES_DIR / "attncc_expr.cuh").read_text()
    key = hashlib.sha256((source + header).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "attncc-cuda-printer-check"
    folder.mkdir(exist_ok=True)
    binary = folder / f"check-{key}"
    if binary.exists():
        return binary
    src = folder / f"check-{key}-{os.getpid()}.cu"
    src.write_text(source)
    tmp = folder / f"check-{key}-{os.getpid()}.bin"
    done = subprocess.run([NVCC, "-std=c++17", "-O1", "-arch=sm_80", "-I", str(TEMPLATES_DIR),
                           "-o", str(tmp), str(src)], capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"nvcc rejected the printed functions ({src}):\n{done.stderr[-6000:]}")
    os.replace(tmp, binary)  # atomic: a concurrent process sees the whole binary or none
    return binary


# ---- running and comparing -----------------------------------------------------------------------

def _array(values, dtype) -> bytes:
    """int32 element count, then the elements' bytes (the binary's `read_vector`)."""
    data = torch.as_tensor(values, dtype=dtype).contiguous()
    return struct.pack("<i", data.numel()) + data.view(torch.uint8).numpy().tobytes()


def _tensor_input(t: torch.Tensor) -> bytes:
    """A strided view of `t` into a sentinel-filled buffer: elements from the view's first
    one, strides, sizes."""
    kind = "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else "int"
    if t.dim() == 0:
        storage, strides = t.reshape(1), []
    else:
        big = torch.full([2 * s + 1 for s in t.shape], SENTINEL[kind], dtype=t.dtype)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
        view.copy_(t)
        storage, strides = big.flatten()[view.storage_offset():], list(view.stride())
    return _array(storage, t.dtype) + struct.pack(f"<{2 * t.dim()}i", *strides, *t.shape)


def _request(case: Case, index: int, grid: Grid) -> bytes:
    spec = case.plan.spec
    out = struct.pack("<i", index)
    out += b"".join(struct.pack("<i" if p.kind == "int" else "<f", p.value) for p in spec.params)
    out += b"".join(_tensor_input(case.tensors[c.name]) for c in spec.captures)
    return out + struct.pack("<4i", grid.Lq, grid.Lk, grid.Hq, grid.Hkv)


def _words(case: Case) -> int:
    """4-byte words the binary writes per point for `case`."""
    return 2 + (case.plan.spec.normaliser.sink is not None) + 6 * len(case.plan.tiles.pieces)


def run(binary: Path, cases: list[Case], grid: Grid) -> list[torch.Tensor]:
    """Per case, int32 [n, words]: what the printed functions return at each point."""
    points = torch.stack([grid.b, grid.h, grid.q, grid.kv, grid.q_first, grid.q_last], dim=1)
    stdin = _array(points.flatten(), torch.int32) + _array(grid.score, torch.float32)
    stdin += b"".join(_request(c, i, grid) for i, c in enumerate(cases))
    done = subprocess.run([str(binary)], input=stdin, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"check binary failed ({done.returncode}): {done.stderr[-2000:]}")
    words = torch.frombuffer(bytearray(done.stdout), dtype=torch.int32)
    out, at = [], 0
    for case in cases:
        size = grid.n * _words(case)
        out.append(words[at:at + size].reshape(grid.n, _words(case)))
        at += size
    assert at == words.numel(), "check binary: one block of results per case"
    return out


def _env(grid: Grid, case: Case, expr: sympy.Basic) -> dict:
    values = {B_IDX.name: grid.b, H_IDX.name: grid.h, Q_IDX.name: grid.q, KV_IDX.name: grid.kv,
              LQ.name: grid.Lq, LK.name: grid.Lk, HQ.name: grid.Hq, HKV.name: grid.Hkv,
              SCORE.name: grid.score.double(), Q_FIRST.name: grid.q_first,
              Q_LAST.name: grid.q_last}
    values.update({p.name: p.value for p in case.plan.spec.params})
    return {s: values[s.name] for s in expr.free_symbols if s.name in values}


def _value(expr: sympy.Basic, grid: Grid, case: Case) -> torch.Tensor:
    out = evaluate(expr, _env(grid, case, expr), case.tensors)
    return torch.as_tensor(out).expand(grid.n)


def expected(case: Case, grid: Grid) -> dict[str, torch.Tensor]:
    """What the evaluator says each printed function returns, per point."""
    spec = case.plan.spec
    out = {"mask": (_value(spec.mask.expr, grid, case).bool() if spec.mask is not None
                    else torch.ones(grid.n, dtype=torch.bool)),
           "score": (_value(spec.score.expr, grid, case).double() if spec.score is not None
                     else grid.score.double())}
    sink = spec.normaliser.sink
    if sink is not None:
        out["sink"] = _value(Load(buffer_symbol(sink.name), H_IDX), grid, case).double()
    for i, piece in enumerate(case.plan.tiles.pieces):
        bounds = [_value(e, grid, case).long() for e in (piece.some_lo, piece.some_hi,
                                                         piece.all_lo, piece.all_hi)]
        guard = _value(piece.guard, grid, case).long()
        out[f"range{i}"] = torch.stack([*bounds, guard, torch.full_like(guard, int(piece.exact))],
                                       dim=1)
    return out


def printed(case: Case, words: torch.Tensor) -> dict[str, torch.Tensor]:
    """The binary's words for `case`, by function, as tensors like `expected`'s."""
    floats = words.view(torch.float32).double()
    out = {"mask": words[:, 0].bool(), "score": floats[:, 1]}
    col = 2
    if case.plan.spec.normaliser.sink is not None:
        out["sink"] = floats[:, col]
        col += 1
    for i in range(len(case.plan.tiles.pieces)):
        out[f"range{i}"] = words[:, col:col + 6].long()
        col += 6
    return out


def differences(binary: Path, cases: list[Case], grid: Grid) -> list[tuple[str, str]]:
    """(case name, what differs) per function of a case whose printed values differ from the
    evaluator's."""
    failures = []
    for case, words in zip(cases, run(binary, cases, grid)):
        want, got = expected(case, grid), printed(case, words)
        for what, w in want.items():
            g = got[what]
            if w.is_floating_point():
                bad = ~torch.isclose(g, w, atol=SCORE_ATOL, rtol=SCORE_RTOL, equal_nan=True)
            else:
                bad = (g != w).reshape(grid.n, -1).any(dim=1)
            if bad.any():
                k = int(bad.nonzero()[0])
                failures.append((case.name,
                    f"{case.name} {what}: {int(bad.sum())}/{grid.n} points differ; first at "
                    f"b={int(grid.b[k])} h={int(grid.h[k])} q={int(grid.q[k])} "
                    f"kv={int(grid.kv[k])} q_first={int(grid.q_first[k])} "
                    f"q_last={int(grid.q_last[k])} score={float(grid.score[k])!r} "
                    f"(Lq={grid.Lq} Lk={grid.Lk} Hq={grid.Hq}): printed {g[k].tolist()}, "
                    f"evaluator {w[k].tolist()}"))
    return failures


def check(binary: Path, cases: list[Case], grid: Grid) -> None:
    """Every printed function of every case equals the evaluator at every point of `grid`."""
    failures = differences(binary, cases, grid)
    if failures:
        raise AssertionError("printed CUDA differs from the IR evaluator:\n"
                             + "\n".join(text for _, text in failures))


def random_grid(Lq: int, Lk: int, Hq: int, Hkv: int, B: int, n: int, seed: int) -> Grid:
    """`n` points: random indices (b up to B, h up to Hq: past a captured tensor's batch or head
    extent too), the edge rows and columns (0, L - 1) and random fp32 scores in [-12, 12]
    with exact zeros."""
    g = torch.Generator().manual_seed(seed)

    def pick(hi: int) -> torch.Tensor:
        x = torch.randint(0, hi, (n,), generator=g)
        edge = torch.rand(n, generator=g)
        return torch.where(edge < 0.15, 0, torch.where(edge < 0.3, hi - 1, x))

    q, kv = pick(Lq), pick(Lk)
    q_first = torch.minimum(q, pick(Lq))
    score = (torch.rand(n, generator=g) * 24 - 12).float()
    score = torch.where(torch.rand(n, generator=g) < 0.1, 0.0, score)
    return Grid(Lq, Lk, Hq, Hkv, pick(B), pick(Hq), q, kv, q_first, q, score)


def full_grid(Lq: int, Lk: int, Hq: int, Hkv: int, B: int) -> Grid:
    """Every (b, h, q, kv) of the shape: all tile edges and negative differences."""
    b, h, q, kv = torch.meshgrid(torch.arange(B), torch.arange(Hq), torch.arange(Lq),
                                 torch.arange(Lk), indexing="ij")
    b, h, q, kv = (x.flatten() for x in (b, h, q, kv))
    score = ((q * 7 + kv * 3) % 29 - 14).float() * 0.75
    return Grid(Lq, Lk, Hq, Hkv, b, h, q, kv, torch.clamp(q - kv % 5, min=0), q, score)
