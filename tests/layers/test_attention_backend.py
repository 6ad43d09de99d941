"""attn_implementation="performer" on stock transformers models (tiny random BERT, GPT-2 and Llama, no downloads).

References are independent of the code under test: the softmax models themselves (sdpa), and a direct O(N^2)
evaluation of sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) written here from the plain feature map.
Run this file as a script to print the error-vs-feature-count table.
"""

import math
import os
import sys
import tempfile

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

from hf_performer import prepare_model_for_performer_attention
from hf_performer.attention_backend import performer_attention_forward, resolve_mask
from hf_performer.cache_performer import CACHE_NAME  # past_key_values before transformers 5.24

if __name__ == "__main__":  # run as a script (the README's table): tests/ holds helpers.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402
from helpers import kernel_attention_reference  # noqa: E402

VOCAB = 96


def llama_config(**extra):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.05, pad_token_id=0, **extra)


def gpt2_config(**extra):
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.05,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, **extra)


def bert_config(**extra):
    return BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, initializer_range=0.05,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **extra)


MODELS = {
    "llama": (LlamaForCausalLM, llama_config, True),
    "gpt2": (GPT2LMHeadModel, gpt2_config, True),
    "bert": (BertModel, bert_config, False),
}


def softmax_model(name, seed=0):
    cls, make_config, _ = MODELS[name]
    torch.manual_seed(seed)
    return cls(make_config()).eval()


def performer_copy(reference, **options):
    """The same weights with kernel attention."""
    cls = type(reference)
    config = type(reference.config).from_dict(reference.config.to_dict())
    for key, value in options.items():
        setattr(config, f"performer_{key}", value)
    model = cls._from_config(config, attn_implementation="performer").eval()
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all("performer_kernel" in key for key in missing)
    return model


def hidden(model, ids, mask, position_ids=None):
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1] if hasattr(out, "hidden_states") and out.hidden_states else out.last_hidden_state


def batch(causal, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    if causal:
        mask[0, :6] = 0  # left padding, as in batched generation
    else:
        mask[0, -6:] = 0  # right padding, as for an encoder
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def feature_count_errors(name, counts=(8, 64, 512)):
    """Relative error of the last hidden states on real tokens, performer vs softmax, for each feature count."""
    reference = softmax_model(name)
    ids, mask = batch(MODELS[name][2])
    real = mask.bool()
    with torch.no_grad():
        target = hidden(reference, ids, mask)[real]
        errors = []
        for count in counts:
            approx = hidden(performer_copy(reference, nb_features=count), ids, mask)[real]
            errors.append(((approx - target).norm() / target.norm()).item())
    return errors


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_approach_softmax_as_features_grow(name):
    errors = feature_count_errors(name)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 3, errors  # Monte-Carlo error ~ 1/sqrt(m): 64x the features, ~8x less error


@pytest.mark.parametrize("causal, q_len, kv_len", [(True, 12, 12), (True, 5, 12), (True, 1, 12), (False, 12, 12)])
def test_function_matches_direct_kernel_evaluation(causal, q_len, kv_len):
    """GQA, scaling, padding, causality and cached prefixes, against the quadratic formula."""
    model = performer_copy(softmax_model("llama"), nb_features=32)
    module = model.model.layers[0].self_attn
    module.is_causal = causal
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, generator=generator)
    k = torch.randn(2, 2, kv_len, 16, generator=generator)  # 2 kv heads shared by 4 query heads
    v = torch.randn(2, 2, kv_len, 16, generator=generator)
    padding = torch.ones(2, kv_len, dtype=torch.bool)
    padding[0, :3] = False
    mask_function = causal_mask_function if causal else (lambda b, h, q_idx, kv_idx: kv_idx >= 0)
    mask = sdpa_mask(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                     mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False)
    scaling = 0.3
    out, weights = performer_attention_forward(module, q, k, v, mask, scaling=scaling)
    assert weights is None and out.shape == (2, q_len, 4, 16)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = kernel_attention_reference(module.performer_kernel.feature_map, q.double(), k.double(), v,
                                          scale=scaling, causal=causal, key_mask=padding)
    expected = expected.transpose(1, 2)  # (B, N, H, d), as attention functions return it
    # queries that see no key at all (left padding) output 0, as the reference says
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_additive_and_2d_masks_agree_with_boolean_masks():
    model = performer_copy(softmax_model("bert"), nb_features=16)
    module = model.encoder.layer[0].attention.self
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, 7:] = False
    boolean = padding[:, None, None, :].expand(2, 1, 10, 10)
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~boolean, torch.finfo(torch.float32).min)
    outputs = [performer_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
               for mask in (boolean, additive, padding.long())]
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])


