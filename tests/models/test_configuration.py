"""PerformerConfig: every field is checked at construction (and on assignment) with a TypeError / ValueError naming
the field; the feature map options are checked without drawing random features; RoPE through transformers'
``rope_parameters``."""

import glob
import json
import math
import os

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_performer import PerformerConfig

from helpers import CHECKPOINTS, tiny_config

CHECKPOINT_CONFIGS = sorted(glob.glob(os.path.join(CHECKPOINTS, "*", "config.json")))

BOOL_FIELDS = ["ff_glu", "attention_bias", "mlp_bias", "causal", "orthogonal_features", "local_rotary", "shift_tokens",
               "scale_by_length", "use_causal_windowed", "sinusoidal_position_embedding", "use_cache",
               "tie_word_embeddings", "lm_head_bias"]
INT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "ff_mult",
              "ff_chunks", "nb_features", "feature_redraw_interval", "feature_seed", "attention_chunk_size",
              "local_window_size", "begin_kernel", "causal_chunk_length", "causal_window_length",
              "max_position_embeddings", "local_attn_heads", "hybrid_window_size"]
FLOAT_FIELDS = ["layer_norm_eps", "hidden_dropout", "attention_dropout", "embedding_dropout", "initializer_range",
                "causal_window_decay", "attention_scale", "rope_theta"]


# -- types -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["no", "false", "False", 0, 1, None, 1.0])
def test_bool_fields_take_real_bools_only(field, value):
    with pytest.raises(TypeError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, 8.0, "8"])
def test_int_fields_reject_bools_floats_and_strings(field, value):
    with pytest.raises(TypeError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["0.1", True, [0.1]])
def test_float_fields_reject_non_numbers(field, value):
    with pytest.raises(TypeError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_float_fields_reject_nan_and_inf(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rope_theta=-10000.0), "rope_theta"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps"),
        (dict(initializer_range=-0.02), "initializer_range"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(embedding_dropout=-0.1), "embedding_dropout"),
        (dict(causal_window_decay=0.0), "causal_window_decay"),
        (dict(causal_window_decay=1.5), "causal_window_decay"),
        (dict(attention_scale=0.0), "attention_scale"),
        (dict(hidden_act="nope"), "hidden_act"),
        (dict(causal_padding="middle"), "causal_padding"),
        (dict(local_window_type="strided"), "local_window_type"),
        (dict(local_attn_heads=-1), "local_attn_heads"),
        (dict(local_attn_heads=[1, -1]), "local_attn_heads"),
        (dict(local_attn_heads=[1, 5]), "local_attn_heads"),
        (dict(local_attn_heads=[1]), "local_attn_heads"),
        (dict(begin_kernel=-1), "begin_kernel"),
        (dict(hybrid_window_size=-1), "hybrid_window_size"),
        (dict(hybrid_window_size=4), "hybrid_window_size"),  # favor+ (the default map) is exponential
        (dict(hybrid_window_size=4, feature_map="exact"), "hybrid_window_size"),
        (dict(hybrid_window_size=4, feature_map="generalized", feature_map_kwargs={"kernel_fn": "exp"}),
         "hybrid_window_size"),
        (dict(hybrid_window_size=4, feature_map="relu", begin_kernel=2), "hybrid_window_size"),
        (dict(hybrid_window_size=4, feature_map="relu", use_causal_windowed=True), "hybrid_window_size"),
        (dict(feature_redraw_interval=-1), "feature_redraw_interval"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(position_embedding_type="axial", max_position_embeddings=256, axial_pos_shape=[-16, -16],
              axial_pos_embds_dim=[16, 16]), "axial_pos_shape"),
        (dict(position_embedding_type="axial", max_position_embeddings=256, axial_pos_shape=[16, 16],
              axial_pos_embds_dim=[48, -16]), "axial_pos_embds_dim"),
        (dict(axial_pos_shape=[0, 16]), "axial_pos_shape"),
    ],
)
def test_out_of_range_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(local_attn_heads=[1, "1"]), "local_attn_heads"),
        (dict(local_attn_heads=[1.0, 2]), "local_attn_heads"),
        (dict(local_attn_heads=[True, 1]), "local_attn_heads"),
        (dict(axial_pos_shape=[16.0, 16]), "axial_pos_shape"),
        (dict(axial_pos_embds_dim=["16", "16"]), "axial_pos_embds_dim"),
        (dict(axial_pos_shape=16), "axial_pos_shape"),
        (dict(hidden_act=None), "hidden_act"),
        (dict(feature_map=1), "feature_map"),
        (dict(feature_map_kwargs=[("kernel_fn", "relu")]), "feature_map_kwargs"),
        (dict(feature_map="relu", feature_map_kwargs={"kernel_epsilon": torch.tensor(1.0)}), "feature_map_kwargs"),
        (dict(eos_token_id=[2, "3"]), "eos_token_id"),
    ],
)
def test_wrong_types_in_lists_strings_and_dicts_raise_type_error(overrides, field):
    with pytest.raises(TypeError, match=field):
        tiny_config(**overrides)


