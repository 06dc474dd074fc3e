"""`attncc explain SPEC_OR_MANIFEST`: what a spec compiles to.

SPEC_OR_MANIFEST is a manifest (`*.toml`: every entry), an import path (`mymodel.attn:spec`) or
catalogue mask calls combined with &, | and ~ (`causal`, `"causal() & sliding_window(4096)"`,
with `--score "softcap(50.0)"` and `--reorder "hilbert((64, 64))"`). For each spec:
`attncc.explain` (the IR after each pass, tile classes and tile source, the token-order cost
table, the tile map for `--shape` or the entry's first shape), the tiles chosen per (dtype, head
dims, target), and with `--source` the generated source (`--backend cuda`: the CUDA C++ one).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

from attncc.backends.base import Unsupported
from attncc.cli.build import BUILD_BACKENDS, DEFAULT_ARCHS
from attncc.cli.output import error, one_line
from attncc.api import Attention
from attncc.backends.targets import check_head_dim, parse_dtype
from attncc.ir.plan import Signature
from attncc.manifest import CatalogueError, call_catalogue
from attncc.manifest import ManifestError, load_manifest, parse_archs
from attncc.manifest import import_spec
from attncc.passes.pipeline import run_plan_passes, run_spec_passes
import attncc


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="print the passes, tiles and (optionally) the source of "
                                       "a spec or of every manifest entry",
                       description=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    p.add_argument("spec", metavar="SPEC_OR_MANIFEST",
                   help='manifest.toml, module:attribute, or catalogue mask calls '
                        'combined with &, |, ~, e.g. "causal() & sliding_window(1024)"')
    p.add_argument("--score", help='catalogue score mod call, e.g. "softcap(50.0)"')
    p.add_argument("--reorder", help='catalogue reorder call, e.g. "hilbert((64, 64))" or auto')
    p.add_argument("--shape", metavar="LQ,LK", help="draw the tile map for these lengths")
    p.add_argument("--block", metavar="BM,BN", default="64,64",
                   help="tile size of the tile map (default 64,64)")
    p.add_argument("--png", metavar="FILE",
                   help="also draw the tile map to FILE (one file per manifest entry)")
    p.add_argument("--source", action="store_true", help="print the generated source")
    p.add_argument("--backend", default="triton", choices=BUILD_BACKENDS,
                   help="whose source --source prints: triton (default) or cuda")
    p.add_argument("--arch", default=None,
                   help=f"targets of the tiles table (default: the entry's archs, else "
                        f"{DEFAULT_ARCHS})")
    p.add_argument("--dtypes", default="float16,bfloat16",
                   help="dtypes of the tiles table for a single spec (default float16,bfloat16)")
    p.add_argument("--head-dims", default="128",
                   help="head dims of the tiles table for a single spec (default 128)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        shape = _pair("--shape", args.shape) if args.shape else None
        block = _pair("--block", args.block)
        archs = parse_archs(args.arch) if args.arch else None
        if args.spec.endswith(".toml"):
            manifest = load_manifest(args.spec)
            for line in manifest.errors:
                error("explain", line)
            entries = [(e.name, e.spec, e.dtypes, e.head_dims, e.archs,
                        shape or ((e.shapes[0][3],) * 2 if e.shapes else None))
                       for e in manifest.kernels]
            bad = len(manifest.errors)
        else:
            dtypes = tuple(parse_dtype(d) for d in args.dtypes.split(","))
            head_dims = tuple((check_head_dim(int(d)),) * 2 for d in args.head_dims.split(","))
            entries = [(args.spec, _spec(args), dtypes, head_dims, None, shape)]
            bad = 0
    except (ManifestError, ValueError, TypeError) as e:
        error("explain", str(e))
        return 2
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    for name, spec, dtypes, head_dims, entry_archs, entry_shape in entries:
        try:
            targets = archs or entry_archs or parse_archs(DEFAULT_ARCHS)
            print(_explain(name, spec, dtypes, head_dims, targets, entry_shape, block,
                           _png(args.png, name, len(entries)), args.source, args.backend))
        except Exception as e:  # one spec that fails to explain must not hide the others
            error("explain", f"{name}: {one_line(e)}")
            bad += 1
    return 1 if bad else 0


def _explain(name: str, spec, dtypes, head_dims, archs, shape, block, png: str | None,
             source: bool, backend: str = "triton") -> str:

    out = [f"### {name}", attncc.explain(spec, shape=shape, block=block, png=png)]
    if spec.memory.text() != "dense":
        out.append(f"== no kernel yet for memory {spec.memory.text()!r}: reference only")
        return "\n".join(out)
    plan = run_spec_passes(spec)
    out.append("== tiles per signature")
    for arch in archs:
        for dtype in dtypes:
            for dqk, dv in head_dims:
                sig = Signature(dtype, dqk, dv, f"sm{arch}")
                out.append(f"{sig.text()}: {run_plan_passes(plan, sig).schedule.text()}")
    if source:
        kernels = attncc.compile(spec).families[backend]
        if isinstance(kernels, Unsupported):
            out.append(f"== no {backend} source: {kernels}")
            return "\n".join(out)
        for src in kernels.backend.render(kernels):
            out += [f"== {src.label} {src.path}", src.text]
    return "\n".join(out)


def _png(png: str | None, name: str, n: int) -> str | None:
    if png is None or n == 1:
        return png
    path = Path(png)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return str(path.with_name(f"{path.stem}-{safe}{path.suffix or '.png'}"))


def _pair(option: str, text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option}: expected two ints like 4096,4096, got {text!r}") from None
    return a, b


def _spec(args: argparse.Namespace):
    if ":" in args.spec:
        if args.score or args.reorder:
            raise ValueError("--score/--reorder go with a catalogue mask, not an import path")
        return import_spec(args.spec)
    parts = {kind: _expression(option, kind, text) for kind, option, text in (
        ("mask", "SPEC", args.spec), ("score", "--score", args.score),
        ("reorder", "--reorder", args.reorder)) if text}
    return Attention(**parts)


EXAMPLES = {"mask": '"causal() & sliding_window(1024)"', "score": '"softcap(50.0)"',
            "reorder": '"hilbert((64, 64))"'}


def _expression(option: str, kind: str, text: str) -> Any:
    """A catalogue call, or for masks calls combined with `&`, `|`, `~` and parentheses:
    `"causal() & sliding_window(1024)"`; literal arguments only (nothing is executed). A bare
    name is a call without arguments. ValueError naming `option` otherwise."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"{option}: not an expression: {text!r} ({e.msg})") from None
    return _evaluate(option, kind, tree, text)


