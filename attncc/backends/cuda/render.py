"""Render a KernelPlan into CUDA C++ with `templates/attn_fwd.cu.j2`.

All decisions are made here, in Python: the tile loops of each piece (partial tiles masked,
full ones not, tiles an earlier piece visited skipped), which printed functions exist, the
arguments. The template lays out what this module prepares; the printed expressions come from
`printer.render_functions` (the mask, score mod, sink and kv ranges as C++ functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attncc.backends import keys
from attncc.backends.base import Unsupported
from attncc.backends.cuda.printer import (EXPR_HEADER, PRINTER_VERSION, extra_arguments,
                                          render_functions)
from attncc.ir.plan import KernelPlan

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "attn_fwd.cu.j2"
# the per-arch machinery a source includes (binary.MACHINERY picks one per arch)
MACHINERY_HEADERS = ("attncc_fwd_sm80.cuh", "attncc_fwd_sm90.cuh")
HEADERS = (EXPR_HEADER, *MACHINERY_HEADERS)  # written beside the source when it is compiled
TEMPLATES = (TEMPLATE, *HEADERS)  # every file a source (and its cubin) depends on


@dataclass(frozen=True)
class Tiles:
    """One CTA's tile: query rows, keys per kv tile, warps (16 query rows each per mma)."""

    block_m: int
    block_n: int
    warps: int


# per head dim, for the mma.sync kernel (sm_80 and up) and the wgmma one (sm_90a): no spills
# with fp16 and bf16 and the heaviest catalogue scores (tests/test_cuda_backend.py, the
# example manifest). The wgmma kernel spills with 64-key tiles at d128 under a sliding window
# with a soft-cap (255 registers, 120 bytes), so it takes 32 keys per tile.
TILES = {64: Tiles(128, 64, 8), 128: Tiles(128, 64, 8)}
TILES_SM90 = {64: Tiles(128, 32, 8), 128: Tiles(128, 32, 8)}


def check_head_dims(head_dim_qk: int, head_dim_v: int, arch: int = 80) -> Tiles:
    """The tiles for (Dqk, Dv) on sm_<arch>; Unsupported unless both are 64 or both 128."""
    if head_dim_qk != head_dim_v or head_dim_qk not in TILES:
        raise Unsupported(f"backend 'cuda': head dims {head_dim_qk}/{head_dim_v} have no CUDA "
                          f"kernel (it has {'/'.join(map(str, TILES))} with Dqk == Dv); "
                          "use backend='triton'")
    return (TILES_SM90 if arch == 90 else TILES)[head_dim_qk]


def check_plan(plan: KernelPlan) -> None:
    """Unsupported for what the CUDA template does not lay out yet (the message says what)."""
    spec = plan.spec
    if spec.memory.text() != "dense":
        raise Unsupported(f"memory {spec.memory.text()!r} has no kernel yet")
    if plan.block_map is not None:
        raise Unsupported("backend 'cuda': this mask needs a run-time block map, which the CUDA "
                          "kernel does not read yet; use backend='triton'")
    if spec.reorder is not None:
        raise Unsupported("backend 'cuda': token reordering (positions) is not in the CUDA "
                          "kernel yet; use backend='triton'")


def kernel_name(plan: KernelPlan) -> str:
    return keys.kernel_name("attn_fwd_cuda", plan.spec.tag, plan.spec.key)


def source_key(plan: KernelPlan) -> str:
    """The cache key of the rendered source of `plan`."""
    return keys.cache_key("cuda", plan.spec.key, templates=template_hash(),
                          printer=PRINTER_VERSION)


def template_text(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text()


def template_hash() -> str:
    return keys.sources_hash(template_text(n) for n in TEMPLATES)


def kernel_arguments(plan: KernelPlan) -> list[tuple[str, str]]:
    """(C++ type, name) of the arguments after the fixed ones: params, then each captured
    tensor's pointer, strides and sizes (the printer's order)."""
    return extra_arguments(plan.spec)


RENDERS = [0]  # how many sources this process rendered (tests: a cache hit renders nothing)


def render(plan: KernelPlan) -> str:
    """CUDA source of the forward kernel for `plan` (dtype and head dim are -D defines)."""
    import jinja2

    RENDERS[0] += 1
    check_plan(plan)
    printed = render_functions(plan)
    env = jinja2.Environment(loader=jinja2.FunctionLoader(template_text),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template(TEMPLATE).render(
        kernel_name=kernel_name(plan),
        expr_header=EXPR_HEADER, printed=printed.source,
        extra_params=printed.extra_params, extra_args=printed.extra_args,
        has_score=printed.has_score, has_sink=printed.has_sink,
        pieces=[_piece(i, piece) for i, piece in enumerate(plan.tiles.pieces)])


def _piece(i: int, piece) -> dict:
    """The loops of piece i: [n_begin, f_begin) masked, [f_begin, f_end) full, [f_end, n_end)
    masked when the piece is exact, else every tile masked; a tile of an earlier piece's range
    is skipped (that piece visited it)."""
    j = str(i)
    loops = ([("n_begin" + j, "f_begin" + j, True), ("f_begin" + j, "f_end" + j, False),
              ("f_end" + j, "n_end" + j, True)] if piece.exact
             else [("n_begin" + j, "n_end" + j, True)])
    earlier = " || ".join(f"(n >= n_begin{e} && n < n_end{e})" for e in range(i))
    return {"i": i, "comment": piece.text().replace("\n", " "), "exact": piece.exact,
            "earlier": earlier,
            "loops": [{"lo": lo, "hi": hi, "masked": "true" if masked else "false"}
                      for lo, hi, masked in loops]}
