"""Context parallelism inside models (issue 16, "Integration"), run by tests/test_dist.py's spawn
of 2 gloo processes (interpreter): the `attncc.nn` modules with a process group or a 1-D
DeviceMesh against the same module on the whole sequence in one process, and the strategies
inside `torch.compile` (backend "aot_eager": dynamo + AOT autograd, no inductor) against eager.

Each case returns {what: max abs error / max(1, max |reference|)}; the test holds them to fp32's
1e-4. Parameter gradients of a sharded module are each rank's share: they are all-reduced over
the group (as DDP/FSDP would) before the comparison. Assertions inside a case (the collectives
are in the compiled graphs) fail the case with its traceback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import attncc
from attncc.ir.linear import LinearState

WORLD = 2
H, L, D = 2, 64, 16  # 32 tokens per rank: two head-tail chunks of 16


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    want = want.detach().double()
    return (got.detach().double() - want).abs().max().item() / max(1.0, want.abs().max().item())


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _alibi_attention(**cp: Any) -> attncc.nn.Attention:
    return attncc.nn.Attention(mask=attncc.causal(), score=attncc.alibi(torch.tensor([0.5, 0.25])),
                               learnable=["alibi_slopes"], **cp)


def nn_attention_group(rank: int, group: Any) -> dict[str, float]:
    """nn.Attention(process_group=, head-tail, all-gather) with a learnable ALiBi slope: o, dq,
    dk, dv of this rank's tokens and the slopes' gradient (all-reduced)."""
    sharding = attncc.dist.sharding_for("head-tail", WORLD)
    q, k, v, do = (_randn(1, H, L, D, seed=s) for s in range(4))
    whole = _alibi_attention()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = whole(*ref)
    (o_ref * do).sum().backward()
    cp = _alibi_attention(process_group=group, sharding="head-tail", strategy="all_gather")
    mine = [attncc.dist.shard_sequence(t, sharding, rank).requires_grad_() for t in (q, k, v)]
    o = cp(*mine)
    (o * attncc.dist.shard_sequence(do, sharding, rank)).sum().backward()
    dist.all_reduce(cp.alibi_slopes.grad, group=group)
    assert whole.alibi_slopes.grad.abs().min() > 1, whole.alibi_slopes.grad  # a gradient to check
    errors = {"o": _error(o, attncc.dist.shard_sequence(o_ref, sharding, rank)),
              "dslopes": _error(cp.alibi_slopes.grad, whole.alibi_slopes.grad)}
    for name, t, r in zip("qkv", mine, ref):
        errors[f"d{name}"] = _error(t.grad, attncc.dist.shard_sequence(r.grad, sharding, rank))
    return errors


def nn_mha_mesh(rank: int, group: Any) -> dict[str, float]:
    """MultiHeadAttention (GQA 4:2) on a 1-D DeviceMesh, head-tail, all-to-all: y and dx of
    this rank's tokens ([B, L, E]: the sequence is dimension 1) and every projection's gradient
    (all-reduced over the mesh's group)."""
    E = 32
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    whole = attncc.nn.MultiHeadAttention(E, 4, num_kv_heads=2, mask=attncc.causal())
    cp = attncc.nn.MultiHeadAttention(E, 4, num_kv_heads=2, mask=attncc.causal(),
                                      device_mesh=mesh, sharding="head-tail",
                                      strategy="all_to_all")
    cp.load_state_dict(whole.state_dict())
    sharding = cp.attn.context_parallel.sharding
    x, dy = _randn(1, L, E, seed=5), _randn(1, L, E, seed=6)
    x_ref = x.clone().requires_grad_()
    y_ref = whole(x_ref)
    (y_ref * dy).sum().backward()
    mine = attncc.dist.shard_sequence(x, sharding, rank, dim=1).requires_grad_()
    y = cp(mine)
    (y * attncc.dist.shard_sequence(dy, sharding, rank, dim=1)).sum().backward()
    errors = {"y": _error(y, attncc.dist.shard_sequence(y_ref, sharding, rank, dim=1)),
              "dx": _error(mine.grad, attncc.dist.shard_sequence(x_ref.grad, sharding, rank,
                                                                 dim=1))}
    wants = dict(whole.named_parameters())
    for name, p in cp.named_parameters():
        dist.all_reduce(p.grad, group=mesh.get_group())
        errors[f"d{name}"] = _error(p.grad, wants[name].grad)
    return errors


def _recording(seen: set[str]) -> Any:
    """The aot_eager backend, recording the ops of every graph dynamo hands it."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)
    return backend


def _compiled_against_eager(f: Any, inputs: list[torch.Tensor], grad_o: torch.Tensor,
                            **compile_args: Any) -> tuple[dict[str, float], set[str]]:
    """(errors of o and of each input's gradient, compiled vs eager; the ops in the graphs)."""
    eager = [t.clone().requires_grad_() for t in inputs]
    o_eager = f(*eager)
    (o_eager * grad_o).sum().backward()
    seen: set[str] = set()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=_recording(seen), **compile_args)
    mine = [t.clone().requires_grad_() for t in inputs]
    o = compiled(*mine)
    (o * grad_o).sum().backward()
    errors = {"o": _error(o, o_eager)}
    for i, (t, r) in enumerate(zip(mine, eager)):
        errors[f"d{i}"] = _error(t.grad, r.grad)
    return errors, seen


def compile_softmax(rank: int, group: Any) -> dict[str, float]:
    """torch.compile of both softmax strategies (causal, head-tail, with the agreement step:
    one graph break each) against eager; the all-gather and the all-to-all are graph nodes."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    sharding = attncc.dist.sharding_for("head-tail", WORLD)

    def f(q, k, v):
        cp = attncc.dist.context_parallel_attention
        return (cp(attn, q, k, v, group=group, sharding=sharding, strategy="all_gather")
                + cp(attn, q, k, v, group=group, sharding=sharding, strategy="all_to_all"))
    inputs = [attncc.dist.shard_sequence(_randn(1, H, L, D, seed=s), sharding, rank)
              for s in range(3)]
    errors, seen = _compiled_against_eager(f, inputs, _randn(1, H, L // WORLD, D, seed=9))
    for op in ("all_gather_into_tensor", "all_to_all_single", "attncc.attention_fwd"):
        assert any(op in s for s in seen), (op, sorted(seen))
    return errors


def compile_linear_fullgraph(rank: int, group: Any) -> dict[str, float]:
    """torch.compile(fullgraph=True) of the L3 (scalar gate) state passing with check=False:
    the exchange traces into one graph with the kernels, forward and backward."""
    lin = attncc.compile(attncc.Attention(memory=LinearState("scalar_gate")))
    sharding = attncc.dist.contiguous(WORLD)

    def f(q, k, v, g):
        return attncc.dist.context_parallel_linear(lin, q, k, v, g=g, group=group, check=False)
    whole = [_randn(1, H, L, D, seed=s) for s in range(3)] + [
        -0.3 * torch.rand(1, H, L, 1, generator=torch.Generator().manual_seed(3))]
    inputs = [attncc.dist.shard_sequence(t, sharding, rank) for t in whole]
    inputs[3] = inputs[3].squeeze(-1)
    errors, seen = _compiled_against_eager(f, inputs, _randn(1, H, L // WORLD, D, seed=9), fullgraph=True)
    assert any("all_gather_into_tensor" in s for s in seen), sorted(seen)
    return errors


def default_group(rank: int, group: Any) -> dict[str, float]:
    """The collectives with group=None (the default group): gather_sequence and the
    all-to-all pair (head-tail) give back the whole sequence / this rank's slice."""
    sharding = attncc.dist.sharding_for("head-tail", WORLD)
    x = _randn(1, H, L, D, seed=7)
    mine = attncc.dist.shard_sequence(x, sharding, rank)
    heads = attncc.dist.sequence_to_heads(mine, sharding)
    return {"gather": _error(attncc.dist.gather_sequence(mine, sharding), x),
            "to-heads": _error(heads, x[:, rank:rank + 1]),
            "round-trip": _error(attncc.dist.heads_to_sequence(heads, sharding), mine)}


CASES = {"default-group": default_group, "nn-attention-group": nn_attention_group, "nn-mha-mesh": nn_mha_mesh,
         "compile-softmax": compile_softmax, "compile-linear-fullgraph": compile_linear_fullgraph}


def _compiled_mismatch(rank: int, group: Any) -> None:
    """Rank 1 holds more tokens than rank 0, inside torch.compile: the agreement (eager, one
    graph break) still raises on both ranks before the gather of K and V."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    torch._dynamo.reset()
    f = torch.compile(lambda t: attncc.dist.context_parallel_attention(attn, t, t, t,
                                                                       group=group),
                      backend="aot_eager")
    f(torch.randn(1, 2, 16 + 8 * rank, 16))


def bad_module_calls(rank: int, group: Any) -> dict[str, Any]:
    """Bad context-parallel module arguments, each raising at construction on every rank, and
    mismatched shapes inside torch.compile."""
    mesh_1d = init_device_mesh("cpu", (WORLD,))
    mesh_2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "cp"))
    causal = attncc.causal()
    module = attncc.nn.Attention
    return {
        "nn-mesh-2d": lambda: module(mask=causal, device_mesh=mesh_2d),
        "nn-mesh-dim": lambda: module(mask=causal, device_mesh=mesh_2d, mesh_dim="tp"),
        "nn-group-and-mesh": lambda: module(mask=causal, process_group=group,
                                            device_mesh=mesh_1d),
        "nn-world": lambda: module(mask=causal, process_group=group,
                                   sharding=attncc.dist.contiguous(3)),
        "nn-strategy": lambda: module(mask=causal, process_group=group, strategy="rings"),
        "nn-no-group": lambda: module(mask=causal, sharding="head-tail"),
        "nn-not-a-group": lambda: module(mask=causal, process_group="world"),
        "nn-mesh-2d-named": lambda: module(mask=causal, device_mesh=mesh_2d, mesh_dim="cp"),
        "compile-mismatch": lambda: _compiled_mismatch(rank, group),
    }


# name: the start of what each rank reports ("no error": the module is built)
BAD_MODULES = {
    "nn-mesh-2d": "ValueError: device_mesh: a mesh of 2 dimensions ('dp', 'cp') (shape (1, 2)) "
                  "needs mesh_dim=",
    "nn-mesh-dim": "ValueError: mesh_dim: expected one of the mesh's dimension names "
                   "['dp', 'cp'], got 'tp'",
    "nn-group-and-mesh": "TypeError: process_group, device_mesh: give one of them",
    "nn-world": "ValueError: context parallel: the sharding",
    "nn-strategy": "ValueError: strategy: expected one of",
    "nn-no-group": "TypeError: sharding: only with process_group= or device_mesh=",
    "nn-not-a-group": "TypeError: process_group: expected a torch.distributed ProcessGroup, "
                      "got str",
    "nn-mesh-2d-named": "no error",
    "compile-mismatch": "ValueError: context parallel: ranks hold different q, k, v shapes",
}
