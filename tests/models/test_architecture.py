"""Architecture options: local heads, positions, TF windowed causal / begin_kernel, block variants."""

import pytest
import torch

from hf_performer import PerformerCache, PerformerForCausalLM, PerformerModel
from hf_performer.ops import naive_kernel_attention

from helpers import kernel_attention_reference, padded_batch, seeded, tiny_config


# -- local heads ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_local_heads_equal_an_explicit_masked_softmax(causal):
    config = tiny_config(causal=causal, local_attn_heads=2, local_window_size=3, num_hidden_layers=1,
                         position_embedding_type="none")
    attn = seeded(PerformerModel, config).layers[0].self_attn
    hidden = torch.randn(2, 11, 32)
    B, N, H, d = 2, 11, 4, 8
    heads = lambda proj: proj(hidden).view(B, N, H, d).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    # global heads 0-1: FAVOR+ through the naive float64 reference
    qf = attn.feature_map.query_features(q[:, :2] * config.qk_scale)
    kf, log_scale = attn.feature_map.key_features(k[:, :2] * config.qk_scale)
    global_out = naive_kernel_attention(qf, kf, v[:, :2], causal=causal, k_log_scale=log_scale)
    # local heads 2-3: dense softmax with a |i - j| < 3 band (and j <= i when causal)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = (i - j).abs() < 3
    if causal:
        allowed &= j <= i
    scores = (q[:, 2:] @ k[:, 2:].transpose(-1, -2)).double() * d**-0.5
    local_out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, 2:].double()
    expected = attn.o_proj(torch.cat([global_out, local_out], 1).float().transpose(1, 2).reshape(B, N, 32))
    torch.testing.assert_close(attn(hidden), expected, rtol=1e-5, atol=1e-5)


def test_local_heads_per_layer_and_all_local():
    config = tiny_config(local_attn_heads=[4, 1], local_window_size=4)
    model = seeded(PerformerForCausalLM, config)
    assert model.model.layers[0].self_attn.feature_map is None  # no global head, no random features
    assert model.model.layers[1].self_attn.num_local_heads == 1
    ids = torch.randint(3, 97, (2, 15))
    assert model(ids).logits.shape == (2, 15, 97)


def test_local_heads_cost_is_linear_not_an_n_by_n_mask():
    """Local heads never build an (N, N) score matrix: the biggest intermediate is (N, ~2 * window)."""
    from hf_performer.local_ops import sliding_window_attention

    q = k = v = torch.randn(1, 1, 4096, 8)
    pos = torch.arange(4096)[None]
    with torch.profiler.profile(profile_memory=True) as prof:
        sliding_window_attention(q, k, v, window=16, causal=True, q_positions=pos, k_positions=pos)
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    assert peak < 4096 * 4096 * 4 / 8, peak  # far below a dense float32 (N, N) matrix


# -- positions ------------------------------------------------------------------------------------------------


