"""How the commands print: one-line errors, sizes, ages and head dims in words."""

from __future__ import annotations

import sys


def error(command: str, message: str) -> None:
    """One line on stderr: `attncc build: error: ...`."""
    print(f"attncc {command}: error: {' '.join(str(message).split())}", file=sys.stderr)


def one_line(e: BaseException) -> str:
    """An exception in one line: its first line, and its last when they differ (for a compiler
    error the first says what failed and the last why)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and lines[-1] != text:
        text = f"{text.rstrip(':')}: ... {lines[-1]}"
    return f"{type(e).__name__}: {text}"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def dims(dqk: int, dv: int) -> str:
    return f"d{dqk}" if dqk == dv else f"d{dqk}_{dv}"
