"""One decoding step as a module of plain tensors, for torch.export, ONNX and torch.compile.

A ``PerformerCache`` is a Python object; exporters want tensors in and out. ``PerformerDecodeStep`` takes the
token to decode, each sequence's next position and the stacked kernel states of every layer, and returns the
next-token logits with the new states: constant shapes, whatever the context length, so one exported graph serves
every step::

    step = PerformerDecodeStep(model)
    kv, log_scale, positions = step.initial_state(prefill_cache)   # after model(prompt, use_cache=True)
    logits, kv, log_scale = step(next_ids, positions, kv, log_scale); positions = positions + 1

Layers must be pure kernel attention (no local heads, token shift, windows or exact attention, whose state is not
a fixed-size tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import KernelState
from .cache_performer import CACHE_NAME, PerformerCache


class PerformerDecodeStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        config = model.config
        reasons = [name for name, bad in (
            ("feature_map='exact'", config.feature_map == "exact"),
            ("local_attn_heads", bool(config.local_attn_heads) and any(
                config.local_heads(i) for i in range(config.num_hidden_layers))),
            ("shift_tokens", config.shift_tokens),
            ("use_causal_windowed", config.use_causal_windowed),
            ("begin_kernel", config.begin_kernel > 0),
            ("hybrid_window_size", getattr(config, "hybrid_window_size", 0) > 0),
            ("add_cross_attention", config.add_cross_attention),
        ) if bad]
        if reasons or not config.causal:
            raise ValueError("PerformerDecodeStep needs a causal model of kernel-attention layers only; this one has "
                             f"{', '.join(reasons) or 'causal=False'}")
        self.model = model

    @staticmethod
    def initial_state(cache: PerformerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv (L, B, H, m, d + 1), log_scale (L, B, H), positions (B,)) of a filled cache."""
        if cache.get_seq_length() == 0:
            raise ValueError("the cache is empty: run the prompt through the model with use_cache=True first")
        kv = torch.stack([layer.attention.kv for layer in cache.layers])
        log_scale = torch.stack([layer.attention.log_scale for layer in cache.layers])
        return kv, log_scale, cache.position_offset

    def forward(self, input_ids, positions, kv, log_scale):
        """input_ids (B, 1), positions (B,) -> logits (B, V), kv, log_scale of the same shapes as given."""
        cache = PerformerCache(self.model.config)
        cache.seen_tokens = 1  # not empty: continue the given state
        cache.feature_version = self.model.base_model.feature_version
        cache.position_offset = positions
        for layer, layer_kv, layer_log_scale in zip(cache.layers, kv, log_scale):
            layer.attention = KernelState(layer_kv, layer_log_scale)
        logits = self.model(input_ids=input_ids, use_cache=True, **{CACHE_NAME: cache}).logits[:, -1]
        kv = torch.stack([layer.attention.kv for layer in cache.layers])
        log_scale = torch.stack([layer.attention.log_scale for layer in cache.layers])
        return logits, kv, log_scale


__all__ = ["PerformerDecodeStep"]
