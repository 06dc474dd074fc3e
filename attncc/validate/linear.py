"""Argument checks of the linear-recurrence family (docs/semantics.md, linear attention), shared
by every backend: dense inputs ([B, H, L, D], `check_inputs`) and packed varlen inputs
([T, H, D] with `cu_seqlens`, `varlen_views`). Each error names the argument, what was expected
and what was given, before anything is launched."""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.ir.linear import LinearState
from attncc.validate import check_device


def shape_of(x: Tensor) -> list[int]:
    return list(x.shape)


def check_tensor(name: str, x: object, shape: list[int], what: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor {what} = {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if shape_of(x) != shape:
        raise ValueError(f"{name}: expected shape {what} = {shape}, got {shape_of(x)}")


def check_axes(name: str, x: object, axes: tuple[str, ...], dims: dict[str, int]) -> None:
    """`check_tensor` for a tensor described by axis names, e.g. ("B", "H", "L")."""
    check_tensor(name, x, [dims[a] for a in axes], "[" + ", ".join(axes) + "]")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
                 beta: Tensor | None, initial_state: Tensor | None,
                 state_name: str = "initial_state") -> None:
    """Raise ValueError naming the argument, what was expected and what was given."""
    if not isinstance(node, LinearState):
        raise ValueError(f"state_node: expected a LinearState, got {type(node).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = shape_of(x) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a floating-point tensor [B, H, L, D], got {got}")
    check_device("q", q)
    check_device("k", k, q.device)
    check_device("v", v, q.device)
    B, H, L, Dk = q.shape
    if shape_of(k) != [B, H, L, Dk]:
        raise ValueError(f"k: expected shape [B, H, L, Dk] = {[B, H, L, Dk]}, got {shape_of(k)}")
    if shape_of(v)[:3] != [B, H, L]:
        raise ValueError(f"v: expected shape [B, H, L, Dv] with [B, H, L] = {[B, H, L]}, "
                         f"got {shape_of(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
    rule = node.rule
    dims = {"B": B, "H": H, "L": L, "Dk": Dk}
    axes = node.input_axes("g")
    if axes is not None:
        check_axes("g", g, axes, dims)
        check_device("g", g, q.device)
        # while torch.compile traces, values are unknown (a data-dependent branch breaks the
        # graph): the backends check them again when the op runs
        if not torch.compiler.is_compiling() and not bool((g <= 0).all()):
            raise ValueError(f"g: expected all entries <= 0 (log of a decay) for rule {rule!r}, "
                             f"got max {g.max().item()}")
    elif g is not None:
        raise ValueError(f"g: expected None for rule {rule!r} (it reads no gate), got a tensor")
    axes = node.input_axes("beta")
    if axes is not None:
        check_axes("beta", beta, axes, dims)
        check_device("beta", beta, q.device)
    elif beta is not None:
        raise ValueError(f"beta: expected None for rule {rule!r} (it reads no beta), got a tensor")
    if isinstance(node.decay, tuple) and len(node.decay) != H:
        raise ValueError(f"decay: expected one value per head (H = {H}), "
                         f"got {len(node.decay)} values")
    if initial_state is not None:
        shape = [B, H, node.feature_dim(Dk), node.state_dv(v.shape[-1])]
        check_tensor(state_name, initial_state, shape, "[B, H, F, Dv']")
        check_device(state_name, initial_state, q.device)


def check_cu_seqlens(cu_seqlens: object, total: int, device: torch.device | None = None) -> int:
    """Raise ValueError unless `cu_seqlens` is a valid int [N + 1] ending at `total`, on the CPU
    or on `device` (the device of q; the kernels copy it there); return N."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = (f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens: expected an int32 or int64 tensor [N + 1], got {got}")
    check_device("cu_seqlens", cu_seqlens,
                 None if device is None or cu_seqlens.device.type == "cpu" else device)
    cu = cu_seqlens.cpu()
    if cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected 0 = cu[0] <= cu[1] <= ... <= cu[N] = T = {total} "
                         f"(tokens in q), got {cu.tolist()}")
    return cu.numel() - 1


def _bhl(x: Tensor | None) -> Tensor | None:
    """[T, H, ...] -> a [1, H, T, ...] view (no copy)."""
    return None if x is None else x.transpose(0, 1).unsqueeze(0)


def _check_packed_shapes(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
                         beta: Tensor | None) -> None:
    """Shape errors in the caller's packed layout, before the [1, H, T, D] views would report
    them in the kernel's."""
    T, H, Dk = q.shape
    if list(k.shape) != [T, H, Dk]:
        raise ValueError(f"k: expected shape [T, H, Dk] = {[T, H, Dk]}, got {list(k.shape)}")
    if list(v.shape[:2]) != [T, H]:
        raise ValueError(f"v: expected shape [T, H, Dv] with [T, H] = {[T, H]}, "
                         f"got {list(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        axes = node.input_axes(name)  # e.g. ("B", "H", "L", "Dk"): packed, [T, H, Dk]
        if axes is not None and x is not None:
            packed = ("T",) + tuple(a for a in axes if a not in ("B", "L"))
            check_axes(name, x, packed, {"T": T, "H": H, "Dk": Dk})


def varlen_views(q: Tensor, k: Tensor, v: Tensor, node: LinearState, g: Tensor | None,
                 beta: Tensor | None, initial_state: Tensor | None, cu_seqlens: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """Check packed inputs; return [1, H, T, D] views of q, k, v (g, beta likewise) and N."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a packed tensor [T, H, D] with cu_seqlens, "
                             f"got {got}")
    check_device("q", q)
    n = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    _check_packed_shapes(q, k, v, node, g, beta)
    qv, kv, vv, gv, bv = _bhl(q), _bhl(k), _bhl(v), _bhl(g), _bhl(beta)
    check_inputs(qv, kv, vv, node, gv, bv, None)  # dtypes, gate signs, decays
    if initial_state is not None:
        _, H, Dk = q.shape
        shape = [n, H, node.feature_dim(Dk), node.state_dv(v.shape[-1])]
        check_tensor("initial_state", initial_state, shape, "[N, H, F, Dv']")
        check_device("initial_state", initial_state, q.device)
    return qv, kv, vv, gv, bv, n
