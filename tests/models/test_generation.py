"""The recurrent cache against the uncached forward pass, through hand-stepped forwards and through generate()."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, TextStreamer, pipeline

from hf_performer import FEATURE_MAPS, PerformerCache, PerformerForCausalLM
from hf_performer.cache_performer import CACHE_NAME

from helpers import tiny_config

CAUSAL_MAPS = sorted([name for name, cls in FEATURE_MAPS.items() if cls.supports_causal] + ["exact"])


def seeded_lm(seed=0, **overrides):
    torch.manual_seed(seed)
    return PerformerForCausalLM(tiny_config(**overrides)).eval()


def uncached_greedy(model, ids, new_tokens, attention_mask=None):
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("feature_map", CAUSAL_MAPS)
@pytest.mark.parametrize("padded", [False, True])
def test_incremental_decoding_equals_the_full_forward(feature_map, padded):
    model = seeded_lm(feature_map=feature_map)
    ids = torch.randint(3, 97, (3, 21))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0
        mask[2, :13] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    # prefill 9 tokens in one chunked forward, then one token at a time, then a 4-token chunk
    cache = None
    pieces = []
    for start, stop in [(0, 9)] + [(t, t + 1) for t in range(9, 17)] + [(17, 21)]:
        out = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
    stepped = torch.cat(pieces, dim=1)
    real = mask.bool()
    # Sign-changing kernels (identity, rff) can have normalisers near zero, which amplifies float32 rounding.
    signed = feature_map in ("identity", "rff")
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=2e-4 if signed else 1e-5)
    assert cache.get_seq_length() == 21


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_argument_under_either_name_continues_the_sequence(name):
    """transformers 5.24 renamed past_key_values to cache; a model takes both and returns the installed name."""
    model = seeded_lm()
    ids = torch.randint(3, 97, (2, 12))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :7], use_cache=True)
    cache = first[CACHE_NAME]
    assert isinstance(cache, PerformerCache)
    rest = model(ids[:, 7:], use_cache=True, **{name: cache}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], cache=PerformerCache(model.config), past_key_values=PerformerCache(model.config))


def test_activation_checkpointing_refuses_a_filled_cache_and_ignores_an_empty_one():
    """Checkpointing replays each layer in the backward pass: a prefix state would be applied twice."""
    model = seeded_lm(seed=22).train()
    model.activation_checkpointing_enable()
    ids = torch.randint(3, 97, (2, 12))
    reference = model(ids, labels=ids, use_cache=False).loss
    out = model(ids, labels=ids, cache=PerformerCache(model.config))
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference)
    with torch.no_grad():
        filled = model(ids[:, :5], use_cache=True)[CACHE_NAME]
    with pytest.raises(ValueError, match="activation checkpointing replays each layer"):
        model(ids[:, 5:], labels=ids[:, 5:], cache=filled)


def test_cache_memory_is_constant_in_context_length():
    model = seeded_lm()
    sizes = []
    for length in (8, 64, 256):
        out = model(torch.randint(3, 97, (1, length)), use_cache=True)
        sizes.append(out.past_key_values.nbytes())
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_exact_layers_cache_grows_with_context():
    """The A/B softmax model keeps a real KV cache: the contrast to the constant kernel state above."""
    model = seeded_lm(feature_map="exact")
    small = model(torch.randint(3, 97, (1, 8)), use_cache=True).past_key_values.nbytes()
    large = model(torch.randint(3, 97, (1, 64)), use_cache=True).past_key_values.nbytes()
    assert large > small


@pytest.mark.parametrize("feature_map", ["favor+", "relu", "exact", "taylor", "hedgehog"])
def test_greedy_generate_equals_argmax_loop_over_uncached_forwards(feature_map):
    model = seeded_lm(seed=1, feature_map=feature_map)
    ids = torch.randint(3, 97, (2, 7))
    generated = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, uncached_greedy(model, ids, 12))


def test_generate_sees_the_whole_prompt_in_the_first_forward():
    model = seeded_lm(seed=2)
    lengths = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    model.generate(torch.randint(3, 97, (1, 30)), max_new_tokens=5, do_sample=False, eos_token_id=None)
    handle.remove()
    assert lengths == [30, 1, 1, 1, 1]


def test_generate_returns_a_performer_cache():
    model = seeded_lm(seed=3)
    out = model.generate(torch.randint(3, 97, (2, 6)), max_new_tokens=4, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True, output_scores=True)
    assert isinstance(out.past_key_values, PerformerCache)
    assert out.past_key_values.get_seq_length() == 6 + 4 - 1  # the last token is never fed back
    assert len(out.scores) == 4


def test_sampling_with_and_without_cache_agree():
    model = seeded_lm(seed=4)
    ids = torch.randint(3, 97, (2, 5))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                                   use_cache=use_cache, eos_token_id=None))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_with_and_without_cache_agree(num_return_sequences):
    model = seeded_lm(seed=5)
    ids = torch.randint(3, 97, (2, 6))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=num_return_sequences,
                  eos_token_id=None)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_num_return_sequences_with_sampling_and_cache():
    model = seeded_lm(seed=6)
    ids = torch.randint(3, 97, (2, 5))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=3,
                                   use_cache=use_cache, eos_token_id=None))
    assert runs[0].shape == (6, 11) and torch.equal(runs[0], runs[1])


def test_left_padded_batch_generation_equals_per_example_generation():
    model = seeded_lm(seed=8)
    prompts = [torch.randint(3, 97, (n,)) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):])


def test_eos_stops_and_pads_finished_rows():
    model = seeded_lm(seed=9)
    ids = torch.randint(3, 97, (2, 5))
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(free[0, 7])  # the third generated token of row 0 becomes the stop token
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    first_stop = (free[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(stopped[0, : first_stop + 1], free[0, : first_stop + 1])
    assert (stopped[0, first_stop + 1:] == 0).all()


def test_text_streamer_streams_the_generated_text(capsys):
    model = seeded_lm(seed=10, vocab_size=384)
    tokenizer = ByT5Tokenizer()
    ids = tokenizer("Hello", return_tensors="pt").input_ids[:, :-1]  # drop </s>
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tokenizer),
                         eos_token_id=None)
    printed = capsys.readouterr().out
    assert printed.startswith("Hello")
    assert printed.strip() == tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_prefill_chunk_size_equals_single_prefill():
    model = seeded_lm(seed=11)
    ids = torch.randint(3, 97, (1, 40))
    whole = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    chunked = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, prefill_chunk_size=16)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])  # either spelling, whichever transformers uses
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the old name, on purpose
def test_continuing_from_a_returned_cache(name):
    model = seeded_lm(seed=12)
    ids = torch.randint(3, 97, (1, 8))
    first = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    more = model.generate(first.sequences, max_new_tokens=5, do_sample=False, eos_token_id=None,
                          **{name: first[CACHE_NAME]})
    assert torch.equal(more, uncached_greedy(model, ids, 10))


def test_assisted_decoding_is_refused_clearly():
    model, assistant = seeded_lm(seed=13), seeded_lm(seed=14)
    with pytest.raises(ValueError, match="stateful|cropped|rolled back"):
        model.generate(torch.randint(3, 97, (1, 5)), assistant_model=assistant, max_new_tokens=4, do_sample=False)


def test_cache_cannot_be_cropped():
    model = seeded_lm(seed=15)
    cache = model(torch.randint(3, 97, (1, 6)), use_cache=True).past_key_values
    cache.crop(0)  # forgetting nothing is allowed
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(2)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_text_generation_pipeline_on_a_saved_checkpoint(tmp_path, trust_remote_code):
    model = seeded_lm(seed=16, vocab_size=384)
    tokenizer = ByT5Tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=trust_remote_code)
    generator = pipeline("text-generation", model=loaded, tokenizer=tokenizer)
    text = generator("Performer", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tokenizer("Performer", return_tensors="pt").input_ids
    expected = tokenizer.decode(uncached_greedy(model, ids, 8)[0], skip_special_tokens=True)
    assert text.startswith("Performer") and text == expected


def test_pipeline_batches_left_padded_prompts(tmp_path):
    model = seeded_lm(seed=17, vocab_size=384)
    tokenizer = ByT5Tokenizer(padding_side="left")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["a much longer prompt", "hi"]
    batched = generator(prompts, max_new_tokens=6, do_sample=False, batch_size=2)
    alone = [generator(p, max_new_tokens=6, do_sample=False)[0] for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a["generated_text"] for a in alone]


# -- hybrid attention (hybrid_window_size: LoLCATs' sliding window + kernel attention) ---------------------------


def left_padded(rows=3, width=11, pads=(0, 4, 7), seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, 97, (rows, width))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("feature_map, window", [("relu", 1), ("relu", 4), ("relu", 40), ("hedgehog", 4),
                                                 ("taylor", 3)])
def test_hybrid_chunked_prefill_and_single_steps_equal_the_full_forward(feature_map, window):
    model = seeded_lm(seed=20, feature_map=feature_map, hybrid_window_size=window, local_attn_heads=1)
    ids, mask = left_padded(width=21, pads=(0, 6, 13))
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, pieces = None, []
    for start, stop in [(0, 9)] + [(t, t + 1) for t in range(9, 17)] + [(17, 21)]:
        out = model(ids[:, start:stop], attention_mask=mask[:, :stop], use_cache=True, **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        pieces.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], rtol=1e-4, atol=1e-5)


def test_hybrid_generate_greedy_and_beam_equal_uncached_decoding():
    model = seeded_lm(seed=21, feature_map="elu", hybrid_window_size=3)
    ids, mask = left_padded(seed=1)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(greedy, uncached_greedy(model, ids, 10, attention_mask=mask))
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                             prefill_chunk_size=4)
    assert torch.equal(chunked, greedy)
    beam = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                eos_token_id=None)
    assert torch.equal(model.generate(ids, use_cache=True, **beam), model.generate(ids, use_cache=False, **beam))


def test_hybrid_cache_is_constant_in_context_length():
    model = seeded_lm(feature_map="relu", hybrid_window_size=5)
    sizes = [model(torch.randint(3, 97, (1, n)), use_cache=True).past_key_values.nbytes() for n in (8, 64, 256)]
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_optimize_for_decoding_relays_weights_without_changing_what_the_model_computes(tmp_path):
    model = seeded_lm(attention_bias=True, num_key_value_heads=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
    expected_tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert model.optimize_for_decoding() is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # column-major: each weight's output index is its fast one (q, k and v as row blocks of one fused matrix)
    assert linears and all(m.weight.stride(0) == 1 and not m.weight.is_contiguous() for m in linears)
    assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())  # the same numbers
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=8, do_sample=False), expected_tokens)

    model.save_pretrained(tmp_path)  # written in the usual layout, the model keeps its own
    assert all(m.weight.stride(0) == 1 and not m.weight.is_contiguous() for m in linears)
    loaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    assert all(m.weight.is_contiguous() for m in loaded.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)

    model.train()  # it still trains
    model(ids, labels=ids).loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.shape == m.weight.shape for m in linears)
    model.optimize_for_decoding(False)
    assert all(m.weight.is_contiguous() for m in linears)
    assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("kv_heads", [None, 1])  # q and k rotated together; grouped keys and values split
def test_the_fused_qkv_projection_decodes_as_the_three_do_and_steps_aside_when_it_must(monkeypatch, kv_heads):
    from peft import LoraConfig, get_peft_model

    from hf_performer.modeling_performer import FusedProjection

    model = seeded_lm(attention_bias=True, **({} if kv_heads is None else {"num_key_value_heads": kv_heads}))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    calls = []
    fused_call = FusedProjection.__call__
    monkeypatch.setattr(FusedProjection, "__call__", lambda self, x: calls.append(x.shape) or fused_call(self, x))
    model.optimize_for_decoding()
    attention = model.model.layers[0].self_attn
    assert attention.fused_qkv is not None
    assert attention.q_proj.weight.data_ptr() == attention.fused_qkv.weight.data_ptr()  # views, not copies

    expected_tokens = reference.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), expected_tokens)
    assert (1, 1, model.config.hidden_size) in calls  # the decode steps went through the fused matrix
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    calls.clear()  # with autograd on, the three projections run, so their weights get gradients
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    assert not calls
    torch.testing.assert_close(attention.k_proj.weight.grad, reference.model.layers[0].self_attn.k_proj.weight.grad,
                               atol=1e-6, rtol=1e-5)
    model.zero_grad()

    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():  # a wrapped q_proj: the fusion would skip the adapter, so it steps aside
        logits = lora(ids).logits
        without_adapter = reference(ids).logits
    assert attention.fused_qkv is None
    assert (logits - without_adapter).abs().max() > 1e-3
