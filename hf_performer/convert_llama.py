"""Llama-family causal LMs (Llama, Mistral, Qwen2) as native ``PerformerForCausalLM`` models.

The Llama block is a pre-norm transformer with RMSNorm, a SwiGLU feed-forward, rotary positions (with the RoPE
scaling types transformers knows) and grouped-query attention: every one of these is a ``PerformerConfig`` option,
so the conversion only renames and stacks weights. With ``feature_map="exact"`` the converted model computes the
host's function (tested to float32 precision); with a kernel feature map it is a Performer that generates through
``PerformerCache`` at constant memory per token, which a host model running ``attn_implementation="performer"``
cannot do (its own KV cache grows with the context).

    performer = convert_llama_to_performer(llama, feature_map="hedgehog")
    performer.save_pretrained(path)   # a standard folder: AutoModelForCausalLM.from_pretrained(path)

Weights that the host model carries under ``performer_kernel`` (from ``attn_implementation="performer"``, e.g.
after ``hf_performer.linearize``) become the Performer layers' feature maps.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_performer import PerformerConfig
from .modeling_performer import PerformerForCausalLM

NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2")
# configuration keys with the same meaning in both configs
_SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings", "initializer_range",
                "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")


def converts_natively(config) -> bool:
    """Whether a model of this config converts to ``PerformerForCausalLM`` (see ``NATIVE_MODEL_TYPES``)."""
    return getattr(config, "model_type", None) in NATIVE_MODEL_TYPES


def check_convertible(config) -> None:
    """ValueError naming the option when a config of ``NATIVE_MODEL_TYPES`` cannot convert (sliding windows, ...)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in NATIVE_MODEL_TYPES:
        raise ValueError(f"convert_llama_to_performer converts {list(NATIVE_MODEL_TYPES)} models, got "
                         f"model_type={model_type!r}; other models run kernel attention in place with "
                         "attn_implementation='performer' (hf_performer.prepare_model_for_performer_attention)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"head_dim={head_dim} with num_attention_heads={config.num_attention_heads} does not match "
                         f"hidden_size={config.hidden_size}; PerformerConfig derives head_dim = hidden / heads")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise ValueError(f"{model_type} with sliding_window={window}: the Performer replaces windowed softmax by "
                         "kernel attention over the whole context; set config.sliding_window = None first if that "
                         "is what you want")


def performer_config_from_llama(config, **performer_options) -> PerformerConfig:
    """The ``PerformerConfig`` of the same architecture; ``performer_options`` set the attention (``feature_map``,
    ``nb_features``, ``feature_map_kwargs``, ``feature_seed``, ...). The host's ``performer_*`` keys (set by
    ``attn_implementation="performer"``) are the defaults of those options."""
    check_convertible(config)
    options = {key: getattr(config, key) for key in _SHARED_KEYS if getattr(config, key, None) is not None}
    qkv_bias = getattr(config, "model_type", None) == "qwen2" or bool(getattr(config, "attention_bias", False))
    options.update(
        causal=True, norm_type="rmsnorm", layer_norm_eps=config.rms_norm_eps, ff_glu=True, mlp_bias=bool(
            getattr(config, "mlp_bias", False)), attention_bias=qkv_bias, position_embedding_type="rotary",
        rope_parameters=dict(config.rope_parameters), attention_dropout=float(getattr(config, "attention_dropout", 0.0)),
        hidden_dropout=0.0, feature_redraw_interval=0,
    )
    for ours, theirs in (("feature_map", "performer_feature_map"), ("nb_features", "performer_nb_features"),
                         ("feature_map_kwargs", "performer_feature_map_kwargs"),
                         ("feature_seed", "performer_feature_seed"), ("attention_chunk_size", "performer_chunk_size"),
                         ("hybrid_window_size", "performer_window_size")):
        value = getattr(config, theirs, None)
        if value is not None:
            options[ours] = value
    options.update(performer_options)
    return PerformerConfig(**options)


@torch.no_grad()
def convert_llama_to_performer(model: nn.Module, **performer_options) -> PerformerForCausalLM:
    """A ``PerformerForCausalLM`` with ``model``'s weights (a ``LlamaForCausalLM``, ``MistralForCausalLM`` or
    ``Qwen2ForCausalLM``); see ``performer_config_from_llama`` for the options. The host model is not changed."""
    config = performer_config_from_llama(model.config, **performer_options)
    host = model.model
    dtype = host.embed_tokens.weight.dtype
    performer = PerformerForCausalLM(config).to(dtype)
    ours = performer.model
    ours.embed_tokens.weight.copy_(host.embed_tokens.weight)
    ours.norm.weight.copy_(host.norm.weight)
    for theirs, layer in zip(host.layers, ours.layers):
        attention, mlp = theirs.self_attn, theirs.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            source, target = getattr(attention, name), getattr(layer.self_attn, name)
            target.weight.copy_(source.weight)
            if target.bias is not None:  # Qwen2 has q/k/v biases but none on o_proj: that one stays 0
                target.bias.copy_(source.bias if source.bias is not None else torch.zeros_like(target.bias))
        # ours: up_proj -> [value | gate], out = value * act(gate); theirs: down(act(gate(x)) * up(x))
        layer.mlp.up_proj.weight.copy_(torch.cat([mlp.up_proj.weight, mlp.gate_proj.weight], dim=0))
        if layer.mlp.up_proj.bias is not None:
            layer.mlp.up_proj.bias.copy_(torch.cat([mlp.up_proj.bias, mlp.gate_proj.bias], dim=0))
        layer.mlp.down_proj.weight.copy_(mlp.down_proj.weight)
        if layer.mlp.down_proj.bias is not None:
            layer.mlp.down_proj.bias.copy_(mlp.down_proj.bias)
        layer.attn_norm.weight.copy_(theirs.input_layernorm.weight)
        layer.mlp_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        kernel = getattr(attention, "performer_kernel", None)  # trained by attention transfer, if any
        if kernel is not None and layer.self_attn.feature_map is not None:
            layer.self_attn.feature_map.load_state_dict(kernel.feature_map.state_dict())
            window_factor = getattr(kernel, "window_factor", None)
            if window_factor is not None and getattr(layer.self_attn, "window_factor", None) is not None:
                layer.self_attn.window_factor.copy_(window_factor)
    if not config.tie_word_embeddings:
        performer.lm_head.weight.copy_(model.lm_head.weight)
    return performer.eval() if not model.training else performer


__all__ = ["NATIVE_MODEL_TYPES", "convert_llama_to_performer", "converts_natively", "performer_config_from_llama"]
