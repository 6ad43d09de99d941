"""Convert a performer-pytorch ``PerformerLM`` (github.com/lucidrains/performer-pytorch) into ``PerformerForCausalLM``.

    model = convert_performer_pytorch("lm.pt", dict(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8,
                                                    dim_head=64, causal=True))
    model.save_pretrained("performer-hf")

or from the shell: ``hf-performer-convert --checkpoint lm.pt --kwargs kwargs.json --output performer-hf``.

What converts (every causal ``PerformerLM`` except the options listed under "Refused"):

- positions: ``rotary_position_emb=True`` (the default): performer-pytorch rotates adjacent pairs (2i, 2i+1) of the
  global heads' q/k, this model half-split pairs (i, i + d/2) with the same frequencies, so the global heads' q/k
  rows and the projection columns are permuted (q.k and the features are unchanged); its fixed [sin | cos] input
  embedding is ``sinusoidal_position_embedding=True`` (same table, bit for bit). Learned absolute positions; axial
  positions (performer-pytorch sums one learned table per axis; the sum is materialised into an absolute table of
  ``max_seq_len`` rows, identical at inference). ``max_seq_len`` becomes ``max_position_embeddings``.
- local heads (``local_attn_heads``, an int or one per layer; the last heads of a layer, as here):
  ``local_window_type="blocked"`` (local-attention's windows: the query's block of ``local_window_size`` tokens and
  the previous block, causal inside; softmax scale d^-0.5; autopad to a multiple of the window only appends keys
  no query can see) with local-attention's rotary on those heads: half-split pairs, frequencies 1 / 10000^(2i/d),
  no xpos (``local_rotary`` when ``rotary_position_emb=False``; with rotary positions this model's rotary covers
  every head, so the local heads get that one rotary, and their q/k rows are not permuted). local-attention rotates
  a block's queries by positions W..2W-1 and the keys [previous block | own block] by 0..2W-1: every query-key
  distance is the absolute one, and rotary scores depend on the distance only, so the absolute positions used here
  give the same scores (in fp32 rounding).
- norms: LayerNorm, ReZero, ScaleNorm (``g``; eps 1e-5 clamps ||x|| as performer-pytorch's ``PreScaleNorm``), with
  the final LayerNorm performer-pytorch always has.
- attention: q/k/v/out projections with their biases, the per-layer random projection matrices, FAVOR+ or the
  generalized (ReLU-type) kernels.
- feed-forward: GELU or GLU (halves swapped: performer-pytorch computes act(first half) * second half, this model
  hidden * act(gate) with the gate second), chunked feed-forward.
- token shift (``shift_tokens``) with any norm (the shift follows the pre-norm in both).
- output: tied embeddings, or the untied ``to_out`` with its bias (``lm_head_bias=True``).

Refused with a ``ValueError`` naming the option (see ``_check_supported``): ``causal=False`` (this is a causal LM),
``reversible``, ``cross_attend``, ``no_projection``, ``heads * dim_head != dim``, and checkpoints whose local
heads carry relative-position weights of another local-attention version or whose fixed position tables were
changed.

Numerics: performer-pytorch adds ``eps=1e-4`` to every FAVOR+ feature after stabilising keys with the maximum over
the whole sequence (and 1e-6 to the causal normaliser). The epsilon's weight relative to the true features
therefore depends on future tokens, which a causal model decoding token by token cannot reproduce; this model uses
the exact kernel (eps = 0). Logits agree to fp32 rounding when performer-pytorch's epsilons are set to 0, and to
within the epsilon's effect otherwise (see tests/integration/test_convert.py). Padding masks are not comparable either:
performer-pytorch zeroes padded values but keeps padded keys in the normaliser; this model removes them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from .configuration_performer import PerformerConfig
from .modeling_performer import PerformerForCausalLM

# performer_pytorch.PerformerLM's constructor defaults (v1.1.x).
PERFORMER_LM_DEFAULTS = dict(
    dim_head=64, local_attn_heads=0, local_window_size=256, causal=False, ff_mult=4, nb_features=None,
    feature_redraw_interval=1000, reversible=False, ff_chunks=1, ff_glu=False, emb_dropout=0.0, ff_dropout=0.0,
    attn_dropout=0.0, generalized_attention=False, kernel_fn="relu", use_scalenorm=False, use_rezero=False,
    cross_attend=False, no_projection=False, tie_embed=False, rotary_position_emb=True, axial_position_emb=False,
    axial_position_shape=None, auto_check_redraw=True, qkv_bias=False, attn_out_bias=False, shift_tokens=False,
)
REQUIRED = ("num_tokens", "max_seq_len", "dim", "depth", "heads")


def _kernel_fn_name(kernel_fn) -> str:
    """Our GeneralizedFeatureMap name for performer-pytorch's ``kernel_fn`` module (or its name)."""
    if isinstance(kernel_fn, str):
        name = kernel_fn.lower()
    elif isinstance(kernel_fn, nn.ReLU):
        name = "relu"
    elif isinstance(kernel_fn, nn.GELU) and kernel_fn.approximate == "none":
        name = "gelu"
    elif isinstance(kernel_fn, nn.Softplus) and kernel_fn.beta == 1 and kernel_fn.threshold == 20:
        name = "softplus"
    elif isinstance(kernel_fn, nn.Identity):
        name = "identity"
    else:
        name = None
    if name not in ("relu", "gelu", "softplus", "identity"):
        raise ValueError(f"kernel_fn={kernel_fn!r} is not supported; use nn.ReLU, nn.GELU, nn.Softplus or nn.Identity")
    return name


