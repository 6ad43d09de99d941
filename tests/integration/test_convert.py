"""Conversion of performer-pytorch PerformerLM checkpoints, checked against performer-pytorch itself.

performer-pytorch (and local-attention, which it uses for local heads) is a test dependency (the ``test`` extra);
it is imported unconditionally so that a missing package fails these tests instead of skipping them.

Like with like: performer-pytorch adds eps=1e-4 to every FAVOR+ feature (after dividing keys by their maximum over
the whole sequence, so the epsilon's weight depends on future tokens) and 1e-6 to its causal normaliser; the
converted model computes the exact kernel. The ``exact_reference`` fixture sets both epsilons to 0, after which
the two implementations compute the same function and agree to fp32 rounding. ``test_default_epsilon_...`` bounds
the difference the epsilons make on their own.
"""

import importlib
import json
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # performer-pytorch imports distutils / torch.cuda.amp
    import performer_pytorch.performer_pytorch as performer_module
    from performer_pytorch import PerformerLM

from transformers import AutoModelForCausalLM

from hf_performer import PerformerForCausalLM
from hf_performer.convert_performer_pytorch import convert_performer_pytorch, main, performer_pytorch_config
from hf_performer.modeling_performer import PerformerScaleNorm, sinusoidal_table

# Tiny matrices: extra threads only add contention on a shared machine (token-by-token decoding went from ~4 ms to
# ~200 ms a step with 2 threads under load).
pytestmark = pytest.mark.usefixtures("single_thread")

converter = importlib.import_module("hf_performer.convert_performer_pytorch")  # the package re-exports the function

# No rotary_position_emb here: performer-pytorch's default (True) unless a config says otherwise.
BASE = dict(num_tokens=61, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8, causal=True, nb_features=16)
ABSOLUTE = dict(rotary_position_emb=False)

CONFIGS = {
    # every option at performer-pytorch's default: rotary + input sinusoid, LayerNorm, untied to_out with its bias
    "defaults-rotary-untied": dict(),
    "absolute-layernorm-untied": dict(ABSOLUTE),
    "axial-rezero-glu-tied": dict(ABSOLUTE, axial_position_emb=True, axial_position_shape=(8, 8), use_rezero=True,
                                  ff_glu=True, tie_embed=True),
    "relu-kernel-biases-chunked-ff": dict(ABSOLUTE, generalized_attention=True, qkv_bias=True, ff_chunks=2,
                                          ff_mult=2, tie_embed=True),
    "rotary-qkv-bias-tied": dict(qkv_bias=True, tie_embed=True),
    "token-shift-rezero-out-bias": dict(ABSOLUTE, use_rezero=True, shift_tokens=True, attn_out_bias=True,
                                        tie_embed=True),
    "token-shift-layernorm-rotary": dict(shift_tokens=True),
    # performer-pytorch takes ScaleNorm over ReZero when both are set
    "scalenorm-token-shift-over-rezero": dict(ABSOLUTE, use_scalenorm=True, use_rezero=True, shift_tokens=True),
    # 40 tokens are not a multiple of 12: local-attention's autopad path
    "local-heads-absolute": dict(ABSOLUTE, local_attn_heads=2, local_window_size=12),
    # the second layer is local heads only (no kernel heads at all)
    "local-heads-per-layer-rotary": dict(local_attn_heads=(1, 4), local_window_size=8, qkv_bias=True),
    "local-heads-axial-scalenorm": dict(ABSOLUTE, axial_position_emb=True, axial_position_shape=(8, 8),
                                        local_attn_heads=(0, 3), local_window_size=8, use_scalenorm=True),
}


@pytest.fixture
def exact_reference(monkeypatch):
    """performer-pytorch with its feature and normaliser epsilons at 0 (restored after the test)."""
    monkeypatch.setattr(performer_module.softmax_kernel, "__kwdefaults__",
                        {**performer_module.softmax_kernel.__kwdefaults__, "eps": 0.0})
    chunks, _ = performer_module.causal_linear_attention_noncuda.__defaults__
    monkeypatch.setattr(performer_module.causal_linear_attention_noncuda, "__defaults__", (chunks, 0.0))


def reference_lm(kwargs, seed=0):
    """A PerformerLM with weights perturbed away from their init (ReZero gates, ScaleNorm gains, norms and biases,
    the untied output bias included, all non-trivial). Fixed buffers (sinusoid tables, rotary frequencies,
    projections) are left as they are."""
    torch.manual_seed(seed)
    lm = PerformerLM(**kwargs).eval()
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return lm


def tokens(length=40, seed=1):
    return torch.randint(0, BASE["num_tokens"], (2, length), generator=torch.Generator().manual_seed(seed))


def decode(model, ids, prefill=10):
    """Logits of a prefill of ``prefill`` tokens followed by one token at a time through the cache."""
    out = model(ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_decoding_match_performer_pytorch(name, exact_reference):
    kwargs = {**BASE, **CONFIGS[name]}
    lm = reference_lm(kwargs)
    ids = tokens()
    with torch.no_grad():
        expected = lm(ids)
        model = convert_performer_pytorch(lm.state_dict(), kwargs)
        logits = model(ids).logits
        decoded = decode(model, ids)
    assert isinstance(model, PerformerForCausalLM)
    assert model.config.max_position_embeddings == kwargs["max_seq_len"]
    # fp32 rounding only: the two compute the same sums in different orders (observed max |diff| <= 1e-5 on
    # logits of magnitude up to ~ 40).
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    # the recurrent cache (kernel state, local-window keys, shifted token, positions) reproduces the full pass
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-4)


