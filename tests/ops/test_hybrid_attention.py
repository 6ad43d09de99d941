"""The ``hybrid`` kind (LoLCATs, arXiv 2410.10254 sec. 3.2: exact softmax over a sliding window, kernel scores for
every other key, one normaliser) against a dense float64 reference written from the formula with explicit masks."""

import pytest
import torch
import torch.nn.functional as F

from hf_performer.attention import (
    ATTENTION_KINDS,
    HybridOptions,
    HybridState,
    KernelOptions,
    PackedDocuments,
    attend,
    hybrid_feature_maps,
)
from hf_performer.feature_maps import EluFeatureMap, FeatureMap, build_feature_map

from helpers import hybrid_attention_reference

pytestmark = pytest.mark.usefixtures("single_thread")

POISON = 1e4  # what padded tokens' queries, keys and values are filled with: any leak shows


class PlainRelu(FeatureMap):
    """relu(x) + 0.1 in the input's dtype (the registered maps compute in float32): float64 end to end."""

    def forward(self, x):
        return torch.relu(x) + 0.1


def elementwise_phi(feature_map):
    """phi in float64 from each map's definition, not from its code."""
    if isinstance(feature_map, EluFeatureMap):
        return lambda x: F.elu(x) + 1.0
    assert isinstance(feature_map, PlainRelu)
    return lambda x: torch.relu(x) + 0.1


