"""Performer models for Hugging Face Transformers: kernel (linear) attention, arXiv 2009.14794.

Layout follows transformers' Llama: PerformerPreTrainedModel -> PerformerModel -> PerformerForCausalLM /
PerformerForSequenceClassification, and BERT's encoder heads (PerformerForMaskedLM, PerformerForTokenClassification,
PerformerForQuestionAnswering, PerformerForMultipleChoice). The attention kinds live in ``attention.py`` (over ``ops.py``, ``local_ops.py``
and ``feature_maps.py``); this file wires them into transformers.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .attention import (
    ATTENTION_KINDS,
    LOLCATS_WINDOW_FACTOR_INIT,
    BeginKernelOptions,
    HybridOptions,
    KernelOptions,
    LocalOptions,
    PackedDocuments,
    SoftmaxOptions,
    WindowedKernelOptions,
    WindowState,
    attend,
)
from .cache_performer import CACHE_NAME, PerformerCache, PerformerCacheLayer, resolve_cache_argument
from .configuration_performer import PerformerConfig
from .feature_maps import EXACT, FeatureMap, RandomProjectionFeatureMap, build_feature_map, feature_seed

logger = logging.get_logger(__name__)


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
    """Rotary position embedding (RoFormer, arXiv 2104.09864), applied to q and k before the feature map, with
    transformers' RoPE scaling types (``config.rope_parameters``: linear, dynamic, yarn, longrope, llama3).

    The frequencies stay float32 whatever dtype the model is cast to: ``model.to(torch.bfloat16)`` would otherwise
    round them, and at 16k tokens the rounded angles are off by radians."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = inv_freq  # float32, on the CPU; what .to() and _init_weights restore
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings

    @staticmethod
    def compute_default_rope_parameters(config: PerformerConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """The RoFormer frequencies theta ** (-2i / d) and no attention scaling."""
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)), 1.0

    def compute_frequencies(self) -> tuple[torch.Tensor, float]:
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, scaling = init_fn(self.config, "cpu")  # real values even while the model is built on meta
        return inv_freq.float(), scaling

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.inv_freq = self.original_inv_freq.to(self.inv_freq.device)  # undo any dtype cast of the frequencies
        self.max_seq_len_cached = self.original_max_seq_len
        return result

    @torch.no_grad()
    @dynamic_rope_update  # rope_type="dynamic": NTK scaling of the frequencies past the trained length
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq.to(x.device, torch.float32)  # (B, N, d/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, N, d), float32
        if self.attention_scaling == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def sinusoidal_table(position_ids: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed [sin | cos] position table (Vaswani et al. 2017, half-split layout): (B, N) -> (B, N, dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _heads(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Heads start:stop of x (B, H, N, d); x itself when that is all of them (a decode step counts its ops)."""
    return x if start == 0 and stop == x.shape[1] else x[:, start:stop]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first_head: int = 0) -> torch.Tensor:
    """Rotate heads ``first_head:`` of x (B, H, N, d) by the angles' cos, sin (B, N, r); earlier heads pass through
    unchanged. With fewer angles than channels (``partial_rotary_factor`` < 1) only the first r channels rotate, as
    in GPT-NeoX."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, r): the same angles for every head
    if first_head:
        return torch.cat([x[:, :first_head], apply_rotary(x[:, first_head:], cos, sin)], dim=1)
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
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


class FusedProjection:
    """q, k and v projections as row blocks of one (out_q + 2 out_kv, in) matrix, laid out column-major like the
    other weights of ``optimize_for_decoding``: one matrix-vector product per decode step instead of three. The
    three ``nn.Linear`` weights (and biases) become views of it, so they stay the model's parameters and what
    ``state_dict``, ties and optimizers see; this object is not a module and is never saved."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear):
        projections = (q_proj, k_proj, v_proj)
        self.sizes = [p.out_features for p in projections]
        with torch.no_grad():
            self.weight = torch.cat([p.weight for p in projections]).t().contiguous().t()  # (O, in), column-major
            self.bias = None if q_proj.bias is None else torch.cat([p.bias for p in projections])  # (O,)
        for projection, weight in zip(projections, self.weight.split(self.sizes)):
            projection.weight.data = weight  # .data: the same Parameter, now a view of the fused matrix
        if self.bias is not None:
            for projection, bias in zip(projections, self.bias.split(self.sizes)):
                projection.bias.data = bias
        self.pointers = self._pointers(*projections)

    @staticmethod
    def _pointers(*projections) -> tuple:
        return tuple((p.weight.data_ptr(), None if p.bias is None else p.bias.data_ptr()) for p in projections)

    @staticmethod
    def fusable(*projections) -> bool:
        """Plain ``nn.Linear`` modules: an adapter (PEFT) wrapping one adds what the fused matrix would skip."""
        return all(type(p) is nn.Linear for p in projections)

    def views_of(self, *projections) -> bool:
        return self.fusable(*projections) and self._pointers(*projections) == self.pointers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)  # (B, N, O)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)

    @staticmethod
    def release(q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        """Give the three projections their own contiguous storage back."""
        for projection in (q_proj, k_proj, v_proj):
            projection.weight.data = projection.weight.data.contiguous()
            if projection.bias is not None:
                projection.bias.data = projection.bias.data.clone()


class PerformerAttention(nn.Module):
    """Multi-head attention: the first ``H - local_heads`` heads run the layer's global kind of attention (kernel
    attention with the configured feature map, or exact softmax, or one of TF KernelAttention's causal variants),
    the last ``local_heads`` heads exact softmax over a sliding window, as in the Performer reference. The math is in
    ``attention.py``; this module projects, applies rotary positions, splits the heads and dispatches."""

    def __init__(self, config: PerformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_local_heads = config.local_heads(layer_idx)
        self.num_global_heads = config.num_attention_heads - self.num_local_heads
        # rotary on every head with rotary positions; with local_rotary only on the local heads
        self.first_rotary_head = 0 if config.position_embedding_type == "rotary" else self.num_global_heads
        # grouped-query attention (arXiv 2305.13245): each key/value head serves ``kv_groups`` query heads
        self.kv_groups = config.num_attention_heads // config.num_key_value_heads
        hidden, kv_hidden, bias = config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_hidden, bias=bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=bias)
        self.fused_qkv: FusedProjection | None = None  # set by optimize_for_decoding
        self.dropout = nn.Dropout(config.attention_dropout)
        self.kind = global_attention_kind(config)
        self.feature_map: FeatureMap | None = None
        if self.kind != "softmax" and self.num_global_heads > 0:
            # drawn from the layer's seed (never from the global RNG); on the meta device only allocated, and then
            # loaded from the checkpoint or drawn by _init_weights
            self.feature_map = build_feature_map(
                config.feature_map, self.head_dim, num_features=config.num_random_features,
                orthogonal=config.orthogonal_features, norm_scaling=config.feature_norm_scaling,
                options=config.feature_map_kwargs, seed=feature_seed(config.feature_seed, layer_idx, 0),
                num_heads=self.num_global_heads,  # per-head maps (hedgehog) see the kernel heads only
            )
        self.options = global_attention_options(config, self.feature_map)
        # hybrid: the per-head window / kernel mixing logits g = sigmoid(window_factor), set by _init_weights
        self.window_factor = nn.Parameter(torch.empty(self.num_global_heads)) \
            if self.kind == "hybrid" and self.num_global_heads > 0 else None
        self.local_options = LocalOptions(causal=config.causal, window=config.local_window_size,
                                          blocked=config.local_window_type == "blocked")

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_layer: PerformerCacheLayer | None = None,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        fused = self._fused_projection()
        if fused is not None and self.kv_groups == 1 and self.first_rotary_head == 0:
            # one matmul and one rotation for q and k together: a decode step is mostly per-op overhead
            heads = self.num_global_heads + self.num_local_heads
            qkv = fused(hidden_states).view(shape).transpose(1, 2)  # (B, 3H, N, d)
            qk, v = qkv[:, : 2 * heads], qkv[:, 2 * heads:]  # (B, 2H, N, d), (B, H, N, d)
            if position_embeddings is not None:
                qk = apply_rotary(qk, *position_embeddings)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            if fused is not None:
                q, k, v = (x.view(shape).transpose(1, 2) for x in fused.split(hidden_states))
            else:
                q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, N, d)
                k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H_kv, N, d)
                v = self.v_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H_kv, N, d)
            if self.kv_groups > 1:  # query head h uses key/value head h // kv_groups
                k = k.repeat_interleave(self.kv_groups, dim=1)  # (B, H, N, d)
                v = v.repeat_interleave(self.kv_groups, dim=1)
            if position_embeddings is not None:
                q = apply_rotary(q, *position_embeddings, self.first_rotary_head)
                k = apply_rotary(k, *position_embeddings, self.first_rotary_head)
        if position_ids is None:
            position_ids = torch.arange(length, device=q.device).expand(batch, length)
        g = self.num_global_heads
        outputs = []
        if g > 0:
            state = None if cache_layer is None else cache_layer.attention or ATTENTION_KINDS[self.kind].state()
            options = self.options
            if self.window_factor is not None:  # the parameter itself (loading may replace it), so it gets grads
                options = dataclasses.replace(options, window_factor=self.window_factor)
            out, state = attend(self.kind, _heads(q, 0, g), _heads(k, 0, g), _heads(v, 0, g), key_mask, position_ids,
                                state, options, documents)
            outputs.append(out)  # (B, g, N, d)
            if cache_layer is not None:
                cache_layer.attention = state
        if self.num_local_heads > 0:
            state = None if cache_layer is None else cache_layer.local or WindowState()
            heads = q.shape[1]
            out, state = attend("local", _heads(q, g, heads), _heads(k, g, heads), _heads(v, g, heads), key_mask,
                                position_ids, state, self.local_options, documents)
            outputs.append(out)  # (B, H - g, N, d)
            if cache_layer is not None:
                cache_layer.local = state
        out = outputs[0] if len(outputs) == 1 else torch.cat([o.to(v.dtype) for o in outputs], dim=1)
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, N, H*d)
        return self.o_proj(self.dropout(out))

    def redraw_features(self, seed: int) -> None:
        if self.feature_map is not None and self.feature_map.is_random:
            self.feature_map.new_feature_map(torch.Generator().manual_seed(seed))

    @property
    def feature_index(self) -> int:
        """Which stream of ``feature_seed`` this module's features come from."""
        return self.layer_idx

    def _fused_projection(self) -> FusedProjection | None:
        """The fused q/k/v projection of ``optimize_for_decoding``, where it may stand in for the three: without
        autograd (gradients belong to the three weights), and only while they are still its views (a moved or
        cast model, or an adapter wrapping a projection, falls back to the three, and the stale fusion is
        dropped)."""
        fused = self.fused_qkv
        if fused is None or torch.is_grad_enabled() or torch.compiler.is_compiling():  # compilers fuse themselves
            return None
        if not fused.views_of(self.q_proj, self.k_proj, self.v_proj):
            self.fused_qkv = None
            return None
        return fused


class PerformerCrossAttention(nn.Module):
    """A decoder layer's attention over the encoder's states (``EncoderDecoderModel``): bidirectional kernel
    attention with the layer's feature map (exact softmax with ``feature_map="exact"``), the encoder's padding
    removed. While decoding, the encoder side's kernel sums are computed once and kept in the cache."""

    def __init__(self, config: PerformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_hidden_layers = config.num_hidden_layers
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.o_proj = nn.Linear(hidden, hidden, bias=bias)
        self.dropout = nn.Dropout(config.attention_dropout)
        self.feature_map: FeatureMap | None = None
        if config.feature_map == EXACT:
            self.kind, self.options = "cross_softmax", SoftmaxOptions(causal=False)
        else:
            self.feature_map = build_feature_map(
                config.feature_map, self.head_dim, num_features=config.num_random_features,
                orthogonal=config.orthogonal_features, norm_scaling=config.feature_norm_scaling,
                options=config.feature_map_kwargs, seed=feature_seed(config.feature_seed, self.feature_index, 0),
                num_heads=config.num_attention_heads,
            )
            self.kind = "cross_kernel"
            self.options = KernelOptions(self.feature_map, causal=False, qk_scale=config.qk_scale,
                                         queries_are_keys=False)

    @property
    def feature_index(self) -> int:
        # self-attention uses streams 0 .. L-1; cross-attention the next L, so no two modules share a projection
        return self.num_hidden_layers + self.layer_idx

    def forward(self, hidden_states, encoder_hidden_states, encoder_mask=None, cache_layer=None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        state = None if cache_layer is None else cache_layer.cross or ATTENTION_KINDS[self.kind].state()
        k = v = None
        if state is None or not state.filled:  # the encoder side: once per encoded sequence
            shape = (batch, encoder_hidden_states.shape[1], -1, self.head_dim)
            k = self.k_proj(encoder_hidden_states).view(shape).transpose(1, 2)  # (B, H, S, d)
            v = self.v_proj(encoder_hidden_states).view(shape).transpose(1, 2)  # (B, H, S, d)
        out, state = attend(self.kind, q, k, v, encoder_mask, None, state, self.options)
        if cache_layer is not None:
            cache_layer.cross = state
        return self.o_proj(self.dropout(out.transpose(1, 2).reshape(batch, length, -1)))

    def redraw_features(self, seed: int) -> None:
        if self.feature_map is not None and self.feature_map.is_random:
            self.feature_map.new_feature_map(torch.Generator().manual_seed(seed))


def global_attention_kind(config: PerformerConfig) -> str:
    """The ``attention.ATTENTION_KINDS`` entry the global heads of every layer run."""
    if config.feature_map == EXACT:
        return "softmax"
    if config.hybrid_window_size > 0:
        return "hybrid"
    if config.begin_kernel > 0:
        return "begin_kernel"
    return "windowed_kernel" if config.use_causal_windowed else "kernel"


def global_attention_options(config: PerformerConfig, feature_map: FeatureMap | None):
    """The options of ``global_attention_kind(config)``."""
    if config.feature_map == EXACT:
        return SoftmaxOptions(causal=config.causal)
    options = KernelOptions(feature_map, causal=config.causal, qk_scale=config.qk_scale,
                            chunk_size=config.attention_chunk_size, implementation=config.attention_implementation,
                            scale_by_length=config.scale_by_length)
    if config.use_causal_windowed:
        options = WindowedKernelOptions(options, chunk_length=config.causal_chunk_length,
                                        window_length=config.causal_window_length, decay=config.causal_window_decay,
                                        align_end=config.causal_padding == "left")
    if config.begin_kernel > 0:
        options = BeginKernelOptions(options, first=config.begin_kernel)
    if config.hybrid_window_size > 0:  # window_factor: the module's parameter, passed at each call
        options = HybridOptions(options, window=config.hybrid_window_size)
    return options


def streams(config: PerformerConfig) -> bool:
    """Whether token-by-token decoding with a cache computes what the full forward computes."""
    return not config.use_causal_windowed or (config.causal_chunk_length == 1 and config.causal_padding != "left")


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
    (-1, 0, 1). When decoding, ``previous`` is the last token of the previous step."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.shifts = (0, 1) if config.causal else (-1, 0, 1)
        self.slice = config.hidden_size // len(self.shifts)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, previous: torch.Tensor | None = None,
                starts: torch.Tensor | None = None):
        """x (B, N, D) -> (shifted x (B, N, D), its last token (B, 1, D), the ``previous`` of the next call).
        ``starts`` (B, N): first tokens of packed documents, which take nothing from the document before them."""
        if key_mask is not None:
            x = x * key_mask.unsqueeze(-1).to(x.dtype)  # (B, N, D)
        pieces = list(x.split(self.slice, dim=-1))
        for i, amount in enumerate(self.shifts):
            piece = pieces[i]
            if amount > 0:
                before = previous[..., i * self.slice:(i + 1) * self.slice] if previous is not None \
                    else torch.zeros_like(piece[:, :amount])
                shifted = torch.cat([before, piece[:, :-amount]], dim=1)[:, -piece.shape[1]:]
                pieces[i] = shifted if starts is None else shifted.masked_fill(starts.unsqueeze(-1), 0.0)
            elif amount < 0:
                shifted = torch.cat([piece[:, -amount:], torch.zeros_like(piece[:, :-amount])], dim=1)
                if starts is not None:  # the last token of a document sees no next one
                    ends = torch.cat([starts[:, 1:], torch.zeros_like(starts[:, :1])], dim=1)
                    shifted = shifted.masked_fill(ends.unsqueeze(-1), 0.0)
                pieces[i] = shifted
        return torch.cat(pieces, dim=-1), x[:, -1:]


class PerformerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), [x + cross_attn(norm(x), encoder states)], then x + ff(norm(x)). With
    ``norm_type='rezero'`` there is no norm and each branch is scaled by a learned scalar that starts at 0
    (arXiv 2003.04887)."""

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
        self.shift_attn = PerformerTokenShift(config) if config.shift_tokens else None
        self.shift_mlp = PerformerTokenShift(config) if config.shift_tokens else None
        self.cross_attn = self.cross_attn_norm = None
        if config.add_cross_attention:
            self.cross_attn = PerformerCrossAttention(config, layer_idx)
            self.cross_attn_norm = build_norm(config)
            if self.rezero:
                self.rezero_cross = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_layer: PerformerCacheLayer | None = None,
        documents: PackedDocuments | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        starts = documents.starts if documents is not None else None
        x = self.attn_norm(hidden_states)
        if self.shift_attn is not None:  # norm, then shift, as performer-pytorch
            x, last = self.shift_attn(x, key_mask, cache_layer.shift_attn if cache_layer is not None else None, starts)
            if cache_layer is not None:
                cache_layer.shift_attn = last
        attn = self.self_attn(x, key_mask=key_mask, position_ids=position_ids,
                              position_embeddings=position_embeddings, cache_layer=cache_layer, documents=documents)
        hidden_states = hidden_states + self.dropout(attn * self.rezero_attn if self.rezero else attn)
        if self.cross_attn is not None and encoder_hidden_states is not None:
            cross = self.cross_attn(self.cross_attn_norm(hidden_states), encoder_hidden_states, encoder_mask,
                                    cache_layer)
            hidden_states = hidden_states + self.dropout(cross * self.rezero_cross if self.rezero else cross)
        x = self.mlp_norm(hidden_states)
        if self.shift_mlp is not None:
            x, last = self.shift_mlp(x, key_mask, cache_layer.shift_mlp if cache_layer is not None else None, starts)
            if cache_layer is not None:
                cache_layer.shift_mlp = last
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
    _can_record_outputs = {"hidden_states": PerformerDecoderLayer}  # capture_outputs: output_hidden_states

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
        if not streams(self.config):
            logger.warning_once("this model's windowed attention cannot be decoded token by token; generate() "
                                "recomputes the whole sequence at every step (no cache)")
            return None
        model_kwargs[CACHE_NAME] = PerformerCache(self.config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RandomProjectionFeatureMap):
            # Drawn from the layer's seed: a projection missing from a checkpoint becomes the one a fresh model has.
            if not getattr(module.projection, "_is_hf_initialized", False):
                init.copy_(module.projection, module.initial_projection())
        elif isinstance(module, FeatureMap):
            # Learned maps (hedgehog): a parameter missing from a checkpoint gets the map's own start (identity), not
            # a random normal; init.copy_ keeps the parameters a checkpoint has loaded.
            for name, value in module.initial_parameters().items():
                init.copy_(getattr(module, name), value)
        elif isinstance(module, PerformerScaleNorm):
            init.constant_(module.g, module.hidden_size**0.5)
        elif isinstance(module, PerformerAxialPositionEmbedding):
            for weight in module.weights:
                init.normal_(weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, PerformerDecoderLayer) and module.rezero:
            init.zeros_(module.rezero_attn)
            init.zeros_(module.rezero_mlp)
            if module.cross_attn is not None:
                init.zeros_(module.rezero_cross)
        elif isinstance(module, PerformerModel):
            init.zeros_(module.feature_redraws)
        elif isinstance(module, PerformerAttention) and module.window_factor is not None:
            init.constant_(module.window_factor, LOLCATS_WINDOW_FACTOR_INIT)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock save, plus a model card (README.md with the ``custom_code`` tag and the architecture) when the
        folder has none, so a saved folder can be pushed to the Hub as it is. Weights laid out by
        ``optimize_for_decoding`` are written in the usual layout (and kept in theirs)."""
        fused = _release_fused_projections(self)
        column_major = _column_major_weights(self)
        _to_row_major(column_major)
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            _to_column_major(column_major)
            _fuse_projections(fused)
        readme = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and not os.path.exists(readme):
            try:
                from .model_card import save_model_card

                save_model_card(save_directory, self)
            except Exception as error:  # a card must never cost the user their checkpoint
                logger.warning(f"could not write a model card to {readme}: {error}")
        return result

    def optimize_for_decoding(self, enabled: bool = True) -> PerformerPreTrainedModel:
        """Store every ``nn.Linear`` weight column-major (the same (out, in) tensor, laid out as (in, out) in
        memory), in place and without extra memory; ``enabled=False`` restores the usual layout.

        A one-token decode step is a chain of matrix-vector products bound by reading the weights, and on CPU
        (MKL) a product streams this layout faster: 292 -> 207 us per 2048 x 512 weight, 1 thread, weights from
        DRAM; it is GPT-2's Conv1D layout. Each self-attention's q, k and v weights also become row blocks of one
        such matrix (``FusedProjection``), which a forward without autograd multiplies once, rotating q and k
        together. Prefill (measured at 1024 tokens) and training run at the same speed, outputs agree to float
        rounding, ``save_pretrained`` writes the usual layout. For CPU inference: call it once after loading.
        (``state_dict()`` then holds non-contiguous tensors; safetensors wants contiguous ones, so save through
        ``save_pretrained``.)"""
        if enabled:
            _fuse_projections([m for m in self.modules() if isinstance(m, PerformerAttention) and m.fused_qkv is None
                               and FusedProjection.fusable(m.q_proj, m.k_proj, m.v_proj)])
            _to_column_major([w for w in _linear_weights(self) if w.is_contiguous() and min(w.shape) > 1])
        else:
            _release_fused_projections(self)
            _to_row_major(_column_major_weights(self))
        return self

    # -- random features -----------------------------------------------------------------------------------------
    def _attention_layers(self) -> list[PerformerAttention | PerformerCrossAttention]:
        return [module for module in self.modules() if isinstance(module, (PerformerAttention, PerformerCrossAttention))]

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
        self.base_model.feature_version += 1  # caches summed with the old features can no longer be continued
        base = self.config.feature_seed if seed is None else seed
        for layer in self._attention_layers():
            layer.redraw_features(feature_seed(base, layer.feature_index, int(counter.item())))
        return True

    def fix_features(self) -> None:
        """Freeze the current random features: later ``redraw_features()`` calls and the Trainer callback do
        nothing. Stored in the config (``feature_redraw_interval=0``), so it survives save/load."""
        self.config.feature_redraw_interval = 0


def _linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """Every ``nn.Linear`` weight once (a tied LM head shares the embedding's)."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2}
    return list(weights.values())


def _column_major_weights(model: nn.Module) -> list[nn.Parameter]:
    """The ``nn.Linear`` weights that ``optimize_for_decoding`` laid out column-major."""
    return [w for w in _linear_weights(model) if not w.is_contiguous() and w.t().is_contiguous()]


def _to_column_major(weights: list[nn.Parameter]) -> None:
    for weight in weights:  # .data: the same Parameter (ties, optimizer state) with new storage
        weight.data = weight.data.t().contiguous().t()


def _to_row_major(weights: list[nn.Parameter]) -> None:
    for weight in weights:
        weight.data = weight.data.contiguous()


def _fuse_projections(attentions: list[PerformerAttention]) -> None:
    for attention in attentions:
        attention.fused_qkv = FusedProjection(attention.q_proj, attention.k_proj, attention.v_proj)


def _release_fused_projections(model: nn.Module) -> list[PerformerAttention]:
    """Undo every ``FusedProjection`` (each projection contiguous again); returns the attentions that had one."""
    released = [m for m in model.modules() if isinstance(m, PerformerAttention) and m.fused_qkv is not None]
    for attention in released:
        FusedProjection.release(attention.q_proj, attention.k_proj, attention.v_proj)
        attention.fused_qkv = None
    return released


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
        self.feature_version = 0  # bumped by every redraw; a cache remembers the version it was summed with
        self.gradient_checkpointing = False
        self.post_init()

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
        # kept even when it is all ones: a data-dependent "no padding?" branch would break torch.export / compile
        return attention_mask[:, -length:].bool()

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

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PerformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: PerformerCache | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids / inputs_embeds: (B, N) token ids or (B, N, D) embeddings, exactly one of them.
        attention_mask: (B, N) or (B, past + N) 0/1, 1 = real token. Padded keys are removed from every attention's
            numerator and normaliser, and positions count real tokens only, so a left-padded row computes what it
            would alone.
        position_ids: (B, N) or (N,); default: real tokens counted, continuing from the cache.
        cache / past_key_values: a ``PerformerCache`` to continue from (``cache`` is transformers >= 5.24's name).
        use_cache: return the cache (default ``config.use_cache``; causal models whose attention streams only).
        encoder_hidden_states / encoder_attention_mask: (B, S, D) and (B, S) 0/1, what the cross-attention of a
            decoder (``add_cross_attention=True``) attends to.
        """
        cache_name = "cache" if cache is not None else "past_key_values"  # as the caller spelled it, for errors
        past_key_values = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: kernel attention never forms attention weights")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        cache = self._resolve_cache(past_key_values, use_cache, cache_name)
        past = cache.get_seq_length() if cache is not None else 0
        return_cache = use_cache if use_cache is not None else self.config.use_cache

        key_mask = self._key_mask(attention_mask, batch, length, past)
        documents = None
        if kwargs.get("cu_seq_lens_q") is not None:  # flash-attention style packing: positions restart per document
            documents = PackedDocuments.from_cu_seqlens(kwargs["cu_seq_lens_q"], batch, length)
            position_ids = documents.positions if position_ids is None else position_ids
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, batch, length, cache, inputs_embeds.device)
        else:
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)
            position_ids = position_ids[:, -length:]
            if documents is None and past == 0 and not torch.compiler.is_compiling():
                documents = PackedDocuments.from_positions(position_ids, key_mask)
        if documents is not None and cache is not None:
            if past_key_values is not None:
                raise ValueError(f"{cache_name} cannot hold packed documents (positions restarting inside a row, or "
                                 "cu_seq_lens): decode one sequence per row")
            cache = None  # the default use_cache: packed training keeps no state

        encoder_mask = self._encoder_mask(encoder_hidden_states, encoder_attention_mask)
        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            self._check_positions(position_ids)
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        if self.config.sinusoidal_position_embedding:
            hidden_states = hidden_states + sinusoidal_table(position_ids, self.config.hidden_size).to(hidden_states.dtype)
        hidden_states = self.embed_dropout(hidden_states)
        rotary = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                key_mask=key_mask,
                position_ids=position_ids,
                position_embeddings=rotary,
                cache_layer=cache.layers[layer.layer_idx] if cache is not None else None,
                documents=documents,
                encoder_hidden_states=encoder_hidden_states,
                encoder_mask=encoder_mask,
            )
        hidden_states = self.norm(hidden_states)

        if cache is not None:
            cache.seen_tokens += length
            cache.position_offset = self._next_position(attention_mask, position_ids, length, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache if return_cache else None})

    def _resolve_cache(self, cache, use_cache, cache_name) -> PerformerCache | None:
        """The cache this forward reads and fills, or None."""
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if cache is not None and not isinstance(cache, PerformerCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # an empty cache of another kind (EncoderDecoderModel.generate builds one): ours instead
            else:
                raise TypeError(f"{cache_name} must be a PerformerCache (or None), got {type(cache).__name__}")
        if not self.config.causal:
            if cache is not None:
                raise ValueError(f"{cache_name} needs causal=True: a bidirectional encoder has no recurrent state")
            return None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The backward pass replays every layer: a state read and written in the forward would be applied twice.
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    f"activation checkpointing replays each layer in the backward pass, which would apply the state "
                    f"in {cache_name} a second time: continue from a cache with checkpointing off "
                    "(model.activation_checkpointing_disable()) or without gradients"
                )
            if cache is not None:
                logger.warning_once(f"activation checkpointing keeps no recurrent state: the empty {cache_name} "
                                    "passed in is not filled")
            return None
        if cache is None:
            if not (use_cache and streams(self.config)):
                return None  # a model whose attention cannot stream (windowed over chunks) runs whole sequences
            cache = PerformerCache(self.config)
        if cache.get_seq_length() == 0:
            cache.feature_version = self.feature_version
        elif cache.feature_version != self.feature_version:
            raise ValueError(
                f"the random features were redrawn after {cache_name} was filled: its kernel sums belong to the old "
                "features, so continuing it would mix two different kernels. Start a new cache (re-run the prompt), "
                "or redraw features only between sequences"
            )
        return cache

    def _encoder_mask(self, encoder_hidden_states, encoder_attention_mask) -> torch.Tensor | None:
        if encoder_hidden_states is None:
            return None
        if not self.config.add_cross_attention:
            raise ValueError("encoder_hidden_states needs a decoder with cross-attention: build it with "
                             "PerformerConfig(add_cross_attention=True) (EncoderDecoderModel sets it)")
        if encoder_attention_mask is None:
            return None
        if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
            raise ValueError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}; expected "
                             f"{tuple(encoder_hidden_states.shape[:2])} (batch, encoder length)")
        return encoder_attention_mask.bool()

    def _check_positions(self, position_ids: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return  # a data-dependent check cannot be traced; eager runs check
        limit = self.config.max_position_embeddings
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= limit:
            raise ValueError(
                f"position_ids must be in [0, max_position_embeddings={limit}) for the "
                f"{self.config.position_embedding_type} position embedding, got values in [{low}, {high}]; use "
                "shorter inputs or a larger max_position_embeddings (or position_embedding_type='rotary', which has "
                "no limit)"
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
        logits_to_keep: int | torch.Tensor = 0,
        cache: PerformerCache | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        labels: (B, N) token ids, unshifted (the loss shifts them; -100 is ignored). Loss options in ``kwargs``
            (``num_items_in_batch``, ``shift_labels`` for context parallelism, ``ignore_index``) reach
            ``self.loss_function``.
        logits_to_keep: compute logits for the last n positions only (0: all), or for the given indices.
        Other arguments: see ``PerformerModel.forward``.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        # the output class with cross_attentions (always None: kernel attention forms no weights), which
        # EncoderDecoderModel reads from its decoder
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_NAME: outputs[CACHE_NAME] if CACHE_NAME in outputs else None},
        )


