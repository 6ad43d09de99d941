"""The attention core: every kind of attention a Performer layer runs, behind one signature.

    out, state = ATTENTION_KINDS[kind](q, k, v, key_mask, positions, state, options)

* ``q``, ``k``, ``v``: (B, h, N, d), the heads that use this kind (a layer may mix kernel heads and local heads);
* ``key_mask``: (B, N) bool, True for real tokens, or None (no padding);
* ``positions``: (B, N) long, each token's position counting real tokens only (so left padding does not move
  windows or rotary angles);
* ``state``: None when nothing is decoded (training, encoders), else the kind's typed decoding state from the
  previous call (an empty one on the first call); the returned state continues the sequence;
* ``options``: the kind's frozen settings (``KernelOptions``, ``SoftmaxOptions``, ...).

Kinds: ``kernel`` (every feature map; chunked / quadratic / Triton underneath), ``softmax`` (exact), ``local``
(sliding-window softmax heads), ``windowed_kernel`` and ``begin_kernel`` (TF KernelAttention's causal variants),
``hybrid`` (LoLCATs: exact softmax over a sliding window plus kernel scores for every older key, one normaliser),
``cross_kernel`` / ``cross_softmax`` (decoder over encoder states). ``attend`` runs one, with autocast off, and on
packed documents (``PackedDocuments``) runs it on each document alone.

The functions are plain PyTorch: no config, no cache class, no module. ``PerformerAttention`` (the model),
``KernelAttention`` (standalone layer) and ``attn_implementation="performer"`` (any transformers model) are thin
adapters that build the options once and call these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

import torch.nn.functional as F

from .feature_maps import FEATURE_MAPS, FeatureMap
from .local_ops import (
    masked_softmax_attention,
    sliding_window_attention,
    sliding_window_sums,
    window_reach,
    windowed_kernel_attention,
)
from .ops import causal_exp_attention, causal_linear_attention, kernel_sums, linear_attention, linear_attention_output
from .ops_common import _safe

# ----------------------------------------------------------------------------------------------------------------
# Decoding states: batch-first tensors, so beam search can reorder them all the same way
# ----------------------------------------------------------------------------------------------------------------


class DecodingState:
    """Base of the typed decoding states (dataclasses of batch-first tensors): beam reorder, selection and
    repetition apply one batch-dimension map to every tensor."""

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                setattr(self, field.name, fn(value))
            elif isinstance(value, DecodingState):
                value.map_batch(fn)

    def nbytes(self) -> int:
        total = 0
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, DecodingState):
                total += value.nbytes()
        return total


@dataclass
class KernelState(DecodingState):
    """Running kernel sums: ``kv`` (B, h, m, d + 1) = [sum_u phi(k_u) v_u^T | sum_u phi(k_u)] and, for exponential
    feature maps, ``log_scale`` (B, h), the running maximum the sums are scaled by (see ``ops.py``). Constant size."""

    kv: torch.Tensor | None = None
    log_scale: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.kv is not None


@dataclass
class WindowState(DecodingState):
    """The last tokens a banded kind needs (at most its reach): keys (B, h, W, *), values (B, h, W, d), their
    positions (B, W) and which of them are real (B, W). Exact softmax layers keep every token here (they grow)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.keys is not None


@dataclass
class BeginKernelState(DecodingState):
    """``begin_kernel``: the state of the kernel kind it wraps, plus the first tokens' exact window."""

    inner: DecodingState | None = None
    exact: WindowState = dataclasses.field(default_factory=WindowState)


@dataclass
class HybridState(DecodingState):
    """``hybrid``: the last ``window - 1`` raw keys / values (the next query's exact window) and the kernel sums of
    every token that has left it. Constant size."""

    kernel: KernelState = dataclasses.field(default_factory=KernelState)
    window: WindowState = dataclasses.field(default_factory=WindowState)


def _with_window(state: WindowState | None, keep: int | None, k, v, key_mask, positions):
    """[cached tokens | new tokens] for a banded kind, and the state holding the last ``keep`` of them (all when
    ``keep`` is None). Without a state the new tokens alone are returned."""
    if state is None:
        return k, v, key_mask, positions, None
    if state.keys is not None:
        k = torch.cat([state.keys, k], dim=2)  # (B, h, W + N, *)
        v = torch.cat([state.values, v], dim=2)
        key_mask = torch.cat([state.key_mask, key_mask], dim=1)  # (B, W + N)
        positions = torch.cat([state.positions, positions], dim=1)
    total = k.shape[2]
    start = 0 if keep is None else max(0, total - keep)
    new_state = WindowState(k[:, :, start:], v[:, :, start:], positions[:, start:], key_mask[:, start:])
    return k, v, key_mask, positions, new_state


