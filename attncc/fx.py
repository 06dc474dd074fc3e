"""Make an existing model use attncc: rewrite `scaled_dot_product_attention` calls in an FX graph.

    model = torch.compile(model, backend=attncc.compile_backend())   # or inner="aot_eager"
    report = attncc.replace_sdpa(gm, example_inputs)                  # an FX GraphModule

A call becomes `attncc::attention_fwd` when attncc can say exactly what it computes:
`is_causal=True` (attncc causal; top-left aligned like SDPA when Lq != Lk), no mask, or a
boolean `attn_mask` whose values are known when the graph is rewritten (a constant, a tensor
built from constants in the graph, or a module buffer) and equal an analytic mask: all true,
causal or a sliding window (both bottom-right aligned). Everything else (dropout, float masks,
masks that are inputs, unrecognised patterns, symbolic shapes, other dtypes) stays SDPA, and the
report (also logged at INFO on the `attncc.fx` logger) says why. A module buffer mask is read
once, at rewrite time: changing it in place afterwards is not seen (the report says so).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from attncc.api import Attention
from attncc.api import compile as compile_attention
from attncc.library.masks import causal, sliding_window
from attncc.validate import DTYPES

log = logging.getLogger("attncc.fx")
SDPA = (torch._C._nn.scaled_dot_product_attention,
        torch.nn.functional.scaled_dot_product_attention)
ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
            "enable_gqa": False}


class Skip(Exception):
    """This call stays SDPA; the message is the reason."""


def _top_left_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _val(node: Any) -> Any:
    """A node's example value (dynamo: example_value; export: val; ShapeProp: tensor_meta)."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("example_value", "val", "tensor_meta"):
        if key in node.meta:
            return node.meta[key]
    raise Skip(f"{node.name} has no shape metadata (run on a dynamo graph or pass "
               f"example_inputs)")


def _static_shape(node: fx.Node) -> tuple[int, ...]:
    shape = tuple(_val(node).shape)
    if not all(isinstance(n, int) for n in shape):
        raise Skip(f"{node.name} has a symbolic shape {shape}")
    return shape


