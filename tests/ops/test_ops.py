"""The attention ops against the naive O(N^2) masked computation in float64: values, gradients, states, dtypes,
memory structure and torch.compile. Small sizes: the whole file runs in well under a minute on two cores."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_performer import ops, ops_chunked
from hf_performer.ops import causal_linear_attention, linear_attention, naive_kernel_attention

from helpers import expected_choice, favor_inputs, features, grads, key_mask, multiply_adds, plain_favor


@pytest.fixture
def small_blocks(monkeypatch):
    """Several blocks per sequence, so the state crosses block boundaries in both passes."""
    monkeypatch.setattr(ops_chunked, "BLOCK_TOKENS", 16)


# -- values and gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
@pytest.mark.parametrize("stabilised", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_causal_matches_naive(small_blocks, implementation, stabilised, masked, chunk_size):
    q, k, v, log_scale = features(stabilised=stabilised)  # length 37: a ragged last chunk
    mask = key_mask(2, 37) if masked else None
    weight = torch.randn(2, 2, 37, 5, dtype=torch.float64)
    ref, ref_grads = grads(
        lambda q, k, v: naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale, key_mask=mask),
        (q, k, v), weight,
    )
    out, out_grads = grads(
        lambda q, k, v: causal_linear_attention(
            q, k, v, k_log_scale=log_scale, key_mask=mask, chunk_size=chunk_size, implementation=implementation
        )[0],
        (q, k, v), weight,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_matches_naive(implementation, masked):
    q, k, v, log_scale = features(length=23)
    mask = key_mask(2, 23) if masked else None
    weight = torch.randn(2, 2, 23, 5, dtype=torch.float64)
    ref, ref_grads = grads(
        lambda q, k, v: naive_kernel_attention(q, k, v, causal=False, k_log_scale=log_scale, key_mask=mask),
        (q, k, v), weight,
    )
    out, out_grads = grads(
        lambda q, k, v: linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask, implementation=implementation),
        (q, k, v), weight,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_exact_scale_mode_for_wild_log_scales(small_blocks, monkeypatch):
    """Running maxima that jump by far more than FAST_SPAN inside a chunk take the exact path, and still match;
    forcing the exact path everywhere gives the same numbers as the fast one."""
    q, k, v, log_scale = features(length=40, spread=1.0)
    wild = log_scale.clone()
    wild[..., 5] += 60.0
    wild[..., 21] += 120.0
    for scales in (log_scale, wild):
        ref = naive_kernel_attention(q, k, v, causal=True, k_log_scale=scales)
        out = causal_linear_attention(q, k, v, k_log_scale=scales, chunk_size=8, implementation="chunked")[0]
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    fast = causal_linear_attention(q, k, v, k_log_scale=log_scale, chunk_size=8, implementation="chunked")[0]
    monkeypatch.setattr(ops_chunked, "FAST_SPAN", -1.0)
    exact = causal_linear_attention(q, k, v, k_log_scale=log_scale, chunk_size=8, implementation="chunked")[0]
    torch.testing.assert_close(fast, exact, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stabilised", [True, False])
def test_gradcheck_chunked_with_state(monkeypatch, stabilised):
    """float64 gradcheck through outputs and the returned state, w.r.t. q, k, v and the initial state
    (11 tokens: chunks of 3, two blocks, a ragged last chunk)."""
    monkeypatch.setattr(ops_chunked, "BLOCK_TOKENS", 6)
    q, k, v, log_scale = features(batch=1, heads=1, length=11, m=3, d=2, stabilised=stabilised)
    kv0 = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    c0 = torch.randn(1, 1, dtype=torch.float64) if stabilised else None

    def fn(q, k, v, kv0):
        out, (kv, _) = causal_linear_attention(
            q, k, v, k_log_scale=log_scale, initial_state=(kv0, c0), chunk_size=3, implementation="chunked"
        )
        return out, kv

    inputs = [t.requires_grad_() for t in (q, k, v, kv0)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_quadratic_and_linear(causal):
    q, k, v, log_scale = features(batch=1, heads=1, length=9, m=3, d=2)
    mask = torch.tensor([[False, True, True, False, True, True, True, True, True]])
    if causal:
        fn = lambda q, k, v: causal_linear_attention(  # noqa: E731
            q, k, v, k_log_scale=log_scale, key_mask=mask, implementation="quadratic")[0]
        inputs = (q, k, v)
    else:
        fn = lambda q, k, v, impl: linear_attention(  # noqa: E731
            q, k, v, k_log_scale=log_scale, key_mask=mask, implementation=impl)
        assert torch.autograd.gradcheck(lambda *t: fn(*t, "quadratic"), [t.clone().requires_grad_() for t in (q, k, v)])
        inputs = (q, k, v)
        fn = lambda q, k, v, _fn=fn: _fn(q, k, v, "chunked")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in inputs])


def test_fp32_accuracy_against_float64():
    """Max relative error (normwise, per output row scale) below 1e-5 in fp32 on a longer sequence."""
    q, k, v, log_scale = features(batch=1, heads=2, length=1500, m=32, d=16, seed=3)
    ref = naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale)
    out = causal_linear_attention(q.float(), k.float(), v.float(), k_log_scale=log_scale.float())[0]
    assert out.dtype == torch.float32
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


# -- chunking, states and decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("stabilised", [True, False])
def test_chunk_size_invariance(small_blocks, stabilised):
    q, k, v, log_scale = features(length=45, stabilised=stabilised)
    mask = key_mask(2, 45)
    runs = [
        causal_linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask, chunk_size=c, implementation="chunked")
        for c in (1, 3, 8, 64)
    ]
    for out, (kv, log_end) in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(kv * _scale(log_end), runs[0][1][0] * _scale(runs[0][1][1]), rtol=1e-11, atol=1e-13)


def _scale(log_scale):
    return 1.0 if log_scale is None else torch.exp(log_scale)[..., None, None]


@pytest.mark.parametrize("stabilised", [True, False])
def test_decoding_token_by_token_matches_one_pass(stabilised):
    """Chunked prefill, then pieces of 1, 5 and 1 tokens from the state: same outputs and final state as one pass."""
    q, k, v, log_scale = features(length=40, stabilised=stabilised, spread=3.0)
    mask = key_mask(2, 40)
    full, (kv_full, c_full) = causal_linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask, chunk_size=8)
    state, pieces, start = None, [], 0
    for end in (29, 30, 35, 36, 37, 38, 39, 40):
        part = slice(start, end)
        out, state = causal_linear_attention(
            q[:, :, part], k[:, :, part], v[:, :, part], k_log_scale=None if log_scale is None else log_scale[..., part],
            key_mask=mask[:, part], initial_state=state, chunk_size=8,
        )
        pieces.append(out)
        start = end
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0], kv_full, rtol=1e-10, atol=1e-12)
    if stabilised:
        torch.testing.assert_close(state[1], c_full)


def test_quadratic_and_chunked_states_agree():
    q, k, v, log_scale = features(length=20)
    kv0, c0 = torch.rand(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    a = causal_linear_attention(q, k, v, k_log_scale=log_scale, initial_state=(kv0, c0), implementation="chunked")
    b = causal_linear_attention(q, k, v, k_log_scale=log_scale, initial_state=(kv0, c0), implementation="quadratic")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1][0], b[1][0])
    torch.testing.assert_close(a[1][1], b[1][1])


def test_auto_follows_the_stated_cost_model_over_a_grid():
    """Not a timing test (speed is measured in benchmarks/): ``choose_implementation`` must pick whichever path the
    cost model (``helpers.multiply_adds``) counts fewer multiply-adds for, on a grid of (N, m, d, C) that crosses
    the boundary for most (m, d, C), so both sides of each crossover are checked."""
    checked = crossovers = 0
    for m in (1, 4, 16, 64, 128, 266):
        for d in (1, 8, 64):
            for chunk in (1, 8, 64, 256):
                for causal in (True, False):
                    choices = []
                    for n in list(range(1, 130)) + [255, 256, 257, 511, 512, 513, 1024, 4096]:
                        choice = ops.choose_implementation(n, n, m, d, causal=causal, chunk_size=chunk)
                        assert choice == expected_choice(n, n, m, d, causal=causal, chunk_size=chunk), (n, m, d, chunk)
                        choices.append(choice)
                        checked += 1
                    crossovers += sum(a != b for a, b in zip(choices, choices[1:]))
                    # causal with C >= N: quadratic N^2 (m+d+1) <= N (N (m+d+1) + 2m(d+1)) always, so short
                    # sequences never take the chunked path
                    assert choices[0] == "quadratic"
    assert checked > 10000 and crossovers > 50  # the grid does cross the boundary, many times


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m, d, chunk", [(16, 8, 8), (128, 64, 64), (266, 64, 64), (7, 5, 4)])
def test_auto_switches_exactly_at_the_crossover(causal, m, d, chunk):
    """At the first N where the chunked count drops below the quadratic one, ``auto`` switches, not one token
    earlier (ties stay quadratic); the crossover is found from the cost model by a linear search over N."""
    lengths = range(1, 20000)
    crossover = next(n for n in lengths
                     if multiply_adds(n, n, m, d, causal=causal, chunk_size=chunk)[1]
                     < multiply_adds(n, n, m, d, causal=causal, chunk_size=chunk)[0])
    assert ops.choose_implementation(crossover - 1, crossover - 1, m, d, causal=causal, chunk_size=chunk) == "quadratic"
    assert ops.choose_implementation(crossover, crossover, m, d, causal=causal, chunk_size=chunk) == "chunked"
    # closed form where there is one: bidirectional N^2 (m+d+1) < 2 N m (d+1)  <=>  N > 2 m (d+1) / (m+d+1)
    if not causal:
        assert crossover == 2 * m * (d + 1) // (m + d + 1) + 1


def test_auto_with_different_query_and_key_lengths_counts_both():
    """Cross attention / a cached prefix: S keys for N queries (bidirectional (N + S) m (d + 1))."""
    for n, s in [(1, 4096), (4096, 1), (16, 512), (512, 16), (3, 40), (40, 3)]:
        for m, d in [(16, 8), (128, 64)]:
            assert ops.choose_implementation(n, s, m, d, causal=False) == expected_choice(n, s, m, d, causal=False)


def test_auto_picks_the_cheaper_path():
    assert ops.choose_implementation(1, 1, 128, 64, causal=True) == "quadratic"  # decoding one token
    assert ops.choose_implementation(64, 64, 128, 64, causal=True) == "quadratic"
    assert ops.choose_implementation(4096, 4096, 128, 64, causal=True) == "chunked"
    assert ops.choose_implementation(4096, 4096, 128, 64, causal=False) == "chunked"
    assert ops.choose_implementation(16, 16, 128, 64, causal=False) == "quadratic"
    with pytest.raises(ValueError, match="implementation"):
        causal_linear_attention(*features()[:3], implementation="fast")


def test_query_without_any_key_outputs_zero_with_finite_gradients(small_blocks):
    q, k, v, log_scale = features(length=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :20] = False  # the first 20 queries of row 1 see nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive_kernel_attention(*leaves, causal=True, k_log_scale=log_scale, key_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = causal_linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask, chunk_size=4)[0]
    assert torch.all(out[1, :, :20] == 0)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)  # the float64 reference: 0 there too
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    for t, expected in zip((q, k, v), ref_grads):  # and its gradients, the zero ones included
        torch.testing.assert_close(t.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(k.grad[1, :, :20] == 0)

    mask[1] = False  # bidirectional: a row with no key at all
    ref = naive_kernel_attention(q.detach(), k.detach(), v.detach(), causal=False, k_log_scale=log_scale,
                                 key_mask=mask)
    for implementation in ("chunked", "quadratic"):
        out = linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask, implementation=implementation)
        assert torch.all(out[1] == 0) and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# -- dtypes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    """4096 tokens in bf16/fp16: sums of that length lose ~2 digits when accumulated in the input dtype. The output
    must match the float64 computation on the same rounded inputs to the output dtype's own rounding."""
    q, k, v, log_scale = features(batch=1, heads=2, length=4096, m=16, d=8, dtype=torch.float32, seed=5)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, (kv, _) = causal_linear_attention(q, k, v, k_log_scale=log_scale)
    assert out.dtype == dtype and kv.dtype == torch.float32
    ref = naive_kernel_attention(q.detach(), k.detach(), v.detach(), causal=True, k_log_scale=log_scale)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(0.05)).max() < 4 * eps
    out.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))
    # gradients: the same op in float64 on the same rounded inputs (O(N), itself checked against the naive reference
    # above), within 4 eps of the largest gradient (measured: ~1.1 eps for q, ~0.3 eps for k, v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact, _ = causal_linear_attention(*leaves, k_log_scale=log_scale.double(), implementation="chunked")
    for t, expected in zip((q, k, v), torch.autograd.grad(exact.sum(), leaves)):
        assert (t.grad.double() - expected).abs().max() < 4 * eps * expected.abs().max()


