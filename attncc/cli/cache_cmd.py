"""`attncc cache ls|info|verify|clean`: look after the kernel cache ($ATTNCC_CACHE_DIR).

Entries are either sources (rendered Triton, one per spec) or compiled kernels (one per kernel,
target, dtype and head dims, made by `attncc build` or `CompiledAttention.precompile`).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from attncc.backends.keys import TRITON_TYPES
from attncc.cli.output import age, dims, error, size
from attncc import config
from attncc.backends import cache


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list, summarise, verify or clean the kernel cache",
                       description=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    p.add_argument("--dir", metavar="DIR",
                   help="cache directory (default $ATTNCC_CACHE_DIR or ~/.cache/attncc)")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    for name, fn, text in (
            ("ls", _ls, "list entries: name, kind, targets, size, age"),
            ("info", _info, "root, entry count, total size, targets and versions"),
            ("verify", _verify, "check every entry's files against meta.json (sizes, sha256); "
                                "exit status 1 naming the bad ones"),
            ("clean", _clean, "remove entries (all, or only older than --older-than DAYS), "
                              "safely while other processes read or build")):
        a = actions.add_parser(name, help=text, description=text)
        if name == "clean":
            a.add_argument("--older-than", type=float, metavar="DAYS",
                           help="only entries created at least DAYS days ago")
        a.add_argument("--dir", metavar="DIR", default=argparse.SUPPRESS,
                       help="cache directory (default $ATTNCC_CACHE_DIR or ~/.cache/attncc)")
        a.set_defaults(run=fn)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _root(args: argparse.Namespace) -> Path:
    """The cache directory; `CacheError` (one line, exit status 1) when it is a file, a dangling
    link or a link loop, rather than an empty listing."""
    root = Path(args.dir) if getattr(args, "dir", None) else config.cache_dir()
    cache.check_root(root)
    return root


def _describe(entry) -> tuple[str, str]:
    meta = entry.meta
    if "source_key" in meta:  # a compiled kernel; sources (forward, backward, ...) have none
        return meta["kind"], (f"{meta['target']} {TRITON_TYPES.get(meta['dtype'], meta['dtype'])} "
                              f"{dims(meta['head_dim_qk'], meta['head_dim_v'])}")
    return "source", ""


def _ls(args: argparse.Namespace) -> int:
    found = cache.inspect_all(_root(args))
    targets: dict[str, set[str]] = {}
    for _, entry, _ in found:
        if entry is not None and "source_key" in entry.meta:
            targets.setdefault(entry.meta["source_key"], set()).add(entry.meta["target"])
    rows = []
    for path, entry, problem in found:
        if entry is None:
            rows.append((path.name, "CORRUPT", problem or "", size(cache.dir_size(path)),
                         age(cache.entry_age(path))))
            continue
        kind, where = _describe(entry)
        if kind == "source":
            built = sorted(targets.get(entry.meta["key"], ()))
            where = ("compiled for " + ",".join(built)) if built else "not compiled"
        rows.append((path.name, kind, where, size(cache.dir_size(path)),
                     age(cache.entry_age(path))))
    if not rows:
        print(f"(no entries in {_root(args)})")
        return 0
    head = ("ENTRY", "KIND", "TARGET", "SIZE", "AGE")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def _info(args: argparse.Namespace) -> int:
    root = _root(args)
    found = cache.inspect_all(root)
    entries = [e for _, e, _ in found if e is not None]
    kinds = Counter(_describe(e)[0] for e in entries)
    targets = Counter(e.meta["target"] for e in entries if "target" in e.meta)
    versions = Counter(f"attncc {e.meta.get('attncc_version')}, torch "
                       f"{e.meta.get('torch_version')}, triton {e.meta.get('triton_version')}"
                       for e in entries)
    kernels, triton = cache.dir_size(root / "kernels"), cache.dir_size(root / "triton")
    print(f"root      {root}")
    print(f"entries   {len(found)}: {kinds['source']} sources, "
          f"{len(entries) - kinds['source']} compiled kernels, {len(found) - len(entries)} "
          "corrupt")
    print(f"size      {size(kernels)} in kernels/, {size(triton)} in triton/ (Triton's own "
          f"cache), {size(cache.dir_size(root))} in all")
    print("targets   " + (", ".join(f"{t}: {n}" for t, n in sorted(targets.items())) or "-"))
    for i, (v, n) in enumerate(sorted(versions.items())):
        print(f"{'versions' if i == 0 else '':<10}{v} ({n} entries)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    root = _root(args)
    found = cache.inspect_all(root)
    bad = [(path, problem) for path, entry, problem in found if entry is None]
    for path, problem in bad:
        print(f"BAD {path.name}: {problem}")
    kernels = root / "kernels"
    temps = [p for p in kernels.iterdir() if p.name.startswith(".tmp.")] \
        if kernels.is_dir() else []
    print(f"attncc cache verify: {len(found) - len(bad)} entries ok, {len(bad)} bad"
          + (f", {len(temps)} temporary dirs (writes in flight, or left by a dead writer)"
             if temps else "") + f" in {root}")
    if bad:
        error("cache verify", f"{len(bad)} bad entries: "
                              f"{', '.join(p.name for p, _ in bad)}; they are rebuilt on next "
                              "use, or `attncc cache clean` removes them")
    return 1 if bad else 0


def _clean(args: argparse.Namespace) -> int:
    if args.older_than is not None and not (math.isfinite(args.older_than)
                                            and args.older_than >= 0):
        error("cache clean", f"--older-than: expected a finite number of DAYS >= 0, got "
                             f"{args.older_than}")
        return 2
    root = _root(args)
    before = cache.dir_size(root / "kernels")
    older = None if args.older_than is None else args.older_than * 86400
    removed = cache.clear(root, older_than=older)
    freed = before - cache.dir_size(root / "kernels")
    which = "" if older is None else f" older than {args.older_than:g} days"
    print(f"attncc cache clean: removed {removed} entries{which} ({size(freed)}) from {root}")
    return 0
