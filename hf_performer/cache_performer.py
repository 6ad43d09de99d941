"""PerformerCache: the recurrent state of a causal Performer, so generation costs O(m d) per token per head.

Per layer it keeps whatever that layer's attention needs to continue where the last forward stopped:
  * kernel heads: ``kv`` (B, H, m, d + 1) = [sum_u phi(k_u) v_u^T | sum_u phi(k_u)] and, for exponential feature
    maps, ``log_scale`` (B, H), the running maximum the sums are scaled by (see ``ops.py``);
  * exact-softmax layers (``feature_map="exact"``): the keys and values seen so far (these grow, by design);
  * ``extras``: named tensors of other components (local-attention windows, token shift, ...), all batch-first.
The memory of the kernel state is independent of the context length.

transformers 5.x traps this class exists to avoid: its default ``DynamicCache`` never hands a linear-attention
layer its recurrent state, and ``get_seq_length()`` raises when every layer is linear. Performer models therefore
opt out of the default cache (``_supports_default_dynamic_cache``) and build this one in ``forward``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to ``cache`` (the old name
# still works there, with a FutureWarning). Models take both names; outputs and generate() get the installed one.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache_argument(cache, past_key_values):
    """The cache a forward was given under either name; both at once is an error unless they are the same object."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class PerformerCacheLayer:
    """The state of one layer. All tensors have the batch as their first dimension."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def set(self, name: str, value: torch.Tensor | None) -> None:
        if value is None:
            self.tensors.pop(name, None)
        else:
            self.tensors[name] = value

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else -1

    def _apply(self, fn) -> None:
        self.tensors = {name: fn(tensor) for name, tensor in self.tensors.items()}

    def reset(self) -> None:
        self.tensors = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "PerformerCache cannot be cropped: a kernel-attention state sums over all past tokens and cannot forget "
            "some of them. Assisted/speculative decoding and DoLa rollbacks are therefore not supported."
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __repr__(self) -> str:
        return f"PerformerCacheLayer({ {k: tuple(v.shape) for k, v in self.tensors.items()} })"


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
