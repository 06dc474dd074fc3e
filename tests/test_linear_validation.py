"""Bad arguments to the linear-state path fail before any launch, naming the argument, what was
expected and what was given: a non-finite `scale`, and meta tensors (no data: a kernel would
read garbage, and the custom op would route them to its shape-only implementation)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import LinearState

NODE = LinearState("gated_delta")  # reads every optional tensor: g, beta, initial_state
B, H, L, D = 1, 2, 5, 16
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def dense() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    return {"q": q, "k": k, "v": v, "g": -torch.rand(B, H, L, generator=gen),
            "beta": torch.rand(B, H, L, generator=gen),
            "initial_state": torch.zeros(B, H, D, D)}


def packed() -> dict[str, torch.Tensor]:
    x = {n: t[0].transpose(0, 1).contiguous() for n, t in dense().items() if n != "initial_state"}
    x["initial_state"] = torch.zeros(2, H, D, D)
    x["cu_seqlens"] = torch.tensor([0, 2, L], dtype=torch.int32)
    return x


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: the checks must come first."""
    def launched(self, *name):  # the chunked forward's split kernels are asked for by name
        raise AssertionError("launched")
    for cls in (TritonChunkedLinear, TritonRecurrentLinear):
        monkeypatch.setattr(cls, "jit_function", launched)


def api():
    spec = attncc.Attention(memory=attncc.recurrent_state(update="delta", decay="scalar"))
    return attncc.compile(spec)


def runners():
    """Every entry point of the linear path, called as fn(**inputs, scale=...)."""
    attn = api()

    def ref(**x):
        x.pop("cu_seqlens", None)
        return recurrent_reference(x.pop("q"), x.pop("k"), x.pop("v"), NODE, **x)

    def ref_varlen(**x):
        return varlen_reference(x.pop("q"), x.pop("k"), x.pop("v"), NODE, **x)

    return {"api": attn, "api_reference": lambda **x: attn(**x, backend="reference"),
            "chunked": TritonChunkedLinear(NODE), "recurrent": TritonRecurrentLinear(NODE),
            "reference": ref, "reference_varlen": ref_varlen}


RUNNERS = ["api", "api_reference", "chunked", "recurrent", "reference"]


# the dense reference takes no cu_seqlens; the varlen one needs them
SCALE_CASES = [(runner, layout) for runner in RUNNERS + ["reference_varlen"]
               for layout in ("dense", "packed")
               if not runner.startswith("reference")
               or (runner == "reference_varlen") == (layout == "packed")]


@pytest.mark.parametrize("scale", NON_FINITE, ids=str)
@pytest.mark.parametrize("runner,layout", SCALE_CASES)
def test_non_finite_scale_is_rejected(runner, scale, layout, no_launch):
    x = dense() if layout == "dense" else packed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API's reference path warns that it is slow
        with pytest.raises(ValueError, match=r"^scale: expected a finite float or None, got "):
            runners()[runner](**x, scale=scale)


def test_non_finite_scale_tensor_is_rejected(no_launch):
    with pytest.raises(ValueError, match=r"^scale: expected a finite float"):
        api()(**dense(), scale=torch.tensor(float("nan")))


# dense inputs take no cu_seqlens, and neither does the dense reference
META_CASES = [(runner, name, layout) for runner in RUNNERS
              for name in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")
              for layout in ("dense", "packed")
              if not (name == "cu_seqlens" and layout == "dense")
              and not (runner == "reference" and layout == "packed")]


@pytest.mark.parametrize("runner,name,layout", META_CASES)
def test_meta_tensor_is_rejected(runner, name, layout, no_launch):
    x = dense() if layout == "dense" else packed()
    x[name] = x[name].to("meta")
    want = "a cpu or cuda device" if name == "q" else "device cpu (the device of q)"
    if name == "cu_seqlens":
        want = "device cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"^{name}: expected a tensor with data on "
                                             rf"{re.escape(want)}.*got a meta tensor"):
            runners()[runner](**x)


def test_all_meta_inputs_are_rejected_not_shape_propagated(no_launch):
    # every input on meta: the custom op alone would return meta outputs without complaint
    x = {n: t.to("meta") for n, t in dense().items()}
    with pytest.raises(ValueError, match=r"^q: expected a tensor with data .*meta"):
        api()(**x)


def test_valid_call_reaches_the_launch(no_launch):
    # the checks above are not simply failing everything
    with pytest.raises(AssertionError, match="launched"):
        api()(**dense(), scale=0.25)
