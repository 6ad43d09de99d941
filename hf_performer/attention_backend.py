"""Kernel (Performer) attention as a transformers attention implementation: ``attn_implementation="performer"``.

Any model whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, GPT-2, BERT,
RoBERTa, ViT, ... in transformers 5.x) can run with kernel attention::

    import hf_performer  # registers "performer"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="performer")
    # or, on a model already in memory:
    prepare_model_for_performer_attention(model, nb_features=256)

Configuration keys, read from the host model's config (set them before loading, e.g.
``config = AutoConfig.from_pretrained(path); config.performer_nb_features = 256;
AutoModel.from_pretrained(path, config=config, attn_implementation="performer")``; they are saved with the config):

    ``performer_feature_map``         name from ``hf_performer.available_feature_maps()``; default ``"favor+"``.
    ``performer_nb_features``         number of random features m; default ``int(d_head * ln d_head)``.
    ``performer_feature_map_kwargs``  extra keyword arguments of the feature-map class (dict); default ``{}``.
    ``performer_feature_seed``        seed of the random projections; default 0. Layer ``i`` uses
                                      ``feature_seed(seed, i, stream)`` (``stream`` 1 for cross-attention).
    ``performer_chunk_size``          chunk length of the causal algorithm; default 64.
    ``performer_window_size``         w > 0: LoLCATs' hybrid attention (arXiv 2410.10254, sec. 3.2), the kind to
                                      linearize a pretrained model with: exact softmax (the host's own scaling)
                                      over a sliding window of w tokens plus kernel scores for every older key, in
                                      one normaliser mixed by a learned per-head ``window_factor`` (a parameter of
                                      ``performer_kernel``, saved with the model; a checkpoint without it starts
                                      at sigmoid = 0.1). Needs a map from ``attention.hybrid_feature_maps()``
                                      (hedgehog, taylor, relu, elu, ...). Self-attention only: cross-attention stays plain kernel
                                      attention. Default 0: plain kernel attention.

Trainable maps (``"hedgehog"``, for linearising a pretrained model as in LoLCATs) keep their parameters in the same
submodule: they are trained, saved and reloaded with the model, and a checkpoint without them starts them at the
map's own initial values (identity), never at the host's random init.

Per-layer random projections live in a ``performer_kernel`` submodule attached to every attention module, as
persistent buffers: ``save_pretrained`` writes them and ``from_pretrained(..., attn_implementation="performer")``
reads them back (a module-registration hook attaches the submodule while the model is being built, so its keys
exist before the weights are loaded). Loading a checkpoint that has no projections (a softmax checkpoint) draws
them from the seed.

Semantics of the attention function, for each call of ``module`` on ``query`` (B, H, N, d), ``key`` / ``value``
(B, H_kv, S, d):

* the softmax kernel is exp(scaling * q . k), so q and k are each multiplied by sqrt(scaling) before the feature
  map (FAVOR+ then estimates exactly that kernel, arXiv 2009.14794, Lemma 1); GQA repeats the key features and
  values over the query heads;
* causality follows the mask when one is given (as ``sdpa`` does), otherwise the ``is_causal`` argument, otherwise
  ``module.is_causal``; padded keys (from a 2D mask or a 4D boolean / additive mask) are removed from both the
  numerator and the normaliser. Masks that are not "causal or full, with key padding" (sliding windows, chunked or
  packed-sequence masks, score biases) cannot be expressed with a kernel and raise ``ValueError``;
* when the host model keeps a key/value cache (e.g. Llama's ``DynamicCache`` in ``generate``), the function sees
  all cached keys and values and recomputes the kernel sums over them at every step. That is exact, only not
  incremental (O(S) per decoded token instead of O(1)); ``PerformerForCausalLM`` has the recurrent cache;
* ``dropout`` cannot drop attention probabilities (they are never formed); it is applied to the attention output
  instead, which regularises similarly but is not the same random function;
* attention weights are never formed: the second return value is always None.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .feature_maps import (
    FEATURE_MAPS,
    FeatureMap,
    available_feature_maps,
    build_feature_map,
    default_num_features,
    feature_seed,
)
from .attention import (
    LOLCATS_WINDOW_FACTOR_INIT,
    HybridOptions,
    HybridState,
    KernelOptions,
    WindowState,
    attend,
    check_hybrid_feature_map,
    hybrid_feature_maps,
)

logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATION = "performer"
KERNEL_ATTRIBUTE = "performer_kernel"
DEFAULT_FEATURE_MAP = "favor+"
DEFAULT_CHUNK_SIZE = 64
# An additive mask entry at or below this is "masked": exp(-1000) underflows to 0 in any float format.
MASKED_BELOW = -1e3


def _config_value(config, key: str, default):
    value = getattr(config, key, None) if config is not None else None
    return default if value is None else value


# ----------------------------------------------------------------------------------------------------------------
# The per-layer kernel module
# ----------------------------------------------------------------------------------------------------------------


class PerformerKernel(nn.Module):
    """Holds one attention module's feature map (its random projection is a persistent buffer) and, with
    ``performer_window_size``, the hybrid kind's per-head ``window_factor`` logits (a parameter).

    The projection is a function of the seed, so a kernel whose buffer was not in the loaded checkpoint can be
    redrawn identically. transformers marks loaded tensors with ``_is_hf_initialized`` and, after loading, sets
    ``module._is_hf_initialized = True`` on every module it has initialised; the setter below uses that moment to
    draw the projections the checkpoint did not provide (the same contract as ``transformers.initialization``).
    """

    def __init__(self, feature_map: FeatureMap, seed: int, window: int = 0, num_heads: int | None = None):
        super().__init__()
        self.feature_map = feature_map  # built with ``seed``: its projection is drawn from it already
        self.seed = seed
        self.window = window
        projection = getattr(feature_map, "projection", None)
        if projection is not None and not projection.is_meta:
            projection._is_hf_initialized = True  # the host's weight init must not draw it again
        for parameter in feature_map.parameters():  # learned maps (hedgehog) start at their own init, not normal_
            if not parameter.is_meta:
                parameter._is_hf_initialized = True
        self.window_factor = None
        if window > 0:
            if num_heads is None:
                raise ValueError("performer_window_size needs the number of attention heads")
            self.window_factor = nn.Parameter(torch.full((num_heads,), LOLCATS_WINDOW_FACTOR_INIT))
            if not self.window_factor.is_meta:
                self.window_factor._is_hf_initialized = True

    @torch.no_grad()
    def draw(self, seed: int | None = None) -> None:
        """(Re)draw the random projection from ``seed`` (default: the layer's own seed)."""
        projection = getattr(self.feature_map, "projection", None)
        if not self.feature_map.is_random or projection is None or projection.is_meta:
            return
        self.feature_map.new_feature_map(torch.Generator().manual_seed(self.seed if seed is None else seed))
        projection._is_hf_initialized = True

    @property
    def _is_hf_initialized(self) -> bool:
        return self.__dict__.get("_performer_initialized", False)

    @_is_hf_initialized.setter
    def _is_hf_initialized(self, value: bool) -> None:
        projection = getattr(self.feature_map, "projection", None)
        if value and projection is not None and not projection.is_meta:
            if not getattr(projection, "_is_hf_initialized", False):
                self.draw()  # missing from the checkpoint: the memory is uninitialised
        if value:  # learned parameters the checkpoint lacks (a softmax checkpoint): the map's initial values
            self.feature_map.reset_learned_parameters(missing_only=True)
        factor = self.window_factor
        if value and factor is not None and not factor.is_meta and not getattr(factor, "_is_hf_initialized", False):
            with torch.no_grad():  # missing from the checkpoint (e.g. a softmax one): the init value
                factor.fill_(LOLCATS_WINDOW_FACTOR_INIT)
            factor._is_hf_initialized = True
        self.__dict__["_performer_initialized"] = bool(value)

    def extra_repr(self) -> str:
        return f"seed={self.seed}" + (f", window={self.window}" if self.window else "")


def _head_dim(module: nn.Module, config) -> int | None:
    for name in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _layer_seed(module: nn.Module, config) -> int:
    """Seed of one module's projections: the config seed, the layer index and whether it is cross-attention."""
    layer_idx = getattr(module, "layer_idx", None)
    layer_idx = layer_idx if isinstance(layer_idx, int) else 0
    cross = bool(getattr(module, "is_cross_attention", False)) or "Cross" in type(module).__name__
    return feature_seed(int(_config_value(config, "performer_feature_seed", 0)), layer_idx, int(cross))


def build_kernel(module: nn.Module, config, head_dim: int) -> PerformerKernel:
    """The ``PerformerKernel`` that the config asks for, for one attention module."""
    name = _config_value(config, "performer_feature_map", DEFAULT_FEATURE_MAP)
    if name not in FEATURE_MAPS:
        choices = [choice for choice in available_feature_maps() if choice in FEATURE_MAPS]
        raise ValueError(f"performer_feature_map must be one of {choices}, got {name!r}")
    seed = _layer_seed(module, config)
    nb_features = int(_config_value(config, "performer_nb_features", default_num_features(head_dim)))
    num_heads = _num_query_heads(module, config) if FEATURE_MAPS[name].per_head else None
    feature_map = build_feature_map(name, head_dim, num_features=nb_features, seed=seed, num_heads=num_heads,
                                    options=_config_value(config, "performer_feature_map_kwargs", {}))
    window = _config_value(config, "performer_window_size", 0)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"performer_window_size must be an int >= 0, got {window!r}")
    if window > 0:
        try:
            check_hybrid_feature_map(feature_map)
        except ValueError as error:
            raise ValueError(f"performer_window_size={window} needs performer_feature_map in "
                             f"{hybrid_feature_maps()}, got {name!r}: {error}") from None
    return PerformerKernel(feature_map, seed, window, _num_query_heads(module, config) if window > 0 else None)


