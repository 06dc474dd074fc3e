"""On-disk kernel cache: safe under parallel builds, never loads a half-written entry.

Layout under `root` (default `attncc.config.cache_dir()`):

    root/kernels/<name>-<key[:16]>/          one entry, e.g. attn_fwd_causal_d128_bf16-9f3a0c1d…
        <file> ...                           whatever `build()` returned (source, cubin, ...)
        meta.json                            written last; see `_meta()` for the fields
    root/kernels/.tmp.<random>.<entry name>/ an entry being written (hidden, never loaded)
    root/locks/<entry name>.lock             one file lock per entry

Protocol (Triton's cache manager, FlashInfer's `build_and_load`): look; lock; look again; build;
write every file into a temporary directory next to the final one, `meta.json` last; rename the
directory into place. An entry is valid only if `meta.json` parses, names the same full key and
lists every file with its size and sha256; anything else is rebuilt under the lock, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from attncc import config

META = "meta.json"
_TMP_PREFIX = ".tmp."
_KEY_RE = re.compile(r"[0-9a-f]{16,}")
# Keys `meta.json` sets itself; `extra_meta` may not shadow them.
_RESERVED = frozenset(
    {"key", "name", "created", "attncc_version", "torch_version", "triton_version", "files"}
)


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the entry directory
    files: dict[str, Path]  # file name -> path inside the entry (excludes meta.json)
    meta: dict  # parsed meta.json
    built: bool  # True if this call built it, False if it was loaded


@dataclass
class CacheStats:
    """Process-wide counters; tests and `attncc build` read them."""

    hits: int = 0
    builds: int = 0
    rebuilt_corrupt: int = 0


stats = CacheStats()


def reset_stats() -> None:
    # Mutate in place so `from attncc.backends.cache import stats` keeps seeing the live object.
    stats.hits = stats.builds = stats.rebuilt_corrupt = 0


def entry_name(readable_name: str, key: str) -> str:
    """Directory name of an entry: `f"{readable_name}-{key[:16]}"`; key is a hex sha256."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"cache key must be lowercase hex of >= 16 digits, got {key!r}")
    if not readable_name or readable_name.startswith(".") or re.search(r"[/\\\s]", readable_name):
        # A leading dot would hide the entry among temporary dirs; separators escape the root.
        raise ValueError(f"bad readable kernel name {readable_name!r}")
    return f"{readable_name}-{key[:16]}"


def load(key: str, readable_name: str, *, root: Path | None = None) -> CacheEntry | None:
    """The valid entry for `key`, or None when it is absent or corrupt (never raises on those)."""
    entry, _ = _inspect(_kernels(root) / entry_name(readable_name, key), key, readable_name)
    if entry is not None:
        stats.hits += 1
    return entry