def real_token_mask(input_ids, attention_mask, pad_token_id, batch: int, length: int, device) -> torch.Tensor:
    """(B, N) bool, True at real tokens: the attention mask, else the non-pad ids, else every token."""
    if attention_mask is not None:
        return attention_mask.bool()
    if input_ids is not None and pad_token_id is not None:
        return input_ids != pad_token_id
    return torch.ones(batch, length, dtype=torch.bool, device=device)


def pool_real_tokens(hidden_states: torch.Tensor, real: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, N, D) -> (B, D), respecting padding: a bidirectional encoder averages its real tokens, a causal model
    takes its last real token (the only one that has seen the whole sequence)."""
    batch, length = hidden_states.shape[:2]
    if causal:
        positions = torch.arange(length, device=real.device).expand(batch, length)  # (B, N)
        last = (positions * real).argmax(-1)  # (B,) rightmost real token, left or right padding
        return hidden_states[torch.arange(batch, device=real.device), last]
    weights = real.to(hidden_states.dtype).unsqueeze(-1)  # (B, N, 1)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PerformerForSequenceClassification(PerformerPreTrainedModel):
    """Sequence classification. Pooling respects padding: a bidirectional encoder averages its real tokens, a
    causal model takes its last real token (the only one that has seen the whole sequence)."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PerformerModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""
        labels: (B,) class indices (cross-entropy), or floats (regression / multi-label, by ``config.problem_type``).
        Other arguments: see ``PerformerModel.forward``.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, N, D)
        batch, length = hidden_states.shape[:2]
        real = real_token_mask(input_ids, attention_mask, self.config.pad_token_id, batch, length,
                               hidden_states.device)  # (B, N)
        logits = self.score(pool_real_tokens(hidden_states, real, self.config.causal))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config, **kwargs)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Encoder heads (BERT's task heads over PerformerModel)
# ----------------------------------------------------------------------------------------------------------------


class PerformerMaskedLMHead(nn.Module):
    """BERT's prediction head: dense + activation + LayerNorm, then the decoder onto the vocabulary, whose weight is
    the input embedding matrix (tied) and whose bias is per token."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden_states))))  # (B, N, D) -> (B, N, V)


class PerformerForMaskedLM(PerformerPreTrainedModel):
    """Masked language modeling (BERT's objective): every position predicts its token from both sides, so the model
    must be a bidirectional encoder (``causal=False``)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        if config.causal:
            raise ValueError("PerformerForMaskedLM needs causal=False in its config: a masked token is predicted "
                             "from the tokens on both sides, which a causal model never sees")
        self.model = PerformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = PerformerMaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, value):
        self.lm_head.decoder = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels: (B, N) token ids at the masked positions, -100 elsewhere (``DataCollatorForLanguageModeling``
            makes them); not shifted. ``num_items_in_batch`` / ``ignore_index`` in ``kwargs`` reach
            ``self.loss_function``.
        Other arguments: see ``PerformerModel.forward``.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # (B, N, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class PerformerForTokenClassification(PerformerPreTrainedModel):
    """One label per token (NER, tagging): dropout and a linear layer over each hidden state."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PerformerModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        labels: (B, N) class indices, -100 at tokens without a label (padding, sub-word continuations).
        Other arguments: see ``PerformerModel.forward``.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (B, N, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class PerformerForQuestionAnswering(PerformerPreTrainedModel):
    """Extractive question answering: a start and an end logit per token. Padded positions get the lowest logit, so
    a span never starts or ends in the padding of a batch."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.model = PerformerModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""
        start_positions / end_positions: (B,) token index of the answer's first and last token; positions outside
            the sequence are ignored by the loss (as in BERT).
        Other arguments: see ``PerformerModel.forward``.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # (B, N, 2)
        if attention_mask is not None:
            padding = ~attention_mask.bool().unsqueeze(-1)  # (B, N, 1)
            logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min)
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))  # (B, N)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states)


