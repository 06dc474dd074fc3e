"""Which compiled object a custom op call names.

An op carries its kernel as a string key (`<tag>-<spec key>`), so an exported graph holds a
readable constant and two compiles of one spec share a key. The registry maps keys to the
latest compiled object, which is what a compiled graph or an exported program runs. Eager
calls run their own object (its caches and cache entry) through `calling`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class OpRegistry(Generic[T]):
    """Compiled objects by op key; `what` names the kind in the error for an unknown key."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._objects: dict[str, T] = {}
        self._caller = threading.local()

    def register(self, key: str, obj: T) -> str:
        self._objects[key] = obj
        return key

    @contextlib.contextmanager
    def calling(self, obj: T) -> Iterator[None]:
        """Within this block an eager op call with `obj.key` runs `obj` itself, not whichever
        compile of the same spec the registry holds."""
        previous = getattr(self._caller, "obj", None)
        self._caller.obj = obj
        try:
            yield
        finally:
            self._caller.obj = previous

    def lookup(self, key: str) -> T:
        caller = getattr(self._caller, "obj", None)
        if caller is not None and caller.key == key:
            return caller
        try:
            return self._objects[key]
        except KeyError:
            raise ValueError(f"kernel: expected the key of {self.what} compiled in this "
                             f"process, got {key!r}; call attncc.compile(spec) for that spec "
                             f"first (an exported program needs it too before it runs)") from None
