"""attncc.integrations.diffusers on a tiny random-init DiT (DiTTransformer2DModel from a config,
a 6 x 6 latent grid: 36 tokens, 2 layers, 2 heads of 8): the processor with a dense spec matches
diffusers' default processor, and with a neighbourhood or HilbertA spec matches attncc's
reference for that spec (fp32, 1e-5), also with the tokens kept permuted across layers; a
counting hook on the kernel entry shows the Triton kernels ran."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import attncc  # noqa: E402
import attncc.integrations.diffusers as ad  # noqa: E402
from attncc.ops.softmax import compiled as compiled_module  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

TOL = 1e-5  # fp32 model outputs


@pytest.fixture
def dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, sample_size=12, patch_size=2, num_embeds_ada_norm=10).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 12, 12), timestep=torch.tensor([5]),
                  class_labels=torch.tensor([3]))

    def run():
        with torch.no_grad():
            return model(**inputs).sample

    return model, run


@pytest.fixture
def launches(monkeypatch):
    calls: list[str] = []
    original = compiled_module.run_forward

    def run(attn, q, *args, **kw):
        calls.append(type(attn.family(args[-1] if isinstance(args[-1], str) else "auto",
                                      q.device)).__module__)
        return original(attn, q, *args, **kw)

    monkeypatch.setattr(compiled_module, "run_forward", run)
    return calls


def _default(model):
    for layer in model.modules():
        if isinstance(layer, diffusers.models.attention_processor.Attention):
            layer.set_processor(AttnProcessor2_0())


def test_grid_comes_from_the_patching(dit):
    assert ad.latent_grid(dit[0]) == (6, 6)


def test_dense_matches_default_processor(dit, launches):
    model, run = dit
    _default(model)
    ref = run()
    ad.apply(model)
    out = run()
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert len(launches) == 2 and all(".triton." in m for m in launches)


def _neighbourhood(grid):
    return attncc.Attention(mask=attncc.neighbourhood_2d(*grid, 3, 3), reorder="auto")


def _hilberta(grid):
    return attncc.Attention(mask=attncc.hilberta(*grid, 4, 0, 2), reorder=attncc.hilbert(grid))


@pytest.mark.parametrize("spec_for,permuted", [(_neighbourhood, False), (_hilberta, False),
                                               (_hilberta, True)],
                         ids=["neighbourhood-auto", "hilberta", "hilberta-permuted"])
def test_spec_matches_its_reference(dit, launches, spec_for, permuted):
    model, run = dit
    _default(model)
    dense = run()
    ad.apply(model, spec_for, backend="reference")
    ref = run()
    launches.clear()
    fresh = ad.apply(model, spec_for, permuted=permuted)
    out = run()
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert (out - dense).abs().max() > 1e-3  # the spec's mask really restricts attention
    assert len(launches) == 2 and all(".triton." in m for m in launches)
    if permuted:
        assert fresh.spec.reorder is not None
        ad.apply(model, spec_for)  # a second apply takes the first one's token hooks off
        torch.testing.assert_close(run(), ref, atol=TOL, rtol=0)


def test_what_the_processor_does_not_do_is_an_error(dit):
    model, run = dit
    processor = ad.AttnccProcessor(tokens=36)
    layer = next(m for m in model.modules() if isinstance(m, diffusers.models.attention_processor
                                                           .Attention))
    x = torch.randn(1, 36, 16)
    with pytest.raises(NotImplementedError, match="cross-attention"):
        processor(layer, x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="36 tokens"):
        processor(layer, torch.randn(1, 35, 16))
    with pytest.raises(ValueError, match="no token order"):
        ad.apply(model, attncc.Attention(), permuted=True)
