"""Performer model configuration."""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .feature_maps import EXACT, FEATURE_MAPS, RandomProjectionFeatureMap, available_feature_maps, default_num_features

POSITION_EMBEDDING_TYPES = ("rotary", "absolute", "axial", "none")
NORM_TYPES = ("layernorm", "rmsnorm", "scalenorm", "rezero")
ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", "quadratic", "triton")


def _allowed(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


@strict
class PerformerConfig(PreTrainedConfig):
    r"""Configuration of a Performer (kernel attention) transformer.

    Sizes and block:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size (default
        ``ff_mult * hidden_size``), hidden_act, ff_glu (gated feed-forward, arXiv 2002.05202), ff_chunks (split the
        feed-forward over the sequence to cut activation memory), norm_type (``layernorm``, ``rmsnorm``,
        ``scalenorm`` arXiv 1910.05895, ``rezero`` arXiv 2003.04887), layer_norm_eps, attention_bias, mlp_bias,
        dropouts, initializer_range, tie_word_embeddings.

    Attention:
        causal: decoder (True) or bidirectional encoder (False).
        feature_map: a name from ``hf_performer.available_feature_maps()`` (``favor+`` by default; ``exact`` is
            plain softmax attention through ``scaled_dot_product_attention``, for A/B comparisons).
        nb_features: number of random features m; default ``int(d_head * ln d_head)`` as in the reference Performer.
        orthogonal_features / feature_norm_scaling: orthogonal (block-QR) or iid projections, rows scaled by
            chi-distributed norms (``chi``) or sqrt(d) (``sqrt_d``).
        feature_map_kwargs: extra keyword arguments of the feature map class (JSON-serialisable).
        feature_redraw_interval: optimizer steps between redraws of the random features (used by
            ``PerformerFeatureRedrawCallback``); 0 or None: never redraw.
        feature_seed: seed of the random features (with the layer index and the redraw counter).
        attention_scale: q and k are each multiplied by this before the feature map; default ``d_head ** -0.25``.
        attention_chunk_size: chunk length of the causal algorithm.
        attention_implementation: ``auto`` (default: the quadratic kernelised matrix for short inputs, the chunked
            algorithm otherwise, through fused Triton kernels on CUDA when Triton is installed), ``chunked``
            (always the PyTorch chunked path), ``quadratic`` or ``triton`` (see ``ops.causal_linear_attention``).

    Local heads and TF KernelAttention options:
        local_attn_heads: exact softmax heads over a sliding window (an int, or one per layer); they are the last
            heads of each layer, the rest are kernel heads. local_window_size: the window in tokens (causal: the
            token and the window - 1 before it; bidirectional: |i - j| < window). local_window_type='blocked'
            uses the local-attention package's windows instead (the token's block of ``local_window_size`` tokens
            and the previous block; bidirectional: also the next). local_rotary: rotary positions on the local
            heads even when ``position_embedding_type`` is not rotary (performer-pytorch's local heads do this).
        shift_tokens: token shift before attention and feed-forward (performer-pytorch ``shift_tokens``).
        begin_kernel: the first n positions use exact softmax attention (TF ``begin_kernel``).
        scale_by_length: multiply the softmax temperature by log(n) / log(512), n the number of real tokens
            (TF ``scale_by_length``; bidirectional only).
        use_causal_windowed, causal_chunk_length, causal_window_length, causal_window_decay, causal_padding: TF's
            windowed causal kernel attention: chunks of ``causal_chunk_length`` tokens attend to the last
            ``causal_window_length`` chunks, weighted by ``decay ** distance``; with chunk length 1 it streams
            token by token through the cache. ``causal_padding='left'`` aligns chunks to the end of the sequence.

    Positions:
        position_embedding_type: ``rotary`` (default, as the Performer reference), ``absolute`` (learned),
            ``axial`` (Reformer's factorised embedding, ``axial_pos_shape`` with product ``max_position_embeddings``
            and ``axial_pos_embds_dim`` summing to ``hidden_size``) or ``none``. sinusoidal_position_embedding adds
            a fixed [sin | cos] table to the token embeddings on top of that (performer-pytorch's rotary models).

    Head: lm_head_bias gives the untied output layer a bias (performer-pytorch's ``to_out``).
    """

    model_type = "performer"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    ff_mult: int = 4
    ff_glu: bool = False
    ff_chunks: int = 1
    hidden_act: str = "gelu"
    norm_type: str = "layernorm"
    layer_norm_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    initializer_range: float = 0.02

    causal: bool = True
    feature_map: str = "favor+"
    nb_features: int | None = None
    orthogonal_features: bool = True
    feature_norm_scaling: str = "chi"
    feature_map_kwargs: dict | None = None
    feature_redraw_interval: int | None = 1000
    feature_seed: int = 0
    attention_scale: float | None = None
    attention_chunk_size: int = 64
    attention_implementation: str = "auto"

    local_attn_heads: int | list[int] = 0
    local_window_size: int = 256
    local_window_type: str = "sliding"
    local_rotary: bool = False
    shift_tokens: bool = False
    begin_kernel: int = 0
    scale_by_length: bool = False
    use_causal_windowed: bool = False
    causal_chunk_length: int = 1
    causal_window_length: int = 3
    causal_window_decay: float | None = None
    causal_padding: str | None = None

    position_embedding_type: str = "rotary"
    sinusoidal_position_embedding: bool = False
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    axial_pos_shape: list[int] | tuple[int, ...] | None = None
    axial_pos_embds_dim: list[int] | tuple[int, ...] | None = None

    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = self.ff_mult * self.hidden_size
        if self.feature_map_kwargs is None:
            self.feature_map_kwargs = {}
        if self.axial_pos_shape is not None:
            self.axial_pos_shape = list(self.axial_pos_shape)
        if self.axial_pos_embds_dim is not None:
            self.axial_pos_embds_dim = list(self.axial_pos_embds_dim)
        super().__post_init__(**kwargs)
        self._check_fields()

    # -- derived values ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_random_features(self) -> int:
        return default_num_features(self.head_dim) if self.nb_features is None else self.nb_features

    @property
    def scale(self) -> float:
        return self.head_dim**-0.25 if self.attention_scale is None else self.attention_scale

    # -- validation (run at construction, plain ValueError / TypeError naming the field) ---------------------------
    def _check_fields(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "ff_mult", "ff_chunks", "attention_chunk_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.nb_features is not None and (not isinstance(self.nb_features, int) or isinstance(self.nb_features, bool)):
            raise TypeError(f"nb_features must be an int or None, got {type(self.nb_features).__name__}")
        if not isinstance(self.feature_map, str):
            raise TypeError(f"feature_map must be a str, got {type(self.feature_map).__name__}")
        if not isinstance(self.feature_map_kwargs, dict):
            raise TypeError(f"feature_map_kwargs must be a dict, got {type(self.feature_map_kwargs).__name__}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("hidden_dropout", "attention_dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.feature_map != EXACT and self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {available_feature_maps()}, got {self.feature_map!r}")
        if self.nb_features is not None and self.nb_features <= 0:
            raise ValueError(f"nb_features must be a positive integer (or None for the default), got {self.nb_features}")
        _allowed("feature_norm_scaling", self.feature_norm_scaling, ("chi", "sqrt_d"))
        if self.feature_redraw_interval is not None and self.feature_redraw_interval < 0:
            raise ValueError(f"feature_redraw_interval must be >= 0 or None, got {self.feature_redraw_interval}")
        if self.attention_scale is not None and not (self.attention_scale > 0 and math.isfinite(self.attention_scale)):
            raise ValueError(f"attention_scale must be a positive number or None, got {self.attention_scale}")
        _allowed("attention_implementation", self.attention_implementation, ATTENTION_IMPLEMENTATIONS)
        _allowed("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _allowed("norm_type", self.norm_type, NORM_TYPES)
        if self.position_embedding_type == "rotary" and self.head_dim % 2:
            raise ValueError(f"position_embedding_type='rotary' needs an even head dim, got {self.head_dim}")
        if self.position_embedding_type == "axial":
            self._validate_axial()
        self._check_architecture_options()
        if self.feature_map != EXACT:
            map_class = FEATURE_MAPS[self.feature_map]
            if self.causal and not map_class.supports_causal:
                raise ValueError(
                    f"feature_map={self.feature_map!r} uses statistics of the whole sequence and cannot be causal; "
                    "use it with causal=False or pick a causal map such as 'favor+'"
                )
            try:
                with torch.random.fork_rng(devices=[]):  # a trial construction must not move the global RNG
                    map_class(self.head_dim, **self.feature_map_options())
            except (TypeError, ValueError) as error:
                raise ValueError(f"feature_map_kwargs {self.feature_map_kwargs!r} are invalid for "
                                 f"feature_map={self.feature_map!r}: {error}") from error

    def _check_architecture_options(self):
        heads = self.local_attn_heads
        if isinstance(heads, (list, tuple)):
            if len(heads) != self.num_hidden_layers:
                raise ValueError(
                    f"local_attn_heads has {len(heads)} entries; give one per layer ({self.num_hidden_layers}) or an int"
                )
            self.local_attn_heads = list(heads)
        for count in (self.local_attn_heads if isinstance(self.local_attn_heads, list) else [self.local_attn_heads]):
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= self.num_attention_heads:
                raise ValueError(
                    f"local_attn_heads must be ints in [0, num_attention_heads={self.num_attention_heads}], got {heads!r}"
                )
        for name in ("local_window_size", "causal_chunk_length", "causal_window_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.begin_kernel, int) or self.begin_kernel < 0:
            raise ValueError(f"begin_kernel must be an int >= 0, got {self.begin_kernel!r}")
        if self.scale_by_length and self.causal:
            raise ValueError("scale_by_length scales by the number of keys of the whole sequence; it needs causal=False")
        if self.causal_window_decay is not None and not 0.0 < self.causal_window_decay <= 1.0:
            raise ValueError(f"causal_window_decay must be in (0, 1] or None, got {self.causal_window_decay!r}")
        _allowed("causal_padding", self.causal_padding, (None, "left", "right"))
        _allowed("local_window_type", self.local_window_type, ("sliding", "blocked"))
        if (self.local_rotary or self.sinusoidal_position_embedding) and self.head_dim % 2:
            raise ValueError(f"local_rotary / sinusoidal_position_embedding need an even head dim, got {self.head_dim}")
        if self.use_causal_windowed:
            if not self.causal:
                raise ValueError("use_causal_windowed needs causal=True")
            if self.feature_map == EXACT:
                raise ValueError("use_causal_windowed is a kernel-attention option; it cannot use feature_map='exact'")
        if self.feature_map == EXACT and (self.begin_kernel or self.scale_by_length):
            raise ValueError("begin_kernel and scale_by_length are kernel-attention options; feature_map='exact' "
                             "is softmax everywhere already")

    def local_heads(self, layer_idx: int) -> int:
        """Number of exact local-window heads in layer ``layer_idx`` (the last heads of the layer)."""
        heads = self.local_attn_heads
        return heads[layer_idx] if isinstance(heads, list) else heads

    def _validate_axial(self):
        shape, dims = self.axial_pos_shape, self.axial_pos_embds_dim
        if not shape or not dims or len(shape) != len(dims):
            raise ValueError(
                "position_embedding_type='axial' needs axial_pos_shape and axial_pos_embds_dim of the same length, "
                f"got {shape!r} and {dims!r}"
            )
        if math.prod(shape) != self.max_position_embeddings:
            raise ValueError(
                f"the product of axial_pos_shape {shape} ({math.prod(shape)}) must equal max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if sum(dims) != self.hidden_size:
            raise ValueError(f"axial_pos_embds_dim {dims} must sum to hidden_size ({self.hidden_size})")

    def feature_map_options(self) -> dict:
        """Keyword arguments for the feature map class named by ``feature_map``."""
        options = dict(self.feature_map_kwargs)
        map_class = FEATURE_MAPS[self.feature_map]
        if issubclass(map_class, RandomProjectionFeatureMap):
            options.setdefault("num_features", self.num_random_features)
            options.setdefault("orthogonal", self.orthogonal_features)
            options.setdefault("norm_scaling", self.feature_norm_scaling)
        return options


__all__ = ["PerformerConfig"]
