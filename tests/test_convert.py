"""Conversion of performer-pytorch PerformerLM checkpoints, checked against performer-pytorch itself.

performer-pytorch is a test dependency (the ``test`` extra); it is imported unconditionally so that a missing
package fails these tests instead of skipping them.

Like with like: performer-pytorch adds eps=1e-4 to every FAVOR+ feature (after dividing keys by their maximum over
the whole sequence, so the epsilon's weight depends on future tokens) and 1e-6 to its causal normaliser; the
converted model computes the exact kernel. The ``exact_reference`` fixture sets both epsilons to 0, after which
the two implementations compute the same function and agree to fp32 rounding. ``test_default_epsilon_...`` bounds
the difference the epsilons make on their own.
"""

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
from hf_performer.convert_performer_pytorch import (
    build_model,
    convert_performer_pytorch,
    convert_state_dict,
    main,
    performer_pytorch_config,
)

BASE = dict(num_tokens=61, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8, causal=True, nb_features=16,
            rotary_position_emb=False)

CONFIGS = {
    "absolute-layernorm-untied": dict(),
    "axial-rezero-glu-tied": dict(axial_position_emb=True, axial_position_shape=(8, 8), use_rezero=True, ff_glu=True,
                                  tie_embed=True),
    "relu-kernel-biases-chunked-ff": dict(generalized_attention=True, qkv_bias=True, ff_chunks=2, ff_mult=2,
                                          tie_embed=True),
    "token-shift-rezero-out-bias": dict(use_rezero=True, shift_tokens=True, attn_out_bias=True, tie_embed=True),
}


@pytest.fixture
def exact_reference(monkeypatch):
    """performer-pytorch with its feature and normaliser epsilons at 0 (restored after the test)."""
    monkeypatch.setattr(performer_module.softmax_kernel, "__kwdefaults__",
                        {**performer_module.softmax_kernel.__kwdefaults__, "eps": 0.0})
    chunks, _ = performer_module.causal_linear_attention_noncuda.__defaults__
    monkeypatch.setattr(performer_module.causal_linear_attention_noncuda, "__defaults__", (chunks, 0.0))


def reference_lm(kwargs, seed=0):
    """A PerformerLM with weights perturbed away from their init (ReZero gates, norms and biases all non-trivial)."""
    torch.manual_seed(seed)
    lm = PerformerLM(**kwargs).eval()
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if lm.to_out is not None:
            lm.to_out.bias.zero_()  # the lm_head here has no bias (see test_untied_bias_is_rejected)
    return lm


def tokens(length=40, seed=1):
    return torch.randint(0, BASE["num_tokens"], (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_performer_pytorch(name, exact_reference):
    kwargs = {**BASE, **CONFIGS[name]}
    lm = reference_lm(kwargs)
    ids = tokens()
    with torch.no_grad():
        expected = lm(ids)
        model = convert_performer_pytorch(lm.state_dict(), kwargs)
        logits = model(ids).logits
    assert isinstance(model, PerformerForCausalLM)
    # fp32 rounding only: the two compute the same sums in different orders (observed max |diff| ~ 5e-6 on
    # logits of magnitude ~ 40).
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def test_rotary_layout_matches_performer_pytorch_without_its_input_sinusoid(exact_reference):
    """performer-pytorch rotates adjacent pairs, this model half-split pairs: the conversion permutes q/k features
    and the projection columns. Its rotary models also add a sinusoid to the input, which PerformerConfig cannot
    express yet (so convert_performer_pytorch refuses them); zeroing that sinusoid isolates the per-layer rotary."""
    kwargs = {**BASE, "rotary_position_emb": True, "qkv_bias": True, "tie_embed": True}
    lm = reference_lm(kwargs)
    lm.pos_emb.emb.zero_()
    config = performer_pytorch_config({**kwargs, "rotary_position_emb": False}, position_embedding_type="rotary")
    model = build_model(config, convert_state_dict(lm.state_dict(), kwargs))
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-5, atol=1e-4)


def test_token_by_token_decoding_matches_performer_pytorch(exact_reference):
    """The recurrent cache reproduces performer-pytorch's full causal forward."""
    kwargs = {**BASE, **CONFIGS["axial-rezero-glu-tied"]}
    lm = reference_lm(kwargs)
    ids = tokens(24)
    model = convert_performer_pytorch(lm, kwargs)
    with torch.no_grad():
        expected = lm(ids)
        out = model(ids[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(10, 24):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-4)


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
    kwargs = {**BASE, **CONFIGS["relu-kernel-biases-chunked-ff"], "kernel_fn": "relu"}
    lm = reference_lm({**kwargs, "kernel_fn": torch.nn.ReLU()})
    torch.save({"state_dict": lm.state_dict()}, tmp_path / "lm.pt")
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    main(["--checkpoint", str(tmp_path / "lm.pt"), "--kwargs", str(tmp_path / "kwargs.json"),
          "--output", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lm(ids), rtol=1e-5, atol=1e-4)
    projection = model.model.layers[1].self_attn.feature_map.projection
    reference = lm.performer.net.layers[1][0].fn.fast_attention.projection_matrix
    assert torch.equal(projection, reference)


@pytest.mark.parametrize("option, value", [
    ("rotary_position_emb", True),
    ("use_scalenorm", True),
    ("local_attn_heads", 2),
    ("reversible", True),
    ("cross_attend", True),
    ("no_projection", True),
    ("causal", False),
    ("dim_head", 16),
    ("shift_tokens", True),  # with LayerNorm: performer-pytorch shifts after the norm
])
def test_unsupported_options_are_named(option, value):
    kwargs = {**BASE, option: value}
    with pytest.raises(ValueError, match=option):
        convert_performer_pytorch({}, kwargs)


def test_untied_bias_and_unknown_arguments_are_rejected():
    kwargs = dict(BASE)
    lm = reference_lm(kwargs)
    state = lm.state_dict()
    state["to_out.bias"] = torch.ones_like(state["to_out.bias"])
    with pytest.raises(ValueError, match="tie_embed=False"):
        convert_performer_pytorch(state, kwargs)
    with pytest.raises(ValueError, match="unknown PerformerLM arguments: \\['depht'\\]"):
        convert_performer_pytorch(state, {**kwargs, "depht": 2})
