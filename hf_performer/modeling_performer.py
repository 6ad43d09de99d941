"""Performer models for Hugging Face Transformers: kernel (linear) attention, arXiv 2009.14794.

Layout follows transformers' Llama: PerformerPreTrainedModel -> PerformerModel -> PerformerForCausalLM /
PerformerForSequenceClassification. The attention math lives in ``ops.py`` and ``feature_maps.py``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .cache_performer import CACHE_NAME, PerformerCache, resolve_cache_argument
from .configuration_performer import PerformerConfig
from .feature_maps import EXACT, FeatureMap, RandomProjectionFeatureMap, get_feature_map_class
from .local_ops import (
    masked_softmax_attention,
    sliding_window_attention,
    window_reach,
    windowed_kernel_attention,
)
from .ops import causal_exp_attention, causal_linear_attention, linear_attention

logger = logging.get_logger(__name__)


def feature_seed(base_seed: int, layer_idx: int, redraw_step: int) -> int:
    """Seed of one layer's random features: a function of the config seed, the layer and the redraw counter, so
    every process of a distributed job draws identical projections without communicating."""
    return (base_seed * 1_000_003 + layer_idx * 7_919 + redraw_step * 104_729) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------------
# Norms and positions
# ----------------------------------------------------------------------------------------------------------------


class PerformerRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class PerformerScaleNorm(nn.Module):
    """ScaleNorm, g * x / ||x|| with one learned scalar (arXiv 1910.05895); g starts at sqrt(hidden_size)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.g = nn.Parameter(torch.tensor(hidden_size**0.5))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float().norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return (x.float() / norm * self.g).to(x.dtype)


def build_norm(config: PerformerConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return PerformerRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    if config.norm_type == "scalenorm":
        return PerformerScaleNorm(config.hidden_size, eps=config.layer_norm_eps)
    if config.norm_type == "rezero":
        return nn.Identity()
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class PerformerRotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864), applied to q and k before the feature map."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq.float()  # (B, N, d/2)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, N, d)
        return angles.cos(), angles.sin()


