"""KernelAttention, the standalone layer: against a float64 multi-head attention written here from its weights,
streaming through the cache dict, padding, low precision, redraw and state_dict round trips."""

from __future__ import annotations

import copy


import pytest
import torch

from hf_performer import KernelAttention, available_feature_maps
from hf_performer.feature_maps import FEATURE_MAPS, RandomProjectionFeatureMap

from helpers import in_float64, kernel_attention_reference

E, H = 16, 2  # embed_dim, heads
pytestmark = pytest.mark.usefixtures("single_thread")

CAUSAL_MAPS = [name for name, cls in FEATURE_MAPS.items() if cls.supports_causal]


def layer(feature_map="favor+", **kwargs) -> KernelAttention:
    torch.manual_seed(0)
    random = feature_map in FEATURE_MAPS and issubclass(FEATURE_MAPS[feature_map], RandomProjectionFeatureMap)
    if random and "num_features" not in kwargs:
        kwargs["num_features"] = 16
    return KernelAttention(E, H, feature_map=feature_map, **kwargs).eval()


def inputs(batch=2, t=6, s=None, seed=0, dims=(E, E, E)):
    g = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    return (torch.randn(batch, t, dims[0], generator=g), torch.randn(batch, s, dims[1], generator=g),
            torch.randn(batch, s, dims[2], generator=g))