def _num_query_heads(module: nn.Module, config) -> int | None:
    """The heads a per-head map sees: the module's query heads (GQA repeats the keys to match before the map)."""
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


_DISPATCHES: dict[type, bool] = {}


def dispatches_attention(module: nn.Module) -> bool:
    """Whether ``module``'s forward calls the attention interface (the heuristic transformers itself uses in
    ``_can_set_attn_implementation``); cached per class."""
    cls = type(module)
    if cls not in _DISPATCHES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _DISPATCHES[cls]


def attach_kernel(module: nn.Module, config=None, head_dim: int | None = None) -> PerformerKernel:
    """Give ``module`` its ``performer_kernel`` submodule (or return the one it has)."""
    kernel = getattr(module, KERNEL_ATTRIBUTE, None)
    if kernel is not None:
        return kernel
    config = config if config is not None else getattr(module, "config", None)
    head_dim = head_dim if head_dim is not None else _head_dim(module, config)
    if head_dim is None:
        raise ValueError(f"cannot tell the head dimension of {type(module).__name__}; pass head_dim")
    kernel = build_kernel(module, config, head_dim)
    setattr(module, KERNEL_ATTRIBUTE, kernel)
    return kernel


def _attach_on_registration(parent: nn.Module, name: str, module):
    """Global module-registration hook: while a model whose config asks for "performer" is being built (also on
    the meta device inside ``from_pretrained``), attach the kernel to each attention module as soon as it is
    assigned to its parent, so the projection buffers exist when the checkpoint is loaded."""
    if not isinstance(module, nn.Module) or name == KERNEL_ATTRIBUTE:
        return None
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return None
    if getattr(module, KERNEL_ATTRIBUTE, None) is None and dispatches_attention(module):
        if _head_dim(module, config) is not None:
            attach_kernel(module, config)
    return None


