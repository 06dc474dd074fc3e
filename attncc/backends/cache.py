"""On-disk kernel cache: safe under parallel builds, never loads a half-written entry.

Layout under `root` (default `attncc.config.cache_dir()`):

    root/kernels/<name>-<key[:16]>/          one entry, e.g. attn_fwd_causal_d128_bf16-9f3a0c1d…
        <file> ...                           whatever `build()` returned (source, cubin, ...)
        meta.json                            written last; see `_meta()` for the fields
    root/kernels/.tmp.<random>.<entry name>/ an entry being written (hidden, never loaded)
    root/locks/<key[:16]>.lock               one file lock per key

Protocol (Triton's cache manager, FlashInfer's `build_and_load`): look; lock; look again; build;
write every file into a temporary directory next to the final one, `meta.json` last; rename the
directory into place. An entry is valid only if `meta.json` parses, names the same full key and
lists every file with its size and sha256; anything else is rebuilt under the lock, never loaded.
An entry name that is a dangling symbolic link or a link loop is such a corrupt entry too.
Entries whose files do not depend on their readable name (compiled kernels) are found by key
(`any_name=True`): one key is stored once, whichever spelling of a spec built it first.

The lock is a per-process `threading.Lock` (threads queue on it rather than poll) and then the
file lock (processes). Looking takes no lock and writes nothing, so a read-only cache serves every
valid entry; writing into one, or onto a full disk, raises `CacheError` naming the path and the
cause, and leaves no entry or temporary directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from attncc import config

META = "meta.json"
_TMP_PREFIX = ".tmp."
_KEY_RE = re.compile(r"[0-9a-f]{16,}")
# Keys `meta.json` sets itself; `extra_meta` may not shadow them.
_RESERVED = frozenset(
    {"key", "name", "created", "attncc_version", "torch_version", "triton_version", "files"}
)


class CacheError(RuntimeError):
    """The cache could not be written (disk full, no permission, read-only file system)."""


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


def load(key: str, readable_name: str, *, root: Path | None = None,
         any_name: bool = False) -> CacheEntry | None:
    """The valid entry for `key`, or None when it is absent or corrupt (never raises on those).
    With `any_name`, an entry of `key` stored under another readable name serves too (for
    entries whose files do not depend on the name: one key, one entry, however it was spelt)."""
    kernels = _kernels(root)
    entry, _ = _inspect(kernels / entry_name(readable_name, key), key, readable_name)
    if entry is None and any_name:
        entry = _find_by_key(kernels, key)
    if entry is not None:
        stats.hits += 1
    return entry


class NotPrebuiltError(RuntimeError):
    """ATTNCC_OFFLINE=1 (or no compiler on this machine) and the kernel asked for is not in
    the cache. One class for every backend, so a caller catches one name."""


def load_prebuilt(key: str, readable_name: str, what: str, build_command: str) -> CacheEntry:
    """The entry of `key` (under any readable name) for a machine that may not compile
    (ATTNCC_OFFLINE=1); NotPrebuiltError naming `what`, the cache and `build_command` (how
    to make it ahead of time) when it is absent."""
    entry = load(key, readable_name, any_name=True)
    if entry is None:
        raise NotPrebuiltError(
            f"ATTNCC_OFFLINE=1 and {what} is not in the cache {config.cache_dir()} (entry "
            f"{readable_name}); build it ahead of time with `{build_command}` or unset "
            "ATTNCC_OFFLINE")
    return entry


def load_or_build(
    key: str,
    readable_name: str,
    build: Callable[[], dict[str, bytes]],
    *,
    root: Path | None = None,
    extra_meta: dict | None = None,
    any_name: bool = False,
) -> CacheEntry:
    """Load the entry for `key`, or call `build()` once (across processes) and store its files.

    `build` returns {file name: contents}; names are plain file names other than `meta.json`.
    `extra_meta` (JSON-serialisable) is merged into `meta.json`. With `any_name` (see `load`),
    a valid entry of `key` under another readable name is loaded rather than built again.
    """
    name = entry_name(readable_name, key)
    extra = dict(extra_meta or {})
    if clash := _RESERVED & extra.keys():
        raise ValueError(f"extra_meta may not set {sorted(clash)}")
    json.dumps(extra)  # fail before an expensive build, not after it
    kernels = _kernels(root)
    path = kernels / name

    entry, _ = _inspect(path, key, readable_name)
    if entry is None and any_name:
        entry = _find_by_key(kernels, key)
    if entry is not None:  # the fast path takes no lock
        stats.hits += 1
        return entry

    with _entry_lock(kernels, name):
        entry, problem = _inspect(path, key, readable_name)
        if entry is None and any_name:
            entry = _find_by_key(kernels, key)
        if entry is not None:  # another process built it while we waited for the lock
            stats.hits += 1
            return entry
        # Holding the key's lock, any temporary dir for this key belongs to a writer that died.
        _remove_temps(kernels, key)
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
    return [entry for _, entry, _ in inspect_all(root) if entry is not None]


def inspect_all(root: Path | None = None) -> list[tuple[Path, CacheEntry | None, str | None]]:
    """(dir, entry, None) for each valid entry and (dir, None, why) for each corrupt one, sorted
    by directory name; temporary dirs (writes in flight, or left by a dead writer) are skipped."""
    kernels = _kernels(root)
    if not kernels.is_dir():
        return []
    found: list[tuple[Path, CacheEntry | None, str | None]] = []
    for path in sorted(kernels.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.exists() and (broken := _broken_link(path)):
            found.append((path, None, broken))
            continue
        try:
            meta = json.loads((path / META).read_text())
            key, readable_name = meta["key"], meta["name"]
            if path.name != entry_name(readable_name, key):
                found.append((path, None, "directory name does not match meta.json"))
                continue
        except FileNotFoundError:
            found.append((path, None, "missing meta.json"))
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            found.append((path, None, f"unreadable meta.json: {type(e).__name__}: {e}"))
            continue
        entry, problem = _inspect(path, key, readable_name)
        found.append((path, entry, problem))
    return found


def clear(root: Path | None = None, *, older_than: float | None = None) -> int:
    """Remove every entry (valid or corrupt) and stale temporary dirs; returns the entry count.
    With `older_than` (seconds), only entries created at least that long ago (meta.json's
    `created`, else the directory's mtime) and temporary dirs not touched for that long.

    Under its entry's lock (a build in flight finishes first), each entry is renamed to a hidden
    temporary name, then deleted: a reader that looks sees the whole entry or none, and files a
    reader already opened stay readable. Lock files stay: deleting a lock file another process
    holds would let a third one lock a new inode.
    """
    kernels = _kernels(root)
    if not kernels.is_dir():
        return 0
    now, count = time.time(), 0
    for path in sorted(kernels.iterdir()):
        is_temp = path.name.startswith(_TMP_PREFIX)
        name = _temp_owner(path.name) if is_temp else path.name
        if older_than is not None and _age(path, now, is_temp) < older_than:
            continue
        with _entry_lock(kernels, name):
            if not path.exists() and not path.is_symlink():
                continue
            if is_temp:  # its writer held this lock; it is gone, so is the writer
                _remove(path)
                continue
            trash = kernels / f"{_TMP_PREFIX}{secrets.token_hex(6)}.{name}"
            try:
                os.replace(path, trash)
                _remove(trash)
            except OSError as e:
                raise CacheError(_why(f"cannot remove cache entry {name}", path, e)) from e
            count += 1
    return count


def entry_age(path: Path, now: float | None = None) -> float:
    """Seconds since the entry was created (meta.json's `created`, else the dir's mtime)."""
    return _age(path, time.time() if now is None else now, False)


def dir_size(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it is absent)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _age(path: Path, now: float, is_temp: bool) -> float:
    created = None
    if not is_temp:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            created = float(json.loads((path / META).read_text())["created"])
    if created is None:
        try:
            created = path.lstat().st_mtime
        except OSError:
            return 0.0
    return now - created


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _entry_lock(kernels: Path, name: str) -> Iterator[None]:
    """Hold entry `name`'s lock: this process's threading.Lock for it, then its file lock.
    The lock is its key's (`<key[:16]>.lock`), shared by every readable name of that key, so
    that builders of one key under two names build it once (`any_name`)."""
    lock_name = _key_part(name)
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(str(kernels / lock_name), threading.Lock())
    with thread_lock:
        _check_root(kernels)
        locks = kernels.parent / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(locks / f"{lock_name}.lock"))
            lock.acquire()
        except OSError as e:
            raise CacheError(_why(f"cannot lock cache entry {name}", locks, e)) from e
        try:
            yield
        finally:
            lock.release()


_WRITABLE = "make it writable or set ATTNCC_CACHE_DIR to a writable directory"
_HINTS = {  # errno -> (what it means, what to do)
    errno.ENOSPC: ("the disk is full", "free space or set ATTNCC_CACHE_DIR to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or set ATTNCC_CACHE_DIR elsewhere"),
    errno.EACCES: ("no write permission", _WRITABLE),
    errno.EPERM: ("no write permission", _WRITABLE),
    errno.EROFS: ("the file system is read-only", _WRITABLE),
}


def _why(action: str, where: Path, e: OSError) -> str:
    """`action` failed at a path because of `e`, in one line, with what to do about it."""
    path = e.filename or where
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    meaning, todo = _HINTS.get(e.errno, ("", "check the cache directory or set ATTNCC_CACHE_DIR"))
    tag = f" [{code}: {meaning}]" if meaning else f" [{code}]" if code else ""
    return f"attncc cache: {action} ({path}): {e.strerror or e}{tag}; {todo}"


def _kernels(root: Path | None) -> Path:
    return Path(root if root is not None else config.cache_dir()) / "kernels"


def _inspect(path: Path, key: str, readable_name: str) -> tuple[CacheEntry | None, str | None]:
    """(entry, None) if valid, (None, None) if absent, (None, why) if corrupt."""
    if not path.exists():
        # exists() is False for a symlink that dangles or loops: that is a corrupt entry, which
        # the caller replaces under the lock, not an absent one (renaming onto it fails)
        return None, _broken_link(path)
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


def _broken_link(path: Path) -> str | None:
    """Why `path`, which does not resolve, is a broken symbolic link; None if it is no link."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "a symbolic link loop"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
    return f"a dangling symbolic link to {os.readlink(path)}"


def check_root(root: Path | None = None) -> None:
    """Raise `CacheError` (one line: the path, what is wrong, what to do) if the cache directory
    or a directory in it is a file, a dangling symbolic link or a link loop; an absent one is
    fine (the first write creates it)."""
    _check_root(_kernels(root))


def _check_root(kernels: Path) -> None:
    # mkdir would say only EEXIST or ENOTDIR, and a listing would look empty
    for where in (kernels.parent, kernels, kernels.parent / "locks"):
        if where.is_dir():
            continue
        if broken := _broken_link(where):
            problem = f"is {broken}"
            todo = "create the link's target or set ATTNCC_CACHE_DIR to a directory"
        elif where.exists():
            problem = "is not a directory"
            todo = "remove it or set ATTNCC_CACHE_DIR to a directory"
        else:
            continue  # absent: created on the first write
        raise CacheError(f"attncc cache: the cache directory {where} {problem}; {todo}")


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
    but load-time validation rejects it and it is rebuilt. A failed write (disk full, no
    permission) raises `CacheError` and removes the temp dir.
    """
    final = kernels / name
    tmp: Path | None = None
    try:
        kernels.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=f".{name}", dir=kernels))
        for fname, data in files.items():
            _write_file(tmp / fname, data)
        _write_file(tmp / META, json.dumps(meta, indent=1, sort_keys=True).encode())
        if final.exists() or final.is_symlink():
            # os.replace cannot overwrite a non-empty dir (nor a dir a symlink, ENOTDIR); move
            # the stale one aside atomically so readers see the old entry or nothing, then the
            # new one.
            trash = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=f".{name}", dir=kernels))
            os.replace(final, trash / "stale")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as e:
        raise CacheError(_why(f"cannot store cache entry {name}", kernels, e)) from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    # one function for every write into an entry, so tests can make it fail (disk full)
    with open(path, "wb") as f:
        f.write(data)


def _remove_temps(kernels: Path, key: str) -> None:
    """Remove the temporary dirs of every entry of `key` (caller holds the key's lock)."""
    if kernels.is_dir():
        for path in kernels.iterdir():
            if path.name.startswith(_TMP_PREFIX) and \
                    _key_part(_temp_owner(path.name)) == key[:16]:
                shutil.rmtree(path, ignore_errors=True)


def _key_part(name: str) -> str:
    """The key prefix ending entry name `name` (`entry_name`), or the whole name when it has
    none (a stray directory: it gets a lock of its own)."""
    readable, sep, key16 = name.rpartition("-")
    return key16 if sep and readable and _KEY_RE.fullmatch(key16) else name


def _find_by_key(kernels: Path, key: str) -> CacheEntry | None:
    """A valid entry of `key` under any readable name (the first in name order), else None."""
    if not kernels.is_dir():
        return None
    for path in sorted(kernels.glob(f"*-{key[:16]}")):
        if not path.name.startswith("."):
            entry, _ = _inspect(path, key, path.name[: -len(key[:16]) - 1])
            if entry is not None:
                return entry
    return None


def _temp_owner(dirname: str) -> str:
    # ".tmp.<random>.<entry name>": mkdtemp's random part has no dots.
    return dirname.split(".", 3)[-1]
