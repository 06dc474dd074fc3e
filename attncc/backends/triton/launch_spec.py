"""What one compiled variant of a kernel takes: every argument's Triton type, the constexpr
values, the pointers it assumes 16-byte aligned and the integer strides it assumes multiples of 16.

`attncc build` compiles from a `LaunchSpec` and a GPU process launches the stored binary with the
same one, so the two cannot disagree about the argument list. Triton's JIT would specialise a
launch on its own (alignment, unit strides, integers divisible by 16, 64-bit integers); a launch
of a prebuilt binary has to pick the variant that matches its arguments instead, which
`choose_variant` does. The stride hint is what makes Q/K/V loads vectorised and pipelined: without
it Triton cannot prove a row starts on a 16-byte boundary, so every load is a 2-byte `LDG.E.U16`
and the software pipeline is never built (see docs/performance.md).

The constexpr tables (`launch_constexprs`, `backward_constexprs`) and the block-map kernel's
fixed arguments live here, below the kernel classes that launch with them: the launchers
(`forward`, `backward.kernel`, `block_maps`) and the ahead-of-time compiler (`aot`,
`prebuilt_targets`) all read these one tables, and this module reads the kernel objects only
through the attributes it is handed (`plan`, `plan_for`, `schedule`, `entry`, `name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from attncc.backends.triton.backward import render as backward_render
from attncc.backends.triton.render import (block_map_arguments, block_map_kernel_name,
                                           fixed_arguments, kernel_arguments)
from attncc.ir.nodes import Schedule
from attncc.ir.plan import Signature
from attncc.passes.select_tiles import padded

if TYPE_CHECKING:
    from attncc.backends.triton.forward import TritonForward
    from attncc.backends.triton.backward.kernel import TritonBackward

# A launch with contiguous last dims specializes these: 16-byte aligned pointers, unit strides
# (Triton turns an int argument equal to 1 into the constexpr 1); forward, then backward kernels.
ALIGNED = ("Q", "K", "V", "O", "LSE", "VISITS")
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")
BACKWARD_ALIGNED = ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DK", "DV")
BACKWARD_UNIT_STRIDES = tuple(f"stride_{x}d" for x in ("q", "k", "v", "do", "dq", "dk", "dv"))
# The strides the default variant assumes multiples of 16 (what Triton's JIT would infer), checked
# on the host at every prebuilt launch; a launch with any other value gets the `divisible=False`
# variant, compiled for any strides.
STRIDES = tuple(f"stride_{x}{s}" for x in "qkvo" for s in ("b", "h", "m" if x in "qo" else "n",
                                                             "d"))
BACKWARD_STRIDES = tuple(f"stride_{x}{s}" for x, m in (
    ("q", "m"), ("k", "n"), ("v", "n"), ("do", "m"), ("dq", "m"), ("dk", "n"), ("dv", "n"))
    for s in ("b", "h", m, "d"))
BACKWARD_KERNELS = ("dq", "dkdv")
INT32_MAX = 2**31 - 1
_INT_TYPES = ("i32", "i64")


@dataclass(frozen=True)
class Variant:
    """How a launch is specialised beyond (dtype, head dims, arch); the backward kernels always
    write their gradients, so `write_lse` stays True for them."""

    write_lse: bool = True
    gather_rows: bool = True  # q/k/v/o in the original token order (see TritonForward.launch)
    contiguous: bool = True  # (BACKWARD_)ALIGNED 16-byte aligned, (BACKWARD_)UNIT_STRIDES 1
    wide_ints: bool = False  # an integer argument (a stride, a length) needs 64 bits
    divisible: bool = True  # every (BACKWARD_)STRIDES value that is no constexpr a multiple of 16

    def suffix(self) -> str:
        """"" for the default variant, else e.g. ".strided.i64" (part of the entry's name)."""
        flags = [(not self.write_lse, "nolse"), (not self.gather_rows, "permuted"),
                 (not self.contiguous, "strided"), (self.wide_ints, "i64"),
                 (not self.divisible, "oddstrides")]
        return "".join(f".{word}" for on, word in flags if on)


DEFAULT_VARIANT = Variant()


@dataclass(frozen=True)
class LaunchSpec:
    path: str  # the generated source file
    name: str  # the @triton.jit function in it
    signature: dict[str, str]  # every argument in order; constexprs typed "constexpr"
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]  # pointer arguments assumed 16-byte aligned
    schedule: Schedule  # num_warps / num_stages the binary was compiled with
    divisible: tuple[str, ...] = ()  # integer arguments assumed multiples of 16

    def int_arguments(self) -> list[tuple[str, str]]:
        return [(n, t) for n, t in self.signature.items() if t in _INT_TYPES]


