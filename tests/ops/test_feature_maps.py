"""Feature maps: each one against an independent float64 computation of its features and of its kernel, through
``ops`` (bidirectional, causal, streamed) and through the model; favor++'s statistics and padding; low precision;
redraw / save / reload; and the quality ordering measured by ``benchmarks/feature_map_quality.py``."""

from __future__ import annotations

import importlib.util
import math
import statistics

import pytest
import torch

from hf_performer import PerformerConfig, PerformerForCausalLM, PerformerModel, available_feature_maps
from hf_performer import feature_maps as fm
from hf_performer.feature_maps import FEATURE_MAPS, FeatureMap, get_feature_map_class, register_feature_map
from hf_performer.ops import causal_linear_attention, linear_attention, naive_kernel_attention

from helpers import REPO, in_float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny matrices (QR is 100x slower on two threads)


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 references: phi(q), phi(k) for one attention call, written from the papers' formulas
# ----------------------------------------------------------------------------------------------------------------


def _w(feature_map) -> torch.Tensor:
    return feature_map.projection.double()  # (m, d)


def _half_sq(x):
    return 0.5 * (x * x).sum(-1, keepdim=True)


def ref_favor_plus(f, q, k, **_):
    w = _w(f)
    phi = lambda x: torch.exp(x @ w.T - _half_sq(x)) / math.sqrt(w.shape[0])
    return phi(q), phi(k)


def ref_rho(q, k, query_mask=None, key_mask=None):
    """mean over real (i, j) pairs of |q_i + k_j|^2, by brute force: (B, H, 1, 1)."""
    pairs = ((q.unsqueeze(-2) + k.unsqueeze(-3)) ** 2).sum(-1)  # (B, H, N, S)
    qm = torch.ones(q.shape[0], q.shape[-2], dtype=torch.float64) if query_mask is None else query_mask.double()
    km = torch.ones(k.shape[0], k.shape[-2], dtype=torch.float64) if key_mask is None else key_mask.double()
    weight = (qm[:, :, None] * km[:, None, :])[:, None]  # (B, 1, N, S)
    return ((pairs * weight).sum((-1, -2)) / weight.sum((-1, -2)))[..., None, None]


def ref_favor_plus_plus(f, q, k, key_mask=None, query_mask=None, **_):
    d, w = q.shape[-1], _w(f)
    rho = ref_rho(q, k, query_mask, key_mask)
    # The positive root of d u^2 - (d + 2 rho) u - 2 rho = 0, u = 1 - 8A (see test_favor_plus_plus_coefficient...).
    u = ((d + 2 * rho) + torch.sqrt((d + 2 * rho) ** 2 + 8 * d * rho)) / (2 * d)
    a = (1 - u) / 8
    wsq = (w * w).sum(-1)

    def phi(x):
        logits = a * wsq + torch.sqrt(1 - 4 * a) * (x @ w.T) - _half_sq(x)
        return (1 - 4 * a) ** (d / 4) * torch.exp(logits) / math.sqrt(w.shape[0])

    return phi(q), phi(k)


def ref_hyperbolic(f, q, k, **_):
    w = _w(f)
    phi = lambda x: torch.cat([torch.exp(x @ w.T), torch.exp(-x @ w.T)], -1) * torch.exp(-_half_sq(x)) / math.sqrt(
        2 * w.shape[0])
    return phi(q), phi(k)


def ref_rff(f, q, k, smoothing=None, gaussian=False, **_):
    w = _w(f)

    def phi(x):
        parts = [torch.cos(x @ w.T) / math.sqrt(w.shape[0]), torch.sin(x @ w.T) / math.sqrt(w.shape[0])]
        if smoothing is not None:
            parts.append(torch.full_like(x[..., :1], math.sqrt(smoothing)))
        out = torch.cat(parts, -1)
        return out if gaussian else out * torch.exp(_half_sq(x))

    return phi(q), phi(k)


def ref_expmod(f, q, k, **_):
    w, d = _w(f), q.shape[-1]
    phi = lambda x: torch.exp(x @ w.T - math.sqrt(d) / 2) / math.sqrt(w.shape[0])
    return phi(q), phi(k)


def ref_softmax_no_projection(f, q, k, key_mask=None, causal=False, **_):
    phi_q = torch.exp(q) / torch.exp(q).sum(-1, keepdim=True)
    if causal:
        return phi_q, torch.exp(k)
    e = torch.exp(k)  # (B, H, S, d)
    if key_mask is not None:
        e = e * key_mask.double()[:, None, :, None]
    return phi_q, e / e.sum(-2, keepdim=True).clamp_min(1e-300)