# -- memory ----------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_size_n_m_d_is_ever_built():
    """Forward and backward kernels, op by op: nothing bigger than N max(m, C) per head (features, chunk scores),
    while an (N, m, d) tensor would be 8x bigger; autograd keeps only inputs, output and small extras."""
    batch, heads, length, m, d = 1, 2, 2048, 32, 16
    q, k, v, log_scale = features(batch, heads, length, m, d, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kv0, c0 = ops.empty_state(batch, heads, m, d, True, "cpu")
    with LargestTensor() as probe:
        saved = ops_chunked._chunked_forward_impl(q.detach(), k.detach(), v.detach(), log_scale, kv0, c0, 64)
        ops_chunked._chunked_backward_impl(
            torch.ones_like(v), torch.zeros_like(kv0), q.detach(), k.detach(), v.detach(), log_scale, c0,
            saved[0], saved[1], saved[4], 64,
        )
    assert probe.largest <= batch * heads * length * max(m, 64) <= batch * heads * length * m * d / 8

    extra = []

    def pack(t):
        if not any(t.data_ptr() == x.data_ptr() for x in (q, k, v)):
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation="chunked")
    inputs = sum(t.numel() for t in (q, k, v, log_scale))
    assert sum(extra) <= out.numel() + inputs // 2  # out, normaliser, a few block states


