"""The maps for linearising a pretrained model (issue 13): ``taylor`` (Based, arXiv 2402.18668) and the trainable
per-head ``hedgehog`` (arXiv 2402.04347, as LoLCATs trains it, arXiv 2410.10254).

References are written here from the papers' formulas: the Taylor kernel 1 + t + t^2 / 2 computed from t = q . k
directly, Hedgehog's features from an einsum and a softmax over the map's parameters, attention from
``helpers.kernel_attention_reference`` / ``naive_kernel_attention``. Then the whole model (cached decoding,
padding, save / reload, checkpoints without the learned parameters) and the ``attn_implementation="performer"``
backend on tiny random Llama (GQA) and BERT models."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from hf_performer import PerformerForCausalLM, PerformerModel
from hf_performer import feature_maps as fm
from hf_performer.attention import KernelOptions, attend
from hf_performer.ops import naive_kernel_attention

from helpers import kernel_attention_reference, padded_batch, seeded, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

LEARNED_MAPS = ["taylor", "hedgehog"]


def qkv(batch=2, heads=3, n=9, s=9, d=5, std=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, d, generator=g) * std, torch.randn(batch, heads, s, d, generator=g) * std,
            torch.randn(batch, heads, s, d, generator=g))


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Move every hedgehog parameter away from its identity start (a map that has been trained)."""
    generator = torch.Generator().manual_seed(seed)
    for feature_map in module.modules():
        if isinstance(feature_map, fm.HedgehogFeatureMap):
            for parameter in feature_map.parameters():
                parameter.add_((torch.randn(parameter.shape, generator=generator) * std).to(parameter))
    return module


def hedgehog_maps(model) -> list[fm.HedgehogFeatureMap]:
    return [m for m in model.modules() if isinstance(m, fm.HedgehogFeatureMap)]


def assert_identity_start(feature_map: fm.HedgehogFeatureMap):
    eye = torch.eye(feature_map.head_dim)[torch.arange(feature_map.feature_dim) % feature_map.head_dim]
    for name in ("query", "key"):
        weight, bias = getattr(feature_map, f"{name}_weight"), getattr(feature_map, f"{name}_bias")
        assert torch.equal(weight.detach().float(), eye.expand_as(weight)), name
        assert torch.equal(bias.detach().float(), torch.zeros_like(bias.float())), name


def hedgehog_reference(x, weight, bias):
    """[softmax(W_h x + b_h), softmax(-(W_h x + b_h))] per head in float64: x (B, H, N, d) -> (B, H, N, 2f)."""
    logits = torch.einsum("bhnd,hfd->bhnf", x.double(), weight.double()) + bias.double()[None, :, None, :]
    return torch.cat([torch.softmax(logits, -1), torch.softmax(-logits, -1)], -1)


# ----------------------------------------------------------------------------------------------------------------
# The maps themselves
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [0.3, 1.0, 3.0])
def test_taylor_kernel_is_one_plus_t_plus_half_t_squared(std):
    d = 6
    feature_map = fm.TaylorFeatureMap(d)
    assert feature_map.num_features == 1 + d + d * (d + 1) // 2 == 28
    q, k, _ = qkv(d=d, std=std)
    phi_q, phi_k = feature_map.kernel_features(q, k)
    assert phi_q.shape[-1] == phi_k.shape[-1] == 28
    t = q.double() @ k.double().transpose(-1, -2)  # (B, H, N, S)
    expected = 1 + t + t * t / 2
    kernel = phi_q.double() @ phi_k.double().transpose(-1, -2)
    # float32 features: rounding scales with the terms' size, |q||k| for the linear and (|q||k|)^2/2 for the square
    norms = q.double().norm(dim=-1).unsqueeze(-1) * k.double().norm(dim=-1).unsqueeze(-2)  # (B, H, N, S)
    assert ((kernel - expected).abs() <= 1e-6 * (1 + norms + norms**2 / 2)).all()
    assert (kernel > 0).all()
    # the minimum of 1 + t + t^2/2 is 1/2, at t = -1: positive everywhere, unlike the features themselves
    x = torch.zeros(1, 1, 1, d)
    x[..., 0] = 1.0
    assert torch.allclose(feature_map.forward_queries(x) @ feature_map.forward_keys(-x).transpose(-1, -2),
                          torch.tensor(0.5))


def test_taylor_approximates_exp_for_small_logits():
    """The second-order series: |exp(t) - (1 + t + t^2/2)| <= |t|^3 e^|t| / 6."""
    feature_map = fm.TaylorFeatureMap(8)
    q, k, _ = qkv(d=8, std=0.3)
    phi_q, phi_k = feature_map.kernel_features(q, k)
    t = q.double() @ k.double().transpose(-1, -2)
    error = (phi_q.double() @ phi_k.double().transpose(-1, -2) - t.exp()).abs()
    assert (error <= t.abs() ** 3 * t.abs().exp() / 6 + 1e-6).all()