def positions_from(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def inputs(batch=2, heads=3, length=17, dim=4, *, pads=(0, 5), dtype=torch.float64, seed=0):
    """q, k, v with left padding ``pads[b]`` in row b, padded entries poisoned; the mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    padded = ~mask[:, None, :, None]
    q, k, v = (x.masked_fill(padded, POISON) for x in (q, k, v))
    return q, k, v, mask


def options_for(feature_map, *, causal, window, gate_logits=None, qk_scale=0.7, **kwargs):
    return HybridOptions(KernelOptions(feature_map, causal=causal, qk_scale=qk_scale, chunk_size=4, **kwargs),
                         window=window, window_factor=gate_logits)


def assert_real_close(out, expected, mask, **tolerances):
    real = mask[:, None, :].expand(out.shape[:3])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real].double(), expected[real], **tolerances)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 8, 17, 40])
@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
def test_equals_the_dense_reference(causal, window, implementation):
    q, k, v, mask = inputs(pads=(0, 5) if causal else (0, 6))
    if not causal:  # bidirectional encoders pad on the right too
        mask[0, -3:] = False
        q, k, v = (x.masked_fill(~mask[:, None, :, None], POISON) for x in (q, k, v))
    gate_logits = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    options = options_for(PlainRelu(4), causal=causal, window=window, gate_logits=gate_logits,
                          implementation=implementation)
    out, state = attend("hybrid", q, k, v, mask, positions_from(mask), None, options)
    expected = hybrid_attention_reference(q, k, v, mask, window=window, causal=causal,
                                          phi=elementwise_phi(PlainRelu(4)), qk_scale=0.7,
                                          gate=torch.sigmoid(gate_logits))
    assert state is None and out.dtype == torch.float64
    assert_real_close(out, expected, mask, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_float32_with_a_registered_map_and_the_default_gate(causal):
    q, k, v, mask = inputs(dtype=torch.float32, length=30, seed=1)
    feature_map = EluFeatureMap(4)
    out, _ = attend("hybrid", q, k, v, mask, positions_from(mask), None,
                    options_for(feature_map, causal=causal, window=6))
    expected = hybrid_attention_reference(q, k, v, mask, window=6, causal=causal, phi=elementwise_phi(feature_map),
                                          qk_scale=0.7)
    assert out.dtype == torch.float32
    assert_real_close(out, expected, mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gate_logit", [-3.0, 0.0, 4.0])
def test_a_window_as_long_as_the_input_is_exact_softmax_whatever_the_gate(causal, gate_logit):
    q, k, v, mask = inputs(seed=2)
    options = HybridOptions(KernelOptions(PlainRelu(4), causal=causal), window=17, softmax_scale=0.3,
                            window_factor=torch.full((3,), gate_logit, dtype=torch.float64))
    out, _ = attend("hybrid", q, k, v, mask, positions_from(mask), None, options)
    allowed = mask[:, None, None, :].expand(-1, 1, 17, -1)
    if causal:
        allowed = allowed & torch.ones(17, 17, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    assert_real_close(out, scores.softmax(-1) @ v, mask, rtol=1e-10, atol=1e-10)


def test_gradcheck_in_float64():
    q, k, v, mask = inputs(batch=2, heads=2, length=7, dim=3, pads=(0, 2), seed=3)
    positions = positions_from(mask)
    feature_map = PlainRelu(3)

    for causal in (True, False):
        def run(q, k, v, logits):
            options = options_for(feature_map, causal=causal, window=2, gate_logits=logits, qk_scale=1.0)
            out, _ = attend("hybrid", q, k, v, mask, positions, None, options)
            return out * mask[:, None, :, None]  # padded queries' outputs are not defined

        tensors = [x.masked_fill(~mask[:, None, :, None], 0.0).requires_grad_() for x in (q, k, v)]
        logits = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(run, (*tensors, logits), eps=1e-6, atol=1e-7)


def test_gradients_equal_the_references():
    q, k, v, mask = inputs(dtype=torch.float32, length=24, seed=4)
    logits = torch.tensor([-1.0, 0.5, 2.0])
    weight = torch.randn(2, 3, 24, 4) * mask[:, None, :, None]
    feature_map = EluFeatureMap(4)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, logits)]
    out, _ = attend("hybrid", *leaves[:3], mask, positions_from(mask), None,
                    options_for(feature_map, causal=True, window=5, gate_logits=leaves[3]))
    got = torch.autograd.grad((out * weight).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, logits)]
    expected = hybrid_attention_reference(*ref_leaves[:3], mask, window=5, causal=True,
                                          phi=elementwise_phi(feature_map), qk_scale=0.7,
                                          gate=torch.sigmoid(ref_leaves[3]))
    wanted = torch.autograd.grad((expected.masked_fill(~mask[:, None, :, None], 0.0) * weight.double()).sum(),
                                 ref_leaves)
    for name, a, b in zip("qkvg", got, wanted):
        if name in "qk":  # padded queries / keys get no gradient, real ones the reference's
            assert (a[~mask[:, None, :, None].expand_as(a)] == 0).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: name + m)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_attend_each_document_alone(causal):
    q, k, v, _ = inputs(batch=1, length=20, pads=(0,), seed=5)
    lengths = [6, 9, 5]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    documents = PackedDocuments.from_positions(position_ids, None)
    options = options_for(PlainRelu(4), causal=causal, window=3)
    out, _ = attend("hybrid", q, k, v, None, position_ids, None, options, documents)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        alone = hybrid_attention_reference(q[:, :, piece], k[:, :, piece], v[:, :, piece],
                                           torch.ones(1, n, dtype=torch.bool), window=3, causal=causal,
                                           phi=elementwise_phi(PlainRelu(4)), qk_scale=0.7)
        torch.testing.assert_close(out[:, :, piece], alone, rtol=1e-10, atol=1e-10)
        start += n


@pytest.mark.parametrize("window", [1, 4, 30])
def test_decoding_in_chunks_and_steps_equals_the_full_pass(window):
    q, k, v, mask = inputs(length=21, pads=(0, 6), seed=6)
    positions = positions_from(mask)
    options = options_for(PlainRelu(4), causal=True, window=window,
                          gate_logits=torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    full, _ = attend("hybrid", q, k, v, mask, positions, None, options)
    state = ATTENTION_KINDS["hybrid"].state()
    assert isinstance(state, HybridState)
    pieces = []
    for start, stop in [(0, 9)] + [(t, t + 1) for t in range(9, 16)] + [(16, 21)]:
        out, state = attend("hybrid", q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                            mask[:, start:stop], positions[:, start:stop], state, options)
        pieces.append(out)
        assert state.window.keys.shape[2] == min(window - 1, stop)  # constant memory: w - 1 keys + (m, d + 1)
    assert_real_close(torch.cat(pieces, dim=2), full.double(), mask, rtol=1e-10, atol=1e-10)


def test_beam_reorder_of_the_state_reorders_the_continuation():
    q, k, v, mask = inputs(length=14, pads=(0, 3), seed=7)
    positions = positions_from(mask)
    options = options_for(PlainRelu(4), causal=True, window=4)
    _, state = attend("hybrid", q[:, :, :10], k[:, :, :10], v[:, :, :10], mask[:, :10], positions[:, :10],
                      HybridState(), options)
    order = torch.tensor([1, 0])
    state.map_batch(lambda t: t.index_select(0, order))
    out, _ = attend("hybrid", q[order, :, 10:], k[order, :, 10:], v[order, :, 10:], mask[order, 10:],
                    positions[order, 10:], state, options)
    full, _ = attend("hybrid", q[order], k[order], v[order], mask[order], positions[order], None, options)
    torch.testing.assert_close(out, full[:, :, 10:], rtol=1e-10, atol=1e-10)


def test_exponential_and_fourier_maps_are_refused_with_the_allowed_ones_named():
    for name in ("favor+", "rff", "softmax_no_projection"):
        with pytest.raises(ValueError, match="plain per-token features.*'elu'.*'relu'"):
            options_for(build_feature_map(name, 4, num_features=8), causal=True, window=4)
    with pytest.raises(ValueError, match="plain per-token features"):
        options_for(build_feature_map("generalized", 4, options={"kernel_fn": "exp"}), causal=True, window=4)
    assert {"elu", "relu", "identity"} <= set(hybrid_feature_maps())
    assert "favor+" not in hybrid_feature_maps()


@pytest.mark.parametrize("field, value", [("window", 0), ("window", 2.5), ("softmax_scale", -1.0),
                                          ("window_factor", torch.zeros(2, 2)), ("window_factor", [0.0])])
def test_bad_options_name_the_field(field, value):
    kwargs = {"window": 4, field: value}
    with pytest.raises(ValueError, match=f"HybridOptions.{field}"):
        HybridOptions(KernelOptions(PlainRelu(4), causal=True), **kwargs)
    with pytest.raises(ValueError, match="scale_by_length"):
        HybridOptions(KernelOptions(PlainRelu(4), causal=False, scale_by_length=True), window=4)


def test_window_factor_must_have_one_logit_per_head():
    q, k, v, mask = inputs()
    options = options_for(PlainRelu(4), causal=True, window=4, gate_logits=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="window_factor has 2 entries for 3 heads"):
        attend("hybrid", q, k, v, mask, positions_from(mask), None, options)