def _constant(node: Any, gm: fx.GraphModule, inputs: dict[fx.Node, Any], notes: list[str]
              ) -> Any:
    """The value of `node` if it depends on constants only (module buffers count as constants,
    noted), evaluated now; raises Skip otherwise."""
    if isinstance(node, (list, tuple)):
        return type(node)(_constant(n, gm, inputs, notes) for n in node)
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    if node.op == "placeholder":
        arg = node.meta.get("grapharg")
        source = arg.source.name if arg is not None else node.name
        source = source() if callable(source) else source
        value = inputs.get(node)
        if "_buffers[" not in str(source) or not isinstance(value, torch.Tensor) or \
                isinstance(value, torch._subclasses.FakeTensor):
            raise Skip(f"attn_mask comes from the graph input {source}, whose values can change")
        notes.append(f"buffer {source} read once as a constant mask")
        return value
    if node.op in ("call_function", "call_method"):
        args = _constant(node.args, gm, inputs, notes)
        kwargs = {k: _constant(v, gm, inputs, notes) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    raise Skip(f"attn_mask depends on {node.op} {node.name}")


def recognise_mask(m: torch.Tensor) -> tuple[Any, str]:
    """(attncc mask or None for all-true, description) for a boolean mask [Lq, Lk]; raises Skip
    when it is none of the analytic masks tried (all true, causal, sliding window)."""
    Lq, Lk = m.shape
    if bool(m.all()):
        return None, "no mask (all true)"
    qp = torch.arange(Lq)[:, None] + Lk - Lq
    kv = torch.arange(Lk)[None, :]
    allowed = kv <= qp
    if torch.equal(m, allowed):
        return causal(), "causal"
    w = int(m.sum(-1).max())
    if w >= 1 and torch.equal(m, allowed & (qp - kv < w)):
        return sliding_window(w), f"sliding_window({w})"
    raise Skip("boolean attn_mask is not all-true, causal or a sliding window "
               "(bottom-right aligned)")


def _spec_for(call: dict[str, Any], gm, inputs, notes, Lq: int, Lk: int) -> tuple[Any, str]:
    if call["dropout_p"] != 0.0:
        raise Skip(f"dropout_p={call['dropout_p']} (attncc has no dropout)")
    mask = call["attn_mask"]
    if call["is_causal"]:
        if mask is not None:
            raise Skip("is_causal=True together with attn_mask")
        if Lq == Lk:
            return Attention(mask=causal()), "causal"
        return Attention(mask=_top_left_causal), "causal (top-left, Lq != Lk)"
    if mask is None:
        return Attention(), "no mask"
    value = _constant(mask, gm, inputs, notes)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise Skip(f"attn_mask is {getattr(value, 'dtype', type(value).__name__)}, not a "
                   f"boolean tensor")
    while value.dim() > 2 and value.shape[0] == 1:
        value = value[0]
    if tuple(value.shape) != (Lq, Lk):
        raise Skip(f"attn_mask of shape {tuple(value.shape)} is not one [Lq, Lk] = "
                   f"[{Lq}, {Lk}] mask shared by all batches and heads")
    node_mask, text = recognise_mask(value.cpu())
    return Attention(mask=node_mask), text


def _rewrite(gm: fx.GraphModule, node: fx.Node, inputs, backend: str) -> str:
    call = dict(DEFAULTS)
    call.update(zip(ARGS, node.args))
    call.update(node.kwargs)
    shapes = [_static_shape(call[n]) for n in ("query", "key", "value")]
    if any(len(s) != 4 for s in shapes):
        raise Skip(f"q/k/v shapes {shapes} are not 4-d [B, H, L, D]")
    dtype = _val(call["query"]).dtype
    if dtype not in DTYPES:
        raise Skip(f"dtype {dtype} (attncc takes float16, bfloat16, float32)")
    (_, _, Lq, D), (_, _, Lk, _) = shapes[0], shapes[1]
    notes: list[str] = []
    spec, text = _spec_for(call, gm, inputs, notes, Lq, Lk)
    attn = compile_attention(spec, backend=backend)
    sm_scale = call["scale"] if call["scale"] is not None else 1.0 / math.sqrt(D)
    row = [float(sm_scale)] + [float(p.value) for p in attn.signature.params]
    with gm.graph.inserting_before(node):
        params = gm.graph.call_function(torch.tensor, (row,), {"dtype": torch.float64})
        out = gm.graph.call_function(
            torch.ops.attncc.attention_fwd.default,
            (attn.key, call["query"], call["key"], call["value"], [], params, [], "bhsd",
             False, backend))
        o = gm.graph.call_function(operator.getitem, (out, 0))
    node.replace_all_uses_with(o)
    gm.graph.erase_node(node)
    return "; ".join([f"attncc {text}", *notes])


def replace_sdpa(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None, *,
                 backend: str = "auto") -> list[str]:
    """Rewrite SDPA calls of `gm` in place; returns one line per call: `<node>: attncc ...`
    or `<node>: kept SDPA: <reason>`. `example_inputs` (the graph's inputs, in placeholder
    order) give shapes to graphs without metadata and values to buffer masks."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None and not any("example_value" in n.meta or "val" in n.meta
                                              for n in placeholders):
        from torch.fx.passes.shape_prop import ShapeProp
        ShapeProp(gm).propagate(*example_inputs)
    inputs = dict(zip(placeholders, example_inputs or ()))
    report = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        name = node.name
        try:
            line = f"{name}: {_rewrite(gm, node, inputs, backend)}"
        except Skip as why:
            line = f"{name}: kept SDPA: {why}"
        log.info(line)
        report.append(line)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return report


def compile_backend(inner: str | Callable = "inductor", *, backend: str = "auto") -> Callable:
    """A `torch.compile` backend: `replace_sdpa` on each dynamo graph, then `inner` (a backend
    name or callable). The reports of every graph so far are in the returned function's
    `.reports` list."""
    def compile_fn(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        compile_fn.reports.extend(replace_sdpa(gm, example_inputs, backend=backend))
        fn = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
        return fn(gm, example_inputs)

    compile_fn.reports = []
    return compile_fn