@pytest.mark.parametrize("num_features", [None, 6, 16])
def test_hedgehog_features_are_a_per_head_softmax_of_a_linear_map(num_features):
    d, heads = 5, 3
    options = {} if num_features is None else {"num_features": num_features}
    feature_map = perturb(fm.HedgehogFeatureMap(d, num_heads=heads, **options))
    f = d if num_features is None else num_features // 2
    assert feature_map.num_features == 2 * f and feature_map.query_weight.shape == (heads, f, d)
    q, k, _ = qkv(heads=heads, d=d)
    phi_q, phi_k = feature_map.kernel_features(q, k)
    torch.testing.assert_close(phi_q.double(), hedgehog_reference(q, feature_map.query_weight, feature_map.query_bias),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi_k.double(), hedgehog_reference(k, feature_map.key_weight, feature_map.key_bias),
                               rtol=1e-5, atol=1e-6)
    assert (phi_q > 0).all() and (phi_q <= 1).all()
    torch.testing.assert_close(phi_q.sum(-1), torch.full(phi_q.shape[:-1], 2.0))  # two softmaxes
    assert not torch.allclose(phi_q, feature_map.forward_keys(q))  # queries and keys have their own parameters
    # extra leading dimensions ((D, H, L, d) from packed documents is one) broadcast; the heads stay at dim -3
    stacked = feature_map.forward_queries(torch.stack([q, 2 * q]))  # (2, B, H, N, d)
    torch.testing.assert_close(stacked[1], feature_map.forward_queries(2 * q))