def normalise_kwargs(kwargs: dict) -> dict:
    """PerformerLM constructor arguments with performer-pytorch's defaults filled in."""
    unknown = sorted(set(kwargs) - set(PERFORMER_LM_DEFAULTS) - set(REQUIRED))
    if unknown:
        raise ValueError(f"unknown PerformerLM arguments: {unknown}")
    missing = [name for name in REQUIRED if name not in kwargs]
    if missing:
        raise ValueError(f"PerformerLM arguments {missing} are required to convert a checkpoint")
    return {**PERFORMER_LM_DEFAULTS, **kwargs}


def _local_heads(args: dict) -> list[int]:
    """Local heads per layer: performer-pytorch takes an int or a tuple (one entry, or one per layer); JSON lists
    are accepted too."""
    local = args["local_attn_heads"]
    counts = list(local) if isinstance(local, (tuple, list)) else [local]
    if len(counts) == 1:
        counts = counts * args["depth"]
    if len(counts) != args["depth"] or not all(
        isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= args["heads"] for count in counts
    ):
        raise ValueError(f"local_attn_heads={local!r} must be an int in [0, heads={args['heads']}] or one such int "
                         f"per layer (depth={args['depth']})")
    return counts


def _check_supported(args: dict) -> None:
    """Raise ValueError naming the first option whose behaviour PerformerForCausalLM cannot reproduce exactly."""
    def unsupported(option: str, why: str):
        raise ValueError(f"performer-pytorch option {option} is not supported by the conversion: {why}")

    if not args["causal"]:
        unsupported("causal=False", "PerformerForCausalLM is a causal language model")
    for option, why in (
        ("reversible", "reversible layers (RevNet residuals) are not implemented"),
        ("cross_attend", "PerformerForCausalLM has no encoder to cross-attend to"),
        ("no_projection", "softmax-normalised q/k without random features is not a feature map here"),
    ):
        if args[option]:
            unsupported(f"{option}=True", why)
    if args["dim_head"] * args["heads"] != args["dim"]:
        unsupported(f"dim_head={args['dim_head']}",
                    f"heads * dim_head must equal dim ({args['heads']} * {args['dim_head']} != {args['dim']})")
    _local_heads(args)


