"""Kernel feature maps: phi such that phi(q) . phi(k) approximates (or defines) the attention kernel K(q, k).

Every map is an ``nn.Module`` with the fast-transformers interface:

* ``new_feature_map(generator=None)`` draws all randomness (random maps only); after it, every ``forward_*`` call
  uses the same features, so queries and keys are always compatible.
* ``forward_queries(x)`` / ``forward_keys(x)`` return the plain per-token features (``phi(q) @ phi(k).T`` is the
  kernel estimate); symmetric maps only implement ``forward``.
* ``factory(**kwargs)`` returns a callable ``head_dim -> FeatureMap``.

Attention code calls ``attention_features(q, k, key_mask=..., query_mask=..., causal=...)``. It returns query
features up to a positive per-query factor (which cancels in the attention normaliser), key features divided by a
per-token scale, and that scale's log (or None). Exponential maps (``exponential = True``) implement log-features
(``query_logits`` / ``key_logits``) so nothing overflows; ``ops.py`` carries the key scale exactly through causal
sums. ``kernel_features(q, k, ...)`` returns the same features unstabilised, for tests and for users who want the
kernel itself.

Two maps use statistics of the whole sequence, so their features of one token depend on the other tokens:
``favor++`` (its coefficients come from the query and key norms) and ``softmax_no_projection`` when bidirectional
(keys are a softmax over the sequence). They override ``attention_features`` / ``kernel_features``; padding is
kept out of their statistics through ``key_mask`` / ``query_mask`` ((B, S) / (B, N), 1 = real token).

Two maps are for linearising a pretrained softmax model (LoLCATs, arXiv 2410.10254): ``taylor``, deterministic
second-order Taylor features of exp, and ``hedgehog``, trainable per head (``nn.Parameter``s, saved with the
model; ``per_head = True`` maps are built with the number of heads they will see).

Inputs are expected already scaled (the attention layer multiplies q and k by ``d ** -0.25`` each, so that the
softmax kernel exp(q . k) is the usual exp(q . k / sqrt(d))).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from .ops import ExpProjectionFeatures


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _weights(mask: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """A (B, S) 0/1 mask as float weights broadcastable against x (B, [H,] S, d): (B, [1,] S, 1)."""
    if mask is None:
        return None
    if x.dim() < 3 or tuple(mask.shape) != (x.shape[0], x.shape[-2]):
        raise ValueError(
            f"{name} must have shape (batch, length) = {(x.shape[0], x.shape[-2]) if x.dim() >= 3 else '?'}, "
            f"got {tuple(mask.shape)} for inputs of shape {tuple(x.shape)}"
        )
    keep = mask.to(device=x.device, dtype=torch.float32)
    return keep.reshape(x.shape[0], *([1] * (x.dim() - 3)), x.shape[-2], 1)


# ----------------------------------------------------------------------------------------------------------------
# Random projections
# ----------------------------------------------------------------------------------------------------------------


def gaussian_projection(
    num_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    norm_scaling: str = "chi",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows w_i with E[w w^T] = I, drawn on the CPU in float32 from ``generator``: (num_features, dim).

    Orthogonal random features (Performer, arXiv 2009.14794, sec. 2.4): stack blocks of Haar-random orthogonal
    matrices and give each row the norm of a Gaussian vector (``chi``), or sqrt(dim) (``sqrt_d``, "regularised").
    With ``chi`` every row is marginally N(0, I), so every estimator below stays unbiased.
    """
    if norm_scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"norm_scaling must be 'chi' or 'sqrt_d', got {norm_scaling!r}")
    # float32 whatever the default dtype (a model built with dtype=float16 sets it): QR has no half kernels on CPU
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator, dtype=torch.float32)
    gaussian = torch.randn(math.ceil(num_features / dim), dim, dim, generator=generator, dtype=torch.float32)  # (blocks, d, d)
    q, r = torch.linalg.qr(gaussian)  # one batched call: small QRs are dominated by per-call threading overhead
    # Sign fix makes q Haar-distributed (Mezzadri, arXiv math-ph/0609050).
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    directions = q.transpose(-1, -2).reshape(-1, dim)[:num_features]  # (m, d), unit rows
    if norm_scaling == "chi":
        norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float32).norm(dim=1)
    else:
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float32)
    return directions * norms.unsqueeze(1)


def feature_seed(base_seed: int, layer_idx: int, redraw_step: int) -> int:
    """Seed of one layer's random features: a function of the base seed, the layer and the redraw counter, so every
    process of a distributed job draws identical projections without communicating, and a projection missing from
    a checkpoint can be drawn again exactly."""
    return (base_seed * 1_000_003 + layer_idx * 7_919 + redraw_step * 104_729) % (2**63 - 1)