def test_hedgehog_starts_at_the_identity_without_drawing_from_the_global_rng():
    state = torch.random.get_rng_state()
    square = fm.HedgehogFeatureMap(4, num_heads=2)
    wide = fm.HedgehogFeatureMap(4, num_heads=2, num_features=12)  # f = 6 > d: e_0 .. e_3, e_0, e_1
    narrow = fm.HedgehogFeatureMap(4, num_heads=2, num_features=4)  # f = 2 < d: e_0, e_1
    assert torch.equal(torch.random.get_rng_state(), state)
    for feature_map in (square, wide, narrow):
        assert_identity_start(feature_map)
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(square.forward_queries(x), torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    assert [type(p) for p in square.parameters()] == [torch.nn.Parameter] * 4
    assert {name for name, _ in square.named_parameters()} == {"query_weight", "query_bias", "key_weight", "key_bias"}


def test_hedgehog_refuses_inputs_with_another_head_count():
    feature_map = fm.HedgehogFeatureMap(4, num_heads=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        feature_map.forward_queries(torch.randn(2, 4, 5, 4))
    with pytest.raises(ValueError, match="num_heads=3"):
        feature_map.forward_keys(torch.randn(5, 4))
    with pytest.raises(NotImplementedError, match="forward_queries"):
        feature_map(torch.randn(2, 3, 5, 4))


def test_only_per_head_maps_get_the_head_count():
    assert fm.HedgehogFeatureMap.per_head and not fm.TaylorFeatureMap.per_head and not fm.FavorPlusFeatureMap.per_head
    assert fm.build_feature_map("hedgehog", 8, num_heads=5).num_heads == 5
    fm.build_feature_map("elu", 8, num_heads=5)  # ignored by maps without per-head parameters
    with pytest.raises(ValueError, match="num_heads"):
        fm.build_feature_map("hedgehog", 8, num_heads=5, options={"num_heads": 2})
    with pytest.raises(ValueError, match="num_heads"):
        fm.build_feature_map("hedgehog", 8)
    attributes = {name: (cls.exponential, cls.supports_causal, cls.is_random) for name, cls in fm.FEATURE_MAPS.items()}
    assert attributes["hedgehog"] == attributes["taylor"] == (False, True, False)


# ----------------------------------------------------------------------------------------------------------------
# Through kernel attention: outputs and gradients against the quadratic reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
@pytest.mark.parametrize("causal", [True, False])
def test_hedgehog_attention_and_its_parameter_gradients_match_the_quadratic_reference(causal, implementation):
    d, heads = 5, 3
    feature_map = perturb(fm.HedgehogFeatureMap(d, num_heads=heads, num_features=8))
    q, k, v = qkv(n=11, s=11, heads=heads, d=d)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    options = KernelOptions(feature_map, causal=causal, chunk_size=4, implementation=implementation)
    out, _ = attend("kernel", q, k, v, mask, None, None, options)  # (B, H, N, d)
    real = mask[:, None, :, None].expand_as(out)  # padded queries of a causal row see no key
    with torch.no_grad():
        expected = kernel_attention_reference(feature_map, q, k, v, causal=causal, key_mask=mask)
    torch.testing.assert_close(out.double()[real], expected[real], rtol=1e-5, atol=1e-6)

    # Gradients: the same loss through the op and through the float64 reference written from the parameters.
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double() * real
    parameters = list(feature_map.parameters())
    grads = torch.autograd.grad((out.double() * weight).sum(), parameters)
    leaves = [p.detach().double().requires_grad_() for p in parameters]
    named = dict(zip([n for n, _ in feature_map.named_parameters()], leaves))
    phi_q = hedgehog_reference(q, named["query_weight"], named["query_bias"])
    phi_k = hedgehog_reference(k, named["key_weight"], named["key_bias"])
    reference = naive_kernel_attention(phi_q, phi_k, v.double(), causal=causal, key_mask=mask)
    expected_grads = torch.autograd.grad((reference * weight).sum(), leaves)
    for name, grad, expected_grad in zip(named, grads, expected_grads):
        assert grad.abs().sum() > 0, name  # every parameter is trained, queries' and keys'
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_taylor_attention_matches_the_quadratic_reference(causal):
    q, k, v = qkv(n=11, s=11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, -3:] = False
    feature_map = fm.TaylorFeatureMap(5)
    q.requires_grad_()
    out, _ = attend("kernel", q, k, v, mask, None, None, KernelOptions(feature_map, causal=causal, chunk_size=4))
    t = q.detach().double() @ k.double().transpose(-1, -2)
    scores = 1 + t + t * t / 2  # (B, H, N, S), given to the reference as "features" against identity keys
    expected = naive_kernel_attention(scores, torch.eye(11, dtype=torch.float64).expand(2, 3, 11, 11), v,
                                      causal=causal, key_mask=mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# The native model
# ----------------------------------------------------------------------------------------------------------------


def lm(feature_map, seed=0, **overrides):
    return perturb(seeded(PerformerForCausalLM, tiny_config(feature_map=feature_map, **overrides), seed), seed)


def test_hedgehog_layers_get_their_kernel_heads_and_keep_the_identity_start():
    config = tiny_config(feature_map="hedgehog", local_attn_heads=[1, 0], local_window_size=3, initializer_range=1.0,
                         is_decoder=True, add_cross_attention=True)
    model = seeded(PerformerForCausalLM, config)
    assert [layer.self_attn.feature_map.num_heads for layer in model.model.layers] == [3, 4]  # 1 local head in layer 0
    assert [layer.cross_attn.feature_map.num_heads for layer in model.model.layers] == [4, 4]  # cross: every head
    for feature_map in hedgehog_maps(model):
        assert_identity_start(feature_map)  # _init_weights did not draw them from N(0, 1)


@pytest.mark.parametrize("feature_map", LEARNED_MAPS)
@pytest.mark.parametrize("overrides", [{}, dict(local_attn_heads=1, local_window_size=4)])
def test_cached_decoding_equals_the_full_forward_and_padding_changes_nothing(feature_map, overrides):
    model = lm(feature_map, **overrides)
    ids, mask = padded_batch(length=14, pads=(0, 5))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, 5:], use_cache=False).logits
        out = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 14):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full[1, 5:], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature_map", LEARNED_MAPS)
def test_bidirectional_model_ignores_right_padding(feature_map):
    model = perturb(seeded(PerformerModel, tiny_config(feature_map=feature_map, causal=False)))
    ids = torch.randint(3, 97, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 9 + [0] * 4])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).last_hidden_state[:, :9],
                                   model(ids).last_hidden_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature_map", LEARNED_MAPS)
