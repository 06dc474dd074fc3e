"""The backend seam (`attncc.backends.base`, `attncc.backends.registry`): the only way from the
front end to a concrete backend is the registry (import rules: tests/test_architecture.py),
"auto" resolves in one place, and every backend answers each family with a family object or an
`Unsupported` error saying why."""

from __future__ import annotations


import pytest
import torch

import attncc
from attncc.backends import registry
from attncc.backends.base import Unsupported

def test_auto_resolves_once_for_every_family(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = registry.resolve("auto", torch.device("cpu"))
    assert cpu == registry.Choice("reference", "CPU tensors and TRITON_INTERPRET is not set; "
                                  "the CUDA backend runs on CUDA tensors only")
    assert registry.resolve("auto", torch.device("meta")).name == "reference"
    assert registry.resolve("reference", torch.device("cpu")) == registry.Choice("reference")
    assert registry.resolve("triton", torch.device("cpu")) == registry.Choice("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.resolve("auto", torch.device("cpu")) == registry.Choice("triton")


def test_names_are_checked_with_one_message():
    assert registry.names() == ("auto", "triton", "cuda", "reference")
    with pytest.raises(ValueError, match=r"^backend: expected one of \('auto', 'triton', "
                                         r"'cuda', 'reference'\), got 'tpu'$"):
        registry.resolve("tpu", torch.device("cpu"))


def test_a_backend_without_a_kernel_says_why():
    spec = attncc.Attention(mask=attncc.causal(), memory=attncc.paged(16))
    attn = attncc.CompiledAttention(spec, backend="reference")
    assert attn.kernels is None and attn.name == "reference"
    why = attn.families["triton"]
    assert isinstance(why, Unsupported)
    assert str(why) == "memory 'paged(page_size=16)' has no kernel yet"
    with pytest.raises(ValueError, match=r"^backend 'triton': memory 'paged\(page_size=16\)' "
                                         r"has no kernel yet; use backend='reference'$"):
        attn.family("triton", torch.device("cpu"))


def test_the_reference_backend_has_nothing_ahead_of_time():
    reference = registry.BACKENDS["reference"]
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    family = attn.families["reference"]
    for call in (lambda: reference.render(family), lambda: reference.build(None),
                 lambda: reference.targets(family, "float16", 64, 64, 90),
                 lambda: reference.precompile(family, "float16", 64, 64, 90)):
        with pytest.raises(Unsupported, match="nothing to render or build ahead of time"):
            call()
    with pytest.raises(Unsupported, match="serving plans launch generated kernels"):
        reference.serving(attn.plan)


def test_a_new_backend_is_one_registry_entry(monkeypatch):
    """The seam is the whole contract: a backend object registered under a new name is
    reachable from `attncc.compile(...)(..., backend=name)` with no change to the front end.
    The toy backend here hands the reference's softmax family out and counts its launches."""
    reference = registry.BACKENDS["reference"]
    launches = []

    class Counting:
        def __init__(self, family):
            self.family, self.name, self.backend = family, "toy", toy

        def __getattr__(self, attr):
            return getattr(self.family, attr)

        def forward(self, *args, **kwargs):
            launches.append(args[0].shape)
            return self.family.forward(*args, **kwargs)

    class Toy:
        name, compiles = "toy", False

        def runs_on(self, device):
            return None

        def softmax(self, plan, spec, positions):
            return Counting(reference.softmax(plan, spec, positions))

        def __getattr__(self, attr):  # the other families: as the reference says
            return getattr(reference, attr)

    toy = Toy()
    monkeypatch.setitem(registry.BACKENDS, "toy", toy)
    attn = attncc.compile(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(5)))
    q, k, v = (torch.randn(1, 2, 13, 8, generator=torch.manual_seed(i)) for i in range(3))
    out = attn(q, k, v, backend="toy")
    assert launches == [(1, 2, 13, 8)]
    torch.testing.assert_close(out, attn(q, k, v, backend="reference"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'triton', 'cuda', "
                                         r"'reference', 'toy'\), got 'tpu'"):
        attn(q, k, v, backend="tpu")
