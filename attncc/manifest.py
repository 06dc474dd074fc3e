"""Manifests: the kernels a model needs, in TOML, for `attncc build`, `explain` and `bench`.

    [[kernel]]
    name = "gemma-local"              # readable, unique
    mask = "sliding_window"           # a catalogue mask: attncc.causal, sliding_window, ...
    mask_args = {window = 4096}       # keyword (table) or positional (array) arguments
    score = "softcap"                 # optional catalogue score mod: softcap, alibi, scale, ...
    score_args = {cap = 50.0}
    reorder = "hilbert"               # optional: hilbert, morton, tiles, auto, ...
    reorder_args = {grid = [64, 64]}
    dtypes = ["float16", "bfloat16"]  # default ["float16"]
    head_dims = [128]                 # or [[192, 128]] for Dqk != Dv; default [128]
    shapes = [[1, 32, 8, 4096]]       # (B, Hq, Hkv, L) buckets: explain's tile map, bench
    archs = ["sm_90"]                 # optional: this kernel's targets instead of --arch
    backward = true                   # optional: also the gradient kernels (training)

    [[kernel]]
    name = "custom"
    spec = "mymodel.attention:spec"   # an AttentionSpec, or a zero-argument function returning one

An argument given as an array goes to a tensor parameter as `torch.tensor(array)`, otherwise as
a tuple. A bad entry is reported as one line naming the entry and the field; the rest load.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from attncc.library import masks
from attncc.library import reorders
from attncc.library import scores
from attncc.api import Attention
from attncc.ir.spec import AttentionSpec
from attncc.backends.targets import check_head_dim, parse_arch, parse_dtype

_NOT_MASKS = {"document_inputs", "bigbird_random_blocks"}  # helpers that build mask inputs
_NOT_SCORES = {"sink"}  # a normaliser, not a score mod
FIELDS = {"name", "mask", "mask_args", "score", "score_args", "reorder", "reorder_args", "spec",
          "dtypes", "head_dims", "shapes", "archs", "backward"}


class ManifestError(ValueError):
    """A manifest (or one of its entries) is invalid; the message is one line."""


@dataclass(frozen=True)
class KernelEntry:
    name: str
    spec: AttentionSpec
    dtypes: tuple[str, ...]
    head_dims: tuple[tuple[int, int], ...]  # (Dqk, Dv)
    shapes: tuple[tuple[int, int, int, int], ...]  # (B, Hq, Hkv, L)
    archs: tuple[int, ...] | None  # None: the command line's --arch
    backward: bool = False  # build the dq/dkdv kernels too


@dataclass(frozen=True)
class Manifest:
    path: Path
    kernels: tuple[KernelEntry, ...]
    errors: tuple[str, ...]  # one line per bad entry


def _catalogue(module: Any, skip: set[str]) -> dict[str, Callable]:
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and fn.__module__ == module.__name__
            and not name.startswith("_") and name not in skip}


CATALOGUE = {"mask": _catalogue(masks, _NOT_MASKS), "score": _catalogue(scores, _NOT_SCORES),
             "reorder": _catalogue(reorders, set())}


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate; ManifestError when the file itself is unusable."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ManifestError(f"{path}: cannot read it: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not a text file (byte {e.start} is not UTF-8); a manifest "
                            f"is TOML text (see examples/manifest.toml)") from e
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML: {e}") from e
    raw = data.get("kernel")
    if not isinstance(raw, list) or not raw or not all(isinstance(k, dict) for k in raw):
        raise ManifestError(f"{path}: expected one or more [[kernel]] tables")
    kernels, errors, names = [], [], set()
    for i, fields in enumerate(raw):
        label = f"kernel {fields['name']!r}" if isinstance(fields.get("name"), str) else \
            f"kernel #{i + 1}"
        try:
            entry = _entry(fields, path.parent)
            if entry.name in names:
                raise _FieldError("name", f"duplicate name {entry.name!r}")
            names.add(entry.name)
            kernels.append(entry)
        except _FieldError as e:
            errors.append(f"{path}: {label}: field {e.field!r}: {e.message}")
    return Manifest(path, tuple(kernels), tuple(errors))


def import_spec(path: str, base: Path | None = None) -> AttentionSpec:
    """The AttentionSpec at import path `module:attribute` (or a zero-argument function's
    result); ManifestError in one line naming the path, not a manifest field."""
    try:
        return _import_spec(path, base or Path.cwd())
    except _FieldError as e:
        raise ManifestError(e.message) from e


def parse_archs(text: str) -> tuple[int, ...]:
    """"sm_80,sm_90" -> (80, 90); ManifestError on an unknown arch or on none at all."""
    try:
        archs = tuple(dict.fromkeys(parse_arch(a) for a in text.split(",") if a.strip()))
    except ValueError as e:
        raise ManifestError(f"--arch: {e}") from e
    if not archs:
        raise ManifestError(f"--arch: expected one or more targets like sm_80,sm_90, got "
                            f"{text!r}")
    return archs


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message.splitlines()[0] if message else message


def _entry(fields: dict[str, Any], base: Path) -> KernelEntry:
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise _FieldError(unknown[0], f"unknown field (known: {', '.join(sorted(FIELDS))})")
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise _FieldError("name", "expected a non-empty one-line string")
    dtypes = tuple(_each(fields, "dtypes", ["float16"], parse_dtype))
    head_dims = tuple(_each(fields, "head_dims", [128], _head_dims))
    shapes = tuple(_each(fields, "shapes", [], _shape))
    archs = tuple(_each(fields, "archs", [], parse_arch)) if "archs" in fields else None
    backward = fields.get("backward", False)
    if not isinstance(backward, bool):
        raise _FieldError("backward", f"expected true or false, got {backward!r}")
    return KernelEntry(name, _spec(fields, base), dtypes, head_dims, shapes, archs, backward)


def _each(fields: dict[str, Any], field: str, default: list, parse: Callable) -> list:
    values = fields.get(field, default)
    if not isinstance(values, list) or (field != "shapes" and not values):
        raise _FieldError(field, f"expected a non-empty array, got {values!r}")
    try:
        return [parse(v) for v in values]
    except ValueError as e:
        raise _FieldError(field, str(e)) from e


def _head_dims(value: Any) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2:
        return check_head_dim(value[0]), check_head_dim(value[1])
    if isinstance(value, list):
        raise ValueError(f"expected a head dim or [Dqk, Dv], got {value!r}")
    return check_head_dim(value), check_head_dim(value)


def _shape(value: Any) -> tuple[int, int, int, int]:
    ok = (isinstance(value, list) and len(value) == 4
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok or value[1] % value[2]:
        raise ValueError(f"expected [B, Hq, Hkv, L] of positive ints with Hq % Hkv == 0, "
                         f"got {value!r}")
    return tuple(value)


def _spec(fields: dict[str, Any], base: Path) -> AttentionSpec:
    if "spec" in fields:
        clash = sorted({"mask", "score", "reorder"} & fields.keys())
        if clash:
            raise _FieldError(clash[0], "give either spec or mask/score/reorder, not both")
        return _import_spec(fields["spec"], base)
    if "mask" not in fields and "score" not in fields:
        raise _FieldError("mask", "missing: give mask (and/or score), or spec")
    parts = {kind: _call(kind, fields) for kind in ("mask", "score", "reorder")
             if fields.get(kind) is not None}
    try:
        return Attention(**parts)
    except (TypeError, ValueError) as e:
        raise _FieldError(next(iter(parts)), f"{type(e).__name__}: {e}") from e


class CatalogueError(ValueError):
    """A catalogue call is wrong; `part` says which: "name" (no such entry) or "args"."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