def test_save_and_reload_is_exact(feature_map, tmp_path):
    model = lm(feature_map, seed=3)
    model.save_pretrained(tmp_path)
    reloaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    state, loaded = model.state_dict(), reloaded.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[key], loaded[key]) for key in state)
    if feature_map == "hedgehog":
        assert sum("feature_map.query_weight" in key for key in state) == model.config.num_hidden_layers
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_checkpoint_without_hedgehog_parameters_starts_them_at_the_identity(tmp_path):
    """Linearising: a softmax ("exact") checkpoint loaded with feature_map="hedgehog" keeps every weight it has and
    starts the maps at the identity; so does a hedgehog checkpoint that lost some of its map parameters."""
    softmax = seeded(PerformerForCausalLM, tiny_config(feature_map="exact", initializer_range=1.0))
    softmax.save_pretrained(tmp_path / "softmax")
    linear = PerformerForCausalLM.from_pretrained(tmp_path / "softmax", feature_map="hedgehog")
    assert len(hedgehog_maps(linear)) == 2
    for feature_map in hedgehog_maps(linear):
        assert_identity_start(feature_map)
    state = linear.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in softmax.state_dict().items())

    trained = lm("hedgehog", seed=4)
    trained.save_pretrained(tmp_path / "hedgehog")
    weights = load_file(tmp_path / "hedgehog" / "model.safetensors")
    dropped = [key for key in weights if key.startswith("model.layers.0.") and "feature_map.key_" in key]
    assert len(dropped) == 2
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "hedgehog" / "model.safetensors",
              metadata={"format": "pt"})
    partial = PerformerForCausalLM.from_pretrained(tmp_path / "hedgehog")
    first, second = (layer.self_attn.feature_map for layer in partial.model.layers)
    original = trained.model.layers[0].self_attn.feature_map
    assert torch.equal(first.key_weight, torch.eye(8).expand(4, 8, 8)) and torch.equal(first.key_bias, torch.zeros(4, 8))
    assert torch.equal(first.query_weight, original.query_weight)  # the loaded half is kept
    assert torch.equal(second.key_weight, trained.model.layers[1].self_attn.feature_map.key_weight)


# ----------------------------------------------------------------------------------------------------------------
# attn_implementation="performer" on transformers models
# ----------------------------------------------------------------------------------------------------------------


def llama_config(**performer):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.5, pad_token_id=0)
    for key, value in performer.items():
        setattr(config, f"performer_{key}", value)
    return config


def bert_config(**performer):
    config = BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, initializer_range=0.5,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    for key, value in performer.items():
        setattr(config, f"performer_{key}", value)
    return config


def kernels(model):
    return [m.performer_kernel.feature_map for m in model.modules() if hasattr(m, "performer_kernel")]


@pytest.mark.parametrize("host", ["llama", "bert"])
def test_backend_hedgehog_is_per_query_head_trainable_and_reloads_exactly(host, tmp_path):
    cls, make_config = (LlamaForCausalLM, llama_config) if host == "llama" else (BertModel, bert_config)
    torch.manual_seed(0)
    model = cls._from_config(make_config(feature_map="hedgehog", feature_map_kwargs={"num_features": 32}),
                             attn_implementation="performer")
    maps = kernels(model)
    assert len(maps) == 2 and all(isinstance(m, fm.HedgehogFeatureMap) for m in maps)
    assert all(m.num_heads == 4 and m.feature_dim == 16 for m in maps)  # query heads, also with 2 key heads (GQA)
    for feature_map in maps:
        assert_identity_start(feature_map)  # the host's normal_(std=0.5) init left them alone

    ids, mask = torch.randint(3, 96, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    (out.logits if host == "llama" else out.last_hidden_state).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in maps for p in m.parameters())

    perturb(model.eval(), seed=1)
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="performer").eval()
    state, loaded = model.state_dict(), reloaded.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[key], loaded[key]) for key in state)
    assert any("performer_kernel.feature_map.query_weight" in key for key in state)
    with torch.no_grad():
        a, b = model(input_ids=ids, attention_mask=mask), reloaded(input_ids=ids, attention_mask=mask)
        key = "logits" if host == "llama" else "last_hidden_state"
        assert torch.equal(a[key], b[key])


def test_backend_loads_a_softmax_checkpoint_with_hedgehog_at_the_identity(tmp_path):
    torch.manual_seed(0)
    softmax = LlamaForCausalLM(llama_config()).eval()
    softmax.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.performer_feature_map = "hedgehog"
    linear = LlamaForCausalLM.from_pretrained(tmp_path, config=config, attn_implementation="performer").eval()
    maps = kernels(linear)
    assert len(maps) == 2
    for feature_map in maps:
        assert_identity_start(feature_map)
    state = linear.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in softmax.state_dict().items())
    # identity start: phi(x) = [softmax(x), softmax(-x)] of the scaled queries and keys, per head
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(linear(ids).logits).all()


def test_backend_taylor_runs_causal_and_bidirectional():
    torch.manual_seed(0)
    llama = LlamaForCausalLM._from_config(llama_config(feature_map="taylor"), attn_implementation="performer").eval()
    bert = BertModel._from_config(bert_config(feature_map="taylor"), attn_implementation="performer").eval()
    assert all(isinstance(m, fm.TaylorFeatureMap) and m.num_features == 1 + 16 + 136 for m in kernels(llama))
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(llama(ids).logits).all() and torch.isfinite(bert(ids).last_hidden_state).all()
    with pytest.raises((TypeError, ValueError), match="num_features"):
        LlamaForCausalLM._from_config(llama_config(feature_map="taylor", feature_map_kwargs={"num_features": 9}),
                                      attn_implementation="performer")