def ref_generalized(fn, eps, projection=True):
    def ref(f, q, k, **_):
        phi = lambda x: fn(x @ _w(f).T if projection else x) + eps
        return phi(q), phi(k)

    return ref


def ref_taylor(f, q, k, **_):
    """[1, x, x_i x_j for i <= j], written as loops: x_i^2 / sqrt(2) on the diagonal, x_i x_j off it (arXiv
    2402.18668: 1 + x.y + (x.y)^2 / 2 with the symmetric quadratic terms merged)."""
    def phi(x):
        d = x.shape[-1]
        quadratic = [x[..., i] * x[..., j] * (1 / math.sqrt(2) if i == j else 1.0) for i in range(d) for j in range(i, d)]
        return torch.cat([torch.ones_like(x[..., :1]), x, torch.stack(quadratic, -1)], -1)

    return phi(q), phi(k)


def ref_hedgehog(f, q, k, **_):
    """Per head h: [softmax(W_h x + b_h), softmax(-W_h x - b_h)], queries and keys with their own W, b (arXiv
    2402.04347, eq. 3), one head at a time."""
    def phi(x, weight, bias):
        heads = []
        for h in range(x.shape[1]):
            logits = x[:, h] @ weight[h].double().T + bias[h].double()  # (B, N, f)
            heads.append(torch.cat([torch.softmax(logits, -1), torch.softmax(-logits, -1)], -1))
        return torch.stack(heads, 1)  # (B, H, N, 2f)

    return phi(q, f.query_weight, f.query_bias), phi(k, f.key_weight, f.key_bias)


relu = lambda t: t.clamp_min(0)
elu1 = lambda t: torch.where(t > 0, t + 1, torch.exp(t))

# id -> (registry name, options, reference, positive features, causal-capable)
MAPS = {
    "favor+": ("favor+", {}, ref_favor_plus, True, True),
    "favor+ iid": ("favor+", {"orthogonal": False}, ref_favor_plus, True, True),
    "favor++": ("favor++", {}, ref_favor_plus_plus, True, False),
    "expplus": ("expplus", {"orthogonal": False}, ref_favor_plus_plus, True, False),
    "hyperbolic": ("hyperbolic", {}, ref_hyperbolic, True, True),
    "rff": ("rff", {}, ref_rff, False, True),
    "rff gaussian": ("rff", {"kernel": "gaussian"}, lambda f, q, k, **kw: ref_rff(f, q, k, gaussian=True), False, True),
    "smoothed_rff": ("smoothed_rff", {"smoothing": 2.0},
                     lambda f, q, k, **kw: ref_rff(f, q, k, smoothing=2.0), False, True),
    "expmod": ("expmod", {}, ref_expmod, True, True),
    "softmax_no_projection": ("softmax_no_projection", {}, ref_softmax_no_projection, True, True),
    "relu": ("relu", {}, ref_generalized(relu, 1e-3), True, True),
    "generalized exp": ("generalized", {"kernel_fn": "exp"}, ref_generalized(torch.exp, 1e-3), True, True),
    "generalized abs, no projection": ("generalized", {"kernel_fn": "abs", "use_projection": False},
                                       ref_generalized(torch.abs, 1e-3, projection=False), True, True),
    "elu": ("elu", {}, ref_generalized(elu1, 0.0, projection=False), True, True),
    "identity": ("identity", {}, ref_generalized(lambda t: t, 0.0, projection=False), False, True),
    "square": ("square", {}, ref_generalized(torch.square, 0.0, projection=False), True, True),
    "taylor": ("taylor", {}, ref_taylor, False, True),  # signed features, positive kernel
    "hedgehog": ("hedgehog", {}, ref_hedgehog, True, True),
    "hedgehog f != d": ("hedgehog", {"num_features": 6}, ref_hedgehog, True, True),
}
CAUSAL_MAPS = [name for name, spec in MAPS.items() if spec[4]]
D = 8


