"""Kernel feature maps: phi such that phi(q) . phi(k) approximates (or defines) the attention kernel K(q, k).

Every map is an ``nn.Module`` with the fast-transformers interface:

* ``new_feature_map(generator=None)`` draws all randomness (random maps only); after it, every ``forward_*`` call
  uses the same features, so queries and keys are always compatible.
* ``forward_queries(x)`` / ``forward_keys(x)`` return the plain features (``phi(q) @ phi(k).T`` approximates the
  kernel); symmetric maps only implement ``forward``.
* ``factory(**kwargs)`` returns a callable ``head_dim -> FeatureMap``.

Attention code does not use the plain features of exponential maps (they overflow); it calls
``query_features`` / ``key_features``, which return features stabilised per token together with the per-token log
scale that was divided out of each key (see ``ops.py`` for how the scale is carried exactly through causal sums).

Inputs are expected already scaled (the attention layer multiplies q and k by ``d ** -0.25`` each, so that the
softmax kernel exp(q . k) is the usual exp(q . k / sqrt(d))).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn


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
    """
    if norm_scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"norm_scaling must be 'chi' or 'sqrt_d', got {norm_scaling!r}")
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        # Sign fix makes q Haar-distributed (Mezzadri, arXiv math-ph/0609050).
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    directions = torch.cat(blocks)[:num_features]  # (m, d), unit rows
    if norm_scaling == "chi":
        norms = torch.randn(num_features, dim, generator=generator).norm(dim=1)
    else:
        norms = torch.full((num_features,), math.sqrt(dim))
    return directions * norms.unsqueeze(1)


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
      ``approximates_softmax``: the kernel is (an estimate of) exp(q . k).
      ``supports_causal``: the map can be used in causal attention (no statistics over the whole sequence).
    """

    exponential: bool = False
    approximates_softmax: bool = False
    supports_causal: bool = True
    is_random: bool = False

    def __init__(self, head_dim: int, **kwargs):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
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

    # -- plain features ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exponential:
            raise NotImplementedError  # use forward_queries / forward_keys
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.query_logits(x).exp() if self.exponential else self(x)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_logits(x).exp() if self.exponential else self(x)

    # -- exponential maps: log-features --------------------------------------------------------------------------
    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- what attention uses -------------------------------------------------------------------------------------
    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """Query features up to a positive per-query factor (which cancels in the attention normaliser)."""
        x = x.float()
        if not self.exponential:
            return self.forward_queries(x)
        logits = self.query_logits(x)  # (..., N, m)
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())

    def key_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key features divided by exp(log_scale) per token, and that log scale ((..., N), or None).

        The true key feature is ``features * exp(log_scale)[..., None]``; the attention ops carry the scale
        through their sums with a running maximum so nothing overflows and nothing from the future leaks in.
        """
        x = x.float()
        if not self.exponential:
            return self.forward_keys(x), None
        logits = self.key_logits(x)  # (..., N, m)
        log_scale = logits.amax(dim=-1).detach()  # (..., N)
        return torch.exp(logits - log_scale.unsqueeze(-1)), log_scale


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
        **kwargs,
    ):
        super().__init__(head_dim, **kwargs)
        num_features = default_num_features(head_dim) if num_features is None else num_features
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if norm_scaling not in ("chi", "sqrt_d"):
            raise ValueError(f"norm_scaling must be 'chi' or 'sqrt_d', got {norm_scaling!r}")
        self.num_random_features = num_features
        self.orthogonal = orthogonal
        self.norm_scaling = norm_scaling
        self.register_buffer("projection", torch.zeros(num_features, head_dim), persistent=True)
        self.new_feature_map()

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

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in float32: (..., N, d) -> (..., N, m)."""
        return torch.matmul(x.float(), self.projection.float().t())

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_random_features}, "
            f"orthogonal={self.orthogonal}, norm_scaling={self.norm_scaling!r}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------------------------------------------


class FavorPlusFeatureMap(RandomProjectionFeatureMap):
    """FAVOR+ positive random features for the softmax kernel (arXiv 2009.14794, Lemma 1):
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), so E[phi(q) . phi(k)] = exp(q . k)."""

    exponential = True
    approximates_softmax = True

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        half_sq_norm = 0.5 * x.pow(2).sum(dim=-1, keepdim=True)  # (..., N, 1)
        return self.project(x) - half_sq_norm - 0.5 * math.log(self.num_random_features)

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)


class GeneralizedFeatureMap(RandomProjectionFeatureMap):
    """Generalised attention (performer-pytorch ``generalized_attention``, fast-transformers
    ``GeneralizedRandomFeatures``): phi(x) = kernel_fn(W x) + eps, or kernel_fn(x) + eps with
    ``use_projection=False``. The kernel is whatever phi defines; it does not approximate softmax."""

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
        if kernel_epsilon < 0:
            raise ValueError(f"kernel_epsilon must be >= 0, got {kernel_epsilon}")
        self.kernel_fn_name = kernel_fn
        self.use_projection = use_projection
        self.kernel_epsilon = kernel_epsilon
        if not use_projection:
            num_features = head_dim
        super().__init__(head_dim, num_features=num_features, **kwargs)
        self.is_random = use_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x) if self.use_projection else x.float()
        return self.KERNEL_FNS[self.kernel_fn_name](projected) + self.kernel_epsilon


class ReluFeatureMap(GeneralizedFeatureMap):
    """relu(W x): the Performer paper's "generalized attention" default (arXiv 2009.14794, sec. 4)."""

    def __init__(self, head_dim: int, num_features: int | None = None, **kwargs):
        kwargs.setdefault("kernel_fn", "relu")
        super().__init__(head_dim, num_features=num_features, **kwargs)


class EluFeatureMap(FeatureMap):
    """elu(x) + 1, the default of "Transformers are RNNs" (arXiv 2006.16236)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(x.float()) + 1.0


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


def available_feature_maps() -> list[str]:
    return sorted([*FEATURE_MAPS, EXACT])


def get_feature_map_class(name: str) -> type[FeatureMap]:
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {available_feature_maps()}, got {name!r}")
    return FEATURE_MAPS[name]


for _name, _cls in {
    "favor+": FavorPlusFeatureMap,
    "relu": ReluFeatureMap,
    "generalized": GeneralizedFeatureMap,
    "elu": EluFeatureMap,
}.items():
    register_feature_map(_name, _cls)