def default_num_features(head_dim: int) -> int:
    """The Performer reference default: int(d * ln d)."""
    return max(1, int(head_dim * math.log(head_dim))) if head_dim > 1 else 1


# ----------------------------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------------------------


class FeatureMap(nn.Module):
    """Base class of every kernel feature map.

    Class attributes describe the map to the attention code:
      ``exponential``: features are exp(logits); attention stabilises them in log space (subclass implements
      ``query_logits`` / ``key_logits`` instead of ``forward``).
      ``approximates_softmax``: the kernel is (an unbiased estimate of) exp(q . k).
      ``supports_causal``: the map can be used in causal attention (no statistics over the whole sequence).
      ``is_random``: the map draws random parameters in ``new_feature_map``.
      ``per_head``: the map has parameters of its own per head; it is built with ``num_heads`` and expects inputs
      (..., H, N, d) with the heads at dim -3.
    """

    exponential: bool = False
    approximates_softmax: bool = False
    supports_causal: bool = True
    is_random: bool = False
    per_head: bool = False

    def __init__(self, head_dim: int, **kwargs):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected options: {sorted(kwargs)}")
        self.head_dim = head_dim

    @property
    def num_features(self) -> int:
        """Size of phi(x)'s last dimension."""
        return self.head_dim

    @classmethod
    def factory(cls, **kwargs) -> Callable[[int], "FeatureMap"]:
        return functools.partial(cls, **kwargs)

    def new_feature_map(self, generator: torch.Generator | None = None) -> None:
        """Draw new random parameters (no-op for deterministic maps)."""

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The values a fresh map gives its trainable parameters, by attribute name (empty: none). A model's
        ``_init_weights`` gives a parameter missing from a checkpoint this value, so it is never left to the host's
        random init."""
        return {}

    @torch.no_grad()
    def reset_learned_parameters(self, missing_only: bool = False) -> None:
        """Copy ``initial_parameters()`` into the parameters (skipping meta ones, which a checkpoint will fill) and
        mark them ``_is_hf_initialized``; ``missing_only`` keeps the parameters a checkpoint has loaded (marked)."""
        for name, value in self.initial_parameters().items():
            parameter = getattr(self, name)
            if parameter.is_meta or (missing_only and getattr(parameter, "_is_hf_initialized", False)):
                continue
            parameter.copy_(value.to(parameter))
            parameter._is_hf_initialized = True

    # -- plain per-token features --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exponential:
            raise NotImplementedError(f"{type(self).__name__} is asymmetric: use forward_queries / forward_keys")
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.query_logits(x.float()).exp() if self.exponential else self(x)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_logits(x.float()).exp() if self.exponential else self(x)

    # -- exponential maps: log-features --------------------------------------------------------------------------
    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def stabilise_queries(logits: torch.Tensor) -> torch.Tensor:
        """exp(logits) divided by its largest entry per query: a positive per-query factor, which cancels."""
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())

    @staticmethod
    def stabilise_keys(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(logits) divided by its largest entry per key, and the log of that entry (..., S)."""
        log_scale = logits.amax(dim=-1).detach()  # (..., S)
        return torch.exp(logits - log_scale.unsqueeze(-1)), log_scale

    # -- per-token features as attention uses them ---------------------------------------------------------------
    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """Query features up to a positive per-query factor (which cancels in the attention normaliser)."""
        x = x.float()
        if not self.exponential:
            return self.forward_queries(x)
        return self.stabilise_queries(self.query_logits(x))  # (..., N, m)

    def key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key features divided by exp(log_scale) per token, and that log scale ((..., S), or None).

        The true key feature is ``features * exp(log_scale)[..., None]``; the attention ops carry the scale
        through their sums with a running maximum so nothing overflows and nothing from the future leaks in.
        """
        x = x.float()
        if not self.exponential:
            return self.forward_keys(x), None
        return self.stabilise_keys(self.key_logits(x))  # (..., S, m), (..., S)

    # -- whole attention calls -----------------------------------------------------------------------------------
    def check_causal(self, causal: bool) -> None:
        if causal and not self.supports_causal:
            raise ValueError(
                f"{type(self).__name__} uses statistics of the whole sequence and cannot be causal "
                "(the features of a token would depend on future tokens); use causal=False"
            )

    def attention_features(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        key_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Float32 features for one attention call: q (..., N, d), k (..., S, d) -> q_features (..., N, m),
        k_features (..., S, m), k_log_scale (..., S) or None. See ``query_features`` / ``key_features``.

        Per-token maps ignore the masks (``ops`` removes masked keys); maps with sequence statistics use them.
        """
        self.check_causal(causal)
        return (self.query_features(q), *self.key_features(k))

    def kernel_features(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        key_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unstabilised phi(q), phi(k) of one attention call: ``phi(q) @ phi(k).T`` is the kernel (estimate)."""
        self.check_causal(causal)
        return self.forward_queries(q.float()), self.forward_keys(k.float())


class RandomProjectionFeatureMap(FeatureMap):
    """A map built on a random projection matrix W (m, d), stored as a persistent buffer so that checkpoints
    reload bit-identically and every rank of a distributed job sees the same features."""

    is_random = True

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        orthogonal: bool = True,
        norm_scaling: str = "chi",
        seed: int | None = None,
        draw: bool = True,
        **kwargs,
    ):
        super().__init__(head_dim, **kwargs)
        num_features = default_num_features(head_dim) if num_features is None else num_features
        _check_positive_int("num_features", num_features)
        if norm_scaling not in ("chi", "sqrt_d"):
            raise ValueError(f"norm_scaling must be 'chi' or 'sqrt_d', got {norm_scaling!r}")
        if not isinstance(orthogonal, bool):
            raise TypeError(f"orthogonal must be a bool, got {orthogonal!r}")
        self.num_random_features = num_features
        self.orthogonal = orthogonal
        self.norm_scaling = norm_scaling
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.register_buffer("projection", torch.zeros(num_features, head_dim), persistent=True)
        if draw:  # models pass draw=False and draw once, in their _init_weights
            self.reset_parameters()

    @property
    def num_features(self) -> int:
        return self.num_random_features

    def draw_projection(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_projection(
            self.num_random_features,
            self.head_dim,
            orthogonal=self.orthogonal,
            norm_scaling=self.norm_scaling,
            generator=generator,
        )

    @torch.no_grad()
    def new_feature_map(self, generator: torch.Generator | None = None) -> None:
        if self.projection.is_meta:
            return  # weights will be loaded from a checkpoint
        self.projection.copy_(self.draw_projection(generator).to(self.projection))

    def initial_projection(self) -> torch.Tensor:
        """The projection a fresh map has: drawn from ``seed`` (or from the global RNG when it has none)."""
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        return self.draw_projection(generator)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the initial projection. transformers' contract for buffers: what a constructor puts in them is what
        ``_init_weights`` would; so a model's ``_init_weights`` redraws only projections never drawn (built on the
        meta device and missing from the checkpoint), and a directly built model draws each one once, here."""
        if not self.projection.is_meta:
            self.projection.copy_(self.initial_projection().to(self.projection))
            self.projection._is_hf_initialized = True

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in float32: (..., N, d) -> (..., N, m). One (rows, d) @ (d, m) matmul: a batched matmul that
        broadcasts W over heads runs at a third of the speed on CPU."""
        x = x.float()
        return (x.reshape(-1, x.shape[-1]) @ self.projection.float().t()).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, "
            f"orthogonal={self.orthogonal}, norm_scaling={self.norm_scaling!r}"
        )


class PairedProjectionFeatureMap(RandomProjectionFeatureMap):
    """A map whose features come in pairs per projection ([exp(u), exp(-u)], [cos u, sin u]). ``num_features``
    counts output features, as in fast-transformers, so maps compare at equal cost: ceil(m / 2) projections."""

    def __init__(self, head_dim: int, num_features: int | None = None, **kwargs):
        num_features = default_num_features(head_dim) if num_features is None else num_features
        _check_positive_int("num_features", num_features)
        super().__init__(head_dim, num_features=-(-num_features // 2), **kwargs)

    @property
    def num_features(self) -> int:
        return 2 * self.num_random_features


# ----------------------------------------------------------------------------------------------------------------
# Softmax-kernel estimators
# ----------------------------------------------------------------------------------------------------------------


def _half_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.pow(2).sum(dim=-1, keepdim=True)  # (..., N, 1)


class ExpProjectionFeatureMap(RandomProjectionFeatureMap):
    """Base of the maps whose log-features are x P^T - a |x|^2 + b (FAVOR+, hyperbolic, expmod): attention
    features come from ``ops.ExpProjectionFeatures`` (one autograd node, a few fused passes), and causal attention
    can compute them inside the chunked op (``fused_feature_args`` -> ``ops.causal_exp_attention``).
    ``query_logits`` / ``key_logits`` (the plain definition) serve ``kernel_features`` and the logits' users."""

    exponential = True
    norm_coef = 0.0  # a

    def logit_offset(self) -> float:  # b
        return -0.5 * math.log(self.num_features)

    def feature_projection(self) -> torch.Tensor:  # P (m, d)
        return self.projection.float()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        logits = self.project_all(x) + self.logit_offset()
        return logits - 2.0 * self.norm_coef * _half_sq_norm(x) if self.norm_coef else logits

    def project_all(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def _fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self.feature_projection()
        if projection.requires_grad:  # a learned projection: let autograd see every op
            return self.stabilise_keys(self._logits(x))
        return ExpProjectionFeatures.apply(x.float().contiguous(), projection, self.norm_coef, self.logit_offset())

    def fused_feature_args(self) -> dict | None:
        """Arguments of ``ops.causal_exp_attention`` (projection, norm_coef, logit_offset), or None when the
        projection is learned (it must then stay visible to autograd)."""
        projection = self.feature_projection()
        if projection.requires_grad:
            return None
        return {"projection": projection, "norm_coef": self.norm_coef, "logit_offset": self.logit_offset()}

    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused(x)[0]  # the per-query factor exp(log_scale) cancels

    def key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._fused(x)


class FavorPlusFeatureMap(ExpProjectionFeatureMap):
    """FAVOR+ positive random features for the softmax kernel (arXiv 2009.14794, Lemma 1):
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), so E[phi(q) . phi(k)] = exp(q . k)."""

    approximates_softmax = True
    norm_coef = 0.5


class FavorPlusPlusFeatureMap(RandomProjectionFeatureMap):
    """FAVOR++: optimised positive random features, OPRF of "Chefs' Random Tables" (arXiv 2205.15317, sec. 3).

    phi(x) = D exp(A |w|^2 + B w.x - |x|^2 / 2) / sqrt(m) with B = sqrt(1 - 4A), D = (1 - 4A)^(d/4) is unbiased for
    exp(q . k) for every A < 1/8 (A = 0 is FAVOR+). The A minimising the mean log second moment over all (q, k)
    pairs of a sequence solves d u^2 - (d + 2 rho) u - 2 rho = 0 with u = 1 - 8A, rho = mean_ij |q_i + k_j|^2:
    A = (1 - u) / 8 <= 0. rho is a statistic of the whole sequence (per batch row and head), so the map cannot be
    causal; padded tokens are left out of it through ``key_mask`` / ``query_mask``. A is treated as a constant
    (no gradient through it), as in TF's ``expplus``.
    """

    exponential = True
    approximates_softmax = True
    supports_causal = False

    def coefficient(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        key_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The optimal A per batch row and head: (..., 1, 1)."""
        q, k = q.detach().float(), k.detach().float()
        q_sq, q_mean = self._moments(q, _weights(query_mask, q, "query_mask"))
        k_sq, k_mean = self._moments(k, _weights(key_mask, k, "key_mask"))
        rho = q_sq + k_sq + 2.0 * (q_mean * k_mean).sum(dim=-1, keepdim=True)  # (..., 1, 1)
        rho = rho.clamp_min(0.0)
        d = float(self.head_dim)
        u = ((d + 2 * rho) + torch.sqrt((d + 2 * rho) ** 2 + 8 * d * rho)) / (2 * d)  # >= 1
        return (1.0 - u) / 8.0

    @staticmethod
    def _moments(x: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of |x|^2 (..., 1, 1) and mean of x (..., 1, d) over the real tokens of x (..., N, d)."""
        if weights is None:
            weights = torch.ones_like(x[..., :1])
        count = weights.sum(dim=-2, keepdim=True).clamp_min(1.0)  # (..., 1, 1)
        mean_sq = (x.pow(2).sum(dim=-1, keepdim=True) * weights).sum(dim=-2, keepdim=True) / count
        mean = (x * weights).sum(dim=-2, keepdim=True) / count
        return mean_sq, mean

    def logits(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log phi(x) for a given A (..., 1, 1): (..., N, d) -> (..., N, m). Same formula for queries and keys."""
        x = x.float()
        one_minus_4a = 1.0 - 4.0 * a  # (..., 1, 1)
        w_sq = self.projection.float().pow(2).sum(dim=-1)  # (m,)
        return (
            0.25 * self.head_dim * torch.log(one_minus_4a)
            + a * w_sq
            + torch.sqrt(one_minus_4a) * self.project(x)
            - _half_sq_norm(x)
            - 0.5 * math.log(self.num_random_features)
        )

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "favor++ features depend on statistics of both queries and keys: use "
            "attention_features(q, k, ...) or kernel_features(q, k, ...)"
        )

    key_logits = query_logits

    def attention_features(self, q, k, *, key_mask=None, query_mask=None, causal=False):
        self.check_causal(causal)
        a = self.coefficient(q, k, key_mask=key_mask, query_mask=query_mask)
        return (self.stabilise_queries(self.logits(q, a)), *self.stabilise_keys(self.logits(k, a)))

    def kernel_features(self, q, k, *, key_mask=None, query_mask=None, causal=False):
        self.check_causal(causal)
        a = self.coefficient(q, k, key_mask=key_mask, query_mask=query_mask)
        return self.logits(q, a).exp(), self.logits(k, a).exp()


class HyperbolicFeatureMap(PairedProjectionFeatureMap, ExpProjectionFeatureMap):
    """Hyperbolic positive features (arXiv 2009.14794, Lemma 1, second estimator; fast-transformers ``Favor``):
    phi(x) = exp(-|x|^2 / 2) [exp(W x), exp(-W x)] / sqrt(2 m'), an antithetic pair per projection w, so that
    E[phi(q) . phi(k)] = E[cosh(w . (q + k))] exp(-|q|^2/2 - |k|^2/2) = exp(q . k)."""

    approximates_softmax = True
    norm_coef = 0.5

    def feature_projection(self) -> torch.Tensor:
        projection = self.projection.float()
        return torch.cat([projection, -projection], dim=0)  # (2m', d)

    def project_all(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x)  # (..., N, m')
        return torch.cat([u, -u], dim=-1)


class RandomFourierFeatureMap(PairedProjectionFeatureMap):
    """Trigonometric random Fourier features (Rahimi & Recht, NIPS 2007; fast-transformers ``RandomFourierFeatures``).

    [cos W x, sin W x] / sqrt(m') estimates the Gaussian kernel exp(-|q - k|^2 / 2). With ``kernel="softmax"``
    (default) the features are multiplied by exp(|x|^2 / 2), which makes the product an unbiased estimate of
    exp(q . k): the Performer paper's SM^trig (arXiv 2009.14794, sec. 2.2). Not positive: attention weights can be
    negative and the variance is worst exactly where softmax weights are small, which is why FAVOR+ exists.
    Attention never forms exp(|x|^2 / 2): queries drop it (it cancels), keys return it as their log scale.
    """

    KERNELS = ("softmax", "gaussian")

    def __init__(self, head_dim: int, num_features: int | None = None, kernel: str = "softmax", **kwargs):
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {list(self.KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.approximates_softmax = kernel == "softmax"
        super().__init__(head_dim, num_features=num_features, **kwargs)

    def trig_features(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x)  # (..., N, m')
        return torch.cat([torch.cos(u), torch.sin(u)], dim=-1) / math.sqrt(self.num_random_features)

    def _log_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        return _half_sq_norm(x.float()).squeeze(-1) if self.kernel == "softmax" else None  # (..., N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trig_features(x)
        log_scale = self._log_scale(x)
        return features if log_scale is None else features * log_scale.exp().unsqueeze(-1)

    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trig_features(x)

    def key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.trig_features(x), self._log_scale(x)


class SmoothedRandomFourierFeatureMap(RandomFourierFeatureMap):
    """Random Fourier features plus one constant feature sqrt(smoothing) (fast-transformers
    ``SmoothedRandomFourierFeatures``): the Gaussian-kernel estimate becomes estimate + smoothing, which is >= 0
    for smoothing >= 1 because the estimate is >= -1. Biased on purpose: positive weights, not softmax."""

    def __init__(self, head_dim: int, num_features: int | None = None, smoothing: float = 1.0, **kwargs):
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not smoothing >= 0:
            raise ValueError(f"smoothing must be a number >= 0, got {smoothing!r}")
        self.smoothing = float(smoothing)
        super().__init__(head_dim, num_features=num_features, **kwargs)
        self.approximates_softmax = False

    @property
    def num_features(self) -> int:
        return 2 * self.num_random_features + 1

    def trig_features(self, x: torch.Tensor) -> torch.Tensor:
        features = super().trig_features(x)  # (..., N, 2m')
        constant = features.new_full((*features.shape[:-1], 1), math.sqrt(self.smoothing))
        return torch.cat([features, constant], dim=-1)  # (..., N, 2m' + 1)


class ExpModFeatureMap(ExpProjectionFeatureMap):
    """TF KernelAttention's ``expmod``: phi(x) = exp(W x - sqrt(d) / 2) / sqrt(m), FAVOR+ without the -|x|^2/2 term.

    E[phi(q) . phi(k)] = exp(|q + k|^2 / 2 - sqrt(d)) = exp(q . k) exp(|q|^2/2) exp(|k|^2/2) exp(-sqrt(d)): after
    normalisation the query factor cancels, so attention weights are softmax tilted by exp(|k|^2 / 2) (not softmax).
    """

    def logit_offset(self) -> float:
        return -0.5 * math.sqrt(self.head_dim) - 0.5 * math.log(self.num_random_features)


class SoftmaxNoProjectionFeatureMap(FeatureMap):
    """performer-pytorch ``no_projection=True``: no random features at all.

    Queries: softmax over the d features. Keys: exp(k) when causal (a per-token map, stabilised like any exponential
    map), and a softmax over the sequence when bidirectional (a per-feature normalisation, computed over the real
    keys only: ``key_mask`` keeps padding out, which performer-pytorch does not). The per-token methods
    (``forward_queries`` / ``forward_keys``) are the causal ones.
    """

    exponential = True

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1)

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def _sequence_softmax_keys(self, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        logits = k.float()  # (..., S, d)
        weights = _weights(key_mask, logits, "key_mask")
        if weights is not None:
            logits = logits.masked_fill(weights == 0, float("-inf"))
        lse = torch.logsumexp(logits, dim=-2, keepdim=True)  # (..., 1, d)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # a row with no real key gets zeros
        return torch.exp(logits - lse)

    def attention_features(self, q, k, *, key_mask=None, query_mask=None, causal=False):
        if causal:
            return super().attention_features(q, k, causal=True)
        return self.query_features(q), self._sequence_softmax_keys(k, key_mask), None

    def kernel_features(self, q, k, *, key_mask=None, query_mask=None, causal=False):
        if causal:
            return super().kernel_features(q, k, causal=True)
        return self.forward_queries(q), self._sequence_softmax_keys(k, key_mask)


# ----------------------------------------------------------------------------------------------------------------
# Other kernels
# ----------------------------------------------------------------------------------------------------------------


class GeneralizedFeatureMap(RandomProjectionFeatureMap):
    """Generalised attention (performer-pytorch ``generalized_attention``, fast-transformers
    ``GeneralizedRandomFeatures``, TF KernelAttention's relu/elu/square/identity with a projection):
    phi(x) = kernel_fn(W x) + eps, or kernel_fn(x) + eps with ``use_projection=False``. The kernel is whatever phi
    defines; it does not approximate softmax. ``kernel_fn="exp"`` is computed in log space (log(exp(u) + eps) =
    logaddexp(u, log eps)), so it cannot overflow."""

    KERNEL_FNS = {
        "relu": torch.relu,
        "elu": lambda t: nn.functional.elu(t) + 1.0,
        "exp": torch.exp,
        "abs": torch.abs,
        "square": torch.square,
        "identity": lambda t: t,
        "gelu": nn.functional.gelu,
        "softplus": nn.functional.softplus,
    }

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        kernel_fn: str = "relu",
        use_projection: bool = True,
        kernel_epsilon: float = 1e-3,
        **kwargs,
    ):
        if kernel_fn not in self.KERNEL_FNS:
            raise ValueError(f"kernel_fn must be one of {sorted(self.KERNEL_FNS)}, got {kernel_fn!r}")
        if isinstance(kernel_epsilon, bool) or not isinstance(kernel_epsilon, (int, float)) or not kernel_epsilon >= 0:
            raise ValueError(f"kernel_epsilon must be a number >= 0, got {kernel_epsilon!r}")
        if not isinstance(use_projection, bool):
            raise TypeError(f"use_projection must be a bool, got {use_projection!r}")
        self.kernel_fn_name = kernel_fn
        self.use_projection = use_projection
        self.kernel_epsilon = float(kernel_epsilon)
        if not use_projection:
            num_features = head_dim
        super().__init__(head_dim, num_features=num_features, **kwargs)
        self.is_random = use_projection
        self.exponential = kernel_fn == "exp"

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x) if self.use_projection else x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.KERNEL_FNS[self.kernel_fn_name](self._inputs(x)) + self.kernel_epsilon

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exponential:
            raise NotImplementedError("log-features exist only for kernel_fn='exp'")
        u = self._inputs(x)
        return torch.logaddexp(u, torch.full_like(u, math.log(self.kernel_epsilon))) if self.kernel_epsilon else u

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_fn={self.kernel_fn_name!r}, use_projection={self.use_projection}, "
            f"kernel_epsilon={self.kernel_epsilon}"
        )


class ReluFeatureMap(GeneralizedFeatureMap):
    """relu(W x) + 1e-3: the Performer paper's "generalized attention" default (arXiv 2009.14794, sec. 4).

    Its attention weights do not change with the scale of q and k (relu(c u) = c relu(u); the epsilon is ~1% of a
    typical feature), so ``attention_scale`` does nothing for it and it sharpens only through key norms and angles,
    linearly, where FAVOR+ sharpens exponentially: one head trained to find a needle among 512 tokens put 70% of
    its mass on it against FAVOR+'s 98% (and learned as fast). For tasks that need very peaked attention over long
    inputs prefer favor+, local heads or ``begin_kernel``."""

    def __init__(self, head_dim: int, num_features: int | None = None, **kwargs):
        kwargs.setdefault("kernel_fn", "relu")
        super().__init__(head_dim, num_features=num_features, **kwargs)


class EluFeatureMap(FeatureMap):
    """elu(x) + 1, the default of "Transformers are RNNs" (arXiv 2006.16236)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(x.float()) + 1.0


class IdentityFeatureMap(FeatureMap):
    """phi(x) = x: the kernel q . k, linear attention with no feature map (TF KernelAttention's ``identity``).
    Not positive: the normaliser can vanish or change sign; use it to study, not to train."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class SquareFeatureMap(FeatureMap):
    """phi(x) = x^2 elementwise, the kernel sum_i q_i^2 k_i^2 >= 0 (TF KernelAttention's ``square``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().square()


# ----------------------------------------------------------------------------------------------------------------
# Maps for linearising pretrained softmax attention
# ----------------------------------------------------------------------------------------------------------------


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor features of exp (Based, arXiv 2402.18668, sec. 3.1): phi(x) = [1, x, vec(x x^T) / sqrt(2)]
    so phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2 = ((1 + q.k)^2 + 1) / 2 > 0 for every q, k: a deterministic kernel
    that follows exp(q . k) for small |q . k| (it is a truncated series, not an estimate: ``approximates_softmax`` is
    False). The individual features are signed; only their products are positive.

    The quadratic part uses the symmetric reduction: x x^T is symmetric, so its upper triangle is kept, diagonal
    entries x_i^2 / sqrt(2) and off-diagonal ones x_i x_j (the two mirrored entries x_i x_j / sqrt(2) merged, a factor
    sqrt(2)): d (d + 1) / 2 quadratic features instead of d^2, so ``num_features = 1 + d + d (d + 1) / 2``. The size
    is fixed by d; ``num_features`` is not an option.
    """

    def __init__(self, head_dim: int, **kwargs):
        if "num_features" in kwargs:
            raise TypeError(
                f"taylor has no num_features option: its size is fixed by head_dim, 1 + d + d (d + 1) / 2 = "
                f"{1 + head_dim + head_dim * (head_dim + 1) // 2 if isinstance(head_dim, int) else '?'} for "
                f"d = {head_dim!r}; got num_features={kwargs['num_features']!r}"
            )
        super().__init__(head_dim, **kwargs)

    @property
    def num_features(self) -> int:
        return 1 + self.head_dim + self.head_dim * (self.head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indices built per call, not buffers: a model built on the meta device (from_pretrained) would leave
        # non-persistent buffers uninitialised, and a float buffer would be rounded by model.to(bfloat16).
        rows, cols = torch.triu_indices(self.head_dim, self.head_dim, device=x.device)  # (d(d+1)/2,) each
        weights = torch.where(rows == cols, 1.0 / math.sqrt(2.0), 1.0)  # mirrored pairs merged off the diagonal
        x = x.float()  # (..., N, d)
        quadratic = x[..., rows] * x[..., cols] * weights  # (..., N, d(d+1)/2)
        return torch.cat([torch.ones_like(x[..., :1]), x, quadratic], dim=-1)  # (..., N, 1 + d + d(d+1)/2)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}"


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog's trainable map (arXiv 2402.04347, eq. 3), as LoLCATs trains it to linearise a pretrained model
    (arXiv 2410.10254, sec. 3.1): per head h, phi(x) = [softmax(W_h x + b_h), softmax(-(W_h x + b_h))], each
    softmax over the f features, so ``num_features = 2 f``. Queries and keys have their own W and b (LoLCATs'
    ``feature_map_q`` / ``feature_map_k``), trained to make kernel attention mimic the softmax it replaces.

    Features are positive and bounded (non-exponential), per token (causal, cross-attention) and not random.
    ``num_features`` (even; default 2 d) sets f = num_features // 2. A fresh map starts at W = identity, b = 0 (so
    phi(x) = [softmax(x), softmax(-x)], a sensible kernel before any training); with f != d, row i of W is the unit
    vector e_(i mod d): the identity repeated (f a multiple of d gives the same attention as f = d) or truncated.
    Inputs are (..., H, N, d) with H = ``num_heads`` at dim -3.
    """

    per_head = True

    def __init__(self, head_dim: int, num_heads: int | None = None, num_features: int | None = None, **kwargs):
        super().__init__(head_dim, **kwargs)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int (hedgehog has parameters per head), got {num_heads!r}")
        num_features = 2 * head_dim if num_features is None else num_features
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 2 or num_features % 2:
            raise ValueError(f"num_features must be an even int >= 2 (2 f: a softmax over f features of W x and one "
                             f"of -W x), got {num_features!r}")
        self.num_heads = num_heads
        self.feature_dim = num_features // 2  # f
        shape = (num_heads, self.feature_dim, head_dim)
        self.query_weight = nn.Parameter(torch.empty(shape))  # (H, f, d)
        self.query_bias = nn.Parameter(torch.empty(num_heads, self.feature_dim))  # (H, f)
        self.key_weight = nn.Parameter(torch.empty(shape))  # (H, f, d)
        self.key_bias = nn.Parameter(torch.empty(num_heads, self.feature_dim))  # (H, f)
        self.reset_learned_parameters()  # no RNG: a model built twice starts from the same kernel

    @property
    def num_features(self) -> int:
        return 2 * self.feature_dim

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        eye = torch.eye(self.head_dim)[torch.arange(self.feature_dim) % self.head_dim]  # (f, d)
        weight = eye.expand(self.num_heads, -1, -1)  # (H, f, d)
        bias = torch.zeros(self.num_heads, self.feature_dim)  # (H, f)
        return {"query_weight": weight, "query_bias": bias, "key_weight": weight, "key_bias": bias}

    def features(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[softmax(W_h x + b_h), softmax(-(W_h x + b_h))] in float32: (..., H, N, d) -> (..., H, N, 2f)."""
        if x.dim() < 3 or x.shape[-3] != self.num_heads:
            raise ValueError(f"hedgehog was built for num_heads={self.num_heads} and expects inputs "
                             f"(..., {self.num_heads}, N, {self.head_dim}) with the heads at dim -3, got shape "
                             f"{tuple(x.shape)}")
        logits = torch.einsum("...hnd,hfd->...hnf", x.float(), weight.float())  # (..., H, N, f)
        logits = logits + bias.float().unsqueeze(-2)  # (H, 1, f) broadcasts over tokens
        return torch.cat([torch.softmax(logits, dim=-1), torch.softmax(-logits, dim=-1)], dim=-1)  # (..., H, N, 2f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("hedgehog has separate query and key maps: use forward_queries / forward_keys")

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, self.query_weight, self.query_bias)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, self.key_weight, self.key_bias)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, num_features={self.num_features}"


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

# "exact" is not a feature map: attention layers dispatch it to scaled_dot_product_attention.
EXACT = "exact"

FEATURE_MAPS: dict[str, type[FeatureMap]] = {}


def register_feature_map(name: str, cls: type[FeatureMap], *, overwrite: bool = False) -> None:
    """Make ``cls`` selectable as ``PerformerConfig(feature_map=name)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"feature map name must be a non-empty str, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
        raise TypeError(f"feature map class must subclass hf_performer.FeatureMap, got {cls!r}")
    if name == EXACT or (name in FEATURE_MAPS and not overwrite):
        raise ValueError(f"feature map {name!r} is already registered (pass overwrite=True to replace it)")
    FEATURE_MAPS[name] = cls


def build_feature_map(
    name: str,
    head_dim: int,
    *,
    num_features: int | None = None,
    orthogonal: bool = True,
    norm_scaling: str = "chi",
    options: dict | None = None,
    seed: int | None = None,
    draw: bool = True,
    num_heads: int | None = None,
) -> FeatureMap:
    """The map registered as ``name`` for heads of ``head_dim``. The random-projection settings apply to maps that
    have a projection (``options``, the class's own keyword arguments, override them); ``draw=False`` allocates the
    projection without drawing it (a model draws it from ``seed`` in its ``_init_weights``). ``num_heads``, the
    number of heads the map will see, goes to per-head maps (``per_head = True``) only, and is theirs to set:
    ``options`` cannot override it."""
    map_class = get_feature_map_class(name)
    kwargs = dict(options or {})
    if map_class.per_head:
        if "num_heads" in kwargs:
            raise ValueError(f"feature map options cannot set num_heads for {name!r}: the attention layer passes the "
                             f"number of heads it runs")
        kwargs["num_heads"] = num_heads
    if issubclass(map_class, RandomProjectionFeatureMap):
        for key, value in (("num_features", num_features), ("orthogonal", orthogonal), ("norm_scaling", norm_scaling),
                           ("seed", seed), ("draw", draw)):
            kwargs.setdefault(key, value)
    return map_class(head_dim, **kwargs)


def available_feature_maps() -> list[str]:
    return sorted([*FEATURE_MAPS, EXACT])


def get_feature_map_class(name: str) -> type[FeatureMap]:
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {available_feature_maps()}, got {name!r}")
    return FEATURE_MAPS[name]


for _name, _cls in {
    "favor+": FavorPlusFeatureMap,
    "favor++": FavorPlusPlusFeatureMap,
    "expplus": FavorPlusPlusFeatureMap,  # TF KernelAttention's name for FAVOR++
    "hyperbolic": HyperbolicFeatureMap,
    "rff": RandomFourierFeatureMap,
    "smoothed_rff": SmoothedRandomFourierFeatureMap,
    "expmod": ExpModFeatureMap,
    "softmax_no_projection": SoftmaxNoProjectionFeatureMap,
    "relu": ReluFeatureMap,
    "generalized": GeneralizedFeatureMap,
    "elu": EluFeatureMap,
    "identity": IdentityFeatureMap,
    "square": SquareFeatureMap,
    "taylor": TaylorFeatureMap,
    "hedgehog": HedgehogFeatureMap,
}.items():
    register_feature_map(_name, _cls)