def make_map(map_id: str, num_features: int = 12, seed: int = 0) -> FeatureMap:
    name, options, *_ = MAPS[map_id]
    cls = get_feature_map_class(name)
    if issubclass(cls, fm.RandomProjectionFeatureMap):
        options = {"num_features": num_features, **options}
    if cls.per_head:
        options = {"num_heads": 2, **options}  # qkv()'s heads
    feature_map = cls(D, **options)
    feature_map.new_feature_map(torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # learned maps: a trained-looking state, not only their identity start
        for parameter in feature_map.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return feature_map


def reference(map_id, feature_map, q, k, **kwargs):
    return MAPS[map_id][2](feature_map, q.double(), k.double(), **kwargs)


def qkv(batch=2, heads=2, n=7, s=7, d=D, std=0.4, seed=0, value_dim=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g) * std
    k = torch.randn(batch, heads, s, d, generator=g) * std
    v = torch.randn(batch, heads, s, value_dim, generator=g)
    return q, k, v


def padding_mask(batch=2, s=7):
    mask = torch.ones(batch, s, dtype=torch.bool)
    mask[0, -2:] = False  # right padding
    mask[1, :3] = False  # left padding
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Registry and API
# ----------------------------------------------------------------------------------------------------------------


def test_registry_lists_every_map():
    expected = {"favor+", "favor++", "expplus", "hyperbolic", "relu", "generalized", "elu", "identity", "square",
                "expmod", "rff", "smoothed_rff", "softmax_no_projection", "taylor", "hedgehog", "exact"}
    assert expected <= set(available_feature_maps())


def test_register_custom_map_is_selectable_from_config():
    class CubeMap(FeatureMap):
        def forward(self, x):
            return x.float().pow(2) + 1.0

    register_feature_map("test_cube", CubeMap)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_feature_map("test_cube", CubeMap)
        config = PerformerConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 feature_map="test_cube")
        model = PerformerModel(config).eval()
        assert isinstance(model.layers[0].self_attn.feature_map, CubeMap)
        ids = torch.randint(0, 16, (1, 5))
        out = model(ids).last_hidden_state
        assert torch.isfinite(out).all()
        # the map really is used: the layer's attention equals the float64 kernel attention with phi(x) = x^2 + 1
        attn, captured = model.layers[0].self_attn, {}
        hooks = [getattr(attn, f"{n}_proj").register_forward_hook(
            lambda m, a, o, n=n: captured.__setitem__(n, o.view(1, 5, 2, 8).transpose(1, 2))) for n in "qkv"]
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0])))
        torch.testing.assert_close(model(ids).last_hidden_state, out, rtol=0, atol=0)
        for hook in hooks:
            hook.remove()
        q, k = captured["q"] * config.qk_scale, captured["k"] * config.qk_scale
        phi_q, phi_k = q.double() ** 2 + 1, k.double() ** 2 + 1
        expected = naive_kernel_attention(phi_q, phi_k, captured["v"], causal=True).transpose(1, 2).reshape(1, 5, 16)
        torch.testing.assert_close(captured["o"].double(), expected, rtol=1e-5, atol=1e-6)
    finally:
        FEATURE_MAPS.pop("test_cube", None)
    with pytest.raises(TypeError, match="subclass"):
        register_feature_map("bad", torch.nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register_feature_map("exact", CubeMap)


def test_factory_builds_maps_per_head_dim():
    make = fm.FavorPlusFeatureMap.factory(num_features=10, orthogonal=False)
    feature_map = make(6)
    assert (feature_map.head_dim, feature_map.num_features, feature_map.orthogonal) == (6, 10, False)


def test_new_feature_map_is_seeded_and_changes_the_draw():
    a, b = make_map("favor+", seed=1), make_map("favor+", seed=1)
    assert torch.equal(a.projection, b.projection)
    b.new_feature_map(torch.Generator().manual_seed(2))
    assert not torch.equal(a.projection, b.projection)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: fm.FavorPlusFeatureMap(8, num_features=0), "num_features"),
        (lambda: fm.HyperbolicFeatureMap(8, num_features=-2), "num_features"),
        (lambda: fm.FavorPlusFeatureMap(8, norm_scaling="unit"), "norm_scaling"),
        (lambda: fm.FavorPlusFeatureMap(0), "head_dim"),
        (lambda: fm.GeneralizedFeatureMap(8, kernel_fn="tanh"), "kernel_fn"),
        (lambda: fm.GeneralizedFeatureMap(8, kernel_epsilon=-1.0), "kernel_epsilon"),
        (lambda: fm.RandomFourierFeatureMap(8, kernel="laplace"), "kernel"),
        (lambda: fm.SmoothedRandomFourierFeatureMap(8, smoothing=-1.0), "smoothing"),
        (lambda: fm.HedgehogFeatureMap(8), "num_heads"),
        (lambda: fm.HedgehogFeatureMap(8, num_heads=0), "num_heads"),
        (lambda: fm.HedgehogFeatureMap(8, num_heads=2, num_features=7), "num_features"),
        (lambda: fm.HedgehogFeatureMap(8, num_heads=2, num_features=0), "num_features"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_unknown_options_and_bad_masks_are_rejected():
    with pytest.raises(TypeError, match="unexpected options"):
        fm.EluFeatureMap(8, num_features=4)
    with pytest.raises(TypeError, match="orthogonal"):
        fm.FavorPlusFeatureMap(8, orthogonal="yes")
    with pytest.raises(TypeError, match="num_features"):  # its size is fixed by d
        fm.TaylorFeatureMap(8, num_features=45)
    with pytest.raises(TypeError, match="unexpected options"):
        fm.HedgehogFeatureMap(8, num_heads=2, orthogonal=True)
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="key_mask"):
        make_map("favor++").attention_features(q, k, key_mask=torch.ones(2, 3, dtype=torch.bool))