# -- exponential features computed inside the op (causal_exp_attention) -----------------------------------------


@pytest.mark.parametrize("implementation", ["chunked", "quadratic"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("spread,norm_coef", [(0.7, 0.5), (2.5, 0.5), (1.0, 0.0)])
def test_exp_features_inside_the_op_match_naive(small_blocks, implementation, masked, spread, norm_coef):
    """Values and gradients w.r.t. q, k, v against the naive float64 attention on features computed from their
    definition; spread 2.5 gives logits far apart (running maxima that jump), norm_coef 0 is TF's expmod form."""
    q, k, v, projection = favor_inputs(spread=spread)
    mask = key_mask(2, 37) if masked else None
    weight = torch.randn(2, 2, 37, 5, dtype=torch.float64)
    ref, ref_grads = grads(
        lambda q, k, v: naive_kernel_attention(
            plain_favor(q, projection, norm_coef, -0.3), plain_favor(k, projection, norm_coef, -0.3), v,
            causal=True, key_mask=mask,
        ),
        (q, k, v), weight,
    )
    out, out_grads = grads(
        lambda q, k, v: ops.causal_exp_attention(
            q, k, v, projection, norm_coef=norm_coef, logit_offset=-0.3, key_mask=mask, chunk_size=8,
            implementation=implementation,
        )[0],
        (q, k, v), weight,
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_exp_features_inside_the_op_same_state_as_outside(small_blocks):
    """The fused op and causal_linear_attention on ExpProjectionFeatures return the same output and state, and a
    prefix's state continued by the other path gives the one-pass result: the cache may mix them (prefill chunked,
    decoding quadratic)."""
    q, k, v, projection = favor_inputs(length=45)
    mask = key_mask(2, 45)
    args = dict(norm_coef=0.5, logit_offset=-0.7)
    fused, (kv, c) = ops.causal_exp_attention(q, k, v, projection, key_mask=mask, chunk_size=8,
                                              implementation="chunked", **args)
    qf, _ = ops.ExpProjectionFeatures.apply(q, projection, 0.5, -0.7)
    kf, log_scale = ops.ExpProjectionFeatures.apply(k, projection, 0.5, -0.7)
    plain, (kv2, c2) = causal_linear_attention(qf, kf, v, k_log_scale=log_scale, key_mask=mask, chunk_size=8,
                                               implementation="chunked")
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kv, kv2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, c2, rtol=0, atol=0)
    head, state = ops.causal_exp_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], projection,
                                           key_mask=mask[:, :30], chunk_size=8, implementation="chunked", **args)
    tail = torch.cat([
        ops.causal_exp_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], projection,
                                 key_mask=mask[:, t:t + 1], initial_state=state, **args)[0]
        for t in range(30, 31)
    ], dim=2)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), fused[:, :, :31], rtol=1e-10, atol=1e-12)


