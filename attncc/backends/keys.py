"""Keys and names of generated kernels, in one place.

- `cache_key`: the one key of a disk-cache entry (source or binary). sha256 over the kernel
  family, the content that determines the source (the IR's canonical key or text), a hash of
  every template the source depends on, the family's extra inputs, the version stamp (attncc,
  torch, triton) and the version of the expression printer. The family is part of the text, so
  two families never share a key for equal content; every input is a string, so the key is the
  same in every process (never Python `hash()`).
- Kernel names: a readable part plus a content hash (`attn_fwd_causal_sw_9f3a0c12d4`), and
  the names of kernel arguments (`p_<param>` for runtime scalars, `cap_<name>_...` for captured
  tensors), shared by renderers, launchers and the ahead-of-time compiler.
- Dtypes: torch dtype -> name ("float16") -> Triton type ("fp16"), and the spellings a user may
  give (`parse_dtype`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import triton

# name -> Triton pointer element type; bool tensors travel as uint8 views. The "fp16" spelling
# is also the short name in artefact file names and cache listings.
TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                "bool": "u8"}
# what a user may write for q/k/v's dtype -> its name (the kernels take these three)
DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32",
                 "fp32": "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (the name plans, signatures and targets carry)."""
    return str(dtype).removeprefix("torch.")


def triton_type(dtype: str) -> str:
    """"float16" -> "fp16": the element type of a Triton pointer to a tensor of `dtype`."""
    return TRITON_TYPES[dtype]


def parse_dtype(dtype: Any) -> str:
    """"float16", "fp16", torch.float16, ... -> "float16" | "bfloat16" | "float32"."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r} (supported: float16, bfloat16, float32)")
    return DTYPE_ALIASES[name]


def digest(text: str) -> str:
    """sha256 hex digest of `text`."""
    return hashlib.sha256(text.encode()).hexdigest()


def sources_hash(sources: Iterable[str]) -> str:
    """sha256 over the concatenated template sources: a change to any of them changes it."""
    return digest("".join(sources))


def version_stamp() -> str:
    """The versions every key includes: a new attncc, torch or triton never loads old entries."""
    try:
        attncc_version = importlib.metadata.version("attncc")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        attncc_version = "dev"
    return f"attncc={attncc_version} torch={torch.__version__} triton={triton.__version__}"


def cache_key(family: str, content: str, *, templates: str = "", printer: int | None = None,
              extra: Sequence[str] = ()) -> str:
    """The key of one cache entry (hex sha256).

    family: which kind of entry ("triton", "triton-backward", "triton-serve", ...).
    content: what the source is generated from (the spec's canonical key, a node's text, or a
    source entry's key for a binary compiled from it). templates: `sources_hash` of every
    template the source depends on. printer: the version of the expression printer that printed
    into it (None when nothing is printed). extra: the family's other inputs, one line each."""
    lines = [f"family={family}", content, f"templates={templates}", *extra, version_stamp()]
    if printer is not None:
        lines.append(f"printer={printer}")
    return digest("\n".join(lines))


def readable(tag: str) -> str:
    """`tag` as part of an identifier: other characters become `_`, at most 48 kept."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in tag)[:48]


def kernel_name(prefix: str, tag: str, key: str) -> str:
    """Readable name plus content hash, e.g. `attn_fwd_causal_sw_softcap_9f3a0c12d4`."""
    return f"{prefix}_{readable(tag)}_{key[:10]}"


def grads_suffix(grad_captures: Sequence[str]) -> str:
    """`_g<hash>` naming the set of grad-requiring captures of a backward kernel ("" if none)."""
    return "_g" + digest(",".join(sorted(grad_captures)))[:6] if grad_captures else ""


def param_arg(name: str) -> str:
    """Kernel argument name of the runtime scalar param `name`."""
    return f"p_{name}"


def capture_arg_names(name: str, ndim: int) -> tuple[str, list[str], list[str]]:
    """Kernel argument names of a captured tensor: pointer, per-dim strides, per-dim sizes."""
    return (f"cap_{name}_ptr", [f"cap_{name}_stride{i}" for i in range(ndim)],
            [f"cap_{name}_size{i}" for i in range(ndim)])
