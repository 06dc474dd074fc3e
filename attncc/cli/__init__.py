"""`attncc` on the command line (also `python -m attncc`):

    attncc build MANIFEST [--arch sm_80,sm_90] [--jobs N] [--out DIR]   compile ahead of time
    attncc explain SPEC_OR_MANIFEST [--shape LQ,LK] [--png FILE] [--source]
    attncc cache ls|info|verify|clean [--older-than DAYS]
    attncc bench MANIFEST [--smoke] [--only NAME] [--out DIR]    (a CUDA GPU, or --smoke: CPU)

One module per command; each adds its parser and a `run(args) -> exit status`.
"""

from __future__ import annotations

import argparse
import sys

from attncc.cli import bench, build, cache_cmd, explain
from attncc.backends.cache import CacheError

COMMANDS = (build, explain, cache_cmd, bench)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="attncc", description="attncc: an attention compiler. Build kernels ahead of time, "
        "explain what a spec compiles to, and manage the kernel cache.")
    sub = top.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if not hasattr(args, "run"):
        top.print_help(sys.stderr)
        return 2

    try:
        return args.run(args)
    except CacheError as e:  # disk full, no permission: already one line naming the path
        print(f"attncc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attncc: interrupted", file=sys.stderr)
        return 130
