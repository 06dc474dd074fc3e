"""attn_implementation="attncc" in Hugging Face transformers: a small random-init Llama and
Gemma 2 (window, soft-cap, query_pre_attn_scalar) built from configs (nothing is downloaded),
saved and loaded back with `from_pretrained(..., attn_implementation="attncc")`, then a padded
batch generated greedily with a KV cache, compared with the models' eager attention: the same
token ids, and prompt logits within 1e-4 (fp32). Prints the time of each and the specs attncc
compiled (a few, shared by every layer). `--tokens N` sets the tokens generated (default 8).

On a CPU the kernels run under Triton's interpreter: about a minute of CPU time; on a GPU the
compiled kernels run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded

import transformers  # noqa: E402

import attncc.integrations.transformers as hf_attncc  # noqa: E402  (registers "attncc")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=100, initializer_range=0.2)
CONFIGS = {
    "llama": transformers.LlamaConfig(**SMALL),
    "gemma2": transformers.Gemma2Config(**SMALL, sliding_window=6, attn_logit_softcapping=20.0,
                                        query_pre_attn_scalar=24),
}


def check(name: str, config: transformers.PretrainedConfig, tokens: int) -> bool:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        models = {impl: transformers.AutoModelForCausalLM.from_pretrained(
                      path, attn_implementation=impl).eval().to(DEVICE)
                  for impl in ("eager", "attncc")}
    ids = torch.randint(0, config.vocab_size, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a shorter prompt, left-padded
    results = {}
    for impl, model in models.items():
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False)
        results[impl] = (logits, out, time.perf_counter() - start)
    (ref_logits, ref_ids, t_eager), (logits, ids_out, t_attncc) = results["eager"], results["attncc"]
    valid = mask.bool()
    err = (logits[valid] - ref_logits[valid]).abs().max().item()
    same = torch.equal(ids_out, ref_ids)
    print(f"{name}: prompt logits max |attncc - eager| = {err:.2e}; {tokens} generated tokens "
          f"{'identical' if same else 'DIFFER'}; eager {t_eager:.1f} s, attncc {t_attncc:.1f} s")
    print(f"  generated: {ids_out[:, ids.shape[1]:].tolist()}")
    return same and err <= 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    ok = all([check(name, config, args.tokens) for name, config in CONFIGS.items()])
    print("compiled specs:", *hf_attncc.compiled_specs(), sep="\n  ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
