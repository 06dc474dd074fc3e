"""The Backend protocol: what a backend provides, per kernel family, to the ops above it.

A backend is one object (`attncc.backends.registry` names them: "reference", "triton"). For each
kernel family it builds a *family object* from what the front end compiled, or raises
`Unsupported` saying why not:

- softmax: `softmax(plan, spec, positions)` -> `SoftmaxFamily` (forward and backward);
- linear recurrence: `linear(node)` -> `LinearFamily` (recurrent / chunked forward, backward);
- serving: `serving(plan)` -> a serving family (plan-time schedule, run-time launches).

A family object launches with bound arguments (tensors already checked, parameters and
captured tensors already bound by `attncc.ops`). `runs_on(device)` says whether the backend's
kernels run on a device (None) or why not. Ahead of time, a backend renders a family's sources,
lists the binaries (`targets`) that a family needs for one signature and arch, builds one target
into an artefact in the disk cache, and loads the artefacts of a family (`precompile`); a
backend without ahead-of-time kernels raises `Unsupported` from these.

The types shared by every backend live here too: `Gradients`, `Unsupported`, `Source`, and
`ServePlan` (what a serving plan holds: the front end makes it, a serving family runs it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

import torch

if TYPE_CHECKING:
    from attncc.ir.linear import LinearState
    from attncc.ir.plan import KernelPlan
    from attncc.ir.positions import Positions
    from attncc.ir.spec import AttentionSpec


class Unsupported(ValueError):
    """A backend has no kernel for this family, spec or device; the message says why."""


@dataclass
class Gradients:
    """dq/dk/dv in the shapes and dtypes of q/k/v (BHSD); `captures` maps the name of each
    captured tensor that was asked for to its gradient (its shape and dtype)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    captures: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """One generated source file of a family: what it is, where the cache keeps it, its text."""

    label: str  # "triton source", "block-map kernel source", ...
    path: str
    text: str


@dataclass
class ServePlan:
    """Everything `run` needs; made by `ServingAttention.plan`. Tensors live on `device`.

    work int32[n_items, 2]: (request, packed row tile); o [B, Hq, q_rows, Dv] (or packed
    [total_q, Hq, Dv] when ragged); lse fp32 like o without Dv; o_part fp32
    [num_splits, rows, Hq, Dv], lse_part fp32 [num_splits, rows, Hq] when num_splits > 1.
    """

    batch: int
    hq: int
    hkv: int
    dqk: int
    dv: int
    dtype: torch.dtype
    device: torch.device
    q_rows: int  # Lq of every request, or total_q when ragged
    ragged_q: bool
    kv_capacity: int  # most keys one request may have (sets the split count)
    num_splits: int
    block_m: int
    block_n: int
    num_warps: int
    work: Tensor
    o: Tensor
    lse: Tensor | None
    o_part: Tensor | None
    lse_part: Tensor | None
    sm_scale: float
    extra: list[Any] = field(repr=False)
    slots: int = 0
    max_q: int = 1  # longest query of one request
    n_stream: int = 0  # K5 compact: streaming kv heads (the full cache holds hkv - n_stream)
    head_map: Tensor | None = None  # K5 compact: int32[Hkv], full index or -1 - compact index
    key: str = ""  # the name attncc::serve_run finds this plan by (`attncc.ops.serving.custom_op`)
    cu_q: Tensor | None = None  # ragged: int32[B + 1], the query offsets the work list is for
    # int64[6] the kernel's index-error record (`attncc.backends.serve_checks`); err_ok = err[:1]
    err: Tensor | None = field(default=None, repr=False)
    err_ok: Tensor | None = field(default=None, repr=False)
    # the backend's own per-plan state for `run` (its launches worked out once per geometry of
    # the run's inputs); empty when made, never read outside the backend
    launches: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.q_rows if self.ragged_q else self.batch * self.q_rows