def prepare_model_for_performer_attention(
    model: nn.Module,
    *,
    feature_map: str | None = None,
    nb_features: int | None = None,
    feature_seed: int | None = None,
    feature_map_kwargs: dict | None = None,
    chunk_size: int | None = None,
    window_size: int | None = None,
) -> nn.Module:
    """Switch a loaded transformers model to kernel attention in place, and return it.

    Writes the given options into the model config (``performer_*`` keys, saved with it), attaches a
    ``performer_kernel`` to every attention module (replacing existing ones, so changed options take effect) and
    calls ``model.set_attn_implementation("performer")``.
    """
    options = {"performer_feature_map": feature_map, "performer_nb_features": nb_features,
               "performer_feature_seed": feature_seed, "performer_feature_map_kwargs": feature_map_kwargs,
               "performer_chunk_size": chunk_size, "performer_window_size": window_size}
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")}
    for config in configs.values():  # sub-models (e.g. a vision tower) have configs of their own
        for key, value in options.items():
            if value is not None:
                setattr(config, key, value)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} does not let its attention implementation be set (it does not "
                         "dispatch through transformers' AttentionInterface)")
    device = next((p.device for p in model.parameters()), None)
    attached = 0
    for module in list(model.modules()):
        if isinstance(module, PerformerKernel) or not dispatches_attention(module):
            continue
        if hasattr(module, KERNEL_ATTRIBUTE):
            delattr(module, KERNEL_ATTRIBUTE)
        kernel = attach_kernel(module, getattr(module, "config", None) or model.config)
        if device is not None:
            kernel.to(device)
        attached += 1
    if attached == 0:
        raise ValueError(f"{type(model).__name__} has no attention module that dispatches through "
                         "ALL_ATTENTION_FUNCTIONS; it cannot use attn_implementation='performer'")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def _allowed_from_4d(mask: torch.Tensor) -> torch.Tensor:
    """(B, h, N', S) boolean "may attend" from a boolean mask or an additive one (0 keep, very negative drop)."""
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= MASKED_BELOW)).all()):
        raise ValueError("attn_implementation='performer' got an additive attention mask with score biases "
                         "(entries that are neither 0 nor very negative); kernel attention cannot add biases to "
                         "attention scores")
    return allowed