def test_rotary_scores_depend_only_on_relative_position():
    from hf_performer.modeling_performer import PerformerRotaryEmbedding, apply_rotary

    rotary = PerformerRotaryEmbedding(tiny_config())
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(p, s):
        cq, sq = rotary(q, torch.tensor([[p]]))
        ck, sk = rotary(k, torch.tensor([[s]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_axial_embedding_equals_its_factorised_construction():
    config = tiny_config(position_embedding_type="axial", max_position_embeddings=24, axial_pos_shape=[4, 6],
                         axial_pos_embds_dim=[20, 12])
    model = seeded(PerformerModel, config)
    axial = model.embed_positions
    assert [tuple(w.shape) for w in axial.weights] == [(4, 20), (6, 12)]
    positions = torch.arange(24)[None]
    table = axial(positions)[0]  # (24, 32)
    for j in range(24):
        expected = torch.cat([axial.weights[0][j % 4], axial.weights[1][j // 4]])
        torch.testing.assert_close(table[j], expected)
    with pytest.raises(ValueError, match="max_position_embeddings=24"):
        model(torch.randint(3, 97, (1, 25)))


def test_absolute_positions_are_added_to_the_embeddings():
    config = tiny_config(position_embedding_type="absolute", num_hidden_layers=1)
    model = seeded(PerformerModel, config)
    ids = torch.randint(3, 97, (1, 6))
    captured = {}
    hook = model.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model(ids)
    hook.remove()
    expected = model.embed_tokens(ids) + model.embed_positions.weight[:6]
    torch.testing.assert_close(captured["x"], expected)


# -- TF KernelAttention options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [None, 0.6])
def test_windowed_causal_training_output_equals_streaming_with_cache(decay):
    config = tiny_config(use_causal_windowed=True, causal_chunk_length=1, causal_window_length=4,
                         causal_window_decay=decay)
    model = seeded(PerformerForCausalLM, config)
    ids, mask = padded_batch()
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        cache, steps = out.past_key_values, steps + [out.logits]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
    assert model.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 23)


def test_windowed_causal_differs_from_global_attention_and_sees_only_its_window():
    config = tiny_config(use_causal_windowed=True, causal_chunk_length=1, causal_window_length=3,
                         num_hidden_layers=1, position_embedding_type="none", shift_tokens=False)
    model = seeded(PerformerForCausalLM, config)
    ids = torch.randint(3, 97, (1, 12))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97
    logits, other = model(ids).logits, model(changed).logits
    # token 2 is inside the windows of queries 2, 3, 4 only (window of 3 tokens, one layer)
    assert (other[0, 2:5] - logits[0, 2:5]).abs().max() > 1e-4
    torch.testing.assert_close(other[0, 5:], logits[0, 5:])


def test_windowed_causal_with_chunks_trains_with_the_default_use_cache_but_refuses_a_cache():
    config = tiny_config(use_causal_windowed=True, causal_chunk_length=4, causal_window_length=2)
    assert config.use_cache  # the default: a plain forward and a training step must not trip over it
    model = seeded(PerformerForCausalLM, config)
    ids = torch.randint(3, 97, (2, 9))
    plain = model(ids, use_cache=False).logits
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, plain)
    assert out.past_key_values is None  # nothing to continue from: chunks attend both ways inside
    with pytest.raises(ValueError, match="causal_chunk_length=4"):
        model(ids, past_key_values=PerformerCache(config))
    # generate() recomputes the whole sequence instead, and agrees with an argmax loop over uncached forwards
    generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    expected = ids[:1]
    for _ in range(4):
        expected = torch.cat([expected, model(expected, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_begin_kernel_positions_equal_exact_softmax():
    kernel = seeded(PerformerForCausalLM, tiny_config(begin_kernel=5))
    exact = PerformerForCausalLM(tiny_config(feature_map="exact")).eval()
    exact.load_state_dict(kernel.state_dict(), strict=False)
    ids, mask = padded_batch(length=14, pads=(0, 3))
    out_kernel = kernel(ids, attention_mask=mask).logits
    out_exact = exact(ids, attention_mask=mask).logits
    for row, pad in enumerate((0, 3)):
        torch.testing.assert_close(out_kernel[row, pad:pad + 5], out_exact[row, pad:pad + 5], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out_kernel[row, pad + 5:], out_exact[row, pad + 5:], atol=1e-4)


def test_begin_kernel_bidirectional_positions_equal_exact_softmax():
    kernel = seeded(PerformerModel, tiny_config(causal=False, begin_kernel=3, num_hidden_layers=1))
    exact = PerformerModel(tiny_config(causal=False, feature_map="exact", num_hidden_layers=1)).eval()
    exact.load_state_dict(kernel.state_dict(), strict=False)
    ids = torch.randint(3, 97, (2, 10))
    a, b = kernel(ids).last_hidden_state, exact(ids).last_hidden_state
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)


def test_scale_by_length_changes_the_temperature_with_the_real_length():
    config = tiny_config(causal=False, scale_by_length=True, num_hidden_layers=1)
    model = seeded(PerformerModel, config)
    ids = torch.randint(3, 97, (1, 8))
    mask = torch.ones_like(ids)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=padded_mask).last_hidden_state[:, :8],
                               model(ids, attention_mask=mask).last_hidden_state, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale_by_length"):
        tiny_config(scale_by_length=True)


# -- cache for every option -------------------------------------------------------------------------------------


OPTIONS = {
    "local heads": dict(local_attn_heads=2, local_window_size=4),
    "token shift": dict(shift_tokens=True),
    "begin_kernel": dict(begin_kernel=6),
    "all local": dict(local_attn_heads=4, local_window_size=3),
    "blocked local + local rotary": dict(local_attn_heads=2, local_window_size=3, local_window_type="blocked",
                                         local_rotary=True, position_embedding_type="absolute"),
    "sinusoid + lm_head bias": dict(sinusoidal_position_embedding=True, lm_head_bias=True, tie_word_embeddings=False),
    "mixed": dict(local_attn_heads=[1, 2], local_window_size=5, shift_tokens=True, ff_glu=True,
                  norm_type="scalenorm"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_incremental_decoding_equals_full_forward_for_each_option(name):
    model = seeded(PerformerForCausalLM, tiny_config(**OPTIONS[name]))
    ids, mask = padded_batch(length=21, pads=(0, 6))
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, pieces = None, []
    for start, stop in [(0, 8)] + [(t, t + 1) for t in range(8, 17)] + [(17, 21)]:
        out = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
        cache, pieces = out.past_key_values, pieces + [out.logits]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], rtol=1e-4, atol=1e-5)


def test_local_and_shift_cache_stays_constant_size():
    model = seeded(PerformerForCausalLM, tiny_config(**OPTIONS["mixed"]))
    sizes = [model(torch.randint(3, 97, (1, n)), use_cache=True).past_key_values.nbytes() for n in (16, 64, 200)]
    assert sizes[0] == sizes[1] == sizes[2]


# -- block variants: train, save, reload ------------------------------------------------------------------------

VARIANTS = {
    "layernorm": dict(),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "scalenorm": dict(norm_type="scalenorm"),
    "rezero": dict(norm_type="rezero"),
    "glu": dict(ff_glu=True, hidden_act="silu"),
    "ff_chunks": dict(ff_chunks=3),
    "shift_tokens": dict(shift_tokens=True),
    "absolute": dict(position_embedding_type="absolute"),
    "axial": dict(position_embedding_type="axial", max_position_embeddings=64, axial_pos_shape=[8, 8],
                  axial_pos_embds_dim=[16, 16]),
    "no positions": dict(position_embedding_type="none"),
    "local heads": dict(local_attn_heads=1, local_window_size=4),
    "windowed causal": dict(use_causal_windowed=True, causal_window_length=4, causal_window_decay=0.9),
    "encoder shift+local": dict(causal=False, shift_tokens=True, local_attn_heads=1, local_window_size=3),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_block_variant_trains_and_round_trips(name, tmp_path):
    config = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = (PerformerForCausalLM if config.causal else PerformerModel)(config).train()
    ids = torch.randint(3, 20, (8, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2 if name == "rezero" else 3e-3)
    losses = []
    for _ in range(15):
        if config.causal:
            loss = model(ids, labels=ids).loss
        else:  # a toy regression on the encoder: predict each token's embedding of the next token
            out = model(ids).last_hidden_state
            loss = (out[:, :-1] - model.embed_tokens(ids[:, 1:]).detach() * 10).pow(2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval().save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    first = model(ids[:2])
    second = reloaded(ids[:2])
    key = "logits" if config.causal else "last_hidden_state"
    assert torch.equal(first[key], second[key])


def test_ff_chunks_do_not_change_the_output():
    a = seeded(PerformerModel, tiny_config(ff_chunks=1))
    b = seeded(PerformerModel, tiny_config(ff_chunks=4))
    ids = torch.randint(3, 97, (2, 13))
    torch.testing.assert_close(a(ids).last_hidden_state, b(ids).last_hidden_state)


def test_mixed_configuration_trains_generates_and_reloads(tmp_path):
    config = tiny_config(hidden_size=64, num_attention_heads=8, local_attn_heads=2, local_window_size=6,
                         position_embedding_type="rotary", ff_glu=True, norm_type="scalenorm", shift_tokens=True)
    torch.manual_seed(0)
    model = PerformerForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 30, (8, 32))
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    prompt = ids[:2, :6]
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    reference = prompt
    for _ in range(10):
        next_token = model(reference, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        reference = torch.cat([reference, next_token], 1)
    assert torch.equal(generated, reference)
    model.save_pretrained(tmp_path)
    reloaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_gradient_checkpointing_with_local_heads_and_shift():
    config = tiny_config(**OPTIONS["mixed"])
    grads = []
    for checkpointing in (False, True):
        model = seeded(PerformerForCausalLM, config, seed=3).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def _rotate(x, positions, theta):
    """RoFormer rotary from its formula, in float64: inv_freq_i = theta ** (-2i / d), angles p * inv_freq repeated
    for both halves, x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1] (the GPT-NeoX / Llama layout)."""
    d = x.shape[-1]
    inv_freq = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    angles = positions.double()[:, None] * inv_freq[None, :]  # (N, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return x.double() * cos + torch.cat([-x2, x1], -1) * sin


def test_local_rotary_rotates_only_the_local_heads():
    """One layer, 2 global (FAVOR+) + 2 local heads, local_rotary: the attention output before o_proj equals an
    independent float64 reference from the captured q, k, v projections: global heads kernel attention on the
    unrotated q, k (feature map + the naive reference), local heads a masked softmax over the window with q and k
    rotated by the documented formula. The global heads are rotation-free: other rotary frequencies change the
    local heads only."""
    config = tiny_config(local_attn_heads=2, local_window_size=4, position_embedding_type="none", local_rotary=True,
                         num_hidden_layers=1)
    model = seeded(PerformerModel, config)
    attn = model.layers[0].self_attn
    captured = {}
    hooks = [getattr(attn, f"{name}_proj").register_forward_hook(
        lambda m, a, out, name=name: captured.__setitem__(name, out)) for name in "qkv"]
    hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0])))
    B, N, H, d = 2, 10, 4, 8
    ids = torch.randint(3, 97, (B, N))
    with torch.no_grad():
        model(ids)
    plain = captured["q"].view(B, N, H, d).transpose(1, 2)
    cos, sin = model.rotary_emb(plain, torch.arange(N)[None])
    from hf_performer.modeling_performer import apply_rotary

    rotated = apply_rotary(plain, cos, sin, first_head=2)
    assert torch.equal(rotated[:, :2], plain[:, :2])
    assert not torch.allclose(rotated[:, 2:, 1:], plain[:, 2:, 1:])

    q, k, v = (captured[name].view(B, N, H, d).transpose(1, 2) for name in "qkv")  # (B, H, N, d), unrotated
    # global heads 0-1: FAVOR+ on unrotated q, k (the model scales q and k by qk_scale before the features)
    global_out = kernel_attention_reference(attn.feature_map, q[:, :2] * config.qk_scale, k[:, :2] * config.qk_scale,
                                            v[:, :2], causal=True)
    # local heads 2-3: softmax over j in (i - 4, i], q and k rotated by their absolute positions
    positions = torch.arange(N)
    theta = config.rope_parameters["rope_theta"]
    q_rot, k_rot = _rotate(q[:, 2:], positions, theta), _rotate(k[:, 2:], positions, theta)
    i, j = positions[:, None], positions[None, :]
    allowed = (j <= i) & (i - j < 4)
    scores = (q_rot @ k_rot.transpose(-1, -2)) * d**-0.5
    local_out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, 2:].double()
    expected = torch.cat([global_out, local_out], 1).transpose(1, 2).reshape(B, N, H * d)
    out = captured["o"]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # the rotation matters for the local heads (without it the reference is far off) ...
    unrotated = (q[:, 2:].double() @ k[:, 2:].double().transpose(-1, -2)) * d**-0.5
    unrotated = (unrotated.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, 2:].double()).transpose(1, 2)
    assert (out.view(B, N, H, d)[:, :, 2:].double() - unrotated).abs().max() > 1e-3

    # ... and only for them: other frequencies leave the global heads bit-identical and move the local ones
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq * 3
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    other = captured["o"].view(B, N, H, d)
    assert torch.equal(other[:, :, :2], out.view(B, N, H, d)[:, :, :2])
    assert (other[:, :, 2:] - out.view(B, N, H, d)[:, :, 2:]).abs().max() > 1e-3


def test_sinusoidal_position_embedding_is_the_fixed_sin_cos_table():
    import math

    config = tiny_config(sinusoidal_position_embedding=True, position_embedding_type="none", num_hidden_layers=1)
    model = seeded(PerformerModel, config)
    captured = {}
    model.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    ids = torch.randint(3, 97, (1, 5))
    model(ids)
    table = torch.tensor([[math.sin(p / 10000 ** (2 * i / 32)) for i in range(16)]
                          + [math.cos(p / 10000 ** (2 * i / 32)) for i in range(16)] for p in range(5)])
    torch.testing.assert_close(captured["x"][0] - model.embed_tokens(ids)[0], table)