def test_converted_options():
    """The config fields each option maps to."""
    config = performer_pytorch_config({**BASE, **CONFIGS["local-heads-per-layer-rotary"]})
    assert (config.position_embedding_type, config.sinusoidal_position_embedding) == ("rotary", True)
    assert (config.local_attn_heads, config.local_window_size, config.local_window_type) == ([1, 4], 8, "blocked")
    assert not config.local_rotary  # the rotary already covers every head
    assert (config.tie_word_embeddings, config.lm_head_bias) == (False, True)
    config = performer_pytorch_config({**BASE, **CONFIGS["local-heads-axial-scalenorm"], "tie_embed": True})
    assert (config.position_embedding_type, config.sinusoidal_position_embedding) == ("absolute", False)
    assert config.local_rotary and config.norm_type == "scalenorm" and config.layer_norm_eps == 1e-5
    assert (config.tie_word_embeddings, config.lm_head_bias) == (True, False)


def test_sinusoid_tables_equal_performer_pytorchs():
    """performer-pytorch's FixedPositionalEmbedding (input table, and the per-head rotary table) is [sin | cos] of
    p / 10000^(2i/D): the same layout and values as sinusoidal_table, bit for bit."""
    for dim in (8, 32, 512):
        reference = performer_module.FixedPositionalEmbedding(dim, 2048).emb
        assert torch.equal(sinusoid_rows := sinusoidal_table(torch.arange(2048)[None], dim)[0], reference), dim
        assert sinusoid_rows.shape == (2048, dim)


def test_scalenorm_matches_performer_pytorchs_including_the_eps_clamp():
    """PreScaleNorm: x / clamp(||x||, min=1e-5) * g; PerformerScaleNorm: x / clamp_min(||x||, eps) * g."""
    x = torch.randn(3, 5, 32)
    x[0, 0] = 0.0
    x[0, 1] *= 1e-8  # ||x|| below eps: the clamp decides
    reference = performer_module.PreScaleNorm(32, torch.nn.Identity())
    ours = PerformerScaleNorm(32, eps=1e-5)
    with torch.no_grad():
        reference.g.fill_(1.7)
        ours.g.fill_(1.7)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_default_epsilon_changes_logits_only_slightly():
    """Unpatched performer-pytorch (eps=1e-4 on features, 1e-6 on the normaliser) against the exact kernel."""
    kwargs = {**BASE, **CONFIGS["absolute-layernorm-untied"]}
    lm = reference_lm(kwargs)
    ids = tokens()
    with torch.no_grad():
        difference = (convert_performer_pytorch(lm, kwargs)(ids).logits - lm(ids)).abs().max()
        scale = lm(ids).std()
    assert 0 < difference < 0.05 * scale


def test_saved_checkpoint_through_the_command_line(tmp_path, exact_reference):
    """JSON kwargs (performer-pytorch's defaults for what is left out, lists where it takes tuples)."""
    kwargs = {**BASE, **CONFIGS["relu-kernel-biases-chunked-ff"], "kernel_fn": "relu", "rotary_position_emb": True,
              "local_attn_heads": [0, 2], "local_window_size": 8, "tie_embed": False}
    lm = reference_lm({**kwargs, "kernel_fn": torch.nn.ReLU(), "local_attn_heads": (0, 2)})
    torch.save({"state_dict": lm.state_dict()}, tmp_path / "lm.pt")
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    main(["--checkpoint", str(tmp_path / "lm.pt"), "--kwargs", str(tmp_path / "kwargs.json"),
          "--output", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-5, atol=1e-4)
    assert model.config.local_attn_heads == [0, 2] and model.config.max_position_embeddings == BASE["max_seq_len"]
    assert torch.equal(model.lm_head.bias, lm.to_out.bias)
    # kernel projections are carried over as they are (rotary models: columns in half-split order)
    projection = model.model.layers[1].self_attn.feature_map.projection
    reference = lm.performer.net.layers[1][0].fn.fast_attention.projection_matrix
    assert torch.equal(projection, reference[:, converter._half_rotation_order(BASE["dim_head"])])


@pytest.mark.parametrize("option, value", [
    ("reversible", True),
    ("cross_attend", True),
    ("no_projection", True),
    ("causal", False),
    ("dim_head", 16),
    ("local_attn_heads", 5),
])
def test_unsupported_options_are_named(option, value):
    kwargs = {**BASE, option: value}
    with pytest.raises(ValueError, match=option):
        convert_performer_pytorch({}, kwargs)


def test_checkpoints_the_model_cannot_carry_are_rejected():
    """Fixed tables the model recomputes must be the standard ones; local heads must be local-attention's rotary
    heads (state: rel_pos.inv_freq only); arguments must be PerformerLM's."""
    kwargs = {**BASE, "local_attn_heads": 1, "local_window_size": 8}
    state = reference_lm(kwargs).state_dict()
    with pytest.raises(ValueError, match="rotary_position_emb=True.*pos_emb.emb"):
        convert_performer_pytorch({**state, "pos_emb.emb": torch.zeros_like(state["pos_emb.emb"])}, kwargs)
    learned = {**state, "performer.net.layers.0.0.fn.local_attn.rel_pos.weights": torch.zeros(16, 8)}
    with pytest.raises(ValueError, match="local_attn_heads=1.*rel_pos.weights"):
        convert_performer_pytorch(learned, kwargs)
    with pytest.raises(ValueError, match="unknown PerformerLM arguments: \\['depht'\\]"):
        convert_performer_pytorch(state, {**kwargs, "depht": 2})