def reference(attn: KernelAttention, query, value, key, mask=None):
    """float64 multi-head attention from the layer's weights: softmax for "exact", else the kernel of its
    feature map (plain features, so no stabilisation), masked keys and future keys removed."""
    lin = lambda m, x: x.double() @ m.weight.double().T + m.bias.double()
    split = lambda x: x.view(x.shape[0], x.shape[1], H, E // H).transpose(1, 2)
    q, k, v = split(lin(attn.q_proj, query)), split(lin(attn.k_proj, key)), split(lin(attn.v_proj, value))
    if attn.feature_map is None:
        scores = torch.exp(attn.scale * q @ k.transpose(-1, -2))
        if attn.causal:
            scores = scores * torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        if mask is not None:
            scores = scores * mask[:, None, None, :]
        out = (scores @ v) / scores.sum(-1, keepdim=True)
    else:
        out = kernel_attention_reference(attn.feature_map, q.float(), k.float(), v, scale=attn.scale,
                                         causal=attn.causal, key_mask=mask)
    return lin(attn.out_proj, out.transpose(1, 2).reshape(query.shape[0], query.shape[1], E))


@pytest.mark.parametrize("name", available_feature_maps())
def test_bidirectional_layer_matches_reference(name):
    attn = layer(name)
    query, value, key = inputs(t=5, s=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = attn(query, value, key=key, attention_mask=mask)
    assert out.shape == (2, 5, E) and out.dtype == torch.float32
    ref = reference(attn, query, value, key, mask)
    scale = ref.abs().max()
    torch.testing.assert_close(out.double() / scale, ref / scale, rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", [n for n in available_feature_maps() if n == "exact" or n in CAUSAL_MAPS])
def test_causal_layer_matches_reference_and_streams_through_the_cache(name):
    attn = layer(name, causal=True, chunk_size=4)
    x, _, _ = inputs(t=9, seed=1)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    full = attn(x, x, attention_mask=mask)
    ref = reference(attn, x, x, x, mask)  # the padded queries of row 1 see no key: the reference says 0 there
    scale = torch.cat([ref[0], ref[1, 3:]]).abs().max()
    torch.testing.assert_close(full[0].double() / scale, ref[0] / scale, rtol=0, atol=2e-4)
    torch.testing.assert_close(full[1, 3:].double() / scale, ref[1, 3:] / scale, rtol=0, atol=2e-4)

    cache = {}
    pieces = [attn(x[:, :5], x[:, :5], attention_mask=mask[:, :5], cache=cache)]
    for t in range(5, 9):
        pieces.append(attn(x[:, t:t + 1], x[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache))
    streamed = torch.cat(pieces, 1)
    assert cache["seen_tokens"] == 9
    torch.testing.assert_close(streamed[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(streamed[1, 3:], full[1, 3:], rtol=1e-4, atol=1e-5)


def test_kernel_state_does_not_grow_with_the_stream():
    attn = layer("favor+", causal=True)
    cache = {}
    x, _, _ = inputs(t=12)
    attn(x[:, :4], x[:, :4], cache=cache)
    shape = cache["kv"].shape
    attn(x[:, 4:], x[:, 4:], cache=cache)
    assert cache["kv"].shape == shape == (2, H, 16, E // H + 1)


def test_key_defaults_to_value_and_cross_attention_dims():
    attn = layer("favor+")
    query, value, _ = inputs(t=3, s=8)
    torch.testing.assert_close(attn(query, value), attn(query, value, key=value))
    cross = layer("favor+", kdim=6, vdim=10)
    query, value, key = inputs(t=3, s=8, dims=(E, 10, 6))
    assert cross(query, value, key=key).shape == (2, 3, E)


@pytest.mark.parametrize("name", ["favor+", "favor++", "elu", "exact"])
def test_padded_keys_do_not_change_the_output(name):
    attn = layer(name)
    query, value, key = inputs(t=4, s=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(query, value, key=key, attention_mask=mask)
    value2, key2 = value.clone(), key.clone()
    value2[0, 4:] += 10.0
    key2[0, 4:] -= 10.0
    torch.testing.assert_close(attn(query, value2, key=key2, attention_mask=mask), out, rtol=1e-5, atol=1e-5)
    alone = attn(query[:1], value[:1, :4], key=key[:1, :4])
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-5)


def test_self_attention_with_padding_equals_the_unpadded_sequence_for_favor_plus_plus():
    """favor++ statistics span the sequence: in self-attention the padding mask also keeps padded queries out."""
    attn = layer("favor++")
    x, _, _ = inputs(batch=1, t=5)
    padded = torch.cat([torch.full((1, 3, E), 4.0), x], 1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    torch.testing.assert_close(attn(padded, padded, attention_mask=mask)[:, 3:], attn(x, x), rtol=1e-5, atol=1e-5)


def test_favor_plus_approaches_exact_attention_with_many_features():
    exact = layer("exact")
    approx = layer("favor+", num_features=4096)
    approx.load_state_dict(exact.state_dict(), strict=False)
    query, value, key = inputs(t=6, s=6)
    query, key = query * 0.3, key * 0.3
    target = exact(query, value, key=key)
    error = (approx(query, value, key=key) - target).norm() / target.norm()
    assert error < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["favor+", "hyperbolic", "softmax_no_projection", "relu"])
def test_low_precision_layer_is_finite(name, dtype):
    """Large half-precision inputs: finite, and equal to the float32 layer with the same (rounded) weights on the
    same rounded inputs, within 8 eps of the dtype relative to the largest output (measured: up to ~4 eps)."""
    for causal in (False, True):
        attn = layer(name, causal=causal).to(dtype)
        x, _, _ = inputs(t=7)
        out = attn((x * 8).to(dtype), (x * 8).to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        rounded = (x * 8).to(dtype).float()
        reference = copy.deepcopy(attn).float()(rounded, rounded)
        assert (out.float() - reference).abs().max() <= 8 * torch.finfo(dtype).eps * reference.abs().max()


def test_gradients_flow_to_the_projections():
    attn = layer("favor++").train()
    query, value, key = inputs()
    attn(query, value, key=key).square().mean().backward()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0
    # the same layer in float64: same gradients to float32 accuracy (measured: ~5e-7 relative)
    exact = in_float64(attn)
    exact(query.double(), value.double(), key=key.double()).square().mean().backward()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        grad, expected = getattr(attn, name).weight.grad, getattr(exact, name).weight.grad
        assert (grad.double() - expected).abs().max() < 1e-5 * expected.abs().max(), name


def test_redraw_is_reproducible_and_state_dict_round_trips():
    a, b = layer("favor+", seed=7), layer("favor+", seed=7)
    assert torch.equal(a.feature_map.projection, b.feature_map.projection)
    first = a.feature_map.projection.clone()
    a.redraw_features()
    b.redraw_features()
    assert not torch.equal(a.feature_map.projection, first)
    assert torch.equal(a.feature_map.projection, b.feature_map.projection)
    a.redraw_features(seed=3)
    assert int(a.feature_redraws) == 2

    restored = layer("favor+", seed=0)
    restored.load_state_dict(a.state_dict())
    query, value, _ = inputs()
    assert torch.equal(restored.feature_map.projection, a.feature_map.projection)
    torch.testing.assert_close(restored(query, value), a(query, value))


@pytest.mark.parametrize(
    "build, error, field",
    [
        (lambda: KernelAttention(E, 3), ValueError, "divisible"),
        (lambda: KernelAttention(0, 1), ValueError, "embed_dim"),
        (lambda: KernelAttention(E, H, feature_map="softmax"), ValueError, "feature_map must be one of"),
        (lambda: KernelAttention(E, H, feature_map="favor++", causal=True), ValueError, "cannot be causal"),
        (lambda: KernelAttention(E, H, feature_map="elu", num_features=8), ValueError, "num_features"),
        (lambda: KernelAttention(E, H, feature_map="relu", feature_map_kwargs={"kernel_fn": "tanh"}), ValueError,
         "kernel_fn"),
        (lambda: KernelAttention(E, H, dropout=1.5), ValueError, "dropout"),
        (lambda: KernelAttention(E, H, scale=-1.0), ValueError, "scale"),
    ],
)
def test_invalid_construction(build, error, field):
    with pytest.raises(error, match=field):
        build()


def test_invalid_calls():
    attn = layer("favor+")
    query, value, _ = inputs()
    with pytest.raises(ValueError, match="cache needs causal=True"):
        attn(query, value, cache={})
    with pytest.raises(ValueError, match="attention_mask"):
        attn(query, value, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[batch, length, dim\]"):
        attn(query[0], value[0])
    causal = layer("favor+", causal=True)
    with pytest.raises(ValueError, match="T == S"):
        causal(query[:, :3], value)
