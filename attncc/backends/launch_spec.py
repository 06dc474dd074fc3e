"""What one compiled variant of a kernel takes: every argument's Triton type, the constexpr
values and the pointers it assumes 16-byte aligned.

`attncc build` compiles from a `LaunchSpec` and a GPU process launches the stored binary with the
same one, so the two cannot disagree about the argument list. Triton's JIT would specialise a
launch on its own (alignment, unit strides, 64-bit integers); a launch of a prebuilt binary
has to pick the variant that matches its arguments instead, which `forward_variant` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from attncc.backends.triton_backend import TritonForward
    from attncc.ir.nodes import Schedule

# A launch with contiguous last dims specializes these: 16-byte aligned pointers, unit strides
# (Triton turns an int argument equal to 1 into the constexpr 1).
ALIGNED = ("Q", "K", "V", "O", "LSE", "VISITS")
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")
INT32_MAX = 2**31 - 1
_INT_TYPES = ("i32", "i64")


@dataclass(frozen=True)
class ForwardVariant:
    """How a forward launch is specialised beyond (dtype, head dims, arch)."""

    write_lse: bool = True
    gather_rows: bool = True  # q/k/v/o in the original token order (see TritonForward.launch)
    contiguous: bool = True  # ALIGNED pointers 16-byte aligned, UNIT_STRIDES equal to 1
    wide_ints: bool = False  # an integer argument (a stride, a length) needs 64 bits

    def suffix(self) -> str:
        """"" for the default variant, else e.g. ".strided.i64" (part of the entry's name)."""
        flags = [(not self.write_lse, "nolse"), (not self.gather_rows, "permuted"),
                 (not self.contiguous, "strided"), (self.wide_ints, "i64")]
        return "".join(f".{word}" for on, word in flags if on)


DEFAULT_VARIANT = ForwardVariant()


@dataclass(frozen=True)
class LaunchSpec:
    path: str  # the generated source file
    name: str  # the @triton.jit function in it
    signature: dict[str, str]  # every argument in order; constexprs typed "constexpr"
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]  # pointer arguments assumed 16-byte aligned
    schedule: Schedule  # num_warps / num_stages the binary was compiled with

    def int_arguments(self) -> list[tuple[str, str]]:
        return [(n, t) for n, t in self.signature.items() if t in _INT_TYPES]


def forward_spec(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                 arch: int, variant: ForwardVariant = DEFAULT_VARIANT) -> LaunchSpec:
    """The forward kernel of `forward` for sm_<arch>, one call signature and one variant."""
    from attncc.backends.triton_backend import launch_constexprs
    from attncc.backends.triton_render import fixed_arguments, kernel_arguments
    from attncc.ir.plan import Signature

    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    arguments = fixed_arguments(dtype) + kernel_arguments(forward.plan)
    if variant.wide_ints:
        arguments = [(n, "i64" if t == "i32" else t) for n, t in arguments]
    constexprs = launch_constexprs(sched, head_dim_qk, head_dim_v, variant.write_lse,
                                   variant.gather_rows)
    if variant.contiguous:
        constexprs.update({name: 1 for name in UNIT_STRIDES})
    return LaunchSpec(str(forward.entry.files["kernel.py"]), forward.name,
                      _with_constexprs(arguments, constexprs), constexprs,
                      ALIGNED if variant.contiguous else (), sched)


def block_map_spec(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                   arch: int) -> LaunchSpec:
    """`forward`'s block-map kernel with the tile sizes its forward kernel of (dtype, head dims)
    uses on sm_<arch>; the launch allocates CLASSES, so it is always aligned."""
    from attncc.backends.block_maps import block_map_launch_arguments
    from attncc.backends.triton_render import block_map_arguments, block_map_kernel_name
    from attncc.ir.plan import Signature

    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    arguments = block_map_launch_arguments() + block_map_arguments(forward.plan)
    constexprs = {"BLOCK_M": sched.block_m, "BLOCK_N": sched.block_n}
    launch = dataclasses.replace(sched, num_warps=4, num_stages=1)
    return LaunchSpec(str(forward.entry.files["block_map.py"]), block_map_kernel_name(forward.plan),
                      _with_constexprs(arguments, constexprs), constexprs, ("CLASSES",), launch)


def forward_variant(pointers: Mapping[str, Any], values: Mapping[str, Any], *, write_lse: bool,
                    gather_rows: bool) -> ForwardVariant:
    """The variant a launch needs: `pointers` maps ALIGNED names to tensors, `values` every
    argument by name (the unit strides among them)."""
    contiguous = (all(t.data_ptr() % 16 == 0 for t in pointers.values())
                  and all(values[name] == 1 for name in UNIT_STRIDES))
    wide = any(isinstance(v, int) and not -INT32_MAX - 1 <= v <= INT32_MAX
               for v in values.values())
    return ForwardVariant(write_lse, gather_rows, contiguous, wide)


def check_int_arguments(name: str, arguments: Iterable[tuple[str, str]],
                        values: Mapping[str, Any]) -> None:
    """ValueError naming the first i32 argument whose value needs 64 bits."""
    for arg, kind in arguments:
        if kind == "i32" and not -INT32_MAX - 1 <= values[arg] <= INT32_MAX:
            raise ValueError(f"{name}: argument {arg} = {values[arg]} does not fit the kernel's "
                             "32-bit integer; split the tensor or make it smaller")


def _with_constexprs(arguments: list[tuple[str, str]], constexprs: Mapping[str, Any]
                     ) -> dict[str, str]:
    signature = dict(arguments)
    signature.update({name: "constexpr" for name in constexprs})
    return signature