def performer_pytorch_config(kwargs: dict, **overrides) -> PerformerConfig:
    """The ``PerformerConfig`` of a ``PerformerLM(**kwargs)``."""
    args = normalise_kwargs(kwargs)
    _check_supported(args)
    rotary = bool(args["rotary_position_emb"])
    local = _local_heads(args)
    options = dict(
        vocab_size=args["num_tokens"],
        hidden_size=args["dim"],
        num_hidden_layers=args["depth"],
        num_attention_heads=args["heads"],
        ff_mult=args["ff_mult"],
        intermediate_size=args["dim"] * args["ff_mult"],
        ff_glu=args["ff_glu"],
        ff_chunks=args["ff_chunks"],
        hidden_act="gelu",  # nn.GELU(): the exact erf form
        # performer-pytorch's precedence: ScaleNorm, else ReZero, else LayerNorm; its final norm is always a
        # LayerNorm(dim), which is this model's final norm for all three.
        norm_type="scalenorm" if args["use_scalenorm"] else "rezero" if args["use_rezero"] else "layernorm",
        layer_norm_eps=1e-5,  # nn.LayerNorm's default and PreScaleNorm's eps
        attention_bias=bool(args["qkv_bias"] or args["attn_out_bias"]),
        mlp_bias=True,
        hidden_dropout=args["ff_dropout"],
        attention_dropout=args["attn_dropout"],
        embedding_dropout=args["emb_dropout"],
        causal=True,
        nb_features=args["nb_features"] or int(args["dim_head"] * math.log(args["dim_head"])),
        orthogonal_features=True,
        feature_norm_scaling="chi",
        feature_redraw_interval=args["feature_redraw_interval"] if args["auto_check_redraw"] else 0,
        # performer-pytorch feeds d^-0.25 * q and d^-0.25 * k to the kernel: this model's default scale.
        attention_scale=None,
        # Axial tables are materialised into an absolute one (see the module docstring).
        position_embedding_type="rotary" if rotary else "absolute",
        # performer-pytorch's rotary models also add a fixed [sin | cos] table to the token embeddings.
        sinusoidal_position_embedding=rotary,
        rope_theta=10000.0,
        max_position_embeddings=args["max_seq_len"],
        local_attn_heads=local[0] if len(set(local)) == 1 else local,
        local_window_size=args["local_window_size"],
        local_window_type="blocked",  # local-attention: own block + previous block
        # local-attention's own rotary on the local heads; with rotary positions ours covers every head already.
        local_rotary=any(local) and not rotary,
        shift_tokens=bool(args["shift_tokens"]),
        tie_word_embeddings=bool(args["tie_embed"]),
        lm_head_bias=not args["tie_embed"],  # to_out = nn.Linear(dim, num_tokens), bias included
    )
    if args["generalized_attention"]:
        options["feature_map"] = "generalized"
        options["feature_map_kwargs"] = {"kernel_fn": _kernel_fn_name(args["kernel_fn"]), "kernel_epsilon": 1e-3}
    else:
        options["feature_map"] = "favor+"
    options.update(overrides)
    return PerformerConfig(**options)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def _find(state_dict: dict, prefix: str, suffix: str) -> torch.Tensor:
    """The one tensor under ``prefix`` whose name ends with ``suffix`` (wrappers add ``fn.`` levels)."""
    matches = [key for key in state_dict if key.startswith(prefix) and key.endswith(suffix)]
    if len(matches) != 1:
        raise KeyError(f"expected one key {prefix}...{suffix} in the performer-pytorch state dict, found {matches}")
    return state_dict[matches[0]]