def _real(key_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if key_mask is not None:
        return key_mask
    return torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)


# ----------------------------------------------------------------------------------------------------------------
# Kernel attention (FAVOR+ and every other feature map)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOptions:
    """``feature_map`` phi; q and k are each multiplied by ``qk_scale`` first (d ** -0.25 makes FAVOR+ estimate
    softmax(q k^T / sqrt(d))). ``implementation`` / ``chunk_size``: see ``ops.causal_linear_attention``.
    ``scale_by_length``: TF KernelAttention's temperature log(n) / log(512) for n real keys (bidirectional).
    ``queries_are_keys``: self-attention, so ``key_mask`` also tells maps with sequence statistics (favor++)
    which queries are real; in cross-attention their statistics take every query."""

    feature_map: FeatureMap
    causal: bool
    qk_scale: float = 1.0
    chunk_size: int = 64
    implementation: str = "auto"
    scale_by_length: bool = False
    queries_are_keys: bool = True


def kernel_attention(q, k, v, key_mask, positions, state: KernelState | None, options: KernelOptions):
    """phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1), padded keys removed from both sums; causal layers continue from
    ``state``. FAVOR+-like maps compute their features inside the chunked causal op (``ops.causal_exp_attention``)."""
    scale = options.qk_scale
    if options.scale_by_length:
        # TF KernelAttention: the temperature grows with log(length) to keep the attention entropy steady.
        count = (key_mask.sum(-1) if key_mask is not None else torch.full((q.shape[0],), q.shape[2])).clamp_min(2)
        scale = scale * (torch.log(count.float()) / math.log(512)).sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    initial = (state.kv, state.log_scale) if state is not None and state.kv is not None else None
    feature_map = options.feature_map
    fused = feature_map.fused_feature_args() if options.causal and hasattr(feature_map, "fused_feature_args") else None
    if fused is not None:
        if torch.is_tensor(scale):  # one scale per batch row cannot be folded into the projection
            q, k, scale = q * scale, k * scale, 1.0
        out, (kv, log_scale) = causal_exp_attention(
            q, k, v, fused["projection"] * scale, norm_coef=fused["norm_coef"] * scale**2,
            logit_offset=fused["logit_offset"], key_mask=key_mask, initial_state=initial,
            chunk_size=options.chunk_size, implementation=options.implementation,
        )
        return out, (KernelState(kv, log_scale) if state is not None else None)
    # masks go in because some maps (favor++, softmax_no_projection) take statistics over the real tokens only
    q_features, k_features, k_log_scale = feature_map.attention_features(
        q * scale, k * scale, key_mask=key_mask, query_mask=key_mask if options.queries_are_keys else None,
        causal=options.causal,
    )  # (B, h, N, m), (B, h, S, m), (B, h, S) or None
    if not options.causal:
        out = linear_attention(q_features, k_features, v, k_log_scale=k_log_scale, key_mask=key_mask,
                               implementation=options.implementation)
        return out, None
    out, (kv, log_scale) = causal_linear_attention(
        q_features, k_features, v, k_log_scale=k_log_scale, key_mask=key_mask, initial_state=initial,
        chunk_size=options.chunk_size, implementation=options.implementation,
    )
    return out, (KernelState(kv, log_scale) if state is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Exact softmax attention: global (for A/B comparisons) and local windows (mixed with kernel heads)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxOptions:
    """``scale`` multiplies q . k (None: d ** -0.5)."""

    causal: bool
    scale: float | None = None


def softmax_attention(q, k, v, key_mask, positions, state: WindowState | None, options: SoftmaxOptions):
    """Plain softmax attention through ``scaled_dot_product_attention``; decoding keeps every key (it grows)."""
    k, v, key_mask, _, state = _with_window(state, None, k, v, _real(key_mask, q), positions)
    return masked_softmax_attention(q, k, v, key_mask=key_mask, causal=options.causal, scale=options.scale), state


@dataclass(frozen=True)
class LocalOptions:
    """Exact softmax over ``window`` tokens (``blocked``: the local-attention package's blocks, see
    ``local_ops.sliding_window_attention``); ``scale`` multiplies q . k (None: d ** -0.5)."""

    causal: bool
    window: int
    blocked: bool = False
    scale: float | None = None


def local_attention(q, k, v, key_mask, positions, state: WindowState | None, options: LocalOptions):
    """Sliding-window softmax at O(N * window); decoding keeps the last ``window_reach`` tokens."""
    keep = window_reach(options.window, options.blocked)
    keys, values, mask, key_positions, state = _with_window(state, keep, k, v, _real(key_mask, q), positions)
    out = sliding_window_attention(q, keys, values, window=options.window, causal=options.causal, q_positions=positions,
                                   k_positions=key_positions, key_mask=mask, scale=options.scale,
                                   blocked=options.blocked)
    return out, state


# ----------------------------------------------------------------------------------------------------------------
# TF KernelAttention's two causal variants
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowedKernelOptions:
    """``use_causal_windowed``: chunks of ``chunk_length`` tokens see the last ``window_length`` chunks with
    kernel scores weighted by ``decay ** distance``; ``align_end`` (TF ``causal_padding='left'``) aligns the chunks
    to the end of each sequence."""

    kernel: KernelOptions
    chunk_length: int = 1
    window_length: int = 3
    decay: float | None = None
    align_end: bool = False

    @property
    def streams(self) -> bool:
        """Token-by-token decoding computes the same numbers only with chunks of one token aligned to the start."""
        return self.chunk_length == 1 and not self.align_end


def windowed_kernel(q, k, v, key_mask, positions, state: WindowState | None, options: WindowedKernelOptions):
    if state is not None and not options.streams:
        raise ValueError(
            f"use_causal_windowed with causal_chunk_length={options.chunk_length}"
            f"{' and causal_padding=left' if options.align_end else ''} attends within whole chunks, so it cannot be "
            "decoded token by token; run it without a cache (use_cache=False), or use causal_chunk_length=1"
        )
    real = _real(key_mask, q)
    if options.align_end:
        positions = positions + (-real.sum(-1, keepdim=True)) % options.chunk_length
    kernel = options.kernel
    q_features, k_features, k_log_scale = kernel.feature_map.attention_features(
        q * kernel.qk_scale, k * kernel.qk_scale, key_mask=key_mask, query_mask=key_mask, causal=True
    )
    log_scale = k_log_scale if k_log_scale is not None else torch.zeros_like(k_features[..., 0])
    # keys and their log scale travel together through the cache window: (B, h, N, m + 1)
    keys = torch.cat([k_features, log_scale.unsqueeze(-1)], dim=-1)
    keep = options.window_length * options.chunk_length - 1
    keys, values, mask, key_positions, state = _with_window(state, keep, keys, v, real, positions)
    out = windowed_kernel_attention(
        q_features, keys[..., :-1], values, chunk_length=options.chunk_length, window_length=options.window_length,
        q_positions=positions, k_positions=key_positions, key_mask=mask, decay=options.decay,
        k_log_scale=keys[..., -1] if k_log_scale is not None else None,
    )
    return out, state


@dataclass(frozen=True)
class BeginKernelOptions:
    """TF KernelAttention's ``begin_kernel``: queries at the first ``first`` positions use exact softmax (scale
    ``d ** -0.5``), the others the kernel kind ``inner`` (plain or windowed kernel attention)."""

    inner: KernelOptions | WindowedKernelOptions
    first: int


def begin_kernel(q, k, v, key_mask, positions, state: BeginKernelState | None, options: BeginKernelOptions):
    windowed = isinstance(options.inner, WindowedKernelOptions)
    inner_attention, inner_state = (windowed_kernel, WindowState) if windowed else (kernel_attention, KernelState)
    if state is not None and state.inner is None:
        state = BeginKernelState(inner_state(), state.exact)
    out, inner = inner_attention(q, k, v, key_mask, positions, state and state.inner, options.inner)
    if windowed or options.inner.causal:
        # Causal queries at positions < n see only keys at positions < n: a window of n tokens is exact.
        exact, exact_state = local_attention(q, k, v, key_mask, positions, state and state.exact,
                                             LocalOptions(causal=True, window=options.first))
    else:
        exact, exact_state = softmax_attention(q, k, v, key_mask, positions, None, SoftmaxOptions(causal=False))
    first = (positions < options.first)[:, None, :, None]  # (B, 1, N, 1)
    out = torch.where(first, exact.to(out.dtype), out)
    return out, (BeginKernelState(inner, exact_state) if state is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# LoLCATs hybrid: exact softmax over a sliding window, kernel scores for the older keys, one normaliser
# ----------------------------------------------------------------------------------------------------------------

# What a map may override and still hand over plain features: these are where maps drop per-token factors
# (exponential maps, random Fourier features) or take sequence statistics (favor++, softmax_no_projection).
_SCALED_FEATURE_METHODS = ("query_features", "key_features", "attention_features", "kernel_features")


def _plain_feature_class(cls: type) -> bool:
    return not cls.exponential and all(getattr(cls, name) is getattr(FeatureMap, name)
                                       for name in _SCALED_FEATURE_METHODS)


def hybrid_feature_maps() -> list[str]:
    """Registered feature maps the ``hybrid`` kind accepts (``generalized`` only with a kernel_fn other than exp)."""
    return sorted(name for name, cls in FEATURE_MAPS.items() if _plain_feature_class(cls))


def check_hybrid_feature_map(feature_map: FeatureMap) -> None:
    """ValueError unless the map's features are plain per-token values: ``forward_queries`` / ``forward_keys`` give
    phi(q), phi(k) themselves. Exponential maps (favor+, ...) and random Fourier features hand attention features
    divided by per-token factors, which cancel in a kernel-only normaliser but not against exact window scores."""
    if not _plain_feature_class(type(feature_map)) or feature_map.exponential:
        raise ValueError(
            f"hybrid attention (a sliding window of exact softmax plus kernel attention) needs a feature map with "
            f"plain per-token features, one of {hybrid_feature_maps()} (generalized with kernel_fn != 'exp'); "
            f"{type(feature_map).__name__} is exponential or scales its features per token (favor+-like and Fourier "
            "maps), and those factors do not cancel against the exact window scores"
        )


# Initial window_factor logit: sigmoid = 0.1, LoLCATs' released configs' init_window_factor (arXiv 2410.10254): the
# exact window's scores exp(s - m) are <= 1 with one of them 1, a small gate keeps the many older keys' kernel scores
# from being drowned out before training has tuned the mix.
LOLCATS_WINDOW_FACTOR_INIT = math.log(0.1 / 0.9)


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class HybridOptions:
    """LoLCATs' sliding window + linear attention (arXiv 2410.10254, sec. 3.2): a query attends to the keys of its
    ``window`` (causal: itself and the window - 1 before; bidirectional: |i - j| < window) with exact scores
    exp(q . k * softmax_scale - m) (softmax_scale None: d ** -0.5, m the row max over the window) and to every other
    key with kernel scores phi(q) . phi(k) (``kernel``: its feature map, qk_scale, chunking), weighted g and 1 - g in
    one normaliser. g = sigmoid(window_factor) per head: ``window_factor`` (h,) logits, a parameter of the module
    that owns it (None: g = 0.5)."""

    kernel: KernelOptions
    window: int
    softmax_scale: float | None = None
    window_factor: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.kernel, KernelOptions):
            raise ValueError(f"HybridOptions.kernel must be KernelOptions, got {type(self.kernel).__name__}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"HybridOptions.window must be a positive int, got {self.window!r}")
        scale = self.softmax_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"HybridOptions.softmax_scale must be None or a finite number > 0, got {scale!r}")
        factor = self.window_factor
        if factor is not None and (not isinstance(factor, torch.Tensor) or factor.dim() != 1):
            raise ValueError("HybridOptions.window_factor must be None or a 1-D tensor of per-head logits, got "
                             f"{factor if not isinstance(factor, torch.Tensor) else tuple(factor.shape)!r}")
        if self.kernel.scale_by_length:
            raise ValueError("HybridOptions.kernel.scale_by_length is not supported by hybrid attention (the window "
                             "scores have their own softmax_scale)")
        check_hybrid_feature_map(self.kernel.feature_map)


def _kernel_sums_before_window(q_features, k_features, v, key_mask, window: int, kv0, kernel: KernelOptions):
    """Un-normalised kernel attention of the N queries (the last N of the S keys) over the keys at least
    ``window`` tokens before them, plus the sums ``kv0`` (B, h, m, d + 1) of even older tokens (or None):
    numerator (B, h, N, d) and normaliser (B, h, N), in float32 (float64 for float64 inputs).

    Real tokens are contiguous in a row (left or right padding), so "window positions back" is "window indices
    back": query t sees the keys up to index t - window, which is causal kernel attention over the keys shifted
    ``window`` places to the right. That runs through ``ops.causal_linear_attention`` (chunked, its own backward,
    O(N m d)); its output comes normalised, so the normaliser is recomputed as phi(q_t) . (prefix sum of the shifted
    key features) (O(N m)) and multiplies it back."""
    queries, keys = q_features.shape[2], k_features.shape[2]
    ct = q_features.dtype
    v = v.to(ct)
    offset = keys - queries - window  # shifted key t = key t + offset
    if offset > 0:  # a cached prefix longer than the window: keys every query sees go into the sums
        seen = kernel_sums(k_features[:, :, :offset], v[:, :, :offset], key_mask=key_mask[:, :offset])
        kv0 = seen if kv0 is None else kv0 + seen
    first, stop = max(0, offset), max(0, queries + offset)
    pad = queries - (stop - first)  # queries whose older-than-window keys start before these keys
    shifted_k = F.pad(k_features[:, :, first:stop], (0, 0, pad, 0))  # (B, h, N, m)
    shifted_v = F.pad(v[:, :, first:stop], (0, 0, pad, 0))  # (B, h, N, d)
    shifted_mask = F.pad(key_mask[:, first:stop], (pad, 0), value=False)  # (B, N)
    initial = None if kv0 is None else (kv0.to(ct), None)
    out, _ = causal_linear_attention(q_features, shifted_k, shifted_v, key_mask=shifted_mask, initial_state=initial,
                                     chunk_size=kernel.chunk_size, implementation=kernel.implementation)
    key_sums = (shifted_k * shifted_mask[:, None, :, None].to(ct)).cumsum(dim=2)  # (B, h, N, m)
    if kv0 is not None:
        key_sums = key_sums + kv0[..., -1].to(ct).unsqueeze(2)
    normaliser = (q_features * key_sums).sum(-1)  # (B, h, N)
    return out.to(ct) * normaliser.unsqueeze(-1), normaliser


def hybrid_attention(q, k, v, key_mask, positions, state: HybridState | None, options: HybridOptions):
    """out_i = [g sum_{W_i} exp(s_ij - m_i) v_j + (1 - g) sum_{R_i} phi(q_i).phi(k_j) v_j] / [same with v_j = 1],
    W_i the window, R_i the older keys (bidirectional: the keys outside the window on both sides), at
    O(N (window + m d)); no N x N tensor. Decoding keeps the last window - 1 raw keys and folds the tokens that
    leave the window into constant-size kernel sums (``HybridState``)."""
    kernel, window, heads = options.kernel, options.window, q.shape[1]
    if state is not None and not kernel.causal:
        raise ValueError("bidirectional hybrid attention cannot be decoded with a state")
    factor = options.window_factor
    if factor is not None and factor.shape[0] != heads:
        raise ValueError(f"HybridOptions.window_factor has {factor.shape[0]} entries for {heads} heads")
    real = _real(key_mask, q)
    keys, values, mask, key_positions, window_state = _with_window(state and state.window, window - 1, k, v, real,
                                                                   positions)
    window_numerator, window_normaliser = sliding_window_sums(
        q, keys, values, window=window, causal=kernel.causal, q_positions=positions, k_positions=key_positions,
        key_mask=mask, scale=options.softmax_scale,
    )  # (B, h, N, d), (B, h, N)
    ct = window_numerator.dtype
    # plain per-token features (check_hybrid_feature_map): forward_* are phi itself, in the compute dtype
    feature_map = kernel.feature_map
    q_features = feature_map.forward_queries((q * kernel.qk_scale).to(ct)).to(ct)  # (B, h, N, m)
    k_features = feature_map.forward_keys((keys * kernel.qk_scale).to(ct)).to(ct)  # (B, h, S, m)
    kv0 = state.kernel.kv if state is not None else None
    numerator, normaliser = _kernel_sums_before_window(q_features, k_features, values, mask, window, kv0, kernel)
    if not kernel.causal:  # the keys at least `window` after: the same sums on the reversed sequence
        flip = lambda x: x.flip(2)  # noqa: E731
        after_numerator, after_normaliser = _kernel_sums_before_window(
            flip(q_features), flip(k_features), flip(values), mask.flip(1), window, None, kernel)
        numerator, normaliser = numerator + flip(after_numerator), normaliser + flip(after_normaliser)
    if factor is None:
        gate = torch.full((1, heads, 1), 0.5, dtype=ct, device=q.device)
    else:
        gate = torch.sigmoid(factor.to(device=q.device, dtype=ct)).view(1, heads, 1)  # (1, h, 1)
    total = gate * window_normaliser + (1 - gate) * normaliser  # (B, h, N): >= g for a real query (its own key)
    out = (gate.unsqueeze(-1) * window_numerator + (1 - gate).unsqueeze(-1) * numerator) / _safe(total).unsqueeze(-1)
    new_state = None
    if state is not None:
        leaving = keys.shape[2] - (window - 1)  # the tokens the new window no longer holds
        kv = state.kernel.kv
        if leaving > 0:
            folded = kernel_sums(k_features[:, :, :leaving], values[:, :, :leaving], key_mask=mask[:, :leaving])
            kv = folded if kv is None else kv + folded
        new_state = HybridState(KernelState(kv), window_state)
    return out.to(v.dtype), new_state


# ----------------------------------------------------------------------------------------------------------------
# Cross-attention: decoder queries against encoder states
# ----------------------------------------------------------------------------------------------------------------


def cross_attention(q, k, v, key_mask, positions, state: KernelState | WindowState | None, options):
    """Bidirectional attention of decoder queries over encoder states (``key_mask``: the encoder's padding). The
    key side never changes while decoding, so it is computed on the first call and kept in ``state``: kernel
    attention keeps its (m, d + 1) kernel sums, exact softmax its keys and values; later calls pass ``k = v = None``.
    Per-token feature maps only (``supports_causal``): the sums must not depend on the queries."""
    filled = state is not None and state.filled
    if isinstance(options, SoftmaxOptions):
        if filled:
            k, v, key_mask = state.keys, state.values, state.key_mask
        elif state is not None:
            state = WindowState(k, v, None, _real(key_mask, k))
        out = masked_softmax_attention(q, k, v, key_mask=_real(key_mask, k), causal=False, scale=options.scale)
        return out, state
    feature_map = options.feature_map
    if filled:
        kv = state.kv
    else:
        k_features, k_log_scale = feature_map.key_features(k * options.qk_scale)  # (B, h, S, m), (B, h, S)
        kv = kernel_sums(k_features, v, k_log_scale=k_log_scale, key_mask=key_mask)  # (B, h, m, d + 1)
        state = KernelState(kv) if state is not None else None
    q_features = feature_map.query_features(q * options.qk_scale)  # (B, h, N, m)
    return linear_attention_output(q_features, kv).to(q.dtype), state


# ----------------------------------------------------------------------------------------------------------------
# Packed documents: several sequences in one row, attention reset at every boundary
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedDocuments:
    """Where the documents of a packed batch lie (``DataCollatorWithFlattening``: rows of concatenated documents,
    positions restarting at 0). Projections and feed-forward run on the packed tokens, without padding; each
    attention kind runs on the documents laid out as rows of a padded batch, so every kind (kernel sums, windows,
    exact attention) starts afresh at each document, exactly as if the documents were run alone.

    ``index`` (D, L): flat token index (into B * N) of each document's tokens, padded with 0; ``real`` (D, L) which
    entries are tokens. Build it with ``from_positions`` or ``from_cu_seqlens``."""

    index: torch.Tensor
    real: torch.Tensor
    starts: torch.Tensor  # (B, N) bool: the first token of every document
    positions: torch.Tensor  # (B, N) long: each token's place in its document
    batch: int
    length: int

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "PackedDocuments":
        """``starts`` (B, N) bool: True at the first token of every document (each row's first token included)."""
        batch, length = starts.shape
        starts = starts.clone()
        starts[:, 0] = True
        flat = starts.flatten()  # (B*N,)
        document = flat.long().cumsum(0) - 1  # (B*N,): which document each token belongs to
        first = torch.nonzero(flat).squeeze(-1)  # (D,): index of each document's first token
        sizes = torch.diff(first, append=first.new_tensor([flat.numel()]))  # (D,)
        offsets = torch.arange(flat.numel(), device=flat.device) - first[document]  # (B*N,) place in the document
        longest = int(sizes.max())
        index = torch.zeros(first.numel(), longest, dtype=torch.long, device=flat.device)  # (D, L)
        real = torch.zeros(first.numel(), longest, dtype=torch.bool, device=flat.device)
        tokens = torch.arange(flat.numel(), device=flat.device)
        index[document, offsets] = tokens
        real[document, offsets] = True
        return cls(index, real, starts, offsets.view(batch, length), batch, length)

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> "PackedDocuments | None":
        """Documents where positions restart at 0 after a real token of the same row; None when none does (left
        padding, whose real tokens start at 0, is not a restart)."""
        real = key_mask if key_mask is not None else torch.ones_like(position_ids, dtype=torch.bool)
        after_real = real.long().cumsum(-1) > 1  # (B, N): an earlier real token exists in the row
        restarts = (position_ids == 0) & real & after_real
        return cls.from_starts(restarts) if bool(restarts.any()) else None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int, length: int) -> "PackedDocuments":
        """flash-attention's cumulative lengths over the flattened batch: (D + 1,) starting at 0."""
        starts = torch.zeros(batch * length, dtype=torch.bool, device=cu_seqlens.device)
        starts[cu_seqlens[:-1].long()] = True
        return cls.from_starts(starts.view(batch, length))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, N, *) -> (D, h, L, *): each document a row."""
        flat = x.transpose(0, 1).flatten(1, 2)  # (h, B*N, *)
        return flat[:, self.index].transpose(0, 1)  # (D, h, L, *)

    def unpack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (D, L): masks and positions."""
        return x.flatten()[self.index]

    def pack(self, out: torch.Tensor) -> torch.Tensor:
        """(D, h, L, *) -> (B, h, N, *), the inverse of ``unpack`` on the real entries."""
        heads = out.shape[1]
        flat = out.new_zeros(heads, self.batch * self.length, *out.shape[3:])  # (h, B*N, *)
        flat[:, self.index[self.real]] = out.transpose(0, 1)[:, self.real]
        return flat.view(heads, self.batch, self.length, *out.shape[3:]).transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionKind:
    function: Callable
    options: type
    state: type