def test_numbers_of_either_kind_are_accepted_for_float_fields():
    config = tiny_config(hidden_dropout=0, layer_norm_eps=0, rope_theta=500000, causal_window_decay=1,
                         attention_scale=1, local_attn_heads=(1, 2), axial_pos_shape=(16, 16))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000}
    assert config.local_attn_heads == [1, 2] and config.axial_pos_shape == [16, 16]


def test_errors_are_builtin_and_strict_dataclass_errors():
    with pytest.raises(TypeError) as info:
        tiny_config(causal="no")
    assert isinstance(info.value, StrictDataclassError) and "expected bool" in str(info.value)
    with pytest.raises(ValueError) as info:
        tiny_config(hidden_size=30)
    assert isinstance(info.value, StrictDataclassError) and "hidden_size" in str(info.value)


def test_assignment_after_construction_is_checked():
    config = tiny_config()
    with pytest.raises(TypeError, match="causal"):
        config.causal = "no"
    with pytest.raises(ValueError, match="rope_theta"):
        config.rope_theta = float("nan")
    assert config.causal is True and config.rope_theta == 10000.0


# -- loading -----------------------------------------------------------------------------------------------------
def test_from_dict_and_config_json_reject_a_string_bool(tmp_path):
    saved = tiny_config().to_dict()
    saved["causal"] = "false"
    with pytest.raises(TypeError, match="causal"):
        PerformerConfig.from_dict(saved)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(TypeError, match="causal"):
        PerformerConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="causal"):
        PerformerConfig.from_pretrained(os.path.dirname(CHECKPOINT_CONFIGS[0]), causal="no")


@pytest.mark.parametrize("path", CHECKPOINT_CONFIGS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_configs_saved_before_load_to_the_same_values(path):
    saved = json.loads(open(path).read())
    assert "rope_theta" in saved and "rope_parameters" not in saved
    config = PerformerConfig.from_pretrained(os.path.dirname(path))
    loaded = config.to_dict()
    for key, value in saved.items():
        if key == "id2label":
            value = {int(k): v for k, v in value.items()}
        assert loaded[key] == value, key
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": saved["rope_theta"]}


def test_save_and_reload_keeps_rope_parameters(tmp_path):
    config = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    config.save_pretrained(tmp_path)
    reloaded = PerformerConfig.from_pretrained(tmp_path)
    assert reloaded.rope_parameters == config.rope_parameters and reloaded.rope_theta == 500000.0


# -- feature map options are checked without drawing -------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(feature_map="favor+", orthogonal_features=True), dict(feature_map="hyperbolic"),
     dict(feature_map="favor++", causal=False), dict(feature_map="generalized", feature_map_kwargs={"kernel_fn": "exp"}),
     dict(feature_map="rff", feature_map_kwargs={"kernel": "softmax"})],
)
def test_building_a_config_draws_nothing(overrides, monkeypatch):
    def no_qr(*args, **kwargs):
        raise AssertionError("building a config must not draw an orthogonal projection")

    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    monkeypatch.setattr(torch.random, "fork_rng", None)  # the config needs no RNG fork either
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    tiny_config(**overrides)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_feature_map_kwargs_are_still_checked_without_drawing(monkeypatch):
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: (_ for _ in ()).throw(AssertionError("drew")))
    with pytest.raises(ValueError, match="feature_map_kwargs.*bogus"):
        tiny_config(feature_map_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="kernel_fn"):
        tiny_config(feature_map="generalized", feature_map_kwargs={"kernel_fn": "tanh"})
    with pytest.raises(ValueError, match="smoothing"):
        tiny_config(feature_map="smoothed_rff", feature_map_kwargs={"smoothing": -1.0})


