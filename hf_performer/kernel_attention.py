"""KernelAttention: multi-head kernel (Performer) attention over [B, T, dim] tensors, usable in any PyTorch model.

The call mirrors TF Model Garden's ``KernelAttention.call(query, value, key=None, attention_mask=None, cache=None)``
(``attention_mask`` is (B, S) with 1 = attend, applied to keys only). Every feature map of the registry is
available by name, plus ``"exact"`` (softmax through ``scaled_dot_product_attention``) for A/B comparisons.

    attn = KernelAttention(256, 4, feature_map="favor+", causal=True)
    y = attn(x, x)                          # one causal pass over x (B, T, 256)
    cache = {}
    ys = [attn(c, c, cache=cache) for c in x.split(16, dim=1)]   # streaming: the same numbers, O(m d) state

The attention itself is ``attention.kernel_attention`` / ``attention.softmax_attention``, the same functions the
Performer models run. Causal kernel attention keeps its running state in the ``cache`` dict: ``kv`` (B, H, m, d + 1)
and ``log_scale`` (B, H) or None. Its size does not grow with the stream, unlike the key/value cache of ``"exact"``
(``keys``, ``values``, ``key_mask``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .attention import KernelOptions, KernelState, SoftmaxOptions, WindowState, attend
from .feature_maps import EXACT, RandomProjectionFeatureMap, build_feature_map, feature_seed, get_feature_map_class


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KernelAttention(nn.Module):
    """Multi-head attention whose softmax is replaced by a kernel feature map (arXiv 2009.14794).

    Args:
        embed_dim: width of the query and of the output; split into ``num_heads`` heads of ``embed_dim // num_heads``.
        num_heads: number of heads.
        feature_map: a name from ``hf_performer.available_feature_maps()`` (``"exact"`` = softmax attention).
        num_features: random features m of random-projection maps (default ``int(d ln d)``).
        causal: each query attends to keys at or before its position (self-attention: T == S); enables ``cache``.
        kdim / vdim: widths of key / value inputs (default ``embed_dim``).
        bias: biases of the four projections. dropout: on the attention output, before the output projection.
        scale: softmax temperature multiplying q . k (default ``head_dim ** -0.5``); q and k each get its sqrt.
        orthogonal / norm_scaling: how random projections are drawn (see ``gaussian_projection``).
        feature_map_kwargs: other options of the feature map class. seed: seed of the random features.
        chunk_size: chunk length of the causal algorithm.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        feature_map: str = "favor+",
        num_features: int | None = None,
        causal: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
        orthogonal: bool = True,
        norm_scaling: str = "chi",
        feature_map_kwargs: dict | None = None,
        seed: int = 0,
        chunk_size: int = 64,
    ):
        super().__init__()
        _positive_int("embed_dim", embed_dim)
        _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kdim = embed_dim if kdim is None else _positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _positive_int("vdim", vdim)
        _positive_int("chunk_size", chunk_size)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive number or None, got {scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.scale = self.head_dim**-0.5 if scale is None else float(scale)
        self.chunk_size = chunk_size
        self.seed = seed
        self.feature_map_name = feature_map

        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("feature_redraws", torch.zeros((), dtype=torch.long), persistent=True)

        self.feature_map = None
        if feature_map == EXACT:
            self.options = SoftmaxOptions(causal=causal, scale=self.scale)
        else:
            if not issubclass(get_feature_map_class(feature_map), RandomProjectionFeatureMap) and num_features:
                raise ValueError(f"num_features applies to random-projection maps only, not to {feature_map!r}")
            self.feature_map = build_feature_map(
                feature_map, self.head_dim, num_features=num_features, orthogonal=orthogonal,
                norm_scaling=norm_scaling, options=feature_map_kwargs, seed=feature_seed(seed, 0, 0),
                num_heads=num_heads,
            )
            self.feature_map.check_causal(causal)
            # exp(q . k * scale) = exp((root q) . (root k)): q and k each get the square root of the temperature
            self.options = KernelOptions(self.feature_map, causal=causal, qk_scale=math.sqrt(self.scale),
                                         chunk_size=chunk_size)
            self.cross_options = dataclasses.replace(self.options, queries_are_keys=False)

    @torch.no_grad()
    def redraw_features(self, seed: int | None = None) -> None:
        """Draw new random features: from ``seed``, or from the layer seed and the redraw counter (reproducible)."""
        if self.feature_map is None or not self.feature_map.is_random:
            return
        self.feature_redraws += 1
        if seed is None:
            seed = feature_seed(self.seed, 0, int(self.feature_redraws))
        self.feature_map.new_feature_map(torch.Generator().manual_seed(seed))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        key: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        *,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, T, embed_dim), value (B, S, vdim), key (B, S, kdim) (default: value) -> (B, T, embed_dim).

        ``attention_mask`` (B, S), 1 = attend: masked keys are removed from the numerator and the normaliser.
        ``cache``: a dict (start with ``{}``) carrying the causal state between calls. ``query_mask`` (B, T) only
        matters for maps with sequence statistics (``favor++``): it keeps padded queries out of them; in
        self-attention (the same tensor as query and key) it defaults to ``attention_mask``.
        """
        key = value if key is None else key
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                "query, key and value must be [batch, length, dim]; got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        batch, length, _ = query.shape
        if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share batch and length "
                             f"with each other and the batch of query {tuple(query.shape)}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(key.shape[:2]):
                raise ValueError(f"attention_mask must have shape (batch, key length) = {tuple(key.shape[:2])}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device=query.device, dtype=torch.bool)
        if cache is not None:
            if not self.causal:
                raise ValueError("cache needs causal=True: a bidirectional layer has no running state to stream")
            if not isinstance(cache, dict):
                raise TypeError(f"cache must be a dict (start with {{}}), got {type(cache).__name__}")
        if self.causal and key.shape[1] != length:
            raise ValueError(f"causal attention needs as many keys as queries (T == S), got {length} and {key.shape[1]}")

        q = self._split_heads(self.q_proj(query))  # (B, H, T, d)
        k = self._split_heads(self.k_proj(key))  # (B, H, S, d)
        v = self._split_heads(self.v_proj(value))  # (B, H, S, d)
        if self.feature_map is None:
            kind, state = "softmax", None if cache is None else cache.get("state", WindowState())
        else:
            kind, state = "kernel", None if cache is None else KernelState(cache.get("kv"), cache.get("log_scale"))
        self_attention = query is key
        if query_mask is not None and not (self_attention and query_mask is attention_mask):
            raise ValueError("query_mask is only used in self-attention, where it is attention_mask; in "
                             "cross-attention the statistics of favor++ are taken over every query")
        options = self.options if self_attention or self.feature_map is None else self.cross_options
        seen = cache.get("seen_tokens", 0) if cache is not None else 0
        positions = torch.arange(seen, seen + length, device=q.device).expand(batch, length)  # (B, T)
        out, state = attend(kind, q, k, v, attention_mask, positions, state, options)
        if cache is not None:
            if kind == "kernel":
                cache["kv"], cache["log_scale"] = state.kv, state.log_scale
            else:
                cache["state"] = state
                cache["keys"], cache["values"], cache["key_mask"] = state.keys, state.values, state.key_mask
            cache["seen_tokens"] = cache.get("seen_tokens", 0) + length
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)  # (B, T, H*d)
        return self.out_proj(self.dropout(out))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, feature_map={self.feature_map_name!r}, "
                f"causal={self.causal}")


__all__ = ["KernelAttention"]