class SoftmaxFamily(Protocol):
    """The softmax attention kernels of one compiled spec on one backend."""

    name: str
    backend: Backend
    block_maps: Any  # run-time block maps the kernels read, or None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, *, sm_scale: float, params: Mapping[str, float | int],
                tensors: Mapping[str, torch.Tensor], reorder_inputs: Mapping[str, torch.Tensor],
                positions: tuple[torch.Tensor, torch.Tensor] | None, permuted: bool,
                visits: torch.Tensor | None = None) -> None:
        """Write o (q/k/v/o BHSD views, any strides; o in q's dtype) and lse fp32
        [B, Hq, Lq]. `positions`: the reorder's (q, kv) permutations or None; `permuted`: the
        tensors are in the reordered token order already."""

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None, *,
                 sm_scale: float, params: Mapping[str, float | int],
                 tensors: Mapping[str, torch.Tensor],
                 reorder_inputs: Mapping[str, torch.Tensor], grad_captures: Sequence[str],
                 permuted: bool) -> Gradients:
        """Gradients at (q, k, v) given o, lse, do (and dlse); tensors BHSD."""


class LinearFamily(Protocol):
    """The linear-recurrence kernels of one `LinearState` on one backend."""

    name: str
    backend: Backend
    no_backward: str | None  # why there is no backward kernel, or None
    recurrent: Any  # the generated one-token (decode) kernel, or None
    chunked: Any  # the generated chunked (prefill) kernel, or None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                g: torch.Tensor | None, beta: torch.Tensor | None, scale: float | None,
                initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                return_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o, final state or None); shapes as `attncc.ops.linear.compiled`."""

    def backward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *,
                 o: torch.Tensor | None, g: torch.Tensor | None, beta: torch.Tensor | None,
                 scale: float | None, initial_state: torch.Tensor | None,
                 d_final_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None
                 ) -> dict[str, torch.Tensor | None]:
        """{input name: gradient or None} for q, k, v, g, beta, initial_state."""


class ServingFamily(Protocol):
    """The serving kernels of one plan (paged / ragged / dense / persistent / per-head KV) on
    one backend: plan-time choices, then launches that read only tensor metadata."""

    name: str
    backend: Backend
    reads_every_tile: bool  # the mask has no closed-form kv range: every tile up to kv_len

    def check_device(self, device: torch.device) -> None:
        """ValueError unless the kernels run on `device`."""

    def tiles(self, head_dim_max: int, device: torch.device) -> tuple[int, int]:
        """(keys per kv tile, warps) for the largest head dim on `device`."""

    def bound_arguments(self, params: dict[str, Any], tensors: dict[str, Tensor],
                        device: torch.device) -> list[Any]:
        """The spec's parameter values and captured tensors as the kernels take them."""

    def run(self, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor, kv_layout: str,
            inputs: dict[str, Any]) -> None:
        """One run of `plan` into its outputs; raises on bad index inputs (no sync)."""

    def cascade(self, plan: ServePlan, q: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                k: Tensor, v: Tensor, **inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """A shared prefix then each request's suffix, merged by LSE."""


class Backend(Protocol):
    """One backend: its family builders, where it runs, and its ahead-of-time kernels."""

    name: str
    #: runs generated kernels (a candidate for backend="auto"); False for the reference
    compiles: bool

    def runs_on(self, device: torch.device) -> str | None:
        """None when this backend's kernels run on `device`, else why not (one phrase)."""

    # kernel families: build one, or raise Unsupported(why)
    def softmax(self, plan: KernelPlan, spec: AttentionSpec,
                positions: Positions | None) -> SoftmaxFamily: ...

    def linear(self, node: LinearState) -> LinearFamily: ...

    def serving(self, plan: KernelPlan) -> ServingFamily: ...

    # ahead of time: raise Unsupported when the backend has no binaries
    def render(self, family: Any) -> list[Source]:
        """The family's generated sources, as the disk cache keeps them."""

    def targets(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int, arch: int,
                *, backward: bool = False) -> list[Any]:
        """The binaries a call of `family` with this signature needs on sm_<arch>."""

    def build(self, target: Any) -> Any:
        """Load `target`'s artefact from the disk cache, or build it there (for `attncc
        build`); the result says `built` and `seconds`."""

    def precompile(self, family: Any, dtype: Any, head_dim_qk: int, head_dim_v: int | None,
                   arch: int | str | None, *, backward: bool = False) -> Any:
        """Load (or build) every artefact of `family` for one signature; returns the
        forward kernel's artefact."""


def no_ahead_of_time(backend: str) -> Unsupported:
    """The error of a backend that compiles nothing ahead of time."""
    return Unsupported(f"backend {backend!r}: runs no generated kernels, so it has nothing to "
                       "render or build ahead of time")