# -- RoPE --------------------------------------------------------------------------------------------------------
ROPE_CASES = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "factor": 4.0,
                 "original_max_position_embeddings": 64},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def test_rope_parameters_default_from_rope_theta():
    assert tiny_config().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    config = tiny_config(rope_theta=500000.0)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    config = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_theta=1234.0)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}
    assert config.rope_theta == 1234.0
    config = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 77.0})
    assert config.rope_theta == 77.0
    tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 77.0}, rope_theta=77)  # agreeing is fine


def test_rope_theta_and_rope_parameters_must_agree():
    with pytest.raises(ValueError, match="rope_theta"):
        tiny_config(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = tiny_config()
    config.rope_theta = 5.0  # rope_parameters unchanged: caught when saving
    with pytest.raises(ValueError, match="rope_theta"):
        config.validate()


def test_legacy_rope_scaling_is_read_as_rope_parameters():
    config = tiny_config(rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("rope_type", list(ROPE_CASES))
def test_each_rope_type_is_validated_and_usable_by_transformers(rope_type):
    config = tiny_config(rope_parameters={"rope_type": rope_type, "rope_theta": 500000.0, **ROPE_CASES[rope_type]})
    assert config.rope_parameters["rope_type"] == rope_type and config.rope_theta == 500000.0
    if rope_type == "default":
        return
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    assert inv_freq.shape == (config.head_dim // 2,) and torch.isfinite(inv_freq).all()
    assert math.isfinite(attention_scaling) and attention_scaling > 0


def test_partial_rotary_factor_gives_fewer_frequencies():
    config = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["linear"](config, None)
    assert inv_freq.shape == (config.head_dim // 4,)


@pytest.mark.parametrize(
    "rope_parameters, error, message",
    [
        ({"rope_type": "ntk"}, ValueError, "rope_type.*must be one of"),
        ({"rope_type": "linear"}, ValueError, "factor"),
        ({"rope_type": "linear", "factor": 0.5}, ValueError, "factor"),
        ({"rope_type": "linear", "factor": "2"}, TypeError, "factor"),
        ({"rope_type": "dynamic", "factor": float("nan")}, ValueError, "factor"),
        ({"rope_type": "default", "rope_theta": -1.0}, ValueError, "rope_theta"),
        ({"rope_type": "default", "rope_theta": float("inf")}, ValueError, "rope_theta"),
        ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}, ValueError, "attention_factor"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, TypeError, "truncate"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, ValueError, "high_freq_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
         ValueError, "original_max_position_embeddings"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3, "factor": 2.0},
         ValueError, "short_factor"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, "x", 1.0, 1.0], "factor": 2.0},
         ValueError, "long_factor"),
        ({"rope_type": "default", "partial_rotary_factor": 0.375}, ValueError, "partial_rotary_factor"),
        ({"rope_type": "default", "partial_rotary_factor": 1.5}, ValueError, "partial_rotary_factor"),
        ({"rope_type": "default", "partial_rotary_factor": 0.1}, ValueError, "partial_rotary_factor"),
    ],
)
def test_invalid_rope_parameters(rope_parameters, error, message):
    with pytest.raises(error, match=message):
        tiny_config(rope_parameters=rope_parameters)  # hidden_size 32, 4 heads: head dim 8