def resolve_mask(mask, is_causal: bool, q_len: int, kv_len: int) -> tuple[torch.Tensor | None, bool, int]:
    """Reduce a transformers attention mask to what kernel attention can use.

    Returns ``(key_mask, causal, kv_used)``: a (B, kv_used) boolean mask of the keys that may be attended (None:
    all), whether query i sees only keys up to ``kv_used - q_len + i``, and how many leading keys to use (fewer
    than ``kv_len`` when the trailing keys are empty slots of a static cache). Raises ``ValueError`` for masks that
    are not "causal or full attention, with key padding".
    """
    if mask is None:
        if is_causal and q_len > 1 and kv_len > q_len:
            # As in transformers' sdpa path: no mask and more keys than queries only happens when prefilling an
            # empty static cache, whose trailing slots are not filled yet.
            return None, True, q_len
        return None, is_causal, kv_len
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attn_implementation='performer' needs a tensor attention mask, got {type(mask).__name__}")
    if mask.dim() == 2:  # (B, S) 0/1 padding mask, 1 = real token
        if mask.shape[-1] != kv_len:
            raise ValueError(f"2D attention mask has {mask.shape[-1]} columns for {kv_len} keys")
        key_mask = mask.bool() if mask.dtype == torch.bool else mask != 0
        return key_mask, is_causal, kv_len
    if mask.dim() != 4 or mask.shape[-1] != kv_len or mask.shape[-2] not in (1, q_len):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit {q_len} queries and "
                         f"{kv_len} keys")
    allowed = _allowed_from_4d(mask)
    if allowed.shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise ValueError("attn_implementation='performer' does not support per-head attention masks")
        allowed = allowed[:, :1]
    allowed = allowed[:, 0]  # (B, N', S)
    if allowed.shape[-2] == 1:
        # Keys only: with a mask, the mask decides (as in sdpa), and a key-only mask lets every query see every key.
        return allowed[:, 0], q_len == 1 and is_causal, kv_len
    key_mask = allowed.any(dim=-2)  # (B, S): keys some query may see
    padded_full = key_mask.unsqueeze(1).expand_as(allowed)
    # Causal with the queries at the end of the keys (cache), or at the end of the filled part (static cache).
    used_candidates = [kv_len]
    filled = int(torch.nonzero(key_mask.any(dim=0)).max()) + 1 if bool(key_mask.any()) else kv_len
    if filled < kv_len:
        used_candidates.append(filled)
    query_pos = torch.arange(q_len, device=allowed.device).unsqueeze(1)  # (N, 1)
    key_pos = torch.arange(kv_len, device=allowed.device).unsqueeze(0)  # (1, S)
    for used in used_candidates:
        if used < q_len:
            continue
        visible = key_pos <= query_pos + (used - q_len)  # (N, S)
        if bool((allowed == (padded_full & visible)).all()):
            return key_mask[:, :used], True, used
    if bool((allowed == padded_full).all()):
        return key_mask, False, kv_len
    raise ValueError("attn_implementation='performer' got an attention mask that is neither causal nor full "
                     "attention with key padding (sliding-window, chunked, packed-sequence or custom masks cannot be "
                     "expressed with kernel attention)")


# ----------------------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------------------


