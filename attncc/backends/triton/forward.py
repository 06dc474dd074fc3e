"""The Triton backend: source from the disk cache (rendered once), module loaded once per
process, one launch per call. Block sizes and flags are constexprs chosen per call signature,
so one cached source serves every dtype, head dim and GPU.

On a GPU that `attncc build` can target, the forward kernel (and its block-map kernel) run the
prebuilt binary of `attncc.backends.triton.prebuilt`, launched by Triton's launcher without
Triton's JIT; under the interpreter, they go through the JIT.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Mapping, NamedTuple

import torch

from attncc.backends.triton import prebuilt
from attncc.backends.triton.launch_spec import (ALIGNED, DEFAULT_VARIANT, INT32_MAX, STRIDES,
                                                UNIT_STRIDES, Variant, choose_variant,
                                                launch_constexprs)
from attncc.backends.targets import SUPPORTED_ARCHS
from attncc.backends.triton.direct import DirectKernel, DirectKernels
from attncc.backends import keys
from attncc.backends.triton.prebuilt_targets import forward_target
from attncc.backends.triton.printer import PRINTER_VERSION
from attncc.backends.triton.source import CachedSource, GeneratedKernel, load_module
from attncc.backends.triton.render import (TEMPLATES, block_map_kernel_name, fixed_arguments,
                                           kernel_arguments, kernel_name, render,
                                           render_block_map)
from attncc.backends.triton.templating import template_hash
from attncc.ir.nodes import Schedule
from attncc.ir.plan import KernelPlan, Signature
from attncc.passes.pipeline import run_plan_passes

BACKEND = "triton"


def source_key(plan: KernelPlan) -> str:
    """The cache key of the forward source (and block-map source) of `plan`."""
    return keys.cache_key(BACKEND, plan.spec.key, templates=template_hash(TEMPLATES),
                          printer=PRINTER_VERSION)


def target_of(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return "interpreter"


class TritonForward(GeneratedKernel):
    """The forward kernel of one plan. Building it renders (or loads) the source on disk."""

    def __init__(self, plan: KernelPlan) -> None:
        self.plan = plan
        self.name = kernel_name(plan)
        self.kernel = CachedSource(source_key(plan), self.name, lambda: _sources(plan),
                                   {"backend": BACKEND, "spec": plan.spec.text()})
        self.entry = self.kernel.entry
        self._block_map_module: ModuleType | None = None
        self._plans: dict[Signature, KernelPlan] = {}
        self._prebuilt = DirectKernels()
        # every argument's name in order (names do not depend on the dtype): built once, not
        # on each launch
        self.kernel_arguments = kernel_arguments(plan)
        self.captures = plan.spec.captures
        # when the kernel's own arguments are all runtime parameters (no captured tensor, block
        # map or positions): their names, in order
        by_arg = {keys.param_arg(p.name): p.name for p in plan.spec.params}
        self._param_arguments = (tuple(by_arg[n] for n, _ in self.kernel_arguments)
                                 if all(n in by_arg for n, _ in self.kernel_arguments) else None)
        # otherwise, where each of them comes from (`argument_values` finds it by name)
        self._sources = _argument_sources(self.kernel_arguments, by_arg, self.captures)
        self.argument_names = [name for name, _ in fixed_arguments("float16")
                               + self.kernel_arguments]
        # per (dtype, Dqk, Dv, device, write_lse, gather_rows, counting): what a launch of that
        # signature always passes (schedule, constexprs, prebuilt arch), worked out once
        self._launches: dict[tuple, _Prepared] = {}
        # per (strides and sizes, Dqk, Dv, dtype, device, no lse, gather_rows) of a launch
        # without visit counting: its _Prepared and the _Geometry of its strides
        self._geometries: dict[tuple, tuple[_Prepared, _Geometry]] = {}
        self._schedules: dict[tuple, Schedule] = {}

    def block_map_function(self):
        """The generated kernel that classifies tiles on the device (block map source 'device')."""
        name = block_map_kernel_name(self.plan)
        if self._block_map_module is None:
            self._block_map_module = load_module(str(self.entry.files["block_map.py"]), name)
        return getattr(self._block_map_module, name)

    def plan_for(self, signature: Signature) -> KernelPlan:
        if signature not in self._plans:
            self._plans[signature] = run_plan_passes(self.plan, signature)
        return self._plans[signature]

    def schedule_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Schedule:
        key = (q.dtype, q.shape[3], v.shape[3], q.device)
        sched = self._schedules.get(key)
        if sched is None:
            sig = Signature(keys.dtype_name(q.dtype), q.shape[3], v.shape[3],
                            target_of(q.device))
            sched = self._schedules[key] = self.plan_for(sig).schedule
        return sched

    def _prepared(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_lse: bool,
                  gather_rows: bool, counting: bool) -> _Prepared:
        key = (q.dtype, q.shape[3], v.shape[3], q.device, write_lse, gather_rows, counting)
        hit = self._launches.get(key)
        if hit is not None:
            return hit
        sched = self.schedule_for(q, k, v)
        constexprs = launch_constexprs(sched, q.shape[3], v.shape[3], write_lse=write_lse,
                                       gather_rows=gather_rows)
        # the interpreter's tl.dot multiplies raw bf16 bits (triton-lang/triton#11584):
        # there, and only there, bf16 tiles are upcast to fp32 before each dot
        constexprs["UPCAST_DOT"] = (target_of(q.device) == "interpreter"
                                    and q.dtype == torch.bfloat16)
        constexprs["COUNT_VISITS"] = counting
        arch = None if counting else prebuilt_arch(q.device)
        hit = self._launches[key] = _Prepared(sched, constexprs, arch,
                                              (keys.dtype_name(q.dtype), q.shape[3], v.shape[3]),
                                              {})
        return hit

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor | None, *, sm_scale: float, params: Mapping[str, int | float],
               tensors: Mapping[str, torch.Tensor], kv_tiles: torch.Tensor | None = None,
               positions: tuple[torch.Tensor, torch.Tensor] | None = None,
               gather_rows: bool = True, visits: torch.Tensor | None = None) -> None:
        """q/k/v/o are BHSD views (any strides); lse is fp32 [B, Hq, Lq] contiguous.

        kv_tiles: the block map (`block_maps.kv_tile_lists`) when the plan reads one.
        positions: int32 (q_pos, kv_pos), original position of each row, when tokens are
        reordered; `gather_rows` says q/k/v/o are in the original order (the kernel gathers rows
        and scatters o back) rather than already in the reordered layout."""
        if visits is None:  # the common case: one lookup for the signature and the strides
            sizes = (*q.stride(), *k.stride(), *v.stride(), *o.stride(),
                     q.shape[2], k.shape[2], q.shape[1], k.shape[1])
            key = (sizes, q.shape[3], v.shape[3], q.dtype, q.device, lse is None, gather_rows)
            known = self._geometries.get(key)
            if known is None:
                if len(self._geometries) >= 256:
                    self._geometries.clear()
                prepared = self._prepared(q, k, v, lse is not None, gather_rows, False)
                known = self._geometries[key] = (prepared, _Geometry.of(sizes))
            prepared, geometry = known
        else:
            prepared = self._prepared(q, k, v, lse is not None, gather_rows, True)
        if self._param_arguments is not None:  # parameters only: read them in order
            extra = [params[name] for name in self._param_arguments]
        elif self._sources is not None and (kv_tiles is not None or not self._sources[1]) and (
                positions is not None or not self._sources[2]):
            try:
                extra = _read_arguments(self._sources[0], self.captures, params, tensors,
                                        kv_tiles, positions)
            except KeyError:  # a value missing: argument_values says which
                extra = argument_values(self.plan, params, tensors, kv_tiles, positions,
                                        self.kernel_arguments, self.captures)
        else:
            extra = argument_values(self.plan, params, tensors, kv_tiles, positions,
                                    self.kernel_arguments, self.captures)
        grid = (-(-q.shape[2] // prepared.schedule.block_m), q.shape[0] * q.shape[1])
        if prepared.arch is not None:  # None when counting visits: that runs the JIT kernel
            self._launch_prebuilt(prepared, geometry, sizes, grid, q, k, v, o, lse,
                                  float(sm_scale), extra, gather_rows)
            return
        # the interpreter, a GPU `attncc build` cannot target, or visit counting
        sched = prepared.schedule
        values = self._values(q, k, v, o, lse, visits, float(sm_scale), extra)
        values.update(prepared.constexprs)
        self.jit_function()[grid](**values, num_warps=sched.num_warps,
                                  num_stages=sched.num_stages)

    def _values(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor | None, visits: torch.Tensor | None, sm_scale: float,
                extra: list[Any]) -> dict[str, Any]:
        """Every non-constexpr argument by name."""
        return dict(zip(self.argument_names, [
            q, k, v, o, lse if lse is not None else o, visits if visits is not None else o,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            q.shape[2], k.shape[2], q.shape[1], k.shape[1], sm_scale, *extra], strict=True))

    def _launch_prebuilt(self, prepared: _Prepared, geometry: _Geometry,
                         sizes: tuple[int, ...], grid: tuple[int, int], q: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor | None, sm_scale: float, extra: list[Any],
                         gather_rows: bool) -> None:
        """The prebuilt forward launch with the variant `choose_variant` would pick, from
        what each launch must recheck: the pointers' alignment and the widths of the
        integers that are not strides or sizes (parameters, captured tensors' geometry) on
        every call; the strides and sizes (`sizes`) once per distinct tuple of them
        (`geometry`). The first launch of each variant goes through the checked
        `DirectKernel.__call__` (the constexprs and integer widths of the binary against this
        launch's values) and its variant is compared with `choose_variant`'s; later ones pass
        the same arguments positionally."""
        lse_arg = lse if lse is not None else o
        contiguous = geometry.unit and not (q.data_ptr() % 16 or k.data_ptr() % 16
                                            or v.data_ptr() % 16 or o.data_ptr() % 16
                                            or lse_arg.data_ptr() % 16)
        wide = geometry.wide or (bool(extra) and _any_wide(extra))
        flags = (contiguous, wide, geometry.divisible_contiguous if contiguous
                 else geometry.divisible, q.device.index)
        known = prepared.kernels.get(flags)
        if known is None:
            values = self._values(q, k, v, o, lse, None, sm_scale, extra)
            values.update(prepared.constexprs)
            variant = choose_variant(values, ALIGNED, UNIT_STRIDES, STRIDES,
                                     write_lse=lse is not None, gather_rows=gather_rows)
            mine = Variant(lse is not None, gather_rows, *flags[:3])
            if variant != mine:  # the fast choice must be choose_variant's, always
                raise AssertionError(f"{self.name}: variant {mine} != {variant}")
            kernel = self.run_prebuilt("forward", grid, values, q.device, prepared.signature,
                                       variant)
            if isinstance(kernel, DirectKernel):  # (tests replace run_prebuilt: no kernel)
                prepared.kernels[flags] = (kernel,
                                           kernel.tail_after(tuple(self.argument_names)))
            return
        kernel, tail = known
        with torch.cuda.device(q.device):
            kernel.compiled[(grid[0], grid[1], 1)](q, k, v, o, lse_arg, o, *sizes, sm_scale,
                                                    *extra, *tail)

    def run_prebuilt(self, kind: str, grid: tuple[int, ...], values: Mapping[str, Any],
                     device: torch.device, signature: tuple[str, int, int],
                     variant: Variant = DEFAULT_VARIANT,
                     tiles: tuple[int, int] | None = None) -> DirectKernel:
        """Launch the prebuilt `kind` kernel ("forward" | "block_map", the latter at `tiles`)
        for (dtype, Dqk, Dv) and `variant` on `device` (see `attncc.backends.triton.prebuilt`):
        loaded from the cache once per process, compiled first (one log line) if `attncc build`
        did not make it."""
        arch = prebuilt_arch(device)

        def load():
            target = forward_target(self, kind, *signature, arch, variant, tiles)
            fn = self.kernel.header() if kind == "forward" else self.block_map_function()
            return prebuilt.direct_kernel(target, fn)

        return self._prebuilt.launch((kind, signature, arch, variant, tiles), device, load, grid,
                                     values)

    def launch_block_map(self, grid: tuple[int, ...], values: Mapping[str, Any],
                         device: torch.device, prebuilt_for: tuple[str, int, int] | None,
                         tiles: tuple[int, int]) -> None:
        """Run the block-map kernel (`block_maps.device_classes` prepares `values`): on a GPU
        `attncc build` can target, and when `prebuilt_for` names the (dtype, Dqk, Dv) of the
        launch the map is for, its prebuilt binary at `tiles`; otherwise Triton's JIT. The
        forward decides, as for its own kernel, so both launches follow one `prebuilt_arch`."""
        if prebuilt_for is not None and prebuilt_arch(device) is not None:
            self.run_prebuilt("block_map", grid, values, device, prebuilt_for, tiles=tiles)
        else:
            self.block_map_function()[grid](**values)


class _Prepared(NamedTuple):
    """What every forward launch of one signature passes: its schedule, constexprs, the
    prebuilt arch it runs (None: Triton's JIT) and its (dtype, Dqk, Dv); `kernels`: per
    (contiguous, wide_ints, divisible, device index) the loaded binary and the constexprs that
    end its argument list."""

    schedule: Schedule
    constexprs: dict[str, Any]
    arch: int | None
    signature: tuple[str, int, int]
    kernels: dict[tuple, tuple[DirectKernel, tuple[Any, ...]]]


class _Geometry(NamedTuple):
    """What `choose_variant` reads from a launch's 16 strides (q, k, v, o) and 4 sizes: whether
    the UNIT_STRIDES are 1, whether the STRIDES are multiples of 16 (all of them, or all but
    the unit strides: the contiguous variant's constexprs) and whether any needs 64 bits."""

    unit: bool
    divisible: bool
    divisible_contiguous: bool
    wide: bool

    @staticmethod
    def of(sizes: tuple[int, ...]) -> _Geometry:
        named = dict(zip(STRIDES, sizes))
        unit = all(named[n] == 1 for n in UNIT_STRIDES)
        return _Geometry(unit, all(named[n] % 16 == 0 for n in STRIDES),
                         all(named[n] % 16 == 0 for n in STRIDES if n not in UNIT_STRIDES),
                         _any_wide(sizes))


def _any_wide(values: list[Any] | tuple[Any, ...]) -> bool:
    """Whether an int among `values` (bools are flags, not ints) needs 64 bits."""
    return any(type(x) is int and not -INT32_MAX - 1 <= x <= INT32_MAX for x in values)


def prebuilt_arch(device: torch.device) -> int | None:
    """The compute capability whose prebuilt kernels a launch on `device` runs: None off CUDA,
    or on a GPU `attncc build` has no tile tables for (those launch through Triton's JIT)."""
    if device.type != "cuda":
        return None
    if device.index not in _ARCHS:
        major, minor = torch.cuda.get_device_capability(device)
        _ARCHS[device.index] = major * 10 + minor
    arch = _ARCHS[device.index]
    return arch if arch in SUPPORTED_ARCHS else None


_ARCHS: dict[int | None, int] = {}


def argument_values(plan: KernelPlan, params: Mapping[str, int | float],
                    tensors: Mapping[str, torch.Tensor], kv_tiles: torch.Tensor | None = None,
                    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                    arguments: list[tuple[str, str]] | None = None,
                    captures: tuple | None = None) -> list[Any]:
    """Values for `arguments` (default `kernel_arguments(plan)`), in its order. `captures`:
    `plan.spec.captures` when the caller holds it (a property that rebuilds the tuple)."""
    arguments = kernel_arguments(plan) if arguments is None else arguments
    if not arguments:
        return []
    values: dict[str, Any] = {keys.param_arg(name): value for name, value in params.items()}
    if kv_tiles is not None:
        values["KV_TILES"] = kv_tiles
        for axis, name in enumerate("bhmc"):
            values[f"kvt_stride_{name}"] = kv_tiles.stride(axis)
    if positions is not None:
        values["Q_POS"], values["KV_POS"] = positions
    for cap in plan.spec.captures if captures is None else captures:
        t = tensors[cap.name]
        t = t.view(torch.uint8) if t.dtype == torch.bool else t
        ptr, strides, sizes = _capture_arg_names(cap.name, cap.ndim)
        values.update({ptr: t, **dict(zip(strides, t.stride())), **dict(zip(sizes, t.shape))})
    try:
        return [values[name] for name, _ in arguments]
    except KeyError:
        missing = [name for name, _ in arguments if name not in values]
        raise ValueError(f"{kernel_name(plan)}: no value for kernel arguments {missing}"
                         ) from None


# a capture's argument names, built once per (name, rank) rather than on every launch
_capture_arg_names = functools.cache(keys.capture_arg_names)

# where `_read_arguments` finds an argument: a parameter (by name), the block map or one of
# its strides (by axis), a position tensor (0: q, 1: kv), a captured tensor (by index) or
# one of its strides or sizes (capture index, axis)
_PARAM, _MAP, _MAP_STRIDE, _POSITIONS, _CAPTURE, _STRIDE, _SIZE = range(7)


def _argument_sources(arguments: list[tuple[str, str]], params: Mapping[str, str],
                      captures: tuple) -> tuple[tuple, bool, bool] | None:
    """Per argument of `arguments`, where `argument_values` would find its value, as
    (kind, key, axis); and whether the block map and the positions are read. None when an
    argument is none of those (then `argument_values` reports it)."""
    named: dict[str, tuple] = {f"kvt_stride_{c}": (_MAP_STRIDE, None, axis)
                               for axis, c in enumerate("bhmc")}
    named.update({"KV_TILES": (_MAP, None, 0), "Q_POS": (_POSITIONS, None, 0),
                  "KV_POS": (_POSITIONS, None, 1)})
    named.update({arg: (_PARAM, name, 0) for arg, name in params.items()})
    for i, cap in enumerate(captures):
        ptr, strides, sizes = _capture_arg_names(cap.name, cap.ndim)
        named[ptr] = (_CAPTURE, i, 0)
        named.update({n: (_STRIDE, i, axis) for axis, n in enumerate(strides)})
        named.update({n: (_SIZE, i, axis) for axis, n in enumerate(sizes)})
    if any(name not in named for name, _ in arguments):
        return None
    sources = tuple(named[name] for name, _ in arguments)
    return (sources, any(k in (_MAP, _MAP_STRIDE) for k, _, _ in sources),
            any(k == _POSITIONS for k, _, _ in sources))


def _read_arguments(sources: tuple, captures: tuple, params: Mapping[str, int | float],
                    tensors: Mapping[str, torch.Tensor], kv_tiles: torch.Tensor | None,
                    positions: tuple[torch.Tensor, torch.Tensor] | None) -> list[Any]:
    """`argument_values` from the sources `_argument_sources` worked out once: the same
    values (a bool capture as uint8), without a dict of every argument per launch."""
    caps = []
    for cap in captures:
        t = tensors[cap.name]
        t = t.view(torch.uint8) if t.dtype == torch.bool else t
        caps.append((t, t.stride(), t.shape))
    map_strides = kv_tiles.stride() if kv_tiles is not None else ()
    out: list[Any] = []
    for kind, key, axis in sources:
        if kind == _PARAM:
            out.append(params[key])
        elif kind == _CAPTURE:
            out.append(caps[key][0])
        elif kind == _STRIDE:
            out.append(caps[key][1][axis])
        elif kind == _SIZE:
            out.append(caps[key][2][axis])
        elif kind == _MAP:
            out.append(kv_tiles)
        elif kind == _MAP_STRIDE:
            out.append(map_strides[axis])
        else:
            out.append(positions[axis])
    return out


def _sources(plan: KernelPlan) -> dict[str, bytes]:
    files = {"kernel.py": render(plan).encode()}
    if plan.block_map is not None and plan.block_map.source in ("device", "topk"):
        files["block_map.py"] = render_block_map(plan).encode()  # topk falls back to it
    return files


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