def test_gradcheck_exp_features_inside_the_op(monkeypatch):
    monkeypatch.setattr(ops_chunked, "BLOCK_TOKENS", 6)
    q, k, v, projection = favor_inputs(batch=1, heads=1, length=11, d=3, m=4)
    kv0 = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    c0 = torch.randn(1, 1, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, False, True, True, True, True, True, True]])

    def fn(q, k, v, kv0):
        # The leaving state is checked through a continuation: kv is at scale exp(-c_end), and c_end (the running
        # max of the keys' log scales) moves with k, a constant for autograd as everywhere (it cancels in outputs).
        args = dict(norm_coef=0.5, logit_offset=0.1, chunk_size=3, implementation="chunked")
        out, state = ops.causal_exp_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], projection,
                                              key_mask=mask[:, :8], initial_state=(kv0, c0), **args)
        rest, _ = ops.causal_exp_attention(q[..., 8:, :], k[..., 8:, :], v[..., 8:, :], projection,
                                           key_mask=mask[:, 8:], initial_state=state, **args)
        return out, rest

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v, kv0)])


def test_gradcheck_exp_projection_features():
    """The fused feature node's gradient is that of exp(logits - sg(log_scale)): check it through a product
    with exp(log_scale) (which then restores exp(logits) and its full gradient)."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(4, 3, dtype=torch.float64)

    def fn(x):
        features, log_scale = ops.ExpProjectionFeatures.apply(x, projection, 0.5, -0.2)
        return features * log_scale.exp().unsqueeze(-1)

    assert torch.autograd.gradcheck(fn, [x])
    torch.testing.assert_close(fn(x), plain_favor(x, projection, 0.5, -0.2))


def test_exp_features_inside_the_op_keep_no_feature_tensor():
    """Autograd keeps q, k, v, the output and (B, H, N)-sized extras: no (N, m) feature tensor, unlike the
    unfused path (features and their log scales)."""
    batch, heads, length, d, m = 1, 2, 1024, 16, 64
    q, k, v, projection = favor_inputs(batch, heads, length, d, m)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    extra = []

    def pack(t):
        if not any(t.data_ptr() == x.data_ptr() for x in (q, k, v)):
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = ops.causal_exp_attention(q, k, v, projection.float(), norm_coef=0.5, logit_offset=0.0,
                                          implementation="chunked")
    assert max(extra) <= out.numel() < batch * heads * length * m


# -- torch.compile ---------------------------------------------------------------------------------------------


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; the chunk loop is inside an opaque custom op, so nothing unrolls."""
    torch._dynamo.reset()
    q, k, v, log_scale = features(batch=1, heads=2, length=70, m=8, d=4, dtype=torch.float32)

    def both(q, k, v):
        causal, (kv, c) = causal_linear_attention(q, k, v, k_log_scale=log_scale)
        bidirectional = linear_attention(q, k, v, k_log_scale=log_scale)
        return causal.sum() + bidirectional.sum() + kv.sum()

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled_in = [t.clone().requires_grad_() for t in (q, k, v)]
    both(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_tiny_model_compiles_in_one_graph(make_config):
    """A whole causal Performer (forward, loss, backward) compiles with fullgraph=True and matches eager."""
    from hf_performer import PerformerForCausalLM

    torch._dynamo.reset()
    model = PerformerForCausalLM(make_config(num_hidden_layers=1)).eval()
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))

    def loss(ids):
        return model(ids, labels=ids, use_cache=False).loss

    compiled_loss = torch.compile(loss, backend="aot_eager", fullgraph=True)(ids)
    compiled_loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    eager_loss = loss(ids)
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(got, want)