def test_config_names_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"feature_map must be one of \[.*'favor\+\+'.*\], got 'favour'"):
        PerformerConfig(feature_map="favour")
    with pytest.raises(ValueError, match="kernel_fn"):
        PerformerConfig(feature_map="generalized", feature_map_kwargs={"kernel_fn": "tanh"})
    with pytest.raises(ValueError, match="num_features"):
        PerformerConfig(feature_map="taylor", feature_map_kwargs={"num_features": 10})
    with pytest.raises(ValueError, match="num_features"):
        PerformerConfig(feature_map="hedgehog", feature_map_kwargs={"num_features": 7})
    with pytest.raises(ValueError, match="num_heads"):  # the layers pass their own head count
        PerformerConfig(feature_map="hedgehog", feature_map_kwargs={"num_heads": 3})
    assert PerformerConfig(feature_map="hedgehog", feature_map_kwargs={"num_features": 12}).feature_map == "hedgehog"
    for name in ("favor++", "expplus"):
        with pytest.raises(ValueError, match="cannot be causal"):
            PerformerConfig(feature_map=name, causal=True)
        PerformerConfig(feature_map=name, causal=False)  # fine bidirectionally


# ----------------------------------------------------------------------------------------------------------------
# Features against the reference; positivity; shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_id", list(MAPS))
def test_features_match_reference(map_id):
    feature_map = make_map(map_id)
    q, k, _ = qkv(n=5, s=6)
    mask = padding_mask(s=6)
    phi_q, phi_k = feature_map.kernel_features(q, k, key_mask=mask)
    assert phi_q.shape == (2, 2, 5, feature_map.num_features) and phi_k.shape == (2, 2, 6, feature_map.num_features)
    assert phi_q.dtype == phi_k.dtype == torch.float32
    ref_q, ref_k = reference(map_id, feature_map, q, k, key_mask=mask)
    if MAPS[map_id][0] == "softmax_no_projection":
        ref_k = ref_k * mask[:, None, :, None]  # masked keys get no feature
        phi_k = phi_k * mask[:, None, :, None]
    torch.testing.assert_close(phi_q.double(), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi_k.double(), ref_k, rtol=1e-5, atol=1e-6)
    if MAPS[map_id][3]:
        assert (phi_q > 0).all() and (phi_k[mask[:, None].expand(2, 2, 6)] > 0).all()


def test_smoothed_rff_kernel_is_nonnegative_for_smoothing_at_least_one():
    feature_map = fm.SmoothedRandomFourierFeatureMap(D, num_features=16, smoothing=1.0)
    q, k, _ = qkv(std=2.0)
    phi_q, phi_k = feature_map.kernel_features(q, k)
    assert ((phi_q @ phi_k.transpose(-1, -2)) >= -1e-5).all()


@pytest.mark.parametrize("map_id", list(MAPS))
def test_attention_features_are_the_plain_features_up_to_cancelling_factors(map_id):
    """phi_q * c(q) and phi_k * exp(log_scale): the same kernel up to a positive factor per query."""
    feature_map = make_map(map_id)
    q, k, _ = qkv()
    for causal in ((False, True) if MAPS[map_id][4] else (False,)):
        q_features, k_features, log_scale = feature_map.attention_features(q, k, causal=causal)
        plain_q, plain_k = feature_map.kernel_features(q, k, causal=causal)
        assert q_features.dtype == k_features.dtype == torch.float32
        if log_scale is not None:
            assert log_scale.shape == k.shape[:-1]
            k_features = k_features.double() * log_scale.double().exp().unsqueeze(-1)
        stabilised = q_features.double() @ k_features.double().transpose(-1, -2)  # (B, H, N, S)
        plain = plain_q.double() @ plain_k.double().transpose(-1, -2)
        factor = plain / stabilised
        torch.testing.assert_close(factor, factor[..., :1].expand_as(factor), rtol=1e-4, atol=0)
        assert (factor > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Kernels: Monte Carlo for random maps, exact for deterministic ones
# ----------------------------------------------------------------------------------------------------------------


def _pairs(seed=0, n=6, d=4, std=0.35):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) * std,
            torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) * std)


