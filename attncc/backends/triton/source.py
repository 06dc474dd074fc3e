"""One generated Triton source: rendered once into the disk cache, loaded once per process.

Every kernel holder (the softmax forward, the linear-recurrence kernels) keeps one of these for
the cache and module plumbing, and derives from `GeneratedKernel` to read through to it."""

from __future__ import annotations

import builtins
import functools
import importlib.util
import os
import re
import symtable
import sys
import threading
from types import ModuleType
from typing import Any, Callable

from triton.runtime.interpreter import InterpretedFunction

from attncc import config
from attncc.backends import cache

# Triton's CPU interpreter is not thread-safe: a launch swaps triton.language's functions for
# interpreted ones process-wide and swaps them back when it ends, and keeps the grid position in
# one global builder, so two threads launching at once break each other's kernels. Every
# generated kernel module is loaded by `load_module`, which makes each interpreted kernel's launch
# hold this lock; compiled (GPU) kernels are not InterpretedFunction and are left alone.
_INTERPRETER_LAUNCH = threading.Lock()


def load_module(path: str, name: str) -> ModuleType:
    """Import a generated source file as module `attncc_kernels.<name>`."""
    # Triton's own files (JIT binaries; launcher stubs on Triton versions that compile one per
    # signature, 3.6 among them) live beside the source, unless that cache is read-only
    # (shipped): then Triton keeps its default, writable place
    root = config.cache_dir()
    if "TRITON_CACHE_DIR" not in os.environ and os.access(root, os.W_OK):
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    module_name = f"attncc_kernels.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton reads the source back through the module
    spec.loader.exec_module(module)
    for value in vars(module).values():
        if isinstance(value, InterpretedFunction):  # only under TRITON_INTERPRET=1
            _serialise_launches(value)
    return module


class SourceError(RuntimeError):
    """A rendered kernel source that would not compile: a bug in attncc, never stored."""


def check_source(text: str, filename: str) -> None:
    """Raise SourceError unless `text` is valid Python whose functions read no undefined name.

    Triton parses a jit function only at its first launch, so a bad expression (a bare `inf`
    printed for `float("-inf")`) would otherwise surface as a NameError inside the kernel, with
    the broken source already in the disk cache; checked here, before the entry is written."""
    try:
        compile(text, filename, "exec")
        table = symtable.symtable(text, filename, "exec")
    except SyntaxError as e:
        raise SourceError(f"{filename}: rendered source does not parse: {e.msg} at line "
                          f"{e.lineno}: {(e.text or '').strip()!r}") from None
    defined = set(table.get_identifiers()) | set(dir(builtins))
    lines = text.splitlines()
    stack = list(table.get_children())
    while stack:
        scope = stack.pop()
        stack.extend(scope.get_children())
        for sym in scope.get_symbols():
            if sym.is_global() and sym.is_referenced() and sym.get_name() not in defined:
                line = next((f"line {i + 1}: {ln.strip()!r}" for i, ln in enumerate(lines)
                             if _reads(ln, sym.get_name())), "")
                raise SourceError(f"{filename}: rendered source reads the undefined name "
                                  f"{sym.get_name()!r} in {scope.get_name()}() ({line})")


def _reads(line: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", line) is not None


def _checked(build: Callable[[], dict[str, bytes]]) -> Callable[[], dict[str, bytes]]:
    def checked_build() -> dict[str, bytes]:
        files = build()
        for fname, data in files.items():
            if fname.endswith(".py"):
                check_source(data.decode(), fname)
        return files
    return checked_build
def _serialise_launches(fn: InterpretedFunction) -> None:
    """Make every launch of `fn` (`fn[grid](...)` ends in `fn.run`) hold the process-wide
    interpreter lock. Calls of one jit function from another inside a kernel go through
    `__call__`, within the launch that already holds it."""
    run = fn.run

    @functools.wraps(run)
    def locked_run(*args: Any, **kwargs: Any) -> Any:
        with _INTERPRETER_LAUNCH:
            return run(*args, **kwargs)

    fn.run = locked_run


class KernelHeader:
    """The parts of a @triton.jit function that Triton's `ASTSource` and launcher read to run a
    binary compiled from it: `__name__`, `arg_names` and `launch_metadata` (None: no hook)."""

    launch_metadata = None

    def __init__(self, name: str, arg_names: list[str]) -> None:
        self.__name__ = name
        self.arg_names = arg_names

    @classmethod
    def read(cls, source: str, name: str) -> "KernelHeader":
        """The header of the generated function `name` in `source` (our templates write one
        argument list per `def`, a name and an optional `: tl.constexpr` per argument);
        ValueError when `source` has no such `def`."""
        found = re.search(rf"^def {re.escape(name)}\((.*?)\):", source, re.MULTILINE | re.DOTALL)
        if found is None:
            raise ValueError(f"{name}: no `def {name}(...)` in the generated source")
        names = [part.split(":")[0].strip() for part in found.group(1).split(",")]
        return cls(name, [n for n in names if n])


class CachedSource:
    """Cache entry `name` (its files made by `build` on a miss, each `.py` checked by
    `check_source` before it is stored) and the jit function `name` of its `kernel.py`."""

    def __init__(self, key: str, name: str, build: Callable[[], dict[str, bytes]],
                 meta: dict) -> None:
        self.name = name
        self.entry = cache.load_or_build(key, name, _checked(build), extra_meta=meta)
        self._module: ModuleType | None = None

    @property
    def source(self) -> str:
        return self.entry.files["kernel.py"].read_text()

    def header(self) -> "KernelHeader":
        """What launching a prebuilt binary of this source needs of its jit function (its name
        and argument names), read from `kernel.py`'s `def` line: the binary was compiled from
        this very file (the entry's key), and executing the module only to ask would cost
        Triton's @jit decorator re-reading the source with `inspect` (about 15 ms a kernel, the
        bulk of a warm process's first call)."""
        return KernelHeader.read(self.source, self.name)

    def jit_function(self, name: str | None = None):
        """The jit function `name` (default: the entry's own name) of `kernel.py`."""
        if self._module is None:
            self._module = load_module(str(self.entry.files["kernel.py"]), self.name)
        return getattr(self._module, name or self.name)


class GeneratedKernel:
    """Base of the kernel holders whose `self.kernel` is a `CachedSource`."""

    kernel: CachedSource

    @property
    def source(self) -> str:
        return self.kernel.source

    def jit_function(self, name: str | None = None):
        """The jit function `name` of the kernel's source (default: the kernel's own)."""
        return self.kernel.jit_function(name)
