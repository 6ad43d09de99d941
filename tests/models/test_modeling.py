"""The foundation: config validation, save/load, remote code, padding, causality, FAVOR+ quality, training."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_performer
from hf_performer import PerformerConfig, PerformerForCausalLM, PerformerForSequenceClassification, PerformerModel
from hf_performer import attention, modeling_performer, ops
from hf_performer.feature_maps import FavorPlusFeatureMap

from helpers import HIDE_HF_PERFORMER, seeded, tiny_config


# -- config ---------------------------------------------------------------------------------------------------


def test_auto_config_snippet_from_the_issue(tmp_path):
    config = AutoConfig.for_model(
        "performer", vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    assert isinstance(config, PerformerConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, PerformerForCausalLM)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 384, (2, 11))
    assert torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)


def test_default_feature_count_is_d_ln_d():
    config = PerformerConfig(hidden_size=512, num_attention_heads=8)
    assert config.num_random_features == int(64 * math.log(64))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(feature_map="no-such-map"), "feature_map"),
        (dict(nb_features=-3), "nb_features"),
        (dict(nb_features=0), "nb_features"),
        (dict(position_embedding_type="sinusoid"), "position_embedding_type"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(feature_norm_scaling="unit"), "feature_norm_scaling"),
        (dict(attention_implementation="fast"), "attention_implementation"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(feature_map_kwargs={"bogus": 1}), "feature_map_kwargs"),
        (dict(position_embedding_type="axial", axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16]), "axial"),
        (dict(position_embedding_type="axial", max_position_embeddings=64, axial_pos_shape=[8, 8],
              axial_pos_embds_dim=[8, 8]), "hidden_size"),
    ],
)
def test_invalid_config_fails_at_construction_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(feature_map="relu", norm_type="scalenorm", ff_glu=True, causal=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "performer" and saved["feature_map"] == "relu"
    assert "auto_map" in saved and saved["auto_map"]["AutoConfig"].endswith("PerformerConfig")
    reloaded = PerformerConfig.from_pretrained(tmp_path)
    for key in ("feature_map", "norm_type", "ff_glu", "causal", "nb_features", "hidden_size"):
        assert getattr(reloaded, key) == getattr(config, key)


# -- save / load ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class, causal", [
    (PerformerForCausalLM, True),
    (PerformerModel, False),
    (PerformerForSequenceClassification, False),
])
def test_save_load_is_bit_identical(tmp_path, model_class, causal):
    config = tiny_config(causal=causal, num_labels=3)
    model = seeded(model_class, config, seed=1)
    model.redraw_features()  # a drawn projection that is not the initial one must survive too
    model.save_pretrained(tmp_path)
    auto = {PerformerForCausalLM: AutoModelForCausalLM, PerformerModel: AutoModel,
            PerformerForSequenceClassification: AutoModelForSequenceClassification}[model_class]
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    ids = torch.randint(3, config.vocab_size, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    out, out2 = model(ids, attention_mask=mask), reloaded(ids, attention_mask=mask)
    first = out.logits if hasattr(out, "logits") else out.last_hidden_state
    second = out2.logits if hasattr(out2, "logits") else out2.last_hidden_state
    assert torch.equal(first, second)
    state, state2 = model.state_dict(), reloaded.state_dict()
    projections = [k for k in state if k.endswith("feature_map.projection")]
    assert len(projections) == config.num_hidden_layers
    for key in state:
        assert torch.equal(state[key], state2[key]), key
    assert reloaded.feature_redraw_count == 1


REMOTE_SCRIPT = HIDE_HF_PERFORMER + textwrap.dedent(
    """

    from transformers import AutoModelForCausalLM
    folder, ids_path = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(ids_path)
    logits = model(ids).logits
    generated = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "generated": generated}, ids_path + ".out")
    print(json.dumps({"module": type(model).__module__, "class": type(model).__name__}))
    """
)


def test_remote_code_loading_without_the_package_installed(tmp_path):
    model = seeded(PerformerForCausalLM, tiny_config(), seed=2)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    for source in ("modeling_performer.py", "configuration_performer.py", "feature_maps.py", "ops.py", "ops_common.py",
                   "ops_naive.py", "ops_quadratic.py", "ops_chunked.py", "ops_triton.py", "cache_performer.py"):
        assert (folder / source).exists(), source
    ids = torch.randint(3, 97, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["class"] == "PerformerForCausalLM" and not info["module"].startswith("hf_performer")
    remote = torch.load(tmp_path / "ids.pt.out")
    assert torch.equal(remote["logits"], model(ids).logits)
    assert torch.equal(remote["generated"], model.generate(ids[:, :4], max_new_tokens=5, do_sample=False))


# -- padding and causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["favor+", "relu", "elu", "exact"])
def test_encoder_padding_invariance(feature_map):
    config = tiny_config(causal=False, feature_map=feature_map, position_embedding_type="absolute")
    model = seeded(PerformerModel, config, seed=3)
    lengths = [11, 6, 3]
    ids = torch.randint(3, 97, (3, 11))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    batched = model(ids, attention_mask=mask).last_hidden_state
    for row, n in enumerate(lengths):
        alone = model(ids[row : row + 1, :n]).last_hidden_state
        torch.testing.assert_close(batched[row, :n], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["favor+", "relu", "exact"])
def test_causal_left_padding_invariance(feature_map):
    config = tiny_config(feature_map=feature_map)
    model = seeded(PerformerForCausalLM, config, seed=4)
    lengths = [12, 7, 2]
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 12 - n :] = 1
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    batched = model(ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        alone = model(ids[row : row + 1, 12 - n :]).logits
        torch.testing.assert_close(batched[row, 12 - n :], alone[0], rtol=1e-5, atol=1e-5)


def test_padded_keys_do_not_leak_into_the_normaliser():
    """A padded key with a huge value must change nothing, neither the numerator nor the normaliser."""
    config = tiny_config(causal=False)
    model = seeded(PerformerModel, config, seed=5)
    ids = torch.randint(3, 97, (1, 8))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    embeds = model.embed_tokens(ids)
    reference = model(inputs_embeds=embeds[:, :5]).last_hidden_state
    poisoned = embeds.clone()
    poisoned[0, -3:] = 50.0
    out = model(inputs_embeds=poisoned, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[:, :5], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["favor+", "relu", "elu"])
def test_causality(feature_map):
    model = seeded(PerformerForCausalLM, tiny_config(feature_map=feature_map), seed=6)
    ids = torch.randint(3, 97, (2, 20))
    logits = model(ids).logits
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 5) % 97
        other = model(changed).logits
        # blocks of the chunked algorithm may sum in another order: equal up to float32 rounding, while a leak
        # of the changed token would move the logits by orders of magnitude more (second assertion)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert (other[:, t:] - logits[:, t:]).abs().max() > 1e-3


def test_bidirectional_sees_the_future():
    model = seeded(PerformerModel, tiny_config(causal=False), seed=7)
    ids = torch.randint(3, 97, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 97
    assert not torch.allclose(model(ids).last_hidden_state[:, 0], model(changed).last_hidden_state[:, 0])


# -- FAVOR+ quality -------------------------------------------------------------------------------------------


def _exact_softmax(q, k, v, causal):
    scores = (q @ k.transpose(-1, -2)).double()
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_converges_to_softmax_as_features_grow(causal):
    from hf_performer.ops import causal_linear_attention, linear_attention

    torch.manual_seed(0)
    batch, heads, length, dim = 1, 4, 64, 16
    scale = dim**-0.25
    q, k = torch.randn(batch, heads, length, dim) * 0.7, torch.randn(batch, heads, length, dim) * 0.7
    v = torch.randn(batch, heads, length, dim)
    exact = _exact_softmax(q * scale, k * scale, v, causal)
    errors = []
    for m in (8, 32, 128, 512):
        trials = []
        for seed in range(4):
            fmap = FavorPlusFeatureMap(dim, num_features=m)
            fmap.new_feature_map(torch.Generator().manual_seed(seed))
            qf = fmap.query_features(q * scale)
            kf, log_scale = fmap.key_features(k * scale)
            if causal:
                out, _ = causal_linear_attention(qf, kf, v, k_log_scale=log_scale, chunk_size=16)
            else:
                out = linear_attention(qf, kf, v, k_log_scale=log_scale)
            trials.append(((out.double() - exact).norm() / exact.norm()).item())
        errors.append(sum(trials) / len(trials))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_exact_feature_map_is_softmax_attention():
    """feature_map='exact' is the softmax model the kernels approximate: check it against a manual computation."""
    config = tiny_config(feature_map="exact", num_hidden_layers=1, position_embedding_type="none")
    model = seeded(PerformerModel, config, seed=8)
    ids = torch.randint(3, 97, (1, 9))
    attn = model.layers[0].self_attn
    hidden = model.layers[0].attn_norm(model.embed_tokens(ids))
    heads = lambda proj: proj(hidden).view(1, 9, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    manual = _exact_softmax(q * 8**-0.25, k * 8**-0.25, v, causal=True).float()
    expected = attn.o_proj(manual.transpose(1, 2).reshape(1, 9, 32))
    torch.testing.assert_close(attn(hidden), expected, rtol=1e-5, atol=1e-5)


# -- training -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(causal=False)])
def test_a_few_training_steps_lower_the_loss(overrides):
    config = tiny_config(**overrides, num_labels=2)
    torch.manual_seed(0)
    if config.causal:
        model = PerformerForCausalLM(config)
        ids = torch.randint(3, 20, (8, 24))
        batch = dict(input_ids=ids, labels=ids)
    else:
        model = PerformerForSequenceClassification(config)
        ids = torch.randint(3, 97, (8, 16))
        batch = dict(input_ids=ids, labels=(ids[:, 0] > 50).long())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_matches_manual_shifted_cross_entropy():
    model = seeded(PerformerForCausalLM, tiny_config(), seed=9)
    ids = torch.randint(3, 97, (2, 10))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_logits_to_keep_and_hidden_states():
    model = seeded(PerformerForCausalLM, tiny_config(), seed=10)
    ids = torch.randint(3, 97, (2, 10))
    full = model(ids, output_hidden_states=True)
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full.logits[:, -1])


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    grads = []
    for checkpointing in (False, True):
        model = seeded(PerformerForCausalLM, config, seed=11).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs_raise_clear_errors():
    model = seeded(PerformerForCausalLM, tiny_config(), seed=12)
    ids = torch.randint(3, 97, (2, 10))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 10, 10))
    with pytest.raises(TypeError, match="PerformerCache"):
        model(ids, past_key_values=((torch.zeros(1),),))
    with pytest.raises(ValueError, match="causal=True"):
        PerformerForCausalLM(tiny_config(causal=False))
    absolute = seeded(PerformerForCausalLM, tiny_config(position_embedding_type="absolute",
                                                       max_position_embeddings=16), seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        absolute(torch.randint(3, 97, (1, 17)))


@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
def test_bf16_autocast_keeps_the_kernel_math_in_float32(implementation):
    """Under autocast only the projections run in bf16; the logits stay close to the float32 model's."""
    model = seeded(PerformerForCausalLM, tiny_config(attention_implementation=implementation, local_attn_heads=1,
                                                     local_window_size=4), seed=13)
    ids = torch.randint(3, 97, (2, 40))
    reference = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids).logits
    assert torch.isfinite(mixed).all()
    assert ((mixed.float() - reference).norm() / reference.norm()) < 0.05