def test_chunked_ops_pass_torch_library_opcheck_with_a_ragged_last_chunk():
    """The fake kernels (what torch.compile and torch.export trace) must promise the strides the real ones return;
    with N not a multiple of the chunk the backward used to return strided views of its padded buffers."""
    generator = torch.Generator().manual_seed(0)
    B, H, N, m, d, chunk = 1, 2, 11, 8, 4, 4
    q, k = torch.rand(B, H, N, m, generator=generator), torch.rand(B, H, N, m, generator=generator)
    v = torch.randn(B, H, N, d, generator=generator)
    log_scale = torch.randn(B, H, N, generator=generator)
    kv0, c0 = torch.zeros(B, H, m, d + 1), torch.full((B, H), -1e30)
    forward_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), log_scale, kv0, c0, chunk)
    torch.library.opcheck(ops_chunked._chunked_forward, forward_args)
    out, normaliser, kv_end, c_end, block_states = ops_chunked._chunked_forward(*forward_args)
    backward_args = (torch.randn_like(out), torch.randn_like(kv_end), q.detach(), k.detach(), v.detach(), log_scale,
                     c0, out.detach(), normaliser.detach(), block_states.detach(), chunk)
    torch.library.opcheck(ops_chunked._chunked_backward, backward_args)


# -- one-token decode fast path (ops_decode.exp_decode_step) -----------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("empty", [False, True])
def test_decode_fast_path_matches_quadratic(masked, empty):
    """Without gradients, one token on a filled state takes ops_decode; it must give the quadratic path's output and
    state (the state passed in left untouched)."""
    torch.manual_seed(0)
    b, h, d, m = 2, 3, 8, 16
    projection = torch.randn(m, d, dtype=torch.float64) * 0.5
    prompt = [torch.randn(b, h, 9, d, dtype=torch.float64) for _ in range(3)]
    step = [torch.randn(b, h, 1, d, dtype=torch.float64) for _ in range(3)]
    kwargs = dict(norm_coef=0.5, logit_offset=-0.5 * 2.77)
    if empty:
        state = ops.empty_state(b, h, m, d, True, "cpu")
        state = (state[0].double(), state[1].double())
    else:
        state = ops.causal_exp_attention(*prompt, projection, **kwargs, implementation="chunked")[1]
    mask = torch.tensor([[True], [False]]) if masked else None
    kv_before = state[0].clone()
    with torch.no_grad():
        out, (kv, c) = ops.causal_exp_attention(*step, projection, **kwargs, key_mask=mask, initial_state=state)
    ref, (ref_kv, ref_c) = ops.causal_exp_attention(*step, projection, **kwargs, key_mask=mask, initial_state=state,
                                                    implementation="quadratic")
    assert torch.equal(state[0], kv_before)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(c, ref_c)
    torch.testing.assert_close(kv, ref_kv)