def test_masks_kernel_attention_cannot_express_are_rejected():
    window = sdpa_mask(batch_size=1, q_length=8, kv_length=8, mask_function=sliding_window_causal_mask_function(3),
                       allow_is_causal_skip=False)
    with pytest.raises(ValueError, match="neither causal nor full"):
        resolve_mask(window, True, 8, 8)
    biased = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="biases"):
        resolve_mask(biased, True, 8, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_does_not_change_real_tokens(name):
    model = performer_copy(softmax_model(name), nb_features=32)
    causal = MODELS[name][2]
    ids, mask = batch(causal)
    positions = (mask.cumsum(-1) - 1).clamp_min(0) if name != "bert" else None
    real = mask[0].bool()
    alone_positions = positions[:1, real] if positions is not None else None
    with torch.no_grad():
        padded = hidden(model, ids, mask, positions)[0, real]
        alone = hidden(model, ids[:1, real], mask[:1, real], alone_positions)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_outputs_do_not_see_the_future(name):
    model = performer_copy(softmax_model(name), nb_features=32)
    ids, _ = batch(True)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_generate_with_dynamic_cache_matches_no_cache():
    """Llama's DynamicCache hands the function all past keys; results must equal recomputing from scratch."""
    model = performer_copy(softmax_model("llama"), nb_features=32)
    prompt, mask = batch(True)
    prompt, mask = prompt[:, :10], mask[:, :10]
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, uncached)
    # A second multi-token chunk on top of a cache (queries after cached keys, materialised mask).
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :9], use_cache=True)
        second = model(ids[:, 9:], use_cache=True, **{CACHE_NAME: first[CACHE_NAME]}).logits
    torch.testing.assert_close(second, full[:, 9:], rtol=1e-4, atol=1e-5)


def test_training_reduces_loss():
    model = performer_copy(softmax_model("gpt2"), nb_features=32).train()
    ids, mask = batch(True)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_and_load_restore_projections_exactly(tmp_path):
    reference = softmax_model("llama")
    reference.save_pretrained(tmp_path / "softmax")
    # A softmax checkpoint has no projections: they are drawn from the seed, as prepare_model... draws them.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "softmax", attn_implementation="performer").eval()
    prepared = prepare_model_for_performer_attention(softmax_model("llama"))
    for a, b in zip(loaded.model.layers, prepared.model.layers):
        assert torch.equal(a.self_attn.performer_kernel.feature_map.projection,
                           b.self_attn.performer_kernel.feature_map.projection)
    # Projections that no seed reproduces must come back from the checkpoint itself.
    for layer in loaded.model.layers:
        layer.self_attn.performer_kernel.draw(seed=12345 + layer.self_attn.layer_idx)
    loaded.save_pretrained(tmp_path / "performer")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "performer", attn_implementation="performer").eval()
    for a, b in zip(loaded.model.layers, reloaded.model.layers):
        assert torch.equal(a.self_attn.performer_kernel.feature_map.projection,
                           b.self_attn.performer_kernel.feature_map.projection)
    ids, mask = batch(True)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


def test_set_attn_implementation_and_config_keys():
    model = softmax_model("gpt2")
    model.config.performer_nb_features = 24
    model.config.performer_feature_map = "relu"
    model.set_attn_implementation("performer")
    ids, _ = batch(True)
    with torch.no_grad():
        model(ids)  # kernels are attached on first use
    feature_map = model.transformer.h[1].attn.performer_kernel.feature_map
    assert type(feature_map).__name__ == "ReluFeatureMap" and feature_map.num_features == 24
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="performer").eval()
    assert reloaded.config.performer_nb_features == 24
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


if __name__ == "__main__":
    counts = (8, 32, 128, 512, 2048)
    print("relative error of last hidden states vs softmax (real tokens, padded batch of 2 x 20)")
    print("model  | " + " | ".join(f"m={m:>5}" for m in counts))
    for model_name in sorted(MODELS):
        print(f"{model_name:6} | " + " | ".join(f"{e:7.4f}" for e in feature_count_errors(model_name, counts)))