def _monte_carlo(make, q, k, draws=40):
    """Mean and standard error over independent draws of phi(q) . phi(k) (each draw averages m features)."""
    estimates = []
    for seed in range(draws):
        feature_map = make()
        feature_map.new_feature_map(torch.Generator().manual_seed(seed))
        phi_q, phi_k = feature_map.kernel_features(q.float(), k.float())
        estimates.append(phi_q.double() @ phi_k.double().transpose(-1, -2))
    stacked = torch.stack(estimates)  # (draws, 1, 1, N, N)
    return stacked.mean(0), stacked.std(0) / math.sqrt(draws)


SOFTMAX_ESTIMATORS = {
    "favor+ orthogonal": lambda: fm.FavorPlusFeatureMap(4, num_features=64),
    "favor+ iid": lambda: fm.FavorPlusFeatureMap(4, num_features=64, orthogonal=False),
    "favor++ orthogonal": lambda: fm.FavorPlusPlusFeatureMap(4, num_features=64),
    "favor++ iid": lambda: fm.FavorPlusPlusFeatureMap(4, num_features=64, orthogonal=False),
    "hyperbolic": lambda: fm.HyperbolicFeatureMap(4, num_features=64),
    "rff": lambda: fm.RandomFourierFeatureMap(4, num_features=64),
}


@pytest.mark.parametrize("name", list(SOFTMAX_ESTIMATORS))
def test_softmax_estimators_are_unbiased(name):
    make = SOFTMAX_ESTIMATORS[name]
    assert make().approximates_softmax
    q, k = _pairs()
    mean, stderr = _monte_carlo(make, q, k)
    target = torch.exp(q @ k.transpose(-1, -2))
    assert ((mean - target).abs() <= 4.5 * stderr + 1e-3 * target).all(), (mean - target).abs().max()
    assert ((mean - target).abs() / target).mean() < 0.05


def test_expmod_and_smoothed_rff_estimate_their_own_kernels():
    q, k = _pairs(seed=1)
    sq = lambda x: (x * x).sum(-1)
    d = q.shape[-1]
    cases = {
        # E exp(w.(q + k)) = exp(|q + k|^2 / 2), times exp(-sqrt(d)) from the constant
        "expmod": (lambda: fm.ExpModFeatureMap(d, num_features=64),
                   torch.exp(sq(q.unsqueeze(-2) + k.unsqueeze(-3)) / 2 - math.sqrt(d))),
        # exp(q.k) + smoothing exp(|q|^2/2 + |k|^2/2)
        "smoothed_rff": (lambda: fm.SmoothedRandomFourierFeatureMap(d, num_features=64, smoothing=0.5),
                         torch.exp(q @ k.transpose(-1, -2))
                         + 0.5 * torch.exp(sq(q).unsqueeze(-1) / 2 + sq(k).unsqueeze(-2) / 2)),
    }
    for name, (make, target) in cases.items():
        assert not make().approximates_softmax
        mean, stderr = _monte_carlo(make, q, k)
        assert ((mean - target).abs() <= 4.5 * stderr + 1e-3 * target).all(), name


def test_relu_features_converge_to_the_arc_cosine_kernel():
    """E[relu(w.x) relu(w.y)] = |x||y| (sin t + (pi - t) cos t) / (2 pi) (Cho & Saul, NIPS 2009). The features
    are not divided by sqrt(m) (performer-pytorch's convention), so phi(q) . phi(k) is m times that."""
    q, k = _pairs(seed=2, std=1.0)
    make = lambda: fm.GeneralizedFeatureMap(4, num_features=64, kernel_fn="relu", kernel_epsilon=0.0)
    mean, stderr = _monte_carlo(make, q, k, draws=60)
    mean, stderr = mean / 64, stderr / 64
    norms = q.norm(dim=-1).unsqueeze(-1) * k.norm(dim=-1).unsqueeze(-2)
    theta = torch.arccos(((q @ k.transpose(-1, -2)) / norms).clamp(-1, 1))
    target = norms * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi)
    assert ((mean - target).abs() <= 4.5 * stderr + 1e-3).all()


