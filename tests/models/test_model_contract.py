"""The model-file contract a transformers maintainer checks: weight init of buffers, dtypes, loss kwargs, tuple
outputs, the cache against redraws, position frequencies. Each test failed before the attention-core rework."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_performer import PerformerCache, PerformerForCausalLM, PerformerForSequenceClassification, PerformerModel
from hf_performer import feature_maps

from helpers import CHECKPOINTS, expected_projection, in_float64, tiny_config



def projections(model) -> dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in model.named_buffers() if name.endswith("feature_map.projection")}


def test_projections_missing_from_a_checkpoint_are_the_ones_a_fresh_model_has(tmp_path):
    source = os.path.join(CHECKPOINTS, "causal_mixed")  # saved with fresh-model projections
    saved = load_file(os.path.join(source, "model.safetensors"))
    kept = {name: tensor for name, tensor in saved.items() if not name.endswith("feature_map.projection")}
    assert len(kept) < len(saved)
    folder = tmp_path / "no_projections"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_bytes(open(os.path.join(source, name), "rb").read())
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    twice = [AutoModelForCausalLM.from_pretrained(folder) for _ in range(2)]
    for name, tensor in saved.items():
        if name.endswith("feature_map.projection"):
            # Bit for bit from one load to the next; against the file, written on another machine, to LAPACK's
            # rounding: the orthogonal blocks come from a QR whose last bits depend on the CPU's vector units
            # (2.4e-7 seen between two Xeons). Another draw would differ by O(1).
            assert torch.equal(twice[0].get_buffer(name), twice[1].get_buffer(name))
            torch.testing.assert_close(twice[0].get_buffer(name), tensor, rtol=1e-5, atol=1e-6)
    expected = load_file(os.path.join(source, "expected.safetensors"))
    with torch.no_grad():
        logits = twice[0](input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_config_with_more_layers_than_the_checkpoint_draws_the_new_layers_from_the_seed():
    source = os.path.join(CHECKPOINTS, "causal_favor")
    model = AutoModelForCausalLM.from_pretrained(source, num_hidden_layers=3)
    saved = load_file(os.path.join(source, "model.safetensors"))
    name = "model.layers.0.self_attn.feature_map.projection"
    assert torch.equal(model.get_buffer(name), saved[name])  # loaded, not redrawn
    new = model.get_buffer("model.layers.2.self_attn.feature_map.projection")
    assert torch.equal(new, expected_projection(model.config, 2))
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        logits = model(ids).logits
        reference = in_float64(model)(ids).logits  # the new layer's projection is used like the loaded ones
    assert torch.isfinite(logits).all()
    assert (logits.double() - reference).abs().max() < 1e-5 * reference.abs().max()
    config = model.config
    fresh = AutoModelForCausalLM.from_config(config).eval()  # draws every layer from the seed
    fresh.load_state_dict({name: t for name, t in model.state_dict().items()
                           if not name.startswith("model.layers.2.self_attn.feature_map")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, logits, rtol=1e-6, atol=1e-6)


def test_fresh_models_draw_each_projection_once_from_the_seed_not_from_the_global_rng(monkeypatch):
    calls = []
    original = feature_maps.gaussian_projection
    monkeypatch.setattr(feature_maps, "gaussian_projection", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = tiny_config(num_hidden_layers=3)
    torch.manual_seed(0)
    first = PerformerForCausalLM(config)
    assert len(calls) == config.num_hidden_layers
    torch.manual_seed(123)  # other weights change with the global seed, the features do not
    second = PerformerForCausalLM(config)
    for (name, a), b in zip(projections(first).items(), projections(second).values()):
        layer = int(name.split(".")[2])
        assert torch.equal(a, b) and torch.equal(a, expected_projection(config, layer))


def test_building_in_half_precision_works_on_cpu_and_draws_in_float32():
    config = tiny_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    projection = model.get_buffer("model.layers.1.self_attn.feature_map.projection")
    assert projection.dtype == torch.float16
    torch.testing.assert_close(projection, expected_projection(config, 1).half(), rtol=0, atol=0)


def test_shift_labels_reach_the_loss():
    model = PerformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    shift_labels = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, shift_labels=shift_labels)
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), shift_labels.flatten())
    torch.testing.assert_close(out.loss, manual)
    other_labels = model(ids, labels=torch.zeros_like(ids), shift_labels=shift_labels).loss
    torch.testing.assert_close(other_labels, out.loss)


@pytest.mark.parametrize("model_class", [PerformerModel, PerformerForCausalLM, PerformerForSequenceClassification])
def test_return_dict_false_gives_the_tuple_of_the_output(model_class):
    model = model_class(tiny_config(num_labels=3)).eval()
    ids = torch.randint(3, 97, (2, 7))
    as_dict = model(ids, output_hidden_states=True)
    as_tuple = model(ids, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        elif isinstance(want, tuple):
            assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_hidden_states_are_the_layer_inputs_then_the_final_norm():
    model = PerformerModel(tiny_config(num_hidden_layers=2)).eval()
    ids = torch.randint(3, 97, (1, 6))
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0]), with_kwargs=True)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    for got, want in zip(out.hidden_states[:2], seen):
        assert torch.equal(got, want)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_a_cache_refuses_to_continue_after_the_features_are_redrawn():
    model = PerformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (1, 8))
    cache = model(ids[:, :5], use_cache=True).past_key_values
    model.redraw_features()
    with pytest.raises(ValueError, match="redrawn"):
        model(ids[:, 5:6], past_key_values=cache)
    fresh = model(ids[:, :5], use_cache=True).past_key_values  # a new cache is fine
    step = model(ids[:, 5:6], past_key_values=fresh).logits
    torch.testing.assert_close(step[:, -1], model(ids[:, :6]).logits[:, -1], rtol=1e-4, atol=1e-5)


def test_rotary_frequencies_stay_float32_when_the_model_is_cast_to_bfloat16():
    model = PerformerModel(tiny_config(hidden_size=64, num_attention_heads=2, max_position_embeddings=32768))
    model.to(torch.bfloat16)
    rotary = model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    positions = torch.tensor([[16_000, 32_000]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)
    dim = model.config.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    # float32 angles at 32k positions are exact to ~2e-3 rad; bf16-rounded frequencies were off by radians
    assert (cos.double() - angles.cos()).abs().max() < 1e-2
    assert (sin.double() - angles.sin()).abs().max() < 1e-2


def test_one_token_of_a_fresh_cache_equals_the_uncached_forward():
    """The empty typed cache (first call of a decode) and the state it returns, against the uncached forward."""
    model = PerformerForCausalLM(tiny_config(local_attn_heads=1, local_window_size=3, shift_tokens=True)).eval()
    ids = torch.randint(3, 97, (2, 7))
    cache = PerformerCache(model.config)
    steps = [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-5)
    layer = cache.layers[0]
    assert layer.attention.kv.shape == (2, 3, 16, 9) and layer.local.keys.shape[2] == 2


def reference_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions.double().unsqueeze(-1) * inv_freq.double()
    return torch.cat([angles, angles], dim=-1)  # (B, N, r)


def test_linear_rope_scaling_divides_positions_by_the_factor():
    base = PerformerModel(tiny_config()).rotary_emb
    scaled = PerformerModel(tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 4.0})).rotary_emb
    x = torch.zeros(1)
    cos, sin = scaled(x, torch.tensor([[0, 8, 40]]))
    base_cos, base_sin = base(x, torch.tensor([[0, 2, 10]]))
    torch.testing.assert_close(cos, base_cos)
    torch.testing.assert_close(sin, base_sin)


def test_partial_rotary_rotates_only_the_leading_channels_and_scores_stay_relative():
    from hf_performer.modeling_performer import apply_rotary

    config = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5})
    rotary = PerformerModel(config).rotary_emb
    d = config.head_dim
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    cos, sin = rotary(q, torch.tensor([[5]]))
    assert cos.shape[-1] == d // 2
    rotated = apply_rotary(q, cos, sin)
    assert torch.equal(rotated[..., d // 2:], q[..., d // 2:])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d // 2, 2, dtype=torch.float64) / (d // 2)))
    torch.testing.assert_close(cos.double(), reference_angles(torch.tensor([[5]]), inv_freq).cos())

    def score(p, s):
        return (apply_rotary(q, *rotary(q, torch.tensor([[p]]))) * apply_rotary(k, *rotary(k, torch.tensor([[s]])))).sum()

    torch.testing.assert_close(score(7, 3), score(30, 26))
    model = PerformerForCausalLM(config).eval()  # and the model runs, cached decoding included
    ids = torch.randint(3, 97, (1, 6))
    cache = PerformerCache(config)
    steps = torch.cat([model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(6)], 1)
    torch.testing.assert_close(steps, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-5)