def _evaluate(option: str, kind: str, node: ast.AST, text: str) -> Any:
    if kind == "mask" and isinstance(node, ast.BinOp) and isinstance(node.op,
                                                                    (ast.BitAnd, ast.BitOr)):
        left, right = (_evaluate(option, kind, n, text) for n in (node.left, node.right))
        return left & right if isinstance(node.op, ast.BitAnd) else left | right
    if kind == "mask" and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return ~_evaluate(option, kind, node.operand, text)
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = [_lists(ast.literal_eval(a)) for a in node.args]
            kwargs = {k.arg: _lists(ast.literal_eval(k.value)) for k in node.keywords}
        except ValueError:
            raise ValueError(f"{option}: {node.func.id}(): arguments must be literals (numbers, "
                             f"strings, lists), got {text!r}") from None
        name = node.func.id
    else:
        combine = " combined with &, | and ~" if kind == "mask" else ""
        raise ValueError(f"{option}: expected catalogue {kind} calls{combine}, like "
                         f"{EXAMPLES[kind]}, got {text!r}")
    try:
        return call_catalogue(kind, name, args, kwargs)
    except CatalogueError as e:
        raise ValueError(f"{option}: {e}") from None


def _lists(value: Any) -> Any:
    # the catalogue converts arrays as the manifest's TOML gives them: as lists
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