@pytest.mark.parametrize("shift", [-30.0, 30.0])
def test_decode_step_keeps_or_rescales_the_state_with_the_same_result(shift):
    """The state (kv, c) and (kv exp(c - c'), c') are the same sums. Raised by 30 nats no new key sets a new running
    max (the one-pass update that keeps the old sums as they are); lowered by 30 every key does (the rescale)."""
    torch.manual_seed(1)
    b, h, d, m = 2, 3, 8, 16
    projection = torch.randn(m, d, dtype=torch.float64) * 0.5
    prompt = [torch.randn(b, h, 9, d, dtype=torch.float64) for _ in range(3)]
    step = [torch.randn(b, h, 1, d, dtype=torch.float64) for _ in range(3)]
    kwargs = dict(norm_coef=0.5, logit_offset=-1.0)
    kv, c = ops.causal_exp_attention(*prompt, projection, **kwargs, implementation="chunked")[1]
    shifted = (kv * torch.exp(-torch.tensor(shift, dtype=torch.float64)), c + shift)
    ref, (ref_kv, ref_c) = ops.causal_exp_attention(*step, projection, **kwargs, initial_state=(kv, c),
                                                    implementation="quadratic")
    with torch.no_grad():
        out, (kv1, c1) = ops.causal_exp_attention(*step, projection, **kwargs, initial_state=shifted)
    assert torch.equal(c1, shifted[1]) == (shift > 0)  # which update ran
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(kv1 * torch.exp(c1 - ref_c)[..., None, None], ref_kv)


def test_decode_fast_path_not_taken_with_gradients(monkeypatch):
    """Training through a state keeps the general (differentiable) paths."""
    from hf_performer import ops_decode

    monkeypatch.setattr(ops, "exp_decode_step", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fast path")))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    state = ops.causal_exp_attention(q.detach(), k.detach(), v.detach(), torch.randn(16, 8, dtype=torch.float64),
                                     norm_coef=0.5, logit_offset=0.0, implementation="quadratic")[1]
    out, _ = ops.causal_exp_attention(q, k, v, torch.randn(16, 8, dtype=torch.float64), norm_coef=0.5,
                                      logit_offset=0.0, initial_state=state)
    out.sum().backward()
    assert q.grad is not None and ops_decode is not None
