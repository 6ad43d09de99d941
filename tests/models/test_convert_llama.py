"""Llama-family decoders as native Performers (hf_performer.convert_llama): with exact attention the converted
model is the host model (logits to float32 precision, GQA, RoPE scaling, Qwen2's biases); with a kernel map it
computes what the host computes with attn_implementation="performer", and decodes at constant memory."""

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_performer import PerformerCache, PerformerForCausalLM, prepare_model_for_performer_attention
from hf_performer.convert_llama import convert_llama_to_performer

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
HOSTS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama_tied_mha": lambda: LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_key_value_heads": 4},
                                                           tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False)),
}


def host(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = HOSTS[name]().eval()
    with torch.no_grad():  # biases start at 0 in transformers' init; make them count
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_exact_attention_conversion_is_the_host_model(name):
    model = host(name)
    performer = convert_llama_to_performer(model, feature_map="exact")
    assert isinstance(performer, PerformerForCausalLM)
    assert performer.config.num_key_value_heads == model.config.num_key_value_heads
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding: positions of the real tokens are the same in both models
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = performer(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("feature_map", ["favor+", "hedgehog"])
def test_kernel_conversion_matches_the_host_running_performer_attention(feature_map):
    model = host("llama", seed=2)
    prepare_model_for_performer_attention(model, feature_map=feature_map, nb_features=32 if feature_map == "favor+" else None)
    with torch.no_grad():  # trained feature maps must travel with the conversion
        for module in model.modules():
            if hasattr(module, "performer_kernel"):
                for parameter in module.performer_kernel.parameters():
                    parameter.add_(0.3 * torch.randn_like(parameter))
    performer = convert_llama_to_performer(model)
    assert performer.config.feature_map == feature_map
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(performer(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_converted_model_decodes_at_constant_memory_and_matches_the_uncached_forward():
    model = host("qwen2", seed=4)
    performer = convert_llama_to_performer(model, feature_map="hedgehog")
    prompt = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generated = performer.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        ids = prompt
        for _ in range(20):  # greedy by full forwards, no cache
            ids = torch.cat([ids, performer(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    sizes = []
    with torch.no_grad():
        cache = PerformerCache(performer.config)
        out = performer(input_ids=prompt, use_cache=True, cache=cache)
        for step in range(30):
            out = performer(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, cache=out.cache)
            sizes.append(sum(layer.attention.nbytes() for layer in out.cache.layers))
    assert len(set(sizes)) == 1  # the state does not grow with the context


def test_conversion_leaves_the_host_unchanged_and_refuses_other_architectures():
    model = host("llama")
    before = copy.deepcopy(model.state_dict())
    convert_llama_to_performer(model, feature_map="favor+")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        convert_llama_to_performer(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)))
    windowed = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=16))
    with pytest.raises(ValueError, match="sliding_window=16"):
        convert_llama_to_performer(windowed)