def forward_spec(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                 arch: int, variant: Variant = DEFAULT_VARIANT) -> LaunchSpec:
    """The forward kernel of `forward` for sm_<arch>, one call signature and one variant."""
    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    constexprs = launch_constexprs(sched, head_dim_qk, head_dim_v, variant.write_lse,
                                   variant.gather_rows)
    return _spec(str(forward.entry.files["kernel.py"]), forward.name,
                 fixed_arguments(dtype) + kernel_arguments(forward.plan), constexprs, sched,
                 variant, ALIGNED, UNIT_STRIDES, STRIDES)


def backward_spec(backward: TritonBackward, kernel: str, dtype: str, head_dim_qk: int,
                  head_dim_v: int, arch: int, variant: Variant = DEFAULT_VARIANT) -> LaunchSpec:
    """The backward's `kernel` ("dq" | "dkdv") for sm_<arch>, one call signature and variant."""
    if kernel not in BACKWARD_KERNELS:
        raise ValueError(f"kernel: expected one of {BACKWARD_KERNELS}, got {kernel!r}")
    if not variant.write_lse:
        raise ValueError("the backward kernels have no write_lse=False variant")
    sched = backward.schedule(dtype, head_dim_qk, head_dim_v, f"sm{arch}", kernel)
    constexprs = backward_constexprs(sched, head_dim_qk, head_dim_v,
                                     gather_rows=variant.gather_rows)
    return _spec(str(backward.entry.files["kernel.py"]), f"{backward.name}_{kernel}",
                 backward_render.fixed_arguments(dtype)
                 + backward_render.backward_arguments(backward.plan, backward.loads),
                 constexprs, sched, variant, BACKWARD_ALIGNED, BACKWARD_UNIT_STRIDES,
                 BACKWARD_STRIDES)


