"""Performer model configuration."""

import json
import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from .feature_maps import EXACT, FEATURE_MAPS, RandomProjectionFeatureMap, available_feature_maps, default_num_features

POSITION_EMBEDDING_TYPES = ("rotary", "absolute", "axial", "none")
NORM_TYPES = ("layernorm", "rmsnorm", "scalenorm", "rezero")
ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", "quadratic", "triton")
# keys of rope_parameters that hold numbers (the rest: rope_type str, truncate bool, short/long_factor lists)
_ROPE_NUMBERS = ("rope_theta", "factor", "partial_rotary_factor", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor")


def rope_types() -> list[str]:
    """The ``rope_parameters["rope_type"]`` values a PerformerConfig accepts: ``default`` and the scaled types of
    ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``."""
    return ["default", *ROPE_INIT_FUNCTIONS]


# -- errors ----------------------------------------------------------------------------------------------------------
# huggingface_hub's @strict wraps every validator error in StrictDataclassFieldValidationError /
# StrictDataclassClassValidationError, which are plain Exceptions. PerformerConfig re-raises them as these subclasses,
# which are also the ValueError / TypeError of the cause, so both `except ValueError` and `except StrictDataclassError`
# catch them.
class PerformerConfigFieldValueError(StrictDataclassFieldValidationError, ValueError):
    pass


class PerformerConfigFieldTypeError(StrictDataclassFieldValidationError, TypeError):
    pass


class PerformerConfigValueError(StrictDataclassClassValidationError, ValueError):
    pass


class PerformerConfigTypeError(StrictDataclassClassValidationError, TypeError):
    pass


def _builtin_errors(cls):
    """Make the strict field and class validation errors of ``cls`` ValueError / TypeError (as their cause)."""
    strict_setattr = cls.__setattr__

    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            cause = error.__cause__
            kind = PerformerConfigFieldTypeError if isinstance(cause, TypeError) else PerformerConfigFieldValueError
            raise kind(field=name, cause=cause) from cause

    def validate(self) -> None:
        for validator in type(self).__class_validators__:  # as @strict's validate, with these errors
            try:
                validator(self)
            except (ValueError, TypeError) as cause:
                kind = PerformerConfigTypeError if isinstance(cause, TypeError) else PerformerConfigValueError
                raise kind(validator=validator.__name__, cause=cause) from cause

    validate.__is_defined_by_strict_decorator__ = True  # a subclass may apply @strict again
    cls.__setattr__, cls.validate = __setattr__, validate
    return cls


# -- field validators (run by @strict on every assignment, after the type check of the annotation) -------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(low=None, high=None, *, low_open=False, high_open=False, finite=True):
    """A validator: None, or a number in the interval (NaN always fails; inf fails when ``finite``)."""
    interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}" \
               f"{')' if high_open or high is None else ']'}"

    def check(value):
        if value is None:
            return
        if math.isnan(value) or (finite and math.isinf(value)):
            raise ValueError(f"must be a finite number in {interval}, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"must be in {interval}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"must be in {interval}, got {value!r}")

    return check


def _int_at_least(low: int):
    def check(value):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and item < low:
                raise ValueError(f"must be {'a positive int' if low == 1 else f'an int >= {low}'}, got {value!r}")

    return check


def _one_of(choices):
    def check(value):
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, got {value!r}")

    return check


def _check_feature_map(value):
    if value != EXACT and value not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {available_feature_maps()}, got {value!r}")


def _check_json(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"must be JSON-serialisable (it is saved in config.json): {error}") from None


def _check_rope_parameters(value):
    """Types and ranges of the entries; the keys each rope_type needs are checked by transformers' validate_rope."""
    if value is None:
        return
    if "rope_type" in value or "type" in value:
        rope_type = value.get("rope_type", value.get("type"))
        if rope_type not in rope_types():
            raise ValueError(f"rope_parameters['rope_type'] must be one of {rope_types()}, got {rope_type!r}")
    for key in _ROPE_NUMBERS:
        entry = value.get(key)
        if entry is not None and not _is_number(entry):
            raise TypeError(f"rope_parameters[{key!r}] must be a number, got {type(entry).__name__} {entry!r}")
    checks = {
        "rope_theta": _number(0, low_open=True),
        "factor": _number(1),
        "partial_rotary_factor": _number(0, 1, low_open=True),
        "attention_factor": _number(0, low_open=True),
        "beta_fast": _number(),
        "beta_slow": _number(),
        "mscale": _number(),
        "mscale_all_dim": _number(),
        "low_freq_factor": _number(0, low_open=True),
        "high_freq_factor": _number(0, low_open=True),
    }
    for key, check in checks.items():
        try:
            check(value.get(key))
        except ValueError as error:
            raise ValueError(f"rope_parameters[{key!r}] {error}") from None
    original = value.get("original_max_position_embeddings")
    if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original < 1):
        raise ValueError(f"rope_parameters['original_max_position_embeddings'] must be a positive int, got {original!r}")
    if value.get("truncate") is not None and not isinstance(value["truncate"], bool):
        raise TypeError(f"rope_parameters['truncate'] must be a bool, got {value['truncate']!r}")
    for key in ("short_factor", "long_factor"):
        factors = value.get(key)
        if factors is not None and not (
            isinstance(factors, list) and all(_is_number(x) and math.isfinite(x) and x > 0 for x in factors)
        ):
            raise ValueError(f"rope_parameters[{key!r}] must be a list of positive finite numbers, got {factors!r}")


