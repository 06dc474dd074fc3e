"""Backends by name, and the one place that resolves backend="auto".

Everything above `attncc.backends` reaches kernels through here: it is the only module outside
a backend's folder that imports that backend's entry module. Adding a backend is a folder with
an entry module exposing a `Backend` (`attncc.backends.base`) and one line in `BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncc.backends.base import Backend, Unsupported
from attncc.backends.cuda.backend import BACKEND as CUDA
from attncc.backends.reference.backend import BACKEND as REFERENCE
from attncc.backends.triton.backend import BACKEND as TRITON

# "auto" takes the first backend here that compiles kernels and runs on the tensors' device,
# else "reference" (the last resort: it runs everywhere). Triton comes before CUDA: "auto"
# keeps choosing Triton until GPU measurements say the CUDA kernels are faster.
BACKENDS: dict[str, Backend] = {"triton": TRITON, "cuda": CUDA, "reference": REFERENCE}
FALLBACK = "reference"


def names() -> tuple[str, ...]:
    """"auto" and every registered backend, read at the call: one registered later counts."""
    return ("auto", *BACKENDS)


def check_name(name: Any) -> str:
    """`name` itself when it is "auto" or a registered backend; ValueError otherwise."""
    if type(name) is str and (name == "auto" or name in BACKENDS):
        return name
    if name not in names():
        raise ValueError(f"backend: expected one of {names()}, got {name!r}")
    return name


@dataclass(frozen=True)
class Choice:
    """The backend a call runs on; `why` is set when "auto" fell back to the reference and says
    why no compiling backend runs on the device (the caller words the warning)."""

    name: str
    why: str | None = None


def resolve(name: str, device: torch.device) -> Choice:
    """A named backend as is; "auto": the first compiling backend whose kernels run on
    `device`, else the reference with the reasons."""
    if check_name(name) != "auto":
        return Choice(name)
    reasons = []
    for backend in BACKENDS.values():
        if backend.compiles:
            why = backend.runs_on(device)
            if why is None:
                return Choice(backend.name)
            reasons.append(why)
    return Choice(FALLBACK, "; ".join(reasons) or None)


def families(build: Callable[[Backend], Any]) -> dict[str, Any]:
    """`build(backend)` for every backend: its family object, or the `Unsupported` error that
    says why it has none (kept, so a call that asks for that backend can say why)."""
    out: dict[str, Any] = {}
    for name, backend in BACKENDS.items():
        try:
            out[name] = build(backend)
        except Unsupported as e:
            out[name] = e
    return out


def compiled_family(found: dict[str, Any]) -> Any:
    """The family of the first compiling backend that has one (what "auto" runs on a device
    that runs kernels), or None."""
    for name, family in found.items():
        if BACKENDS[name].compiles and not isinstance(family, Unsupported):
            return family
    return None


def why_none(found: dict[str, Any]) -> str | None:
    """Why no compiling backend has a family: the first one's reason, or None if one has."""
    if compiled_family(found) is not None:
        return None
    for name, family in found.items():
        if BACKENDS[name].compiles:
            return str(family)
    return None
