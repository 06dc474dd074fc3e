"""Every environment knob attncc reads, in one place.

`ATTNCC_CACHE_DIR`   where rendered sources and compiled kernels live (default ~/.cache/attncc).
`TRITON_INTERPRET`   when "1", kernels run on the CPU under Triton's interpreter.
`ATTNCC_DEBUG`       when "1", calls also run checks that need a device sync (e.g. that a
                     captured tensor promised nondecreasing is), before any launch; serving
                     `run` reads its kernel's index-error record back after the launch and
                     raises the detailed error at once (without it: an async device assert).
`ATTNCC_OFFLINE`     when "1", `precompile` and GPU launches only load kernels `attncc build` made
                     ahead of time: a missing one raises instead of compiling (production).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

_overrides: dict[str, str | None] = {}


def _get(name: str, default: str | None = None) -> str | None:
    if name in _overrides:
        return _overrides[name]
    return os.environ.get(name, default)


def cache_dir() -> Path:
    """Root of the on-disk kernel cache."""
    return Path(_get("ATTNCC_CACHE_DIR") or Path.home() / ".cache" / "attncc")


def triton_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return _get("TRITON_INTERPRET", "0") == "1"


def debug_checks() -> bool:
    """True when calls run the checks that synchronise with the device (`ATTNCC_DEBUG=1`)."""
    return _get("ATTNCC_DEBUG", "0") == "1"


def offline() -> bool:
    """True when a missing prebuilt kernel raises rather than compiles (`ATTNCC_OFFLINE=1`)."""
    return _get("ATTNCC_OFFLINE", "0") == "1"


@contextlib.contextmanager
def override(**knobs: str | None) -> Iterator[None]:
    """Temporarily set knobs by environment-variable name, e.g. `override(ATTNCC_CACHE_DIR=p)`."""
    saved = dict(_overrides)
    _overrides.update(knobs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