class PerformerForMultipleChoice(PerformerPreTrainedModel):
    """Multiple choice (SWAG, RACE): each of the C choices, paired with its prompt, is one sequence; the pooled
    sequence (as in ``PerformerForSequenceClassification``) gets one score, and the scores of a question compete in
    a softmax."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.model = PerformerModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @staticmethod
    def _flatten_choices(name: str, value: torch.Tensor | None, dims: int) -> torch.Tensor | None:
        """(B, C, ...) -> (B * C, ...); ``dims`` is the number of dimensions the per-choice input must have."""
        if value is None:
            return None
        if value.dim() != dims:
            raise ValueError(f"{name} must have shape (batch, num_choices, sequence{', hidden' if dims == 4 else ''}) "
                             f"for multiple choice; got shape {tuple(value.shape)}")
        return value.flatten(0, 1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultipleChoiceModelOutput:
        r"""
        input_ids / attention_mask / position_ids: (B, C, N); inputs_embeds: (B, C, N, D).
        labels: (B,) index of the right choice, in [0, C).
        Other arguments: see ``PerformerModel.forward``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        input_ids = self._flatten_choices("input_ids", input_ids, 3)  # (B*C, N)
        attention_mask = self._flatten_choices("attention_mask", attention_mask, 3)  # (B*C, N)
        position_ids = self._flatten_choices("position_ids", position_ids, 3)  # (B*C, N)
        inputs_embeds = self._flatten_choices("inputs_embeds", inputs_embeds, 4)  # (B*C, N, D)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B*C, N, D)
        flat, length = hidden_states.shape[:2]
        real = real_token_mask(input_ids, attention_mask, self.config.pad_token_id, flat, length,
                               hidden_states.device)  # (B*C, N)
        pooled = pool_real_tokens(hidden_states, real, self.config.causal)  # (B*C, D)
        logits = self.score(self.dropout(pooled)).view(-1, num_choices)  # (B, C)
        loss = None
        if labels is not None:
            # transformers has no ForMultipleChoice loss_function: BERT's cross-entropy over the choices, through the
            # helper its losses share, so the Trainer's num_items_in_batch (gradient accumulation) is honoured
            loss = fixed_cross_entropy(logits.float(), labels.view(-1).to(logits.device), **kwargs)
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "PerformerPreTrainedModel",
    "PerformerModel",
    "PerformerForCausalLM",
    "PerformerForSequenceClassification",
    "PerformerForMaskedLM",
    "PerformerForTokenClassification",
    "PerformerForQuestionAnswering",
    "PerformerForMultipleChoice",
]