ATTENTION_KINDS: dict[str, AttentionKind] = {
    "kernel": AttentionKind(kernel_attention, KernelOptions, KernelState),
    "softmax": AttentionKind(softmax_attention, SoftmaxOptions, WindowState),
    "local": AttentionKind(local_attention, LocalOptions, WindowState),
    "windowed_kernel": AttentionKind(windowed_kernel, WindowedKernelOptions, WindowState),
    "begin_kernel": AttentionKind(begin_kernel, BeginKernelOptions, BeginKernelState),
    "hybrid": AttentionKind(hybrid_attention, HybridOptions, HybridState),
    "cross_kernel": AttentionKind(cross_attention, KernelOptions, KernelState),
    "cross_softmax": AttentionKind(cross_attention, SoftmaxOptions, WindowState),
}


def attend(kind: str, q, k, v, key_mask, positions, state, options, documents: PackedDocuments | None = None):
    """Run one kind of attention: ``(out (B, h, N, d), state)``; with ``documents``, on each packed document alone.
    The math runs with autocast off: exponential features and kernel sums lose everything in bf16, so the ops pick
    their own (float32) accumulation dtypes."""
    function = ATTENTION_KINDS[kind].function
    with torch.autocast(device_type=q.device.type, enabled=False):
        if documents is None:
            return function(q, k, v, key_mask, positions, state, options)
        if state is not None:
            raise ValueError("packed documents (positions restarting inside a row, or cu_seq_lens) cannot be "
                             "decoded with a cache: pass one sequence per row to generate")
        real = documents.real if key_mask is None else documents.real & documents.unpack_tokens(key_mask)
        out, _ = function(documents.unpack(q), documents.unpack(k), documents.unpack(v), real,
                          documents.unpack_tokens(positions), None, options)
        return documents.pack(out), None


__all__ = [
    "ATTENTION_KINDS",
    "LOLCATS_WINDOW_FACTOR_INIT",
    "AttentionKind",
    "DecodingState",
    "HybridOptions",
    "HybridState",
    "BeginKernelOptions",
    "BeginKernelState",
    "KernelOptions",
    "KernelState",
    "LocalOptions",
    "PackedDocuments",
    "SoftmaxOptions",
    "WindowState",
    "WindowedKernelOptions",
    "attend",
    "begin_kernel",
    "check_hybrid_feature_map",
    "cross_attention",
    "hybrid_attention",
    "hybrid_feature_maps",
    "kernel_attention",
    "local_attention",
    "softmax_attention",
    "windowed_kernel",
]