def _field(default, *validators):
    return validated_field(list(validators), default=default)


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
_DROPOUT = _number(0, 1, high_open=True)


@_builtin_errors
@strict
class PerformerConfig(PreTrainedConfig):
    r"""Configuration of a Performer (kernel attention) transformer.

    Sizes and block:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (grouped-query
        attention, arXiv 2305.13245: key/value heads shared by ``num_attention_heads / num_key_value_heads`` query
        heads each; default ``num_attention_heads``, plain multi-head attention), intermediate_size (default
        ``ff_mult * hidden_size``), hidden_act (a key of ``transformers.activations.ACT2FN``), ff_glu (gated
        feed-forward, arXiv 2002.05202), ff_chunks (split the feed-forward over the sequence to cut activation
        memory), norm_type (``layernorm``, ``rmsnorm``, ``scalenorm`` arXiv 1910.05895, ``rezero`` arXiv 2003.04887),
        layer_norm_eps, attention_bias, mlp_bias, dropouts, initializer_range, tie_word_embeddings.

    Attention:
        causal: decoder (True) or bidirectional encoder (False).
        feature_map: a name from ``hf_performer.available_feature_maps()`` (``favor+`` by default; ``exact`` is
            plain softmax attention through ``scaled_dot_product_attention``, for A/B comparisons).
        nb_features: number of random features m; default ``int(d_head * ln d_head)`` as in the reference Performer.
        orthogonal_features / feature_norm_scaling: orthogonal (block-QR) or iid projections, rows scaled by
            chi-distributed norms (``chi``) or sqrt(d) (``sqrt_d``).
        feature_map_kwargs: extra keyword arguments of the feature map class (JSON-serialisable). They are checked
            at construction by building the map on the meta device, which draws nothing. Maps without a random
            projection size themselves here (``hedgehog``: ``{"num_features": 2 f}``; ``taylor`` has a fixed size);
            per-head maps get each layer's head count from the layer, not from here.
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
        hybrid_window_size: w > 0 makes the global heads LoLCATs' hybrid attention (arXiv 2410.10254, sec. 3.2):
            exact softmax over a sliding window of w tokens plus kernel scores for every older key, in one
            normaliser weighted by a learned per-head ``window_factor`` (decoding keeps w - 1 keys and the kernel
            sums: constant memory). Needs a feature map with plain per-token features (``attention.
            hybrid_feature_maps()``: relu, elu, ...); not with begin_kernel, use_causal_windowed, scale_by_length.

    Positions:
        position_embedding_type: ``rotary`` (default, as the Performer reference), ``absolute`` (learned),
            ``axial`` (Reformer's factorised embedding, ``axial_pos_shape`` with product ``max_position_embeddings``
            and ``axial_pos_embds_dim`` summing to ``hidden_size``) or ``none``. sinusoidal_position_embedding adds
            a fixed [sin | cos] table to the token embeddings on top of that (performer-pytorch's rotary models).
        rope_parameters: the rotary embedding as in transformers' RoPE configs (``RopeParameters``): a dict with
            ``rope_type`` (``default`` or a scaled type: ``linear`` and ``dynamic`` need ``factor``; ``yarn``
            ``factor`` and optionally ``original_max_position_embeddings`` (default ``max_position_embeddings``),
            ``attention_factor``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``truncate``;
            ``longrope`` ``short_factor`` and ``long_factor`` (``rotary dim / 2`` numbers each) and ``factor`` or
            ``original_max_position_embeddings``; ``llama3`` ``factor``, ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings``), ``rope_theta`` and optionally ``partial_rotary_factor`` (the
            fraction of the head dim that is rotated). Checked by transformers' ``validate_rope`` and here.
        rope_theta: the RoPE base (default 10000). Kept for configs saved before ``rope_parameters``: a config with
            only ``rope_theta`` means ``{"rope_type": "default", "rope_theta": rope_theta}``; given both, they must
            agree. After construction it always equals ``rope_parameters["rope_theta"]``.

    Head: lm_head_bias gives the untied output layer a bias (performer-pytorch's ``to_out``).

    Encoder-decoder (transformers' way, set by ``EncoderDecoderModel``): is_decoder, add_cross_attention: each
    layer of a causal decoder also attends to ``encoder_hidden_states`` with bidirectional kernel attention (the
    encoder's padding removed from numerator and normaliser; while decoding the encoder side's kernel sums are
    computed once and kept in the cache).

    Every field is checked at construction (and on assignment) against its type and range: bool fields take real
    bools only (not 0/1 or strings such as ``"false"``), int fields reject bools and floats, float fields reject
    strings, NaN and inf. Errors are ``TypeError`` (wrong type) or ``ValueError`` (out of range, or inconsistent
    fields) whose message names the field; they also subclass huggingface_hub's ``StrictDataclassError``.
    """

    model_type = "performer"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = _field(32000, _POSITIVE)
    hidden_size: int = _field(512, _POSITIVE)
    num_hidden_layers: int = _field(6, _POSITIVE)
    num_attention_heads: int = _field(8, _POSITIVE)
    num_key_value_heads: int | None = _field(None, _POSITIVE)
    intermediate_size: int | None = _field(None, _POSITIVE)
    ff_mult: int = _field(4, _POSITIVE)
    ff_glu: bool = False
    ff_chunks: int = _field(1, _POSITIVE)
    hidden_act: str = _field("gelu", _one_of(lambda: sorted(ACT2FN)))
    norm_type: str = _field("layernorm", _one_of(NORM_TYPES))
    layer_norm_eps: int | float = _field(1e-5, _number(0))
    attention_bias: bool = False
    mlp_bias: bool = True
    hidden_dropout: int | float = _field(0.0, _DROPOUT)
    attention_dropout: int | float = _field(0.0, _DROPOUT)
    embedding_dropout: int | float = _field(0.0, _DROPOUT)
    initializer_range: int | float = _field(0.02, _number(0))

    causal: bool = True
    feature_map: str = _field("favor+", _check_feature_map)
    nb_features: int | None = _field(None, _POSITIVE)
    orthogonal_features: bool = True
    feature_norm_scaling: str = _field("chi", _one_of(("chi", "sqrt_d")))
    feature_map_kwargs: dict[str, Any] | None = _field(None, _check_json)
    feature_redraw_interval: int | None = _field(1000, _NON_NEGATIVE)
    feature_seed: int = 0
    attention_scale: int | float | None = _field(None, _number(0, low_open=True))
    attention_chunk_size: int = _field(64, _POSITIVE)
    attention_implementation: str = _field("auto", _one_of(ATTENTION_IMPLEMENTATIONS))

    local_attn_heads: int | list[int] | tuple[int, ...] = _field(0, _NON_NEGATIVE)
    local_window_size: int = _field(256, _POSITIVE)
    local_window_type: str = _field("sliding", _one_of(("sliding", "blocked")))
    local_rotary: bool = False
    shift_tokens: bool = False
    begin_kernel: int = _field(0, _NON_NEGATIVE)
    scale_by_length: bool = False
    use_causal_windowed: bool = False
    causal_chunk_length: int = _field(1, _POSITIVE)
    causal_window_length: int = _field(3, _POSITIVE)
    causal_window_decay: int | float | None = _field(None, _number(0, 1, low_open=True))
    causal_padding: str | None = _field(None, _one_of((None, "left", "right")))
    hybrid_window_size: int = _field(0, _NON_NEGATIVE)

    position_embedding_type: str = _field("rotary", _one_of(POSITION_EMBEDDING_TYPES))
    sinusoidal_position_embedding: bool = False
    max_position_embeddings: int = _field(8192, _POSITIVE)
    rope_parameters: RopeParameters | dict | None = _field(None, _check_rope_parameters)
    rope_theta: int | float | None = _field(None, _number(0, low_open=True))
    axial_pos_shape: list[int] | tuple[int, ...] | None = _field(None, _POSITIVE)
    axial_pos_embds_dim: list[int] | tuple[int, ...] | None = _field(None, _POSITIVE)

    is_decoder: bool = False
    add_cross_attention: bool = False

    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = self.ff_mult * self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.feature_map_kwargs is None:
            self.feature_map_kwargs = {}
        for name in ("local_attn_heads", "axial_pos_shape", "axial_pos_embds_dim"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self._merge_rope_theta(kwargs)
        super().__post_init__(**kwargs)  # standardizes rope_parameters (transformers' RotaryEmbeddingConfigMixin)

    def _merge_rope_theta(self, kwargs: dict) -> None:
        """rope_parameters from rope_parameters (or the legacy rope_scaling) and rope_theta, before transformers
        standardizes it: an old config with only rope_theta means the default RoPE with that base."""
        legacy = kwargs.pop("rope_scaling", None)
        if legacy is not None:
            if self.rope_parameters is not None and self.rope_parameters != legacy:
                raise ValueError(f"rope_scaling {legacy!r} and rope_parameters {self.rope_parameters!r} disagree; "
                                 "give only rope_parameters")
            self.rope_parameters = legacy
        parameters = dict(self.rope_parameters or {})  # a copy: transformers fills it in place
        given = parameters.get("rope_theta")
        if given is not None and self.rope_theta is not None and given != self.rope_theta:
            raise ValueError(f"rope_theta={self.rope_theta!r} and rope_parameters['rope_theta']={given!r} disagree; "
                             "give one of them (rope_parameters is preferred)")
        if given is None:
            parameters["rope_theta"] = self.default_theta if self.rope_theta is None else self.rope_theta
        parameters.setdefault("rope_type", parameters.pop("type", "default"))
        self.rope_parameters = parameters
        self.rope_theta = parameters["rope_theta"]

    # -- derived values ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_random_features(self) -> int:
        return default_num_features(self.head_dim) if self.nb_features is None else self.nb_features

    @property
    def qk_scale(self) -> float:
        """What q and k are each multiplied by before the feature map (``attention_scale``, default d ** -0.25)."""
        return self.head_dim**-0.25 if self.attention_scale is None else self.attention_scale

    # -- class validators (run by @strict after construction and by save_pretrained; ValueError naming the fields) --
    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.position_embedding_type == "rotary" and self.head_dim % 2:
            raise ValueError(f"position_embedding_type='rotary' needs an even head dim, got {self.head_dim}")
        if (self.local_rotary or self.sinusoidal_position_embedding) and self.head_dim % 2:
            raise ValueError(f"local_rotary / sinusoidal_position_embedding need an even head dim, got {self.head_dim}")
        if self.position_embedding_type == "axial":
            self._validate_axial()

    def validate_attention_options(self):
        heads = self.local_attn_heads
        if isinstance(heads, list) and len(heads) != self.num_hidden_layers:
            raise ValueError(
                f"local_attn_heads has {len(heads)} entries; give one per layer ({self.num_hidden_layers}) or an int"
            )
        if any(count > self.num_attention_heads for count in (heads if isinstance(heads, list) else [heads])):
            raise ValueError(
                f"local_attn_heads must be ints in [0, num_attention_heads={self.num_attention_heads}], got {heads!r}"
            )
        if self.scale_by_length and self.causal:
            raise ValueError("scale_by_length scales by the number of keys of the whole sequence; it needs causal=False")
        if self.use_causal_windowed:
            if not self.causal:
                raise ValueError("use_causal_windowed needs causal=True")
            if self.feature_map == EXACT:
                raise ValueError("use_causal_windowed is a kernel-attention option; it cannot use feature_map='exact'")
        if self.feature_map == EXACT and (self.begin_kernel or self.scale_by_length):
            raise ValueError("begin_kernel and scale_by_length are kernel-attention options; feature_map='exact' "
                             "is softmax everywhere already")

    def validate_cross_attention(self):
        if self.is_decoder and not self.causal:
            raise ValueError("is_decoder=True needs causal=True (a decoder attends to its past only)")
        if self.add_cross_attention:
            if not self.causal:
                raise ValueError("add_cross_attention=True needs causal=True: cross-attention belongs to a decoder")
            if self.feature_map not in (EXACT, *FEATURE_MAPS) or self.feature_map == EXACT:
                return
            if not FEATURE_MAPS[self.feature_map].supports_causal:
                raise ValueError(
                    f"add_cross_attention=True cannot use feature_map={self.feature_map!r}: its features depend on "
                    "statistics of the queries too, so the encoder side's kernel sums could not be computed once "
                    "and kept while decoding; use a per-token map such as 'favor+'"
                )

    def validate_feature_map(self):
        _check_feature_map(self.feature_map)  # the registry may have changed since the field was set
        if self.feature_map == EXACT:
            return
        map_class = FEATURE_MAPS[self.feature_map]
        if self.causal and not map_class.supports_causal:
            raise ValueError(
                f"feature_map={self.feature_map!r} uses statistics of the whole sequence and cannot be causal; "
                "use it with causal=False or pick a causal map such as 'favor+'"
            )
        if map_class.per_head and "num_heads" in self.feature_map_kwargs:
            raise ValueError(f"feature_map_kwargs cannot set num_heads for feature_map={self.feature_map!r}: each "
                             "layer passes the number of heads it runs")
        # A trial construction on the meta device runs the class's own checks of its options without drawing
        # anything: RandomProjectionFeatureMap.new_feature_map skips meta buffers, and meta tensors use no RNG.
        try:
            with torch.device("meta"):
                map_class(self.head_dim, **self.feature_map_options())
        except (TypeError, ValueError) as error:
            raise ValueError(f"feature_map_kwargs {self.feature_map_kwargs!r} are invalid for "
                             f"feature_map={self.feature_map!r}: {error}") from error
        except (RuntimeError, NotImplementedError):
            pass  # a custom map that cannot be built on meta: its options are checked when the model is built

    def validate_hybrid_window(self):
        if not self.hybrid_window_size:
            return
        combined = [name for name in ("begin_kernel", "use_causal_windowed", "scale_by_length") if getattr(self, name)]
        if combined:
            raise ValueError(f"hybrid_window_size={self.hybrid_window_size} cannot be combined with {combined}: "
                             "the hybrid kind has its own exact window")
        from .attention import check_hybrid_feature_map, hybrid_feature_maps

        if self.feature_map == EXACT or self.feature_map not in hybrid_feature_maps():
            raise ValueError(f"hybrid_window_size needs feature_map in {hybrid_feature_maps()} (plain per-token "
                             f"features), got {self.feature_map!r}")
        try:  # the instance decides (generalized with kernel_fn='exp' is exponential); meta: nothing is drawn
            with torch.device("meta"):
                feature_map = FEATURE_MAPS[self.feature_map](self.head_dim, **self.feature_map_options())
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            return  # validate_feature_map reports bad options
        try:
            check_hybrid_feature_map(feature_map)
        except ValueError as error:
            raise ValueError(f"hybrid_window_size with feature_map={self.feature_map!r}: {error}") from None

    def validate_rope(self):
        """transformers' RoPE validation (required keys of each rope_type), made strict: what it only logs about
        values is an error here, and a missing key is a ValueError instead of a KeyError."""
        parameters = self.rope_parameters
        if not isinstance(parameters, dict):
            raise TypeError(f"rope_parameters must be a dict, got {type(parameters).__name__}")
        _check_rope_parameters(parameters)
        if parameters.get("rope_theta") != self.rope_theta:
            raise ValueError(f"rope_theta={self.rope_theta!r} and rope_parameters['rope_theta']="
                             f"{parameters.get('rope_theta')!r} disagree")
        try:
            super().validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters {parameters!r}: {error.args[0]}") from None
        rope_type = parameters["rope_type"]
        factor = parameters.get("partial_rotary_factor", 1.0)
        rotary_dim = int(self.head_dim * factor)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"rope_parameters['partial_rotary_factor']={factor} rotates {rotary_dim} of the "
                             f"{self.head_dim} head dims; it must be an even number >= 2")
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(parameters[key]) != rotary_dim // 2:
                    raise ValueError(f"rope_parameters[{key!r}] must have rotary dim / 2 = {rotary_dim // 2} "
                                     f"entries, got {len(parameters[key])}")
            if parameters.get("factor") is None and parameters.get("original_max_position_embeddings") is None:
                raise ValueError("rope_type='longrope' needs rope_parameters['factor'] or "
                                 "['original_max_position_embeddings']")
        if rope_type == "llama3":
            if not parameters["high_freq_factor"] > parameters["low_freq_factor"]:
                raise ValueError("rope_parameters['high_freq_factor'] must be greater than ['low_freq_factor'], got "
                                 f"{parameters['high_freq_factor']} and {parameters['low_freq_factor']}")
            if not parameters["original_max_position_embeddings"] < self.max_position_embeddings:
                raise ValueError(
                    "rope_type='llama3' needs rope_parameters['original_max_position_embeddings'] "
                    f"({parameters['original_max_position_embeddings']}) < max_position_embeddings "
                    f"({self.max_position_embeddings})"
                )

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
        if map_class.per_head:
            options["num_heads"] = self.num_attention_heads  # the layers pass their own count; any valid one checks
        return options


__all__ = ["PerformerConfig"]
