"""attn_implementation="attncc" on tiny random-init transformers models (built from configs:
nothing is downloaded), against the models' own eager attention in fp32: logits of a padded
batch (at its tokens; a padding query's row is meaningless in both) and of an unpadded
sequence within 1e-4, and 8 greedy tokens of `generate` with a KV cache, identical ids. A
counting hook on attncc's kernel entry proves attncc ran on each path (prefill, padded, decode).

Covered: Llama (dynamic and static cache), Mistral (sliding window), Qwen2 (a sliding layer and a
full one), Gemma 2 (window, soft-cap, query_pre_attn_scalar), Gemma 3 (alternating local /
global), GPT-OSS (sinks, alternating windows), BERT (bidirectional, right padding), packed
sequences (position_ids restarting), training gradients, and the errors for what attncc does
not do.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attncc.integrations.transformers as hf_attncc  # noqa: E402  (registers "attncc")
from attncc.ops.softmax import compiled as compiled_module  # noqa: E402
from attncc.ops.softmax import custom_op  # noqa: E402

TOL = 1e-4  # fp32 logits: attncc's kernel vs the model's eager attention
VOCAB, L, NEW = 64, 7, 8
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, initializer_range=0.2)


def _decoder(name: str):
    t = transformers
    two = ["sliding_attention", "full_attention"]
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**SMALL))
    if name == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**SMALL, sliding_window=4))
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=3,
                                                max_window_layers=1, layer_types=two))
    if name == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, sliding_window=4,
                                                  attn_logit_softcapping=3.0,
                                                  query_pre_attn_scalar=12))
    if name == "gemma3":
        return t.Gemma3ForCausalLM(t.Gemma3TextConfig(**SMALL, sliding_window=3,
                                                      query_pre_attn_scalar=12, layer_types=two))
    if name == "gpt_oss":
        model = t.GptOssForCausalLM(t.GptOssConfig(**{**SMALL, "intermediate_size": 32},
                                                   sliding_window=4, num_local_experts=2,
                                                   num_experts_per_tok=1, layer_types=two))
        for layer in model.model.layers:  # sinks that matter (they start at zero)
            layer.self_attn.sinks.data.normal_(0.0, 1.0)
        return model
    raise ValueError(name)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every launch of attncc's softmax kernel entry (`run_forward`, both the direct path and the
    custom op's) as (Lq, Lk, spec tag, the module of the family that runs it)."""
    calls: list[tuple[int, int, str, str]] = []

    def counting(original):
        def run(attn, q, k, v, captures, bound, reorder_inputs, layout, backend, *a, **kw):
            family = attn.family(backend if isinstance(backend, str) else "auto", q.device)
            calls.append((q.shape[2], k.shape[2], attn.spec.tag, type(family).__module__))
            return original(attn, q, k, v, captures, bound, reorder_inputs, layout, backend,
                            *a, **kw)
        return run

    monkeypatch.setattr(compiled_module, "run_forward", counting(compiled_module.run_forward))
    monkeypatch.setattr(custom_op, "run_forward", counting(custom_op.run_forward))
    return calls


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as generate wants for decoders
    return ids, mask


def _run(model, impl: str, fn):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"])
def test_decoder_matches_eager(name, kernel_calls):
    torch.manual_seed(0)
    model = _decoder(name).eval()
    ids, mask = _batch()
    layers = model.config.num_hidden_layers

    def logits(i, m):
        return lambda: model(i, attention_mask=m).logits

    # padded batch: compared at its tokens
    ref = _run(model, "eager", logits(ids, mask))
    out = _run(model, "attncc", logits(ids, mask))
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=TOL, rtol=0)
    assert len(kernel_calls) == layers and all(c[:2] == (L, L) for c in kernel_calls)
    assert all("key_valid" in c[2] and ".triton." in c[3] for c in kernel_calls), kernel_calls

    # one unpadded sequence: every position
    kernel_calls.clear()
    one = ids[1:]
    ref = _run(model, "eager", logits(one, None))
    out = _run(model, "attncc", logits(one, None))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert len(kernel_calls) == layers and not any("key_valid" in c[2] for c in kernel_calls)

    # greedy decode with a KV cache, on the padded batch
    kernel_calls.clear()

    def gen():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              min_new_tokens=NEW)

    ref = _run(model, "eager", gen)
    assert not kernel_calls
    out = _run(model, "attncc", gen)
    assert torch.equal(out, ref), (out, ref)
    decode = [c for c in kernel_calls if c[0] == 1]
    assert len(kernel_calls) == layers * NEW and len(decode) == layers * (NEW - 1)
    longest = 4 if name == "mistral" else L + NEW - 1  # every layer of Mistral keeps a window
    assert max(c[1] for c in decode) == longest  # the cache grew to the last token


def test_static_cache_generate(kernel_calls):
    """A StaticCache hands the layer every slot (max_cache_len); the unwritten ones lie after
    the last query and are cut off before the call."""
    torch.manual_seed(0)
    model = _decoder("llama").eval()
    ids, mask = _batch(1)

    def gen():
        return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              min_new_tokens=4, cache_implementation="static")

    ref = _run(model, "eager", gen)
    out = _run(model, "attncc", gen)
    assert torch.equal(out, ref)
    assert [c[:2] for c in kernel_calls[::2]] == [(L, L), (1, L + 1), (1, L + 2), (1, L + 3)]


