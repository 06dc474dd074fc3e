"""Launch a binary built ahead of time, through Triton's own launcher, with no compile.

Triton's JIT reuses a stored binary only when its own cache key matches (the source hash, the
specialisation it infers from the arguments, the options and several environment variables).
A prebuilt attncc kernel is instead wrapped in the object `triton.compile` itself returns on a
cache hit, a `triton.compiler.CompiledKernel` built from Triton's metadata file, the cubin and the
PTX of the artifact, and launched as `compiled[grid](*arguments)`. That is the JIT's own last step
(`JITFunction.run` hands every argument, constexprs included, to `CompiledKernel.run`), so the
only thing left out is the compile. Loading the module on the device and the launcher come from
Triton, unchanged, on every version attncc supports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from attncc.backends.triton.launch_spec import LaunchSpec, check_int_arguments

# the artifact files `CompiledKernel` reads: its metadata (the one ".json" it is given) and the
# binaries, named by extension
METADATA_FILE, BINARY_FILES = "triton.json", ("kernel.cubin", "kernel.ptx")


class DirectKernel:
    """One prebuilt binary of the @triton.jit function `fn` for the variant `spec` describes."""

    def __init__(self, fn: Any, spec: LaunchSpec, files: Mapping[str, Path]) -> None:
        from triton.backends.compiler import BaseBackend
        from triton.compiler import ASTSource, CompiledKernel

        if list(spec.signature) != list(fn.arg_names):
            raise ValueError(f"{spec.name}: the kernel takes {fn.arg_names}, the prebuilt "
                             f"binary's signature is {list(spec.signature)}")
        index = {name: i for i, name in enumerate(fn.arg_names)}
        # the source object `triton.compile` was given when the binary was built
        self.source = ASTSource(fn, dict(spec.signature),
                                {(index[n],): v for n, v in spec.constexprs.items()},
                                {(index[n],): BaseBackend.parse_attr("D")
                                 for n in spec.aligned + spec.divisible})
        group = {f"{spec.name}.json": str(files[METADATA_FILE]),
                 **{f"{spec.name}.{f.split('.')[-1]}": str(files[f]) for f in BINARY_FILES}}
        metadata_hash = json.loads(Path(files[METADATA_FILE]).read_text())["hash"]
        self.compiled = CompiledKernel(self.source, group, metadata_hash)
        self.spec = spec
        self._int_arguments = spec.int_arguments()
        # built once: the argument order and the constexprs every launch must pass
        self._names = tuple(spec.signature)
        self._constexpr_names = tuple(spec.constexprs)
        self._constexpr_values = tuple(spec.constexprs.values())

    def __call__(self, grid: tuple[int, ...], values: Mapping[str, Any]) -> None:
        """Launch on the current device and stream; `values` names every argument (constexprs
        too, as the JIT passes them; the launcher drops them)."""
        check_int_arguments(self.spec.name, self._int_arguments, values)
        if tuple(map(values.__getitem__, self._constexpr_names)) != self._constexpr_values:
            for name, value in self.spec.constexprs.items():
                if values[name] != value:  # a caller picked the wrong variant: never launch it
                    raise ValueError(f"{self.spec.name}: constexpr {name} is {value} in the "
                                     f"prebuilt binary, the launch passes {values[name]!r}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled[grid](*map(values.__getitem__, self._names))

    def tail_after(self, names: tuple[str, ...]) -> tuple[Any, ...]:
        """The constexpr values a positional launch passes after the arguments `names`, which
        must be the first arguments of the binary's signature in order (ValueError if not).
        A caller that has checked one launch with `__call__` launches the same variant again
        as `compiled[grid](*values_of_names, *tail)`: the constexprs never change, and what
        the checks read from the arguments is the caller's to keep (see
        `TritonForward.launch`)."""
        if self._names[:len(names)] != tuple(names):
            raise ValueError(f"{self.spec.name}: the launch names {list(names)}, the binary's "
                             f"signature starts {list(self._names[:len(names)])}")
        tail = self._names[len(names):]
        missing = [n for n in tail if n not in self.spec.constexprs]
        if missing:
            raise ValueError(f"{self.spec.name}: arguments {missing} are no constexprs")
        return tuple(self.spec.constexprs[n] for n in tail)


class DirectKernels:
    """The direct kernels one kernel holder has loaded in this process, one per (what, device):
    Triton loads a binary's module onto the device current at its first launch."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, DirectKernel] = {}

    def get(self, what: tuple, device: Any, load: Callable[[], DirectKernel]) -> DirectKernel:
        """The kernel `what` names on `device`, `load()`ed on first use."""
        key = (what, device.index)
        kernel = self._loaded.get(key)
        if kernel is None:
            kernel = self._loaded[key] = load()
        return kernel

    def launch(self, what: tuple, device: Any, load: Callable[[], DirectKernel],
               grid: tuple[int, ...], values: Mapping[str, Any]) -> DirectKernel:
        """Launch the kernel `what` names on `device` (checked: `DirectKernel.__call__`),
        `load()`ing it on first use; returns it."""
        import torch

        kernel = self.get(what, device, load)
        with torch.cuda.device(device):
            kernel(grid, values)
        return kernel
