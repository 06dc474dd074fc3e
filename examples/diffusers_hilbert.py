"""A DiT's self-attention through attncc in diffusers: a tiny random-init DiTTransformer2DModel
(16 x 16 latents in 2 x 2 patches: an 8 x 8 grid of 64 tokens) built from a config, one denoising step
(a DDIM step from t = 500) with diffusers' default processor and with
`attncc.integrations.diffusers.apply` running HilbertA (Hilbert order, tiles of 16 tokens, a
4 x 4 shared centre; tokens kept permuted across layers) and a 3 x 3 neighbourhood
(`reorder="auto"`). Each is compared with attncc's reference for its spec, and the tile
statistics of the spec are printed (16 x 16 tiles, as a GPU kernel's 64 x 64 tiles would see a
larger grid: tiles visited per token order, and the order "auto" picks).

On a CPU the kernels run under Triton's interpreter: well under a minute.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded

import diffusers  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import attncc  # noqa: E402
import attncc.integrations.diffusers as attncc_diffusers  # noqa: E402
from attncc.passes.choose_reorder import cost_table, order_costs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def hilberta(grid):
    return attncc.Attention(mask=attncc.hilberta(*grid, 16, 0, 4), reorder=attncc.hilbert(grid))


def neighbourhood(grid):
    return attncc.Attention(mask=attncc.neighbourhood_2d(*grid, 3, 3), reorder="auto")


def main() -> int:
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval().to(DEVICE)
    grid = attncc_diffusers.latent_grid(dit)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(2)
    t = scheduler.timesteps[0]
    latents = torch.randn(1, 4, 16, 16, device=DEVICE)
    label = torch.tensor([1], device=DEVICE)

    def step() -> torch.Tensor:
        with torch.no_grad():
            eps = dit(latents, timestep=t.reshape(1).to(DEVICE), class_labels=label).sample
        return scheduler.step(eps, t, latents).prev_sample

    for layer in dit.modules():
        if isinstance(layer, Attention):
            layer.set_processor(AttnProcessor2_0())
    default = step()
    attncc_diffusers.apply(dit)  # dense: the same as the default processor
    ok = (err := (step() - default).abs().max().item()) <= 1e-5
    print(f"grid {grid}; dense attncc vs default processor: max |diff| = {err:.2e}")
    for name, spec_for, permuted in (("HilbertA", hilberta, True),
                                     ("3x3 neighbourhood", neighbourhood, False)):
        attncc_diffusers.apply(dit, spec_for, backend="reference")
        ref = step()
        attn = attncc_diffusers.apply(dit, spec_for, permuted=permuted)
        out = step()
        err = (out - ref).abs().max().item()
        ok &= err <= 1e-5
        print(f"\n{name} ({attn.spec.reorder.text() if attn.spec.reorder else 'row-major'}"
              f"{', permuted across layers' if permuted else ''}): max |attncc - reference| = "
              f"{err:.2e}; differs from dense by {(out - default).abs().max().item():.2e}")
        print(cost_table(order_costs(attncc.Attention(mask=spec_for(grid).mask), grid,
                                     tiles=(16, 16))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