def test_bert_bidirectional_with_padding(kernel_calls):
    t = transformers
    torch.manual_seed(0)
    model = t.BertModel(t.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, vocab_size=VOCAB,
                                     initializer_range=0.2)).eval()
    ids, mask = _batch()
    mask = mask.flip(1)  # right padding, as encoders have it

    def hidden(m):
        return lambda: model(ids, attention_mask=m).last_hidden_state

    ref = _run(model, "eager", hidden(mask))
    out = _run(model, "attncc", hidden(mask))
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=TOL, rtol=0)
    assert len(kernel_calls) == 2 and all(c[2] == "full_key_valid_mask" for c in kernel_calls)
    ref = _run(model, "eager", hidden(None))
    out = _run(model, "attncc", hidden(None))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert kernel_calls[-1][2] == "full"


def test_packed_sequences_are_documents(kernel_calls):
    """position_ids restarting inside a row (no padding mask, no cache): transformers detects
    packed sequences, attncc runs them as cu_seqlens documents (the two rows end to end); each
    sequence's logits equal running it alone."""
    torch.manual_seed(0)
    model = _decoder("gemma3").eval()  # a window and a full layer
    lengths = ((3, 5, 4), (7, 5))
    ids = torch.randint(0, VOCAB, (2, 12))
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])

    def packed():
        return model(ids, position_ids=pos, use_cache=False).logits

    ref = _run(model, "eager", packed)
    out = _run(model, "attncc", packed)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert {c[2] for c in kernel_calls} == {"causal_doc", "sw_doc"}
    assert {c[:2] for c in kernel_calls} == {(24, 24)}
    start = 0
    for n in lengths[0]:  # and the documents really are independent
        alone = _run(model, "attncc", lambda: model(ids[:1, start:start + n]).logits)
        torch.testing.assert_close(out[:1, start:start + n], alone, atol=TOL, rtol=0)
        start += n


def test_specs_are_shared_and_values_do_not_recompile():
    """Windows, soft-caps and scales are runtime values: two Gemma 2 models with other values
    reuse the same compiled objects."""
    ids, mask = _batch()
    for window, cap, scalar in ((4, 3.0, 12), (3, 7.0, 20)):
        torch.manual_seed(0)
        t = transformers
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, sliding_window=window,
                                                   attn_logit_softcapping=cap,
                                                   query_pre_attn_scalar=scalar)).eval()
        ref = _run(model, "eager", lambda: model(ids, attention_mask=mask).logits)
        out = _run(model, "attncc", lambda: model(ids, attention_mask=mask).logits)
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=TOL, rtol=0)
        if window == 4:
            before = hf_attncc.compiled_specs()
    after = hf_attncc.compiled_specs()
    assert after == before  # same keys, same objects
    keys = [k for k in after if k.softcap]
    assert {(k.window, k.padded) for k in keys} >= {(True, True), (False, True)}


def test_from_pretrained_with_attncc(tmp_path):
    t = transformers
    torch.manual_seed(0)
    t.LlamaForCausalLM(t.LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    model = t.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attncc").eval()
    assert model.config._attn_implementation == "attncc"
    ids, mask = _batch()
    out = _run(model, "attncc", lambda: model(ids, attention_mask=mask).logits)
    ref = _run(model, "eager", lambda: model(ids, attention_mask=mask).logits)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=TOL, rtol=0)


def test_what_attncc_cannot_do_is_an_error():
    t = transformers
    torch.manual_seed(0)
    cfg = t.LlamaConfig(**SMALL, attention_dropout=0.1)
    model = t.LlamaForCausalLM(cfg)
    model.set_attn_implementation("attncc")
    ids, _ = _batch()
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(ids)
    model.eval()
    with pytest.raises(NotImplementedError, match="4-D|materialised"):
        model(ids, attention_mask=torch.ones(2, 1, L, L, dtype=torch.bool))
    or_mask = transformers.masking_utils.or_masks(
        transformers.masking_utils.causal_mask_function, lambda b, h, q, kv: kv == 0)
    with pytest.raises(NotImplementedError, match="or_masks"):
        hf_attncc.attncc_mask(1, L, L, mask_function=or_mask)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        hf_attncc.attncc_attention_forward(model.model.layers[0].self_attn,
                                           *(torch.zeros(1, 4, L, 8) for _ in range(3)), None,
                                           output_attentions=True)


def test_training_gradients_match_eager(kernel_calls):
    """Without dropout a model trains through attncc's custom op (its backward kernels)."""
    t = transformers
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(**SMALL)).train()
    ids, mask = _batch()
    # a padding query's row is meaningless (no valid key: attncc gives 0, eager a uniform
    # average): no loss on a padding token, nor on the token a padding query predicts
    after_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | after_pad, -100)
    grads = {}
    for impl in ("eager", "attncc"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.model.layers[0].self_attn.parameters()]
    for ref, out in zip(grads["eager"], grads["attncc"]):
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert len(kernel_calls) == 2