def test_building_a_config_or_model_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    config = tiny_config()
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    first = PerformerForCausalLM(config).lm_head.weight.clone()
    torch.manual_seed(0)
    tiny_config(feature_map="relu")
    second = PerformerForCausalLM(config).lm_head.weight.clone()
    assert torch.equal(first, second)


def test_save_pretrained_writes_a_hub_model_card(tmp_path):
    from huggingface_hub import ModelCard

    model = seeded(PerformerForCausalLM, tiny_config(), seed=14)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "custom_code" in card.data.tags
    assert "favor+" in card.text
    (tmp_path / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path)  # a card the user wrote is never overwritten
    assert (tmp_path / "README.md").read_text() == "my own card"


@pytest.mark.parametrize("feature_map", ["favor+", "hyperbolic", "expmod"])
def test_features_inside_the_op_match_the_feature_map_path(make_config, monkeypatch, feature_map):
    """Causal FAVOR+-type layers compute their features inside the chunked op; the model's logits and gradients
    equal those of the plain path (feature map, then causal_linear_attention), with left padding and a ragged
    last chunk, and with begin_kernel replacing the first outputs."""
    from hf_performer import PerformerForCausalLM
    from hf_performer.feature_maps import ExpProjectionFeatureMap

    for extra in ({}, {"begin_kernel": 3}):
        torch.manual_seed(0)
        model = PerformerForCausalLM(make_config(feature_map=feature_map, **extra))
        ids = torch.randint(3, 97, (2, 29), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :6] = 0

        def run():
            model.zero_grad()
            out = model(ids, attention_mask=mask, labels=ids, use_cache=False)
            out.loss.backward()
            return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

        calls = []
        original = ops.causal_exp_attention
        monkeypatch.setattr(attention, "causal_exp_attention",
                            lambda *a, **k: calls.append(1) or original(*a, **k))
        fused_logits, fused_grads = run()
        assert calls, "the fused path was not taken"
        monkeypatch.setattr(ExpProjectionFeatureMap, "fused_feature_args", lambda self: None)
        plain_logits, plain_grads = run()
        monkeypatch.undo()
        torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
        for got, want in zip(fused_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# -- hybrid attention (hybrid_window_size) ---------------------------------------------------------------------


def test_hybrid_window_factor_is_a_trained_parameter_saved_and_initialised_when_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config(feature_map="relu", hybrid_window_size=4, local_attn_heads=1)
    model = seeded(PerformerForCausalLM, config, seed=30)
    attn = model.model.layers[0].self_attn
    assert attn.kind == "hybrid" and attn.window_factor.shape == (3,)  # the global heads only
    torch.testing.assert_close(torch.sigmoid(attn.window_factor.detach()), torch.full((3,), 0.1))
    ids = torch.randint(3, 97, (2, 15))
    model(ids, labels=ids).loss.backward()
    assert attn.window_factor.grad is not None and attn.window_factor.grad.abs().sum() > 0
    with torch.no_grad():
        attn.window_factor.copy_(torch.tensor([1.0, -0.5, 3.0]))  # trained values must survive save / load
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = PerformerForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(reloaded(ids).logits, expected)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_bytes((tmp_path / "saved" / "config.json").read_bytes())
    save_file({k: t for k, t in saved.items() if not k.endswith("window_factor")},
              str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    old = PerformerForCausalLM.from_pretrained(tmp_path / "old")
    for layer in old.model.layers:  # missing from the checkpoint: the init value, not uninitialised memory
        torch.testing.assert_close(layer.self_attn.window_factor.detach(),
                                   torch.full((3,), attention.LOLCATS_WINDOW_FACTOR_INIT))


def test_hybrid_model_runs_the_hybrid_kind_with_its_parameter():
    config = tiny_config(feature_map="elu", hybrid_window_size=3)
    options = modeling_performer.global_attention_options(config, hf_performer.feature_maps.EluFeatureMap(8))
    assert modeling_performer.global_attention_kind(config) == "hybrid"
    assert isinstance(options, attention.HybridOptions) and options.window == 3
    assert options.kernel.qk_scale == config.qk_scale and options.window_factor is None
    model = seeded(PerformerForCausalLM, config, seed=31)
    seen = []
    original = attention.ATTENTION_KINDS["hybrid"]
    try:
        attention.ATTENTION_KINDS["hybrid"] = attention.AttentionKind(
            lambda *args: seen.append(args[-1]) or original.function(*args), original.options, original.state)
        model(torch.randint(3, 97, (1, 9)))
    finally:
        attention.ATTENTION_KINDS["hybrid"] = original
    assert len(seen) == 2
    assert all(o.window_factor is layer.self_attn.window_factor for o, layer in zip(seen, model.model.layers))