def forward_tiles(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                  arch: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of `forward` for one call signature on sm_<arch>."""
    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    return sched.block_m, sched.block_n


def block_map_spec(forward: TritonForward, arch: int, tiles: tuple[int, int]) -> LaunchSpec:
    """`forward`'s block-map kernel for (BLOCK_M, BLOCK_N) = `tiles` on sm_<arch> (the forward's
    or a backward kernel's); the launch allocates CLASSES, so it is always aligned."""
    arguments = block_map_launch_arguments() + block_map_arguments(forward.plan)
    constexprs = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    return LaunchSpec(str(forward.entry.files["block_map.py"]), block_map_kernel_name(forward.plan),
                      _with_constexprs(arguments, constexprs), constexprs, ("CLASSES",),
                      Schedule(block_m=tiles[0], block_n=tiles[1], num_warps=4, num_stages=1))


def launch_constexprs(sched: Schedule, dqk: int, dv: int, write_lse: bool,
                      gather_rows: bool = True) -> dict[str, Any]:
    """The forward kernel's constexprs for a compiled (non-interpreter) launch without visit
    counting; the launcher and the ahead-of-time compiler both use this one table."""
    return {"D_QK": dqk, "D_V": dv, "D_QK_PAD": padded(dqk), "D_V_PAD": padded(dv),
            "BLOCK_M": sched.block_m, "BLOCK_N": sched.block_n,
            "DOT_PRECISION": "tf32" if sched.allow_tf32 else "ieee",
            "UPCAST_DOT": False, "WRITE_LSE": write_lse, "COUNT_VISITS": False,
            "GATHER_ROWS": gather_rows}


def backward_constexprs(sched: Schedule, dqk: int, dv: int, *, upcast_dot: bool = False,
                        gather_rows: bool = True) -> dict[str, Any]:
    """The backward kernels' constexprs; the launcher and the ahead-of-time compiler share it."""
    return {"D_QK": dqk, "D_V": dv, "D_QK_PAD": padded(dqk), "D_V_PAD": padded(dv),
            "BLOCK_M": sched.block_m, "BLOCK_N": sched.block_n,
            "DOT_PRECISION": "tf32" if sched.allow_tf32 else "ieee",
            "UPCAST_DOT": upcast_dot, "GATHER_ROWS": gather_rows}


def block_map_launch_arguments() -> list[tuple[str, str]]:
    """The block-map kernel's fixed arguments, as (name, Triton signature type)."""
    return [("CLASSES", "*i8"), ("cls_stride_b", "i32"), ("cls_stride_h", "i32"),
            ("cls_stride_m", "i32"), ("Gh", "i32"), ("Lq", "i32"), ("Lk", "i32"),
            ("Hq", "i32"), ("Hkv", "i32")]


def choose_variant(values: Mapping[str, Any], aligned: Iterable[str],
                   unit_strides: Iterable[str], strides: Iterable[str] = (), *,
                   write_lse: bool = True, gather_rows: bool = True) -> Variant:
    """The variant a launch needs: `values` names every argument; `aligned` and
    `unit_strides` are the kernel's pointers and strides the contiguous variant specialises,
    `strides` (STRIDES or BACKWARD_STRIDES) those the divisible variant assumes multiples of 16
    (a unit stride of the contiguous variant is a constexpr, so its 1 does not count)."""
    unit_strides = tuple(unit_strides)
    contiguous = True
    for name in unit_strides:
        if values[name] != 1:
            contiguous = False
            break
    if contiguous:
        for name in aligned:
            if values[name].data_ptr() % 16:
                contiguous = False
                break
    divisible = all(values[name] % 16 == 0 for name in strides
                    if not (contiguous and name in unit_strides))
    ints = [v for v in values.values() if type(v) is int]  # bools are constexpr flags
    wide = bool(ints) and (min(ints) < -INT32_MAX - 1 or max(ints) > INT32_MAX)
    return Variant(write_lse, gather_rows, contiguous, wide, divisible)


def check_int_arguments(name: str, arguments: Iterable[tuple[str, str]],
                        values: Mapping[str, Any]) -> None:
    """ValueError naming the first i32 argument whose value needs 64 bits."""
    arguments = list(arguments)
    narrow = [values[arg] for arg, kind in arguments if kind == "i32"]
    if not narrow or -INT32_MAX - 1 <= min(narrow) and max(narrow) <= INT32_MAX:
        return  # all fit (one pass in C); else find the first that does not, for the message
    for arg, kind in arguments:
        if kind == "i32" and not -INT32_MAX - 1 <= values[arg] <= INT32_MAX:
            raise ValueError(f"{name}: argument {arg} = {values[arg]} does not fit the kernel's "
                             "32-bit integer; split the tensor or make it smaller")


def _spec(path: str, name: str, arguments: list[tuple[str, str]], constexprs: dict[str, Any],
          sched: Schedule, variant: Variant, aligned: tuple[str, ...],
          unit_strides: tuple[str, ...], strides: tuple[str, ...]) -> LaunchSpec:
    if variant.wide_ints:
        arguments = [(n, "i64" if t == "i32" else t) for n, t in arguments]
    if variant.contiguous:
        constexprs.update({n: 1 for n in unit_strides})
    divisible = tuple(n for n in strides if n not in constexprs) if variant.divisible else ()
    return LaunchSpec(path, name, _with_constexprs(arguments, constexprs), constexprs,
                      aligned if variant.contiguous else (), sched, divisible)


def _with_constexprs(arguments: list[tuple[str, str]], constexprs: Mapping[str, Any]
                     ) -> dict[str, str]:
    signature = dict(arguments)
    signature.update({name: "constexpr" for name in constexprs})
    return signature