def _half_rotation_order(dim_head: int) -> torch.Tensor:
    """performer-pytorch rotates adjacent pairs (2i, 2i+1) (GPT-J layout); this model rotates (i, i + d/2) (GPT-NeoX
    layout), same frequencies and direction. Our dim j holds their dim order[j]: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, dim_head, 2), torch.arange(1, dim_head, 2)])


def _permute_heads(tensor: torch.Tensor, order: torch.Tensor, heads: int, count: int) -> torch.Tensor:
    """Reorder the output features of the first ``count`` heads of a (heads * d, ...) weight or (heads * d,) bias;
    the other heads are left as they are."""
    shape = tensor.shape
    per_head = tensor.reshape(heads, len(order), *shape[1:])
    return torch.cat([per_head[:count][:, order], per_head[count:]]).reshape(shape)


def _axial_table(state_dict: dict, length: int) -> torch.Tensor:
    """performer-pytorch's summed axial embedding, materialised: (length, dim). The last axis varies fastest."""
    weights = [state_dict[key] for key in sorted(
        (k for k in state_dict if k.startswith("pos_emb.weights.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if not weights:
        raise KeyError("axial_position_emb=True but the state dict has no pos_emb.weights.*")
    shape = [w.shape[1 + axis] for axis, w in enumerate(weights)]  # each weight is (1, 1.., s_a, ..1, dim)
    dim = weights[0].shape[-1]
    table = sum(w.expand(1, *shape, dim) for w in weights).reshape(math.prod(shape), dim)
    if table.shape[0] < length:
        raise ValueError(f"axial_position_shape {shape} covers {table.shape[0]} positions < max_seq_len={length}")
    return table[:length]


def _inv_freq(dim: int) -> torch.Tensor:
    """1 / 10000^(2i / dim): the frequencies of performer-pytorch's and local-attention's fixed tables (and ours)."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))


def _check_same(found: torch.Tensor | None, expected: torch.Tensor, key: str, option: str, why: str) -> None:
    """A fixed buffer of the checkpoint must be the table this model computes (it is recomputed, not loaded)."""
    if found is None:
        return
    tolerance = 2 * torch.finfo(found.dtype).eps if found.is_floating_point() else 0.0
    found = found.detach().float().cpu()
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=tolerance, atol=tolerance):
        raise ValueError(f"performer-pytorch option {option} is not supported for this checkpoint: {key} differs "
                         f"from the standard table, {why}")


def _check_rotary_tables(sd: dict, args: dict) -> None:
    """performer-pytorch stores its fixed sinusoid tables (FixedPositionalEmbedding: [sin | cos] of p / 10000^(2i/D))
    in the state dict; this model computes the same tables, so they must not have been changed."""
    positions = torch.arange(args["max_seq_len"], dtype=torch.float32)
    for key, dim in (("pos_emb.emb", args["dim"]), ("layer_pos_emb.emb", args["dim_head"])):
        angles = positions[:, None] * _inv_freq(dim)
        _check_same(sd.get(key), torch.cat([angles.sin(), angles.cos()], dim=-1), key, "rotary_position_emb=True",
                    "which sinusoidal_position_embedding / the rotary embedding cannot carry")


def _check_local_attention(sd: dict, prefix: str, dim_head: int, local: int) -> None:
    """performer-pytorch's local heads are local-attention ``LocalAttention(rel_pos_emb_config=(dim_head, heads))``:
    in local-attention 1.x as installed that is a half-split rotary with frequencies 1 / 10000^(2i/d), no xpos,
    whose only state is the ``rel_pos.inv_freq`` buffer. Anything else (e.g. learned relative-position weights of an
    older local-attention) has no counterpart here."""
    option = f"local_attn_heads={local}"
    keys = sorted(key[len(prefix):] for key in sd if key.startswith(prefix) and ".local_attn." in key)
    unexpected = [key for key in keys if not key.endswith("local_attn.rel_pos.inv_freq")]
    if unexpected or not keys:
        raise ValueError(
            f"performer-pytorch option {option} is not supported for this checkpoint: its local-attention state is "
            f"{keys or 'missing'}, while the conversion reproduces local-attention's rotary local heads, whose only "
            "state is local_attn.rel_pos.inv_freq"
        )
    _check_same(_find(sd, prefix, "local_attn.rel_pos.inv_freq"), _inv_freq(dim_head), f"{prefix}...inv_freq",
                option, "so local-attention's rotary frequencies are not local_rotary's")


def convert_state_dict(state_dict: dict, kwargs: dict) -> dict:
    """performer-pytorch ``PerformerLM`` weights -> ``PerformerForCausalLM`` weights (same math, our names)."""
    args = normalise_kwargs(kwargs)
    _check_supported(args)
    sd = {key: value for key, value in state_dict.items() if not key.startswith("performer.proj_updater.instance.")}
    dim, heads, dim_head, inner = args["dim"], args["heads"], args["dim_head"], args["dim"] * args["ff_mult"]
    local_heads = _local_heads(args)
    out = {"model.embed_tokens.weight": sd["token_emb.weight"]}
    rotary = args["rotary_position_emb"]
    if rotary:
        _check_rotary_tables(sd, args)
        order = _half_rotation_order(dim_head)
    elif args["axial_position_emb"]:
        out["model.embed_positions.weight"] = _axial_table(sd, args["max_seq_len"])
    else:
        out["model.embed_positions.weight"] = sd["pos_emb.emb.weight"]
    zeros = torch.zeros(dim, dtype=sd["token_emb.weight"].dtype)

    for i in range(args["depth"]):
        attn, ff = f"performer.net.layers.{i}.0.", f"performer.net.layers.{i}.1."
        ours = f"model.layers.{i}."
        global_heads = heads - local_heads[i]
        for theirs, name in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "o_proj")):
            out[f"{ours}self_attn.{name}.weight"] = _find(sd, attn, f"{theirs}.weight")
            if args["qkv_bias"] or args["attn_out_bias"]:
                has_bias = args["attn_out_bias"] if theirs == "to_out" else args["qkv_bias"]
                # One attention_bias flag here: a bias performer-pytorch does not have becomes a zero bias.
                out[f"{ours}self_attn.{name}.bias"] = _find(sd, attn, f"{theirs}.bias") if has_bias else zeros
        if rotary and global_heads:
            # The global heads' q and k are permuted the same way, so q.k is unchanged; the projection sees the
            # permuted vectors, so its columns move with them. The local heads are left alone: local-attention's
            # rotary already pairs (i, i + d/2), as this model's.
            for name in ("q_proj", "k_proj"):
                for kind in ("weight", "bias"):
                    key = f"{ours}self_attn.{name}.{kind}"
                    if key in out:
                        out[key] = _permute_heads(out[key], order, heads, global_heads)
        if global_heads:  # a layer of local heads only has an unused FastAttention in performer-pytorch
            projection = _find(sd, attn, "fast_attention.projection_matrix")  # (m, d)
            out[f"{ours}self_attn.feature_map.projection"] = projection[:, order] if rotary else projection
        if local_heads[i]:
            _check_local_attention(sd, attn, dim_head, local_heads[i])

        w1, b1 = _find(sd, ff, "w1.weight"), _find(sd, ff, "w1.bias")
        if args["ff_glu"]:
            # performer-pytorch: act(first half) * second half; ours: first half * act(second half).
            w1 = torch.cat([w1[inner:], w1[:inner]])
            b1 = torch.cat([b1[inner:], b1[:inner]])
        out[f"{ours}mlp.up_proj.weight"], out[f"{ours}mlp.up_proj.bias"] = w1, b1
        out[f"{ours}mlp.down_proj.weight"] = _find(sd, ff, "w2.weight")
        out[f"{ours}mlp.down_proj.bias"] = _find(sd, ff, "w2.bias")

        if args["use_scalenorm"]:  # PreScaleNorm: x / clamp(||x||, min=1e-5) * g, g of shape (1,); ours is 0-dim
            out[f"{ours}attn_norm.g"] = sd[f"{attn}g"].reshape(())
            out[f"{ours}mlp_norm.g"] = sd[f"{ff}g"].reshape(())
        elif args["use_rezero"]:
            out[f"{ours}rezero_attn"] = sd[f"{attn}g"].reshape(1)
            out[f"{ours}rezero_mlp"] = sd[f"{ff}g"].reshape(1)
        else:
            for branch, name in ((attn, "attn_norm"), (ff, "mlp_norm")):
                out[f"{ours}{name}.weight"] = sd[f"{branch}norm.weight"]
                out[f"{ours}{name}.bias"] = sd[f"{branch}norm.bias"]

    out["model.norm.weight"], out["model.norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    if args["tie_embed"]:
        out["lm_head.weight"] = sd["token_emb.weight"]
    else:
        out["lm_head.weight"], out["lm_head.bias"] = sd["to_out.weight"], sd["to_out.bias"]
    return out


def _load_checkpoint(checkpoint) -> dict:
    """A state dict from a dict, an ``nn.Module`` or a ``torch.save`` file (optionally wrapped in
    ``{"state_dict": ...}`` / ``{"model": ...}``)."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, (str, Path)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a state dict, a module or a checkpoint path, got {type(checkpoint).__name__}")
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict) and "token_emb.weight" not in checkpoint:
            checkpoint = checkpoint[wrapper]
    return checkpoint


def convert_performer_pytorch(checkpoint, kwargs: dict, *, dtype: torch.dtype | None = None,
                              **config_overrides) -> PerformerForCausalLM:
    """Build the ``PerformerForCausalLM`` equivalent of ``PerformerLM(**kwargs)`` with the given weights.

    ``checkpoint``: the ``PerformerLM`` itself, its ``state_dict()``, or the path of a ``torch.save``-d state dict.
    ``kwargs``: the ``PerformerLM`` constructor arguments (``kernel_fn`` may be given by name, e.g. ``"relu"``).
    ``config_overrides`` go to ``PerformerConfig`` (e.g. ``attention_chunk_size``).
    """
    config = performer_pytorch_config(kwargs, **config_overrides)
    model = build_model(config, convert_state_dict(_load_checkpoint(checkpoint), kwargs))
    return model.to(dtype) if dtype is not None else model


def build_model(config: PerformerConfig, weights: dict) -> PerformerForCausalLM:
    """``PerformerForCausalLM(config)`` holding exactly ``weights`` (every parameter and buffer accounted for)."""
    model = PerformerForCausalLM(config)
    weights = {key: value.to(torch.float32) for key, value in weights.items()}
    weights["model.feature_redraws"] = model.model.feature_redraws
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"conversion produced a mismatched state dict: missing {missing}, unexpected {unexpected}")
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-performer-convert",
        description="Convert a performer-pytorch PerformerLM checkpoint into a Hugging Face PerformerForCausalLM.",
    )
    parser.add_argument("--checkpoint", required=True, help="torch.save-d PerformerLM state dict")
    parser.add_argument("--kwargs", required=True,
                        help="PerformerLM constructor arguments: a JSON file or an inline JSON object "
                             '(kernel_fn by name, e.g. "relu")')
    parser.add_argument("--output", required=True, help="directory for save_pretrained")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    text = Path(args.kwargs).read_text() if Path(args.kwargs).is_file() else args.kwargs
    model = convert_performer_pytorch(args.checkpoint, json.loads(text), dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.output)
    print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters) "
          f"to {args.output}")


__all__ = ["build_model", "convert_performer_pytorch", "convert_state_dict", "performer_pytorch_config", "main"]

if __name__ == "__main__":
    main()
