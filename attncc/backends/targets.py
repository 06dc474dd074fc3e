"""The arguments that name an ahead-of-time binary, checked the same way for every backend:
a GPU arch (`parse_arch`), a dtype (`parse_dtype`) and a head dim (`check_head_dim`). The CLI,
manifests and `precompile` parse with these before asking a backend for anything."""

from __future__ import annotations

from typing import Any

from attncc.backends.keys import parse_dtype  # noqa: F401 (one dtype table: keys)
from attncc.passes.select_tiles import MAX_HEAD_DIM

# compute capabilities `attncc build` and `precompile` accept (each has a select-tiles table)
SUPPORTED_ARCHS = (80, 86, 89, 90)


def parse_arch(arch: int | str) -> int:
    """90, "90", "sm90", "sm_90" or "sm_90a" -> 90; ValueError unless in SUPPORTED_ARCHS."""
    text = str(arch).strip().lower().removeprefix("sm").removeprefix("_").removesuffix("a")
    if not text.isdigit() or int(text) not in SUPPORTED_ARCHS:
        known = ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS)
        raise ValueError(f"unknown arch {arch!r} (supported: {known})")
    return int(text)



def check_head_dim(d: Any) -> int:
    """`d` itself when it is an int in 1..MAX_HEAD_DIM; ValueError otherwise."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d!r} is not supported (1..{MAX_HEAD_DIM})")
    return d