def load_or_build(
    key: str,
    readable_name: str,
    build: Callable[[], dict[str, bytes]],
    *,
    root: Path | None = None,
    extra_meta: dict | None = None,
) -> CacheEntry:
    """Load the entry for `key`, or call `build()` once (across processes) and store its files.

    `build` returns {file name: contents}; names are plain file names other than `meta.json`.
    `extra_meta` (JSON-serialisable) is merged into `meta.json`.
    """
    name = entry_name(readable_name, key)
    extra = dict(extra_meta or {})
    if clash := _RESERVED & extra.keys():
        raise ValueError(f"extra_meta may not set {sorted(clash)}")
    json.dumps(extra)  # fail before an expensive build, not after it
    kernels = _kernels(root)
    path = kernels / name

    entry, _ = _inspect(path, key, readable_name)
    if entry is not None:  # the fast path takes no lock
        stats.hits += 1
        return entry

    locks = kernels.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{name}.lock")):
        entry, problem = _inspect(path, key, readable_name)
        if entry is not None:  # another process built it while we waited for the lock
            stats.hits += 1
            return entry
        # Holding the lock, any temporary dir for this entry belongs to a writer that died.
        _remove_temps(kernels, name)
        if problem is not None:
            warnings.warn(
                f"attncc cache entry {path} is corrupt ({problem}); rebuilding it", stacklevel=2
            )
            stats.rebuilt_corrupt += 1
        files = build()
        stats.builds += 1
        _check_files(files)
        # Round-trip so a built entry's meta equals what a later load parses (tuples -> lists).
        meta = json.loads(json.dumps(_meta(key, readable_name, files, extra)))
        _publish(kernels, name, files, meta)
    return CacheEntry(path, {f: path / f for f in files}, meta, built=True)


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every valid entry, sorted by directory name; corrupt and temporary dirs are skipped."""
    kernels = _kernels(root)
    if not kernels.is_dir():
        return []
    entries = []
    for path in sorted(kernels.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / META).read_text())
            key, readable_name = meta["key"], meta["name"]
            if path.name != entry_name(readable_name, key):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        entry, _ = _inspect(path, key, readable_name)
        if entry is not None:
            entries.append(entry)
    return entries


def clear(root: Path | None = None) -> int:
    """Remove every entry (valid or corrupt) and stale temporary dirs; returns the entry count.

    Each dir is removed under its entry's lock so a build in flight finishes first. Lock files
    stay: deleting a lock file another process holds would let a third one lock a new inode.
    """
    kernels = _kernels(root)
    if not kernels.is_dir():
        return 0
    locks = kernels.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(kernels.iterdir()):
        is_temp = path.name.startswith(_TMP_PREFIX)
        name = _temp_owner(path.name) if is_temp else path.name
        with FileLock(str(locks / f"{name}.lock")):
            if not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            count += not is_temp
    return count


def _kernels(root: Path | None) -> Path:
    return Path(root if root is not None else config.cache_dir()) / "kernels"


def _inspect(path: Path, key: str, readable_name: str) -> tuple[CacheEntry | None, str | None]:
    """(entry, None) if valid, (None, None) if absent, (None, why) if corrupt."""
    if not path.exists():
        return None, None
    try:
        meta = json.loads((path / META).read_text())
        if not isinstance(meta, dict):
            return None, "meta.json is not an object"
        if meta.get("key") != key or meta.get("name") != readable_name:
            return None, "meta.json names another key or name"
        listed = meta["files"]
        for fname, info in listed.items():
            if not _plain_file_name(fname):  # a forged meta.json must not point outside
                return None, f"meta.json lists a bad file name {fname!r}"
            # Hashing every load is cheap next to a compile and catches truncated or torn files.
            data = (path / fname).read_bytes()
            if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                return None, f"{fname} does not match its size or sha256"
    except FileNotFoundError as e:
        return None, f"missing {Path(e.filename or '?').name}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable: {type(e).__name__}: {e}"
    return CacheEntry(path, {f: path / f for f in listed}, meta, built=False), None


def _check_files(files: dict[str, bytes]) -> None:
    if not isinstance(files, dict):
        raise TypeError(f"build() must return dict[str, bytes], got {type(files).__name__}")
    for fname, data in files.items():
        if not _plain_file_name(fname):
            raise ValueError(f"build() returned a bad file name {fname!r}")
        if not isinstance(data, bytes):
            raise TypeError(f"build() file {fname!r} is {type(data).__name__}, not bytes")


def _plain_file_name(fname: object) -> bool:
    return (
        isinstance(fname, str)
        and fname not in ("", ".", "..", META)
        and not re.search(r"[/\\]", fname)
    )


def _meta(key: str, readable_name: str, files: dict[str, bytes], extra: dict) -> dict:
    return {
        "key": key,
        "name": readable_name,
        "created": time.time(),
        "attncc_version": _version("attncc", "unknown"),
        "torch_version": _version("torch", "none"),
        "triton_version": _version("triton", "none"),
        "files": {
            f: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for f, d in files.items()
        },
        **extra,
    }


def _version(dist: str, missing: str) -> str:
    # Prefer the module already imported (what actually ran); otherwise read the installed
    # metadata so that writing an entry never pays for importing torch.
    module = sys.modules.get(dist)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def _publish(kernels: Path, name: str, files: dict[str, bytes], meta: dict) -> None:
    """Write files then meta.json into a hidden temp dir and rename it to `kernels/name`.

    Caller holds the entry lock. No fsync: a crash can leave a renamed entry with torn files,
    but load-time validation rejects it and it is rebuilt.
    """
    kernels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=f".{name}", dir=kernels))
    final = kernels / name
    try:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            # os.replace cannot overwrite a non-empty dir; move the stale one aside atomically
            # so readers see the old entry or nothing, then the new one.
            trash = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=f".{name}", dir=kernels))
            os.replace(final, trash / "stale")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_temps(kernels: Path, name: str) -> None:
    if kernels.is_dir():
        for path in kernels.iterdir():
            if path.name.startswith(_TMP_PREFIX) and _temp_owner(path.name) == name:
                shutil.rmtree(path, ignore_errors=True)


def _temp_owner(dirname: str) -> str:
    # ".tmp.<random>.<entry name>": mkdtemp's random part has no dots.
    return dirname.split(".", 3)[-1]
