"""Cross-attention, transformers' way (``is_decoder``, ``add_cross_attention``): a causal Performer decoder attends
to encoder states with bidirectional kernel attention, the encoder's padding removed; ``EncoderDecoderModel`` works
with a Performer or a BERT encoder; while decoding, the encoder side's kernel sums are computed once."""

import pytest
import torch
from transformers import BertConfig, BertModel, EncoderDecoderModel

from hf_performer import PerformerCache, PerformerForCausalLM, PerformerModel
from hf_performer.ops import naive_kernel_attention

from helpers import seeded, tiny_config


def decoder_config(**options):
    return tiny_config(is_decoder=True, add_cross_attention=True, initializer_range=0.2, **options)


def encoder_batch(seed=0, batch=2, length=11, hidden=32):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0  # right padding of the encoder side
    return states, mask


def test_cross_attention_equals_the_float64_reference_and_ignores_encoder_padding():
    model = seeded(PerformerForCausalLM, decoder_config(num_hidden_layers=1))
    layer = model.model.layers[0]
    states, mask = encoder_batch()
    captured = {}
    layer.cross_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("out", args[0]))
    hidden = torch.randn(2, 5, 32)
    layer.cross_attn(hidden, states, mask.bool())
    attn = layer.cross_attn
    split = lambda x: x.view(2, x.shape[1], 4, 8).transpose(1, 2)  # (B, H, L, d)
    q, k, v = split(attn.q_proj(hidden)), split(attn.k_proj(states)), split(attn.v_proj(states))
    scale = model.config.qk_scale
    q_features = attn.feature_map.query_features(q * scale)
    k_features, log_scale = attn.feature_map.key_features(k * scale)
    expected = naive_kernel_attention(q_features, k_features, v, causal=False, k_log_scale=log_scale, key_mask=mask.bool())
    torch.testing.assert_close(captured["out"].double(), expected.transpose(1, 2).reshape(2, 5, 32), rtol=1e-5,
                               atol=1e-6)
    # poisoned padding: what sits in the encoder's padded positions changes nothing
    ids = torch.randint(3, 97, (2, 5))
    poisoned = states.clone()
    poisoned[1, 7:] = 1e3
    clean = model(ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
    torch.testing.assert_close(model(ids, encoder_hidden_states=poisoned, encoder_attention_mask=mask).logits, clean)


@pytest.mark.parametrize("options", [{}, dict(feature_map="exact"), dict(local_attn_heads=1, local_window_size=3,
                                                                        shift_tokens=True),
                                     dict(feature_map="taylor"),  # per-token maps: the encoder side is cached too
                                     dict(feature_map="hedgehog", local_attn_heads=1, local_window_size=3)])
def test_cached_decoding_with_cross_attention_equals_the_uncached_forward(options):
    model = seeded(PerformerForCausalLM, decoder_config(**options))
    states, mask = encoder_batch(1)
    ids = torch.randint(3, 97, (2, 8))
    full = model(ids, encoder_hidden_states=states, encoder_attention_mask=mask, use_cache=False).logits
    calls = []
    for layer in model.model.layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda m, a, out: calls.append(1))
    cache = PerformerCache(model.config)
    steps = [model(ids[:, :3], encoder_hidden_states=states, encoder_attention_mask=mask, past_key_values=cache).logits]
    for t in range(3, 8):
        steps.append(model(ids[:, t:t + 1], encoder_hidden_states=states, encoder_attention_mask=mask,
                           past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers  # the encoder side, once per layer


def encoder_decoder(encoder_kind: str):
    torch.manual_seed(0)
    if encoder_kind == "performer":
        encoder = PerformerModel(tiny_config(causal=False))
    else:
        encoder = BertModel(BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, pad_token_id=0))
    model = EncoderDecoderModel(encoder=encoder, decoder=PerformerForCausalLM(decoder_config())).eval()
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id = 1, 0
    return model


@pytest.mark.parametrize("encoder_kind", ["performer", "bert"])
def test_encoder_decoder_model_trains_and_generates_the_same_with_and_without_cache(encoder_kind):
    model = encoder_decoder(encoder_kind)
    src = torch.randint(3, 97, (2, 11))
    src_mask = torch.ones_like(src)
    src_mask[1, 7:] = 0
    src = src.masked_fill(src_mask == 0, 0)
    labels = torch.randint(3, 97, (2, 6))
    out = model(input_ids=src, attention_mask=src_mask, labels=labels)
    out.loss.backward()
    cross = model.decoder.model.layers[0].cross_attn
    assert cross.k_proj.weight.grad.abs().sum() > 0 and torch.isfinite(out.loss)
    common = dict(attention_mask=src_mask, max_new_tokens=6, do_sample=False, suppress_tokens=[0, 1, 2],
                  repetition_penalty=5.0)
    calls = []
    hook = cross.k_proj.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    greedy = model.generate(src, **common)
    hook.remove()
    assert len(calls) == 1  # the decoder kept the encoder side's kernel sums in its PerformerCache
    assert len(set(greedy[0, 1:].tolist())) > 3  # a real sequence, not one token repeated
    assert not torch.equal(greedy[0], greedy[1])  # driven by the encoder's input
    assert torch.equal(greedy, model.generate(src, use_cache=False, **common))
    beams = model.generate(src, num_beams=3, **common)
    assert torch.equal(beams, model.generate(src, num_beams=3, use_cache=False, **common))


def test_bad_cross_attention_setups_raise_clear_errors():
    model = seeded(PerformerForCausalLM, tiny_config())
    states, mask = encoder_batch()
    with pytest.raises(ValueError, match="add_cross_attention"):
        model(torch.randint(3, 97, (2, 4)), encoder_hidden_states=states)
    with pytest.raises(ValueError, match="favor\\+\\+"):
        tiny_config(add_cross_attention=True, feature_map="favor++", causal=True)
    decoder = seeded(PerformerForCausalLM, decoder_config())
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        decoder(torch.randint(3, 97, (2, 4)), encoder_hidden_states=states, encoder_attention_mask=mask[:, :5])