def test_softmax_no_projection_keys_are_a_softmax_over_the_real_keys():
    feature_map = fm.SoftmaxNoProjectionFeatureMap(D)
    q, k, _ = qkv(s=7)
    mask = padding_mask()
    mask[1] = False  # a row with no real key at all
    _, keys, log_scale = feature_map.attention_features(q, k, key_mask=mask)
    assert log_scale is None and torch.isfinite(keys).all()
    torch.testing.assert_close(keys[0].sum(-2), torch.ones(2, D))  # each feature sums to 1 over the sequence
    assert (keys[0, :, -2:] == 0).all() and (keys[1] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# favor++ statistics
# ----------------------------------------------------------------------------------------------------------------


def test_favor_plus_plus_coefficient_minimises_the_mean_log_second_moment():
    """For phi = D exp(A|w|^2 + B w.x - |x|^2/2), log E[(phi(q) phi(k))^2] = d log(1-4A) - d/2 log(1-8A)
    + 2 (1-4A) |q+k|^2 / (1-8A) - |q|^2 - |k|^2 (Gaussian integral); A* minimises its mean over pairs."""
    feature_map = fm.FavorPlusPlusFeatureMap(D, num_features=4)
    grid = torch.linspace(-3.0, 0.124, 400_001, dtype=torch.float64)
    for std in (0.1, 0.5, 1.5):
        q, k, _ = qkv(batch=1, heads=1, std=std, seed=3)
        a = feature_map.coefficient(q, k).double().item()
        rho = ref_rho(q.double(), k.double()).item()
        loss = D * torch.log(1 - 4 * grid) - D / 2 * torch.log(1 - 8 * grid) + 2 * (1 - 4 * grid) * rho / (1 - 8 * grid)
        assert a <= 0 and abs(a - grid[loss.argmin()].item()) < 1e-4


def test_favor_plus_plus_has_lower_kernel_variance_than_favor_plus():
    """The point of OPRF: same mean, smaller second moment of the per-feature kernel estimate (on average)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, D, generator=g) * 0.3
    k = torch.randn(1, 1, 4, D, generator=g) * 0.3
    moments = {}
    for cls in (fm.FavorPlusFeatureMap, fm.FavorPlusPlusFeatureMap):
        feature_map = cls(D, num_features=20_000, orthogonal=False)
        feature_map.new_feature_map(torch.Generator().manual_seed(1))
        phi_q, phi_k = feature_map.kernel_features(q, k)
        per_feature = phi_q.double().unsqueeze(-2) * phi_k.double().unsqueeze(-3) * feature_map.num_features
        target = torch.exp(q.double() @ k.double().transpose(-1, -2))
        torch.testing.assert_close(per_feature.mean(-1), target, rtol=0.1, atol=0)
        moments[cls] = (per_feature**2).mean(-1)  # (1, 1, 4, 4)
    # A* minimises the mean over pairs of the log second moment (not every pair's): compare that mean.
    log_ratio = (moments[fm.FavorPlusPlusFeatureMap] / moments[fm.FavorPlusFeatureMap]).log().mean()
    assert log_ratio < -0.2, log_ratio


def test_favor_plus_plus_statistics_ignore_padding():
    """A padded row gets exactly the features and outputs it gets alone; without the masks it would not."""
    feature_map = make_map("favor++", num_features=16)
    q, k, v = qkv(batch=1, n=5, s=5, std=0.6, seed=4)
    junk = torch.full((1, 2, 3, D), 5.0)  # large padded tokens, so leaking them into the statistics shows
    q_pad, k_pad = torch.cat([junk, q], 2), torch.cat([junk, k], 2)
    v_pad = torch.cat([torch.zeros(1, 2, 3, D), v], 2)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    alone = linear_attention(*feature_map.attention_features(q, k)[:2], v,
                             k_log_scale=feature_map.attention_features(q, k)[2])
    qf, kf, ls = feature_map.attention_features(q_pad, k_pad, key_mask=mask, query_mask=mask)
    padded = linear_attention(qf, kf, v_pad, k_log_scale=ls, key_mask=mask)[:, :, 3:]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(feature_map.coefficient(q_pad, k_pad), feature_map.coefficient(q, k))


def test_maps_with_sequence_statistics_refuse_causal_use():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="cannot be causal"):
        make_map("favor++").attention_features(q, k, causal=True)
    with pytest.raises(RuntimeError, match="attention_features"):
        make_map("favor++").forward_queries(q)


# ----------------------------------------------------------------------------------------------------------------
# Through ops
# ----------------------------------------------------------------------------------------------------------------


def _check_close(out, ref):
    """Relative to the output's scale: signed kernels (rff, identity) can have small normalisers."""
    scale = ref.abs().max()
    torch.testing.assert_close(out.double() / scale, ref / scale, rtol=0, atol=2e-4)


@pytest.mark.parametrize("map_id", list(MAPS))
def test_bidirectional_ops_match_naive_attention(map_id):
    feature_map = make_map(map_id)
    q, k, v = qkv(seed=5)
    mask = padding_mask()
    q_features, k_features, log_scale = feature_map.attention_features(q, k, key_mask=mask, query_mask=mask)
    out = linear_attention(q_features, k_features, v, k_log_scale=log_scale, key_mask=mask)
    phi_q, phi_k = reference(map_id, feature_map, q, k, key_mask=mask, query_mask=mask)
    _check_close(out, naive_kernel_attention(phi_q, phi_k, v, causal=False, key_mask=mask))


@pytest.mark.parametrize("map_id", CAUSAL_MAPS)
def test_causal_ops_match_naive_attention_and_streaming(map_id):
    feature_map = make_map(map_id)
    q, k, v = qkv(n=11, s=11, seed=6)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    q_features, k_features, log_scale = feature_map.attention_features(q, k, key_mask=mask, causal=True)
    out, _ = causal_linear_attention(q_features, k_features, v, k_log_scale=log_scale, key_mask=mask, chunk_size=4)
    phi_q, phi_k = reference(map_id, feature_map, q, k, causal=True)
    ref = naive_kernel_attention(phi_q, phi_k, v, causal=True, key_mask=mask)
    _check_close(out[1, :, 4:], ref[1, :, 4:])
    _check_close(out[0], ref[0])

    # Streamed: a prompt of 6, then token by token, each call starting from the returned state.
    state, pieces = None, []
    for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, 11)]:
        piece = slice(start, stop)
        qf, kf, ls = feature_map.attention_features(q[:, :, piece], k[:, :, piece], key_mask=mask[:, piece],
                                                    causal=True)
        o, state = causal_linear_attention(qf, kf, v[:, :, piece], k_log_scale=ls, key_mask=mask[:, piece],
                                           initial_state=state, chunk_size=4)
        pieces.append(o)
    torch.testing.assert_close(torch.cat(pieces, 2)[1, :, 4:], out[1, :, 4:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(pieces, 2)[0], out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("map_id", list(MAPS))
def test_low_precision_inputs_give_finite_fp32_features(map_id, dtype):
    """Large half-precision queries and keys: features are float32 and never inf/NaN (exp runs in log space). They
    equal the features of the same (rounded) inputs in float32, and the output equals the float32 output rounded to
    the half dtype: within 2 eps of its largest value (measured: under 0.5 eps)."""
    feature_map = make_map(map_id)
    q, k, v = qkv(std=4.0, seed=7)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = padding_mask()
    causal = MAPS[map_id][4]
    q_features, k_features, log_scale = feature_map.attention_features(q, k, key_mask=mask, causal=causal)
    for t in (q_features, k_features) + ((log_scale,) if log_scale is not None else ()):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    reference = feature_map.attention_features(q.float(), k.float(), key_mask=mask, causal=causal)
    for t, expected in zip((q_features, k_features, log_scale), reference):
        if expected is None:
            assert t is None
        else:
            torch.testing.assert_close(t, expected)  # float32 tolerances
    if causal:
        out, _ = causal_linear_attention(q_features, k_features, v, k_log_scale=log_scale, key_mask=mask)
        ref, _ = causal_linear_attention(*reference[:2], v.float(), k_log_scale=reference[2], key_mask=mask)
    else:
        out = linear_attention(q_features, k_features, v, k_log_scale=log_scale, key_mask=mask)
        ref = linear_attention(*reference[:2], v.float(), k_log_scale=reference[2], key_mask=mask)
    assert out.dtype == dtype
    if map_id not in ("identity", "rff"):  # signed kernels may legitimately exceed the half range here
        assert torch.isfinite(out).all()
    finite = torch.isfinite(out)
    assert ((out.float() - ref)[finite].abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max())


# ----------------------------------------------------------------------------------------------------------------
# Through the model
# ----------------------------------------------------------------------------------------------------------------

MODEL_MAPS = sorted(FEATURE_MAPS)


def _tiny(make_config, name, **overrides):
    return make_config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, nb_features=8,
                       feature_map=name, **overrides)


@pytest.mark.parametrize("name", MODEL_MAPS)
def test_every_map_runs_bidirectional_through_the_model(make_config, name):
    torch.manual_seed(0)
    model = PerformerModel(_tiny(make_config, name, causal=False)).eval()
    ids = torch.randint(3, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 6, 16) and torch.isfinite(out).all()
    # the same model in float64 (measured: relative error ~1e-7; 3e-6 for the signed identity map)
    reference = in_float64(model)(ids, attention_mask=mask).last_hidden_state
    assert (out.double() - reference).abs().max() < 1e-5 * reference.abs().max()


@pytest.mark.parametrize("name", [n for n in MODEL_MAPS if FEATURE_MAPS[n].supports_causal])
def test_every_causal_map_decodes_like_the_full_pass(make_config, name):
    torch.manual_seed(0)
    model = PerformerForCausalLM(_tiny(make_config, name)).eval()
    ids = torch.randint(3, 32, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 7):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        reference = in_float64(model)(ids).logits  # the full pass in float64 (measured: ~1e-7 relative)
    assert (full.double() - reference).abs().max() < 1e-5 * reference.abs().max()


def test_model_keeps_padding_out_of_favor_plus_plus_statistics(make_config):
    torch.manual_seed(0)
    model = PerformerModel(_tiny(make_config, "favor++", causal=False, position_embedding_type="none")).eval()
    ids = torch.randint(3, 32, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        with_padding = model(padded, attention_mask=mask).last_hidden_state[:, 3:]
    torch.testing.assert_close(with_padding, alone, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Redraw, fix, save and reload
# ----------------------------------------------------------------------------------------------------------------


def _projections(model):
    return [m.projection.clone() for m in model.modules() if isinstance(m, fm.RandomProjectionFeatureMap)]


def test_redraw_changes_features_reproducibly_and_survives_save_and_reload(make_config, tmp_path):
    config = make_config(feature_map="favor+", num_hidden_layers=2)
    torch.manual_seed(0)
    model = PerformerForCausalLM(config).eval()
    twin = PerformerForCausalLM(config).eval()  # different weights, same feature seed
    before = _projections(model)
    assert all(torch.equal(a, b) for a, b in zip(before, _projections(twin)))
    assert not torch.equal(before[0], before[1])  # layers draw different features

    assert model.redraw_features() and twin.redraw_features()
    after = _projections(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(after, _projections(twin)))  # from config seed and counter
    model.redraw_features(seed=123)
    twin.redraw_features(seed=123)
    assert all(torch.equal(a, b) for a, b in zip(_projections(model), _projections(twin)))
    twin.redraw_features(seed=124)
    assert not torch.equal(_projections(model)[0], _projections(twin)[0])
    assert model.feature_redraw_count == 2

    ids = torch.randint(3, config.vocab_size, (1, 9))
    model.save_pretrained(tmp_path)
    reloaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.feature_redraw_count == 2
    assert all(torch.equal(a, b) for a, b in zip(_projections(model), _projections(reloaded)))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_fix_features_freezes_the_projections_across_save_and_reload(make_config, tmp_path):
    model = PerformerForCausalLM(make_config(feature_map="hyperbolic")).eval()
    model.fix_features()
    frozen = _projections(model)
    assert model.redraw_features() is False
    assert all(torch.equal(a, b) for a, b in zip(frozen, _projections(model)))
    model.save_pretrained(tmp_path)
    reloaded = PerformerForCausalLM.from_pretrained(tmp_path)
    assert reloaded.redraw_features() is False
    assert all(torch.equal(a, b) for a, b in zip(frozen, _projections(reloaded)))


# ----------------------------------------------------------------------------------------------------------------
# Quality: what benchmarks/feature_map_quality.py measures, asserted where it reproduces
# ----------------------------------------------------------------------------------------------------------------


def _benchmark():
    path = REPO / "benchmarks" / "feature_map_quality.py"
    spec = importlib.util.spec_from_file_location("feature_map_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_ordering_that_reproduces():
    """Means over 8 seeds, d = 64, N = 128, logit std 0.25 (the regime where errors are below 100%).

    Reproduces: error falls with m for every positive estimator; favor++ beats favor+ once m is large enough
    (benchmark, 20 seeds: 0.83x at m = 512, lower on 20/20 seeds). Does not reproduce, so not asserted as an
    improvement (numbers in benchmarks/results/feature_map_quality.md): orthogonal features are within noise of
    iid ones for the attention output (0.91x-1.06x); favor++ is worse than favor+ at logit std >= 0.75 with few
    features (1.15x at logit std 1, m = 64). We only check that orthogonal is not markedly worse.
    """
    bench = _benchmark()
    seeds = range(8)

    def err(variant, m, std=0.25):
        return statistics.fmean(bench.relative_output_error(variant, m, std, s, head_dim=64, length=128)
                                for s in seeds)

    errors = {(v, m): err(v, m) for v in ("favor+ orthogonal", "favor+ iid", "favor++ orthogonal",
                                          "favor++ iid", "hyperbolic orthogonal") for m in (64, 512)}
    for variant in ("favor+ orthogonal", "favor+ iid", "favor++ orthogonal", "favor++ iid", "hyperbolic orthogonal"):
        assert errors[(variant, 512)] < 0.7 * errors[(variant, 64)], variant
    # At m = 512 favor++ wins on 98 of 100 seeds (benchmark: 0.265 vs 0.319 orthogonal, 0.272 vs 0.323 iid).
    assert errors[("favor++ orthogonal", 512)] < 0.93 * errors[("favor+ orthogonal", 512)]
    assert errors[("favor++ iid", 512)] < 0.93 * errors[("favor+ iid", 512)]
    # Orthogonal: no reliable gain (and at m = 64 some seed sets make it worse), so only "not markedly worse".
    assert errors[("favor+ orthogonal", 512)] < 1.1 * errors[("favor+ iid", 512)]