def performer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Kernel attention with the signature of transformers' attention functions: returns ((B, N, H, d), None).
    The math is ``attention.kernel_attention``, run with autocast off (exponential features and kernel sums must stay
    in float32 under bf16/fp16 autocast)."""
    for option in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(option) is not None:
            raise ValueError(f"attn_implementation='performer' does not support {option!r}")
    if kwargs.get("output_attentions"):
        logger.warning_once("attn_implementation='performer' never forms attention weights; they are returned as None")
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        raise ValueError(f"attn_implementation='performer' does not support sliding-window attention "
                         f"(sliding_window={window} < {kv_len} keys)")

    kernel = getattr(module, KERNEL_ATTRIBUTE, None)
    if kernel is None:
        # set_attn_implementation("performer") on a model built without the kernels: attach them now. The seed is
        # fixed by the config, so this draws what prepare_model_for_performer_attention would have drawn.
        kernel = attach_kernel(module, head_dim=head_dim).to(query.device)
    feature_map = kernel.feature_map
    if feature_map.head_dim != head_dim:
        raise ValueError(f"{type(module).__name__}.{KERNEL_ATTRIBUTE} was built for head_dim={feature_map.head_dim}, "
                         f"got queries with head_dim={head_dim}")

    default_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_mask, causal, kv_used = resolve_mask(attention_mask, bool(default_causal), q_len, kv_len)
    if causal and not feature_map.supports_causal:
        raise ValueError(f"feature map {type(feature_map).__name__} cannot be used in causal attention")
    key, value = key[:, :, :kv_used], value[:, :, :kv_used]

    # exp(scaling * q.k) = exp((sqrt(scaling) q) . (sqrt(scaling) k)): FAVOR+ estimates the kernel of the inputs.
    root_scale = math.sqrt(head_dim**-0.5 if scaling is None else scaling)
    groups = heads // key.shape[1]
    if groups > 1:  # GQA: every query head gets its key head (maps such as favor++ pair q and k statistics)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    chunk = int(_config_value(getattr(module, "config", None), "performer_chunk_size", DEFAULT_CHUNK_SIZE))
    if kernel.window > 0 and (causal or q_len == kv_used):  # self-attention; cross-attention stays plain kernel
        out = _hybrid_forward(kernel, query, key, value, key_mask, causal, root_scale**2, chunk)
        if dropout > 0.0:
            out = nn.functional.dropout(out, p=dropout, training=module.training)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, N, H, d)
    # a single causal query at the end sees every key: the non-causal sum is the same and cheaper
    options = KernelOptions(feature_map, causal=causal and q_len > 1, qk_scale=root_scale, chunk_size=chunk,
                            queries_are_keys=q_len == kv_used)
    offset = kv_used - q_len if options.causal else 0
    if offset > 0:  # cached keys before the queries: placeholder queries there, outputs dropped below
        query = nn.functional.pad(query, (0, 0, offset, 0))
    out, _ = attend("kernel", query, key, value, key_mask, None, None, options)
    out = out[:, :, offset:]  # (B, H, N, d)
    if dropout > 0.0:
        out = nn.functional.dropout(out, p=dropout, training=module.training)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, N, H, d)


def _hybrid_forward(kernel: PerformerKernel, query, key, value, key_mask, causal: bool, scaling: float, chunk: int):
    """The ``hybrid`` kind over the host's keys: the cached ones (the first S - N) go in as the window state of an
    empty decoding state, so the N queries see exactly what a full pass would show them (O(S) per decoded token,
    as the plain kernel path). Positions count real tokens from the key mask, so left padding moves no window."""
    batch, heads, q_len, _ = query.shape
    total = key.shape[2]
    real = key_mask if key_mask is not None else torch.ones(batch, total, dtype=torch.bool, device=key.device)
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)
    options = HybridOptions(KernelOptions(kernel.feature_map, causal=causal, qk_scale=math.sqrt(scaling),
                                          chunk_size=chunk), window=kernel.window, softmax_scale=scaling,
                            window_factor=kernel.window_factor)
    cached = total - q_len
    state = None
    if cached > 0:
        state = HybridState(window=WindowState(key[:, :, :cached], value[:, :, :cached], positions[:, :cached],
                                               real[:, :cached]))
    out, _ = attend("hybrid", query, key[:, :, cached:], value[:, :, cached:], real[:, cached:],
                    positions[:, cached:], state, options)
    return out  # (B, H, N, d)


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------

_HOOK = None


def register_performer_attention() -> None:
    """Register "performer" with transformers (attention function and mask builder) and install the hook that
    attaches kernels while models are built. Idempotent; runs when ``hf_performer`` is imported."""
    global _HOOK
    AttentionInterface.register(ATTN_IMPLEMENTATION, performer_attention_forward)
    # Boolean sdpa-style masks (None when there is no padding), which resolve_mask reduces to key masks.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if _HOOK is None:
        _HOOK = torch.nn.modules.module.register_module_module_registration_hook(_attach_on_registration)


register_performer_attention()

__all__ = [
    "PerformerKernel",
    "performer_attention_forward",
    "prepare_model_for_performer_attention",
    "register_performer_attention",
    "resolve_mask",
]
