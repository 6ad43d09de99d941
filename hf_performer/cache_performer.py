"""PerformerCache: the recurrent state of a causal Performer, so generation costs O(m d) per token per head.

Each layer keeps typed state (``attention.py``): its global heads' kind state (``KernelState``, the running kernel
sums of constant size; ``WindowState`` for windowed kinds, or every key for ``feature_map="exact"``), its local
heads' ``WindowState`` and the last token before each token shift. All tensors are batch-first, so beam search
reorders them alike.

Why a ``Cache`` subclass of our own rather than transformers' layer types: ``LinearAttentionLayer`` keeps recurrent
tensors and a convolution window along the last dimension, but a Performer layer needs (a) the kernel sums together
with the running log-scale they are normalised by, (b) windows of keys that carry their positions and padding mask
(windows are decided by real-token positions, so left-padded rows decode like unpadded ones) and (c) a mix of such
states in one layer (kernel heads next to local heads). And transformers' default ``DynamicCache`` never hands a
linear-attention layer its state, while ``get_seq_length()`` raises when every layer is linear. So Performer models
opt out of the default cache (``_supports_default_dynamic_cache``) and build this one.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .attention import WindowState, DecodingState

# transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to ``cache`` (the old name
# still works there, with a FutureWarning). Models take both names; outputs and generate() get the installed one.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache_argument(cache, past_key_values):
    """The cache a forward was given under either name; both at once is an error unless they are the same object."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class PerformerCacheLayer:
    """The state of one layer: ``attention`` (its global heads' state, of the type its attention kind declares),
    ``local`` (its local heads' window), ``cross`` (the encoder side of its cross-attention), ``shift_attn`` /
    ``shift_mlp`` (B, 1, D): the last token seen by each token shift. Each starts as None and is filled by the first forward."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.attention: DecodingState | None = None
        self.local: WindowState | None = None
        self.cross: DecodingState | None = None  # the encoder side of cross-attention, computed once
        self.shift_attn: torch.Tensor | None = None
        self.shift_mlp: torch.Tensor | None = None

    def _map_batch(self, fn) -> None:
        for state in (self.attention, self.local, self.cross):
            if state is not None:
                state.map_batch(fn)
        if self.shift_attn is not None:
            self.shift_attn = fn(self.shift_attn)
        if self.shift_mlp is not None:
            self.shift_mlp = fn(self.shift_mlp)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "PerformerCache cannot be cropped: a kernel-attention state sums over all past tokens and cannot forget "
            "some of them. Assisted/speculative decoding and DoLa rollbacks are therefore not supported."
        )

    def nbytes(self) -> int:
        total = sum(state.nbytes() for state in (self.attention, self.local, self.cross) if state is not None)
        return total + sum(t.numel() * t.element_size() for t in (self.shift_attn, self.shift_mlp) if t is not None)

    def __repr__(self) -> str:
        return f"PerformerCacheLayer(attention={self.attention!r}, local={self.local!r})"


class PerformerCache(Cache):
    """Recurrent cache of ``PerformerForCausalLM``; created by the model when ``use_cache=True``."""

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("PerformerCache needs either a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[PerformerCacheLayer() for _ in range(num_layers)])
        self.seen_tokens = 0
        # (B,) position of the next token of each sequence (padding does not advance it).
        self.position_offset: torch.Tensor | None = None
        # Which draw of the random features the state was summed with (``redraw_features`` bumps the model's).
        self.feature_version: int | None = None

    def _apply_to_offset(self, fn) -> None:
        if self.position_offset is not None:
            self.position_offset = fn(self.position_offset)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._apply_to_offset(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._apply_to_offset(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._apply_to_offset(lambda t: t.repeat_interleave(repeats, dim=0))

    def layer(self, layer_idx: int) -> PerformerCacheLayer:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # unbounded

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    def reset(self):
        super().reset()
        self.seen_tokens = 0
        self.position_offset = None
        self.feature_version = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return  # generate() calls crop(0) to trim buffers; nothing to forget
        self.layers[0].crop(tokens_to_remove)

    def activate_past_recording(self):
        """Only called when the cache must be rolled back, which a recurrent state cannot do."""
        raise ValueError(
            "PerformerCache cannot record past states for rollback (it keeps one running sum per layer)."
        )

    def nbytes(self) -> int:
        """Bytes held by the cache: constant in the context length for kernel-attention layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"PerformerCache(seen_tokens={self.seen_tokens}, layers={len(self.layers)}, bytes={self.nbytes()})"


__all__ = ["PerformerCache", "PerformerCacheLayer"]