def sinusoidal_table(position_ids: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed [sin | cos] position table (Vaswani et al. 2017, half-split layout): (B, N) -> (B, N, dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_head: int = 0) -> torch.Tensor:
    """Rotate heads ``first_head:`` of x (B, H, N, d); earlier heads pass through unchanged."""
    if first_head:
        return torch.cat([x[:, :first_head], apply_rotary(x[:, first_head:], cos, sin)], dim=1)
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


class PerformerAxialPositionEmbedding(nn.Module):
    """Reformer's axial position embedding: position j = (j_1, ..., j_k) in the grid ``axial_pos_shape`` gets the
    concatenation of one learned vector per axis (widths ``axial_pos_embds_dim``)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.shape = list(config.axial_pos_shape)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.zeros(size, dim)) for size, dim in zip(self.shape, config.axial_pos_embds_dim)]
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        parts = []
        remainder = position_ids
        for size, weight in zip(self.shape, self.weights):  # first axis varies fastest
            parts.append(weight[remainder % size])
            remainder = remainder // size
        return torch.cat(parts, dim=-1)  # (B, N, hidden)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


class PerformerAttention(nn.Module):
    """Multi-head attention mixing global kernel heads with exact local-window heads.

    The first ``H - local_heads`` heads are global: phi(q) (phi(k)^T v), normalised, with FAVOR+ or another
    feature map (or exact softmax with ``feature_map="exact"``, or TF's windowed causal kernel attention). The last
    ``local_heads`` heads are exact softmax over a sliding window of ``local_window_size`` tokens, as in the
    Performer reference. Causal layers continue from the state kept in ``PerformerCache`` when decoding; padded
    keys are removed from both the numerator and the normaliser.
    """

    def __init__(self, config: PerformerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_local_heads = config.local_heads(layer_idx)
        self.num_global_heads = self.num_heads - self.num_local_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.scale = config.scale
        self.chunk_size = config.attention_chunk_size
        self.window = config.local_window_size
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.dropout = nn.Dropout(config.attention_dropout)
        self.is_exact = config.feature_map == EXACT
        self.feature_map: FeatureMap | None = None
        if not self.is_exact and self.num_global_heads > 0:
            map_class = get_feature_map_class(config.feature_map)
            with torch.random.fork_rng(devices=[]):  # the draw below is seeded; leave the global RNG alone
                self.feature_map = map_class(self.head_dim, **config.feature_map_options())
            self.redraw_features(feature_seed(config.feature_seed, layer_idx, 0))

    def redraw_features(self, seed: int) -> None:
        if self.feature_map is not None and self.feature_map.is_random:
            self.feature_map.new_feature_map(torch.Generator().manual_seed(seed))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: PerformerCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, N, d)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, N, d)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, N, d)
        if position_embeddings is not None:
            # rotary on every head with rotary positions; with local_rotary only on the local heads
            first = 0 if self.config.position_embedding_type == "rotary" else self.num_global_heads
            q, k = apply_rotary(q, *position_embeddings, first), apply_rotary(k, *position_embeddings, first)
        if position_ids is None:
            position_ids = torch.arange(length, device=q.device).expand(batch, length)
        if key_mask is None:
            key_mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
        cache = past_key_values.layer(self.layer_idx) if past_key_values is not None and self.causal else None
        # Under mixed-precision autocast the feature maps and kernel sums must stay in float32 (exp features and
        # running sums lose everything in bf16): the attention math runs with autocast off and handles dtypes itself.
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = self._attend(q, k, v, key_mask, position_ids, cache)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, N, H*d)
        return self.o_proj(self.dropout(out))

    def _attend(self, q, k, v, key_mask, position_ids, cache) -> torch.Tensor:
        """(B, H, N, d) attention output: global heads first, then local heads."""
        g = self.num_global_heads
        outputs = []
        if g > 0:
            if self.is_exact:
                outputs.append(self._exact_attention(q[:, :g], k[:, :g], v[:, :g], key_mask, cache))
            else:
                outputs.append(self._kernel_attention(q[:, :g], k[:, :g], v[:, :g], key_mask, position_ids, cache))
        if self.num_local_heads > 0:
            blocked = self.config.local_window_type == "blocked"
            outputs.append(self._windowed(
                "local", q[:, g:], k[:, g:], v[:, g:], key_mask, position_ids, cache,
                window_reach(self.window, blocked),
                lambda q_, k_, v_, qp, kp, km: sliding_window_attention(
                    q_, k_, v_, window=self.window, causal=self.causal, q_positions=qp, k_positions=kp, key_mask=km,
                    blocked=blocked,
                ),
            ))
        if len(outputs) > 1:
            return torch.cat([o.to(v.dtype) for o in outputs], dim=1)  # (B, H, N, d)
        return outputs[0]

    @staticmethod
    def _windowed(name, q, k, v, key_mask, position_ids, cache, keep, attend):
        """Run banded attention over [cached last ``keep`` tokens | new tokens], then keep the new tail.

        ``q``, ``k``, ``v`` are (B, h, N, *); the cache holds the same tensors for the previous tokens, so memory
        stays at ``keep`` tokens per layer whatever the context length."""
        keys = {"k": k, "v": v, "pos": position_ids, "mask": key_mask}
        if cache is not None:
            for key, new in keys.items():
                old = cache.get(f"{name}.{key}")
                if old is not None:
                    keys[key] = torch.cat([old, new], dim=2 if new.dim() == 4 else 1)
            for key, full in keys.items():
                dim = 2 if full.dim() == 4 else 1
                total = full.shape[dim]
                cache.set(f"{name}.{key}", full.narrow(dim, max(0, total - keep), min(total, keep)))
        return attend(q, keys["k"], keys["v"], position_ids, keys["pos"], keys["mask"])

    def _kernel_attention(self, q, k, v, key_mask, position_ids, cache):
        config = self.config
        scale = self.scale
        if config.scale_by_length:
            # TF KernelAttention: temperature grows with log(length) to keep the attention entropy steady.
            count = key_mask.sum(-1).clamp_min(2).float()  # (B,)
            scale = scale * (torch.log(count) / math.log(512)).sqrt().view(-1, 1, 1, 1)
        fused = self.feature_map.fused_feature_args() if hasattr(self.feature_map, "fused_feature_args") else None
        if fused is not None and self.causal and not config.use_causal_windowed:
            out = self._fused_causal_attention(q, k, v, scale, fused, key_mask, cache)
            if config.begin_kernel > 0:
                out = self._begin_with_softmax(q, k, v, out, key_mask, position_ids, cache)
            return out
        # masks go in because some maps (favor++, softmax_no_projection) take statistics over the real tokens
        q_features, k_features, k_log_scale = self.feature_map.attention_features(
            q * scale, k * scale, key_mask=key_mask, query_mask=key_mask, causal=self.causal
        )  # (B, h, N, m), (B, h, N, m), (B, h, N) or None
        if not self.causal:
            out = linear_attention(q_features, k_features, v, k_log_scale=k_log_scale, key_mask=key_mask,
                                   implementation=config.attention_implementation)
        elif config.use_causal_windowed:
            out = self._causal_windowed(q_features, k_features, k_log_scale, v, key_mask, position_ids, cache)
        else:
            state = None
            if cache is not None and cache.get("kv") is not None:
                state = (cache.get("kv"), cache.get("log_scale"))
            out, (kv, log_scale) = causal_linear_attention(
                q_features, k_features, v, k_log_scale=k_log_scale, key_mask=key_mask, initial_state=state,
                chunk_size=self.chunk_size, implementation=config.attention_implementation,
            )
            if cache is not None:
                cache.set("kv", kv)
                cache.set("log_scale", log_scale)
        if config.begin_kernel > 0:
            out = self._begin_with_softmax(q, k, v, out, key_mask, position_ids, cache)
        return out

    def _fused_causal_attention(self, q, k, v, scale, fused, key_mask, cache):
        """FAVOR+ and its relatives: features computed inside the chunked op (``ops.causal_exp_attention``), the
        scale folded into the projection, exp(s x P^T - a s^2 |x|^2 + b)."""
        state = None
        if cache is not None and cache.get("kv") is not None:
            state = (cache.get("kv"), cache.get("log_scale"))
        if torch.is_tensor(scale):  # scale_by_length: one scale per batch row
            q, k, scale = q * scale, k * scale, 1.0
        out, (kv, log_scale) = causal_exp_attention(
            q, k, v, fused["projection"] * scale, norm_coef=fused["norm_coef"] * scale**2,
            logit_offset=fused["logit_offset"], key_mask=key_mask, initial_state=state, chunk_size=self.chunk_size,
            implementation=self.config.attention_implementation,
        )
        if cache is not None:
            cache.set("kv", kv)
            cache.set("log_scale", log_scale)
        return out

    def _causal_windowed(self, q_features, k_features, k_log_scale, v, key_mask, position_ids, cache):
        config = self.config
        chunk = config.causal_chunk_length
        if cache is not None and chunk > 1:
            raise ValueError(
                f"use_causal_windowed with causal_chunk_length={chunk} attends both ways inside a chunk, so it cannot "
                "be decoded token by token; use causal_chunk_length=1 for generation (or use_cache=False)"
            )
        if config.causal_padding == "left":
            if cache is not None:
                raise ValueError("causal_padding='left' aligns chunks to the end of the sequence; it cannot be "
                                 "combined with a cache")
            position_ids = position_ids + (-key_mask.sum(-1, keepdim=True)) % chunk
        log_scale = k_log_scale if k_log_scale is not None else torch.zeros_like(k_features[..., 0])
        window_tokens = config.causal_window_length * chunk

        def attend(q_, k_, v_, qp, kp, km):
            return windowed_kernel_attention(
                q_, k_[..., :-1], v_, chunk_length=chunk, window_length=config.causal_window_length,
                q_positions=qp, k_positions=kp, k_log_scale=k_[..., -1] if k_log_scale is not None else None,
                key_mask=km, decay=config.causal_window_decay,
            )

        # keys and their log scale travel together through the cache window
        keys = torch.cat([k_features, log_scale.unsqueeze(-1)], dim=-1)
        return self._windowed("windowed", q_features, keys, v, key_mask, position_ids, cache, window_tokens - 1,
                              attend)

    def _begin_with_softmax(self, q, k, v, kernel_out, key_mask, position_ids, cache):
        """TF KernelAttention's ``begin_kernel``: the first n positions use exact softmax attention."""
        n = self.config.begin_kernel
        first = (position_ids < n)[:, None, :, None]  # (B, 1, N, 1)
        if self.causal:
            # Causal queries at positions < n see only keys at positions < n: a window of n tokens is exact.
            exact = self._windowed(
                "begin", q, k, v, key_mask, position_ids, cache, n - 1,
                lambda q_, k_, v_, qp, kp, km: sliding_window_attention(
                    q_, k_, v_, window=n, causal=True, q_positions=qp, k_positions=kp, key_mask=km,
                    scale=self.head_dim**-0.5,
                ),
            )
        else:
            exact = self._exact_attention(q, k, v, key_mask, None)
        return torch.where(first, exact.to(kernel_out.dtype), kernel_out)

    def _exact_attention(self, q, k, v, key_mask, cache):
        """Plain softmax attention, for A/B comparisons against the kernel that approximates it."""
        if cache is not None:
            if cache.get("keys") is not None:
                k = torch.cat([cache.get("keys"), k], dim=2)
                v = torch.cat([cache.get("values"), v], dim=2)
                key_mask = torch.cat([cache.get("key_mask"), key_mask], dim=1)
            cache.set("keys", k)
            cache.set("values", v)
            cache.set("key_mask", key_mask)
        return masked_softmax_attention(q, k, v, key_mask=key_mask, causal=self.causal)


# ----------------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------------


class PerformerMLP(nn.Module):
    """Feed-forward, optionally gated (GLU, arXiv 2002.05202) and chunked along the sequence (Reformer's
    chunked feed-forward: the (N, intermediate) activation never exists at once)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.glu = config.ff_glu
        self.chunks = config.ff_chunks
        inner = config.intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, inner * (2 if self.glu else 1), bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up_proj(x)
        if self.glu:
            hidden, gate = hidden.chunk(2, dim=-1)
            hidden = hidden * self.act(gate)
        else:
            hidden = self.act(hidden)
        return self.down_proj(self.dropout(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks <= 1 or x.shape[1] <= 1:
            return self._forward(x)
        return torch.cat([self._forward(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


class PerformerTokenShift(nn.Module):
    """Token shift (performer-pytorch ``shift_tokens``, after RWKV / arXiv 2105.14103 style time mixing): split
    the features into ``len(shifts)`` slices and move slice i by ``shifts[i]`` tokens (1 = take the previous
    token's features), padding with zeros; padded tokens contribute zeros. Causal: shifts (0, 1); bidirectional:
    (-1, 0, 1). When decoding, the last token of the previous step comes from the cache."""

    def __init__(self, config: PerformerConfig, name: str):
        super().__init__()
        self.shifts = (0, 1) if config.causal else (-1, 0, 1)
        self.slice = config.hidden_size // len(self.shifts)
        self.name = name

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        if key_mask is not None:
            x = x * key_mask.unsqueeze(-1).to(x.dtype)  # (B, N, D)
        previous = cache.get(self.name) if cache is not None else None  # (B, 1, D) or None
        if cache is not None:
            cache.set(self.name, x[:, -1:])
        pieces = list(x.split(self.slice, dim=-1))
        for i, amount in enumerate(self.shifts):
            piece = pieces[i]
            if amount > 0:
                before = previous[..., i * self.slice:(i + 1) * self.slice] if previous is not None \
                    else torch.zeros_like(piece[:, :amount])
                pieces[i] = torch.cat([before, piece[:, :-amount]], dim=1)[:, -piece.shape[1]:]
            elif amount < 0:
                pieces[i] = torch.cat([piece[:, -amount:], torch.zeros_like(piece[:, :-amount])], dim=1)
        return torch.cat(pieces, dim=-1)


class PerformerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + ff(norm(x)). With ``norm_type='rezero'`` there is no norm and
    each branch is scaled by a learned scalar that starts at 0 (arXiv 2003.04887)."""

    def __init__(self, config: PerformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = PerformerAttention(config, layer_idx)
        self.mlp = PerformerMLP(config)
        self.attn_norm = build_norm(config)
        self.mlp_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.rezero = config.norm_type == "rezero"
        if self.rezero:
            self.rezero_attn = nn.Parameter(torch.zeros(1))
            self.rezero_mlp = nn.Parameter(torch.zeros(1))
        self.shift_attn = PerformerTokenShift(config, "shift.attn") if config.shift_tokens else None
        self.shift_mlp = PerformerTokenShift(config, "shift.mlp") if config.shift_tokens else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: PerformerCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cache = past_key_values.layer(self.layer_idx) if past_key_values is not None else None
        x = self.attn_norm(hidden_states)
        if self.shift_attn is not None:  # norm, then shift, as performer-pytorch
            x = self.shift_attn(x, key_mask, cache)
        attn = self.self_attn(
            x,
            key_mask=key_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
        )
        hidden_states = hidden_states + self.dropout(attn * self.rezero_attn if self.rezero else attn)
        x = self.mlp_norm(hidden_states)
        if self.shift_mlp is not None:
            x = self.shift_mlp(x, key_mask, cache)
        ff = self.mlp(x)
        return hidden_states + self.dropout(ff * self.rezero_mlp if self.rezero else ff)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class PerformerPreTrainedModel(PreTrainedModel):
    config_class = PerformerConfig
    config: PerformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerformerDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _is_stateful = True  # generate() refuses assisted decoding, which would need to roll the state back

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # a DynamicCache would never hand the layers their recurrent state

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a PerformerCache up front (chunked prefill needs one before the first forward)."""
        other_name = "past_key_values" if CACHE_NAME == "cache" else "cache"
        if other_name in model_kwargs:  # a user's cache under the name this transformers does not use
            model_kwargs[CACHE_NAME] = resolve_cache_argument(model_kwargs.pop(other_name), model_kwargs.get(CACHE_NAME))
        if model_kwargs.get(CACHE_NAME) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: Performer "
                "models keep a constant-size recurrent PerformerCache (leave cache_implementation unset)"
            )
        model_kwargs[CACHE_NAME] = PerformerCache(self.config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerformerAttention):
            if isinstance(module.feature_map, RandomProjectionFeatureMap):
                seed = feature_seed(self.config.feature_seed, module.layer_idx, 0)
                init.copy_(
                    module.feature_map.projection,
                    module.feature_map.draw_projection(torch.Generator().manual_seed(seed)),
                )
        elif isinstance(module, PerformerRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, PerformerScaleNorm):
            init.constant_(module.g, module.hidden_size**0.5)
        elif isinstance(module, PerformerAxialPositionEmbedding):
            for weight in module.weights:
                init.normal_(weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, PerformerDecoderLayer) and module.rezero:
            init.zeros_(module.rezero_attn)
            init.zeros_(module.rezero_mlp)
        elif isinstance(module, PerformerModel):
            init.zeros_(module.feature_redraws)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock save, plus a model card (README.md with the ``custom_code`` tag and the architecture) when the
        folder has none, so a saved folder can be pushed to the Hub as it is."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        readme = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and not os.path.exists(readme):
            try:
                from .model_card import save_model_card

                save_model_card(save_directory, self)
            except Exception as error:  # a card must never cost the user their checkpoint
                logger.warning(f"could not write a model card to {readme}: {error}")
        return result

    # -- random features -----------------------------------------------------------------------------------------
    def _attention_layers(self) -> list[PerformerAttention]:
        return [module for module in self.modules() if isinstance(module, PerformerAttention)]

    @property
    def feature_redraw_count(self) -> int:
        """How many times the random features were redrawn (saved with the checkpoint)."""
        return int(self.base_model.feature_redraws.item())

    @torch.no_grad()
    def redraw_features(self, seed: int | None = None) -> bool:
        """Draw new random projections in every attention layer.

        Without ``seed`` the draw is a function of ``config.feature_seed``, the layer and the redraw counter, so it
        is reproducible and identical on every rank. Returns False (and changes nothing) after ``fix_features()``.
        """
        if self.config.feature_redraw_interval == 0:
            logger.info("features are fixed (feature_redraw_interval=0); not redrawing")
            return False
        counter = self.base_model.feature_redraws
        counter += 1
        base = self.config.feature_seed if seed is None else seed
        for layer in self._attention_layers():
            layer.redraw_features(feature_seed(base, layer.layer_idx, int(counter.item())))
        return True

    def fix_features(self) -> None:
        """Freeze the current random features: later ``redraw_features()`` calls and the Trainer callback do
        nothing. Stored in the config (``feature_redraw_interval=0``), so it survives save/load."""
        self.config.feature_redraw_interval = 0


class PerformerModel(PerformerPreTrainedModel):
    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        needs_rotary = config.position_embedding_type == "rotary" or (config.local_rotary and config.local_attn_heads)
        self.rotary_emb = PerformerRotaryEmbedding(config) if needs_rotary else None
        self.embed_positions = None
        if config.position_embedding_type == "absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_embedding_type == "axial":
            self.embed_positions = PerformerAxialPositionEmbedding(config)
        self.layers = nn.ModuleList(
            [PerformerDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        # final norm: LayerNorm after layernorm / scalenorm / rezero blocks (as performer-pytorch), RMSNorm after rmsnorm
        self.norm = build_norm(config) if config.norm_type == "rmsnorm" else nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps
        )
        self.register_buffer("feature_redraws", torch.zeros((), dtype=torch.long), persistent=True)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _key_mask(self, attention_mask, batch: int, length: int, past: int) -> torch.Tensor | None:
        """The (B, N) boolean mask of the current tokens from a (B, past + N) or (B, N) 0/1 attention mask."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be a 2D (batch, sequence) tensor of 0/1 (1 = real token); got "
                f"{type(attention_mask).__name__} with shape {getattr(attention_mask, 'shape', None)}"
            )
        if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (length, past + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {past + length}) "
                f"(past tokens + new tokens) or ({batch}, {length})"
            )
        key_mask = attention_mask[:, -length:].bool()
        return None if bool(key_mask.all()) else key_mask

    @staticmethod
    def _position_ids(attention_mask, batch, length, cache, device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded sequence gets the positions it would have alone;
        with a cache they continue from where the previous forward stopped."""
        start = cache.position_offset if cache is not None else None  # (B,) or None
        if attention_mask is None:
            steps = torch.arange(length, device=device).unsqueeze(0)  # (1, N)
            return steps.expand(batch, length) if start is None else start.unsqueeze(1) + steps
        counted = attention_mask[:, -length:].long().cumsum(-1)  # (B, N)
        if start is not None:
            counted = counted + start.unsqueeze(1)
        return (counted - 1).clamp_min(0)

    @staticmethod
    def _next_position(attention_mask, position_ids, length, cache) -> torch.Tensor:
        """(B,) position of each sequence's next token: real tokens seen so far (padding does not count)."""
        if attention_mask is not None:
            start = cache.position_offset if cache.position_offset is not None else 0
            return start + attention_mask[:, -length:].long().sum(-1)
        return position_ids[:, -1] + 1

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PerformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: PerformerCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``cache`` (transformers >= 5.24) and ``past_key_values`` (earlier) name the same PerformerCache."""
        cache_name = "cache" if cache is not None else "past_key_values"  # as the caller spelled it, for errors
        past_key_values = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: kernel attention never forms attention weights")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if not self.config.causal:
            if past_key_values is not None:
                raise ValueError(f"{cache_name} needs causal=True: a bidirectional encoder has no recurrent state")
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, PerformerCache):
            raise TypeError(
                f"{cache_name} must be a PerformerCache (or None), got {type(past_key_values).__name__}"
            )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The backward pass replays every layer: a state read and written in the forward would be applied twice.
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError(
                    f"activation checkpointing replays each layer in the backward pass, which would apply the state "
                    f"in {cache_name} a second time: continue from a cache with checkpointing off "
                    "(model.activation_checkpointing_disable()) or without gradients"
                )
            if past_key_values is not None:
                logger.warning_once(f"activation checkpointing keeps no recurrent state: the empty {cache_name} "
                                    "passed in is not filled")
            past_key_values, use_cache = None, False
        if use_cache and past_key_values is None:
            past_key_values = PerformerCache(self.config)
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.get_seq_length() if cache is not None else 0

        key_mask = self._key_mask(attention_mask, batch, length, past)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, batch, length, cache, inputs_embeds.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        position_ids = position_ids[:, -length:]

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            limit = self.config.max_position_embeddings
            if int(position_ids.max()) >= limit:
                raise ValueError(
                    f"position {int(position_ids.max())} is beyond max_position_embeddings={limit} of the "
                    f"{self.config.position_embedding_type} position embedding; use shorter inputs or a larger "
                    "max_position_embeddings (or position_embedding_type='rotary', which has no limit)"
                )
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        if self.config.sinusoidal_position_embedding:
            hidden_states = hidden_states + sinusoidal_table(position_ids, self.config.hidden_size).to(hidden_states.dtype)
        hidden_states = self.embed_dropout(hidden_states)
        rotary = self.rotary_emb(position_ids) if self.rotary_emb is not None else None

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                key_mask=key_mask,
                position_ids=position_ids,
                position_embeddings=rotary,
                past_key_values=cache,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if cache is not None:
            cache.seen_tokens += length
            cache.position_offset = self._next_position(attention_mask, position_ids, length, cache)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_NAME: cache if use_cache else None},
        )


class PerformerForCausalLM(PerformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        if not config.causal:
            raise ValueError("PerformerForCausalLM needs causal=True in its config")
        self.model = PerformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PerformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: PerformerCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = resolve_cache_argument(cache, past_key_values)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_NAME: outputs[CACHE_NAME] if CACHE_NAME in outputs else None},
        )


class PerformerForSequenceClassification(PerformerPreTrainedModel):
    """Sequence classification. Pooling respects padding: a bidirectional encoder averages its real tokens, a
    causal model takes its last real token (the only one that has seen the whole sequence)."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PerformerModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _real_tokens(self, input_ids, attention_mask, batch, length, device) -> torch.Tensor:
        if attention_mask is not None:
            return attention_mask.bool()
        if input_ids is not None and self.config.pad_token_id is not None:
            return input_ids != self.config.pad_token_id
        return torch.ones(batch, length, dtype=torch.bool, device=device)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, N, D)
        batch, length = hidden_states.shape[:2]
        real = self._real_tokens(input_ids, attention_mask, batch, length, hidden_states.device)  # (B, N)
        if self.config.causal:
            positions = torch.arange(length, device=real.device).expand(batch, length)
            last = (positions * real).argmax(-1)  # rightmost real token, left or right padding
            pooled = hidden_states[torch.arange(batch, device=real.device), last]
        else:
            weights = real.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "PerformerPreTrainedModel",
    "PerformerModel",
    "PerformerForCausalLM",
    "PerformerForSequenceClassification",
]
