"""attncc as a Hugging Face transformers (5.x) attention implementation.

    import attncc.integrations.transformers  # registers "attncc"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attncc")
    # or: model.set_attn_implementation("attncc") / config._attn_implementation = "attncc"

Importing this module registers the attention function (`hf_attention`) with
`transformers.AttentionInterface` and the mask function (`hf_masks`) with
`AttentionMaskInterface`: transformers 5 builds a custom implementation's mask through the
latter, and attncc's describes the mask (kind, positions, padding) instead of materialising it.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from attncc.integrations.hf_attention import (SpecKey, attncc_attention_forward, compiled_for,
                                              compiled_specs)
from attncc.integrations.hf_masks import MaskGeometry, MaskKind, attncc_mask

__all__ = ["MaskGeometry", "MaskKind", "SpecKey", "attncc_attention_forward", "attncc_mask",
           "compiled_for", "compiled_specs", "register"]


def register(name: str = "attncc") -> str:
    """Register attncc's attention and mask functions under `name` (idempotent); returns it."""
    AttentionInterface.register(name, attncc_attention_forward)
    AttentionMaskInterface.register(name, attncc_mask)
    return name


register()
