"""The results JSON (schema "attncc-bench/1", documented in benchmarks/README.md) and its
checker. `validate_results(obj)` raises `ValueError` naming the first bad field."""

from __future__ import annotations

import math
from typing import Any

SCHEMA = "attncc-bench/1"
STATUSES = ("ok", "wrong", "unavailable", "error")
FAMILIES = ("dense", "flex", "sparse", "manifest")
SHAPE_INTS = ("B", "H", "L", "D")
DTYPES = ("bfloat16", "float16", "float32")


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ValueError(f"results JSON: {where}: {what}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _keys(obj: Any, where: str, keys: tuple[str, ...]) -> None:
    _need(isinstance(obj, dict), where, "expected an object")
    missing = [k for k in keys if k not in obj]
    _need(not missing, where, f"missing {missing}")


def _entry(e: Any, where: str, smoke: bool, flops: int) -> None:
    _keys(e, where, ("status", "ms", "tflops", "max_err", "reason"))
    status = e["status"]
    _need(status in STATUSES, where, f"status {status!r} not in {STATUSES}")
    if status == "ok":
        _need(_number(e["max_err"]), where, "an ok entry has a numeric max_err")
        if smoke:
            _need(e["ms"] is None and e["tflops"] is None, where, "smoke runs time nothing")
        else:
            _need(_number(e["ms"]) and e["ms"] > 0, where, "an ok entry has ms > 0")
            _need(_number(e["tflops"]) and math.isclose(
                e["tflops"], flops / (e["ms"] * 1e-3) / 1e12, rel_tol=1e-6), where,
                "tflops = flops / ms")
    else:
        _need(e["ms"] is None and e["tflops"] is None, where, f"a {status} entry is not timed")
        _need(isinstance(e["reason"], str) and e["reason"], where, f"a {status} entry says why")
    if status == "wrong":
        _need(e["max_err"] is None or _number(e["max_err"]), where, "max_err: number or null")


def _result(r: Any, where: str, smoke: bool) -> None:
    _keys(r, where, ("workload", "family", "shape", "params", "allowed_pairs", "flops",
                     "tile", "tiles_visited", "tile_efficiency", "density", "entries",
                     "speedup"))
    _need(isinstance(r["workload"], str) and r["workload"], where, "workload: a name")
    _need(r["family"] in FAMILIES, where, f"family {r['family']!r} not in {FAMILIES}")
    s = r["shape"]
    _keys(s, f"{where}.shape", (*SHAPE_INTS, "dtype", "grid"))
    for k in SHAPE_INTS:
        _need(isinstance(s[k], int) and s[k] > 0, f"{where}.shape.{k}", "a positive int")
    _need(s["dtype"] in DTYPES, f"{where}.shape.dtype", f"one of {DTYPES}")
    pairs = s["B"] * s["H"] * s["L"] * s["L"]
    allowed = r["allowed_pairs"]
    _need(isinstance(allowed, int) and 0 < allowed <= pairs, where,
          "allowed_pairs: an int in (0, B*H*L*L]")
    _need(r["flops"] == 4 * allowed * s["D"], where, "flops = 4 * allowed_pairs * D")
    _need(_number(r["tile_efficiency"]) and 0 < r["tile_efficiency"] <= 1, where,
          "tile_efficiency in (0, 1]")
    _need(math.isclose(r["density"], allowed / pairs, rel_tol=1e-9), where,
          "density = allowed_pairs / (B*H*L*L)")
    entries = r["entries"]
    _need(isinstance(entries, dict) and "attncc" in entries, where, "entries has 'attncc'")
    for name, e in entries.items():
        _entry(e, f"{where}.entries[{name!r}]", smoke, r["flops"])
    _need(isinstance(r["speedup"], dict), where, "speedup: an object")
    base = entries["attncc"]["ms"]
    for name, x in r["speedup"].items():
        peer = entries.get(name, {}).get("ms")
        _need(base is not None and peer is not None and _number(x)
              and math.isclose(x, peer / base, rel_tol=1e-6), f"{where}.speedup[{name!r}]",
              "peer ms / attncc ms, both timed")


def validate_results(obj: Any) -> None:
    """Raise ValueError unless `obj` is a well-formed results object."""
    _keys(obj, "top level", ("schema", "smoke", "date", "device", "versions", "git", "protocol",
                             "pending", "results", "failed"))
    _need(obj["schema"] == SCHEMA, "schema", f"expected {SCHEMA!r}")
    _need(isinstance(obj["smoke"], bool), "smoke", "a bool")
    _keys(obj["device"], "device", ("kind", "name", "driver", "cuda"))
    _need(obj["device"]["kind"] in ("cuda", "cpu"), "device.kind", "cuda or cpu")
    _need(obj["smoke"] or obj["device"]["kind"] == "cuda", "device.kind",
          "a timed run needs a CUDA device")
    _keys(obj["versions"], "versions", ("python", "torch", "triton", "attncc"))
    _keys(obj["protocol"], "protocol", ("timer", "reference", "checked_on", "tolerances",
                                        "flops", "fill_rule"))
    _keys(obj["pending"], "pending", ("families", "peers"))
    _need(isinstance(obj["failed"], list), "failed", "a list")
    for i, f in enumerate(obj["failed"]):
        _keys(f, f"failed[{i}]", ("workload", "shape", "reason"))
    _need(isinstance(obj["results"], list) and (obj["results"] or obj["failed"]), "results",
          "a list, non-empty unless cases failed")
    for i, r in enumerate(obj["results"]):
        _result(r, f"results[{i}]", obj["smoke"])