def test_bf16_autocast_through_the_backend():
    """The host model's autocast must not push the kernel sums into bf16 (the chunked op refuses mixed dtypes)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("performer")
    ids = torch.randint(0, 64, (2, 70))
    reference = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids).logits
    assert torch.isfinite(mixed).all()
    assert ((mixed.float() - reference).norm() / reference.norm()) < 0.05


# -- performer_window_size: LoLCATs' hybrid attention on the host model --------------------------------------


def hybrid_copy(reference, window, **options):
    return performer_copy(reference, feature_map="elu", window_size=window, **options)


def elu_phi(x):
    return torch.nn.functional.elu(x) + 1.0


@pytest.mark.parametrize("name, feature_map", [("llama", "elu"), ("bert", "elu"), ("llama", "hedgehog")])
def test_a_window_longer_than_the_input_gives_the_softmax_model_back(name, feature_map):
    """With every key in the window the hybrid kind is exact softmax, whatever the mix: the host's sdpa model is
    the reference."""
    reference = softmax_model(name)
    model = performer_copy(reference, feature_map=feature_map, window_size=64)
    ids, mask = batch(MODELS[name][2])
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, ids, mask)[real], hidden(reference, ids, mask)[real],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal, q_len, kv_len", [(True, 12, 12), (True, 1, 12), (True, 4, 12), (False, 12, 12)])
def test_hybrid_function_equals_the_dense_reference(causal, q_len, kv_len):
    model = hybrid_copy(softmax_model("llama" if causal else "bert"), 3)
    module = next(m for m in model.modules() if hasattr(m, "performer_kernel"))
    kernel = module.performer_kernel
    with torch.no_grad():
        kernel.window_factor.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, q_len, 16, generator=generator)
    k, v = torch.randn(2, 4, kv_len, 16, generator=generator), torch.randn(2, 4, kv_len, 16, generator=generator)
    key_mask = torch.ones(2, kv_len, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    k, v = k.masked_fill(~key_mask[:, None, :, None], 1e4), v.masked_fill(~key_mask[:, None, :, None], 1e4)
    out, weights = performer_attention_forward(module, q, k, v, key_mask.long(), scaling=0.2, is_causal=causal)
    expected = helpers.hybrid_attention_reference(
        q, k, v, key_mask, window=3, causal=causal, phi=elu_phi, qk_scale=0.2**0.5, softmax_scale=0.2,
        gate=torch.sigmoid(kernel.window_factor.detach()))
    real = key_mask[:, None, -q_len:].expand(2, 4, q_len)
    assert weights is None
    torch.testing.assert_close(out.transpose(1, 2)[real].double(), expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_hybrid_generate_with_dynamic_cache_matches_no_cache(feature_map):
    model = performer_copy(softmax_model("llama"), feature_map=feature_map, window_size=4)
    prompt, mask = batch(True)
    prompt, mask = prompt[:, :10], mask[:, :10]
    for beams in (1, 2):
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=beams)
        assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_hybrid_window_factor_is_trained_saved_and_starts_at_its_init(tmp_path):
    reference = softmax_model("llama")
    reference.save_pretrained(tmp_path / "softmax")
    config = LlamaConfig.from_pretrained(tmp_path / "softmax")
    config.performer_feature_map, config.performer_window_size = "relu", 4
    # a softmax checkpoint has no window_factor: every layer starts at sigmoid = 0.1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "softmax", config=config,
                                                  attn_implementation="performer").eval()
    for layer in loaded.model.layers:
        factor = layer.self_attn.performer_kernel.window_factor
        assert isinstance(factor, torch.nn.Parameter) and factor.shape == (4,)
        torch.testing.assert_close(torch.sigmoid(factor.detach()), torch.full((4,), 0.1))
    ids, mask = batch(True)
    loaded(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert all(layer.self_attn.performer_kernel.window_factor.grad.abs().sum() > 0 for layer in loaded.model.layers)
    with torch.no_grad():
        for index, layer in enumerate(loaded.model.layers):
            layer.self_attn.performer_kernel.window_factor.copy_(torch.arange(4.0) - index)
    loaded.save_pretrained(tmp_path / "hybrid")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid", attn_implementation="performer").eval()
    assert reloaded.config.performer_window_size == 4
    for index, layer in enumerate(reloaded.model.layers):
        assert torch.equal(layer.self_attn.performer_kernel.window_factor.detach(), torch.arange(4.0) - index)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("options, message", [
    (dict(window_size=4), "performer_window_size=4 needs performer_feature_map in"),  # favor+ by default
    (dict(window_size=-1, feature_map="relu"), "performer_window_size must be an int >= 0"),
])
def test_bad_window_settings_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        prepare_model_for_performer_attention(softmax_model("llama"), **options)
