"""The process group of a context-parallel module, from a `ProcessGroup` or a `DeviceMesh`
(docs/context_parallel.md, "attncc.nn modules").

A module is built once and called many times, so its arguments are checked when it is built:
a process group and a device mesh together, a mesh of several dimensions without the name of
the context-parallel one, a dimension the mesh does not have, or a sharding / strategy without
any group all raise here, on every rank alike (they read only the arguments, which every rank
passes the same), before any collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from attncc.dist.softmax import STRATEGIES, sharding_for
from attncc.passes.shard_pairs import Sharding

__all__ = ["ContextParallel", "context_parallel_plan"]


@dataclass(frozen=True)
class ContextParallel:
    """What a module's forward hands `context_parallel_attention`."""

    group: Any  # a torch.distributed ProcessGroup
    sharding: Sharding
    strategy: str


def _mesh_group(mesh: Any, mesh_dim: str | int | None) -> Any:
    from torch.distributed.device_mesh import DeviceMesh  # absent from torch without dist
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"device_mesh: expected a torch.distributed DeviceMesh, got "
                        f"{type(mesh).__name__}")
    names = mesh.mesh_dim_names or ()
    if mesh_dim is None:
        if mesh.ndim != 1:
            raise ValueError(f"device_mesh: a mesh of {mesh.ndim} dimensions {tuple(names)} "
                             f"(shape {tuple(mesh.shape)}) needs mesh_dim= naming the "
                             "context-parallel one (or pass mesh['cp'], a 1-D mesh)")
        return mesh.get_group()
    if isinstance(mesh_dim, str):
        if mesh_dim not in names:
            raise ValueError(f"mesh_dim: expected one of the mesh's dimension names "
                             f"{list(names)}, got {mesh_dim!r}")
    elif isinstance(mesh_dim, int) and not isinstance(mesh_dim, bool):
        if not 0 <= mesh_dim < mesh.ndim:
            raise ValueError(f"mesh_dim: expected a dimension index in [0, {mesh.ndim}), "
                             f"got {mesh_dim}")
    else:
        raise TypeError(f"mesh_dim: expected a dimension name or index, got "
                        f"{type(mesh_dim).__name__}")
    return mesh.get_group(mesh_dim)


def context_parallel_plan(process_group: Any = None, device_mesh: Any = None,
                          mesh_dim: str | int | None = None,
                          sharding: str | Sharding | None = None,
                          strategy: str | None = None) -> ContextParallel | None:
    """None (no group: the module runs on whole sequences) or the checked plan: the group
    (`process_group`, or `device_mesh` 1-D or with `mesh_dim`), its `Sharding` ("contiguous"
    when None) and the strategy ("auto" when None)."""
    if process_group is None and device_mesh is None:
        given = [n for n, v in (("mesh_dim", mesh_dim), ("sharding", sharding),
                                ("strategy", strategy)) if v is not None]
        if given:
            raise TypeError(f"{', '.join(given)}: only with process_group= or device_mesh= "
                            "(context parallelism); without either the module runs on whole "
                            "sequences")
        return None
    if process_group is not None and device_mesh is not None:
        raise TypeError("process_group, device_mesh: give one of them (the mesh's dimension "
                        "is the process group), not both")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets it up)")
    if device_mesh is not None:
        group = _mesh_group(device_mesh, mesh_dim)
    else:
        if mesh_dim is not None:
            raise TypeError("mesh_dim: only with device_mesh=, not with process_group=")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group: expected a torch.distributed ProcessGroup, got "
                            f"{type(process_group).__name__}")
        group = process_group
    if dist.get_rank(group) < 0:
        raise ValueError("context parallel: this process is not a member of the group; only "
                         "its members build the module (each holds a slice of the sequence)")
    strategy = "auto" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
    plan = sharding_for("contiguous" if sharding is None else sharding,
                        dist.get_world_size(group))
    return ContextParallel(group, plan, strategy)