def call_catalogue(kind: str, name: Any, args: list | tuple = (),
                   kwargs: dict[str, Any] | None = None) -> Any:
    """`masks.<name>(*args, **kwargs)` (or scores, reorders: `kind`), arrays converted as the
    manifest converts them (a tensor parameter gets `torch.tensor(array)`, another a tuple).
    CatalogueError (one line, naming the call) on an unknown name or bad arguments."""
    table, kwargs = CATALOGUE[kind], dict(kwargs or {})
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CatalogueError("name", f"unknown catalogue {kind} {name!r}{hint} "
                                     f"(known: {', '.join(sorted(table))})")
    fn = table[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise CatalogueError("args", f"{name}() takes no argument {unknown[0]!r} "
                                     f"(it takes: {', '.join(params)})")
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        values = {k: _convert(v, str(params[k].annotation)) for k, v in bound.arguments.items()}
        return fn(**values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CatalogueError("args", f"{name}(): {e}") from e


def _call(kind: str, fields: dict[str, Any]) -> Any:
    name, args = fields[kind], fields.get(f"{kind}_args", {})
    if isinstance(name, str) and name in CATALOGUE[kind] and not isinstance(args, (dict, list)):
        raise _FieldError(f"{kind}_args", f"expected a table or an array, got {args!r}")
    try:
        return call_catalogue(kind, name, args if isinstance(args, list) else (),
                              args if isinstance(args, dict) else {})
    except CatalogueError as e:
        raise _FieldError(kind if e.part == "name" else f"{kind}_args", str(e)) from e


def _convert(value: Any, annotation: str) -> Any:
    if isinstance(value, list):
        return torch.tensor(value) if "Tensor" in annotation else tuple(value)
    return value


def _import_spec(path: Any, base: Path) -> AttentionSpec:
    if not isinstance(path, str) or not path.strip():
        raise _FieldError("spec", f"expected 'module:attribute', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise _FieldError("spec", f"expected 'module:attribute', got {path!r}")
    added = [p for p in (str(base.resolve()), str(Path.cwd())) if p not in sys.path]
    sys.path[:0] = added  # modules beside the manifest or in the working directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise _FieldError("spec", f"cannot import {path!r}: {e}") from e
    except Exception as e:  # the module itself failed: say how, in one line
        raise _FieldError("spec", f"importing {module_name!r} raised {type(e).__name__}: "
                                  f"{e}") from e
    finally:
        for p in added:
            sys.path.remove(p)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _FieldError("spec", f"cannot import {path!r}: module {module_name!r} has no "
                                      f"attribute {attr!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, AttentionSpec):
        try:
            obj = obj()
        except Exception as e:
            raise _FieldError("spec", f"{path}() raised {type(e).__name__}: {e}") from e
    if not isinstance(obj, AttentionSpec):
        obj = getattr(obj, "spec", obj)  # a CompiledAttention
    if not isinstance(obj, AttentionSpec):
        raise _FieldError("spec", f"{path!r} is a {type(obj).__name__}, not an AttentionSpec "
                                  "(or a zero-argument function returning one)")
    return obj
