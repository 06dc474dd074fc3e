"""Glue between attncc and model libraries: the top layer of the package (it may import
everything below it; nothing in attncc imports it). Each module needs its library installed
(`pip install attncc[hf]`):

- `attncc.integrations.transformers`: registers "attncc" as a transformers attention
  implementation (`attn_implementation="attncc"`);
- `attncc.integrations.diffusers`: an attention processor that runs a DiT's self-attention
  through an attncc spec (HilbertA, neighbourhoods, any reorder).
"""
