"""Shared test helpers: the one place a test imports from (``from helpers import ...``; ``tests/`` is on the path
through ``[tool.pytest.ini_options] pythonpath`` in pyproject.toml). No test imports another test file.

Fixtures live in ``conftest.py`` (``single_thread``, ``single_thread_per_module``, ``offline_hub``,
``make_config``); plain functions and constants live here:

* paths: ``TESTS``, ``REPO``, ``CHECKPOINTS``
* models: ``tiny_config``, ``seeded``, ``padded_batch``, ``in_float64``, ``expected_projection``,
  ``build_tokenizer`` (a small fast word-level tokenizer with BERT's special tokens)
* op inputs: ``features``, ``key_mask``, ``grads``, ``favor_inputs``, ``plain_favor``
* the cost model ``auto`` is checked against: ``multiply_adds``, ``expected_choice``
* references: ``hf_performer.ops.naive_kernel_attention`` (float64 O(N S) on given features) is the one op
  reference; ``kernel_attention_reference`` is the whole kernel attention, feature map included, built on it;
  ``hybrid_attention_reference`` is LoLCATs' window + kernel attention, dense from its formula
* the two-process run of integration/test_distributed.py (its worker script imports these): ``DISTRIBUTED_*``,
  ``distributed_model``, ``fsdp_batch``
"""

from __future__ import annotations

import copy
import textwrap
import math
from pathlib import Path

import torch

from hf_performer import PerformerConfig, PerformerForCausalLM
from hf_performer.feature_maps import feature_seed, gaussian_projection
from hf_performer.ops import naive_kernel_attention

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHECKPOINTS = TESTS / "data" / "checkpoints"


# -- models -----------------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> PerformerConfig:
    """A model small enough for CPU tests, large enough to have several heads and layers."""
    options = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        nb_features=16,
        max_position_embeddings=256,
        attention_chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    options.update(overrides)
    return PerformerConfig(**options)


def seeded(model_class, config, seed=0):
    """``model_class(config)`` in eval mode, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_class(config).eval()


def padded_batch(length=20, pads=(0, 7), vocab=97):
    """Random ids (B = len(pads), length) with ``pads[b]`` left-padding tokens in row b, and the attention mask."""
    ids = torch.randint(3, vocab, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def in_float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a module (same weights, same feature projections): the reference a float32 or
    low-precision run is compared with."""
    return copy.deepcopy(module).double()


def expected_projection(config: PerformerConfig, layer: int, redraws: int = 0) -> torch.Tensor:
    """What a model holds for one layer after ``redraws`` redraws: the Gaussian projection drawn from the documented
    seed ``feature_seed(config.feature_seed, layer, redraws)``, independently of the model code."""
    generator = torch.Generator().manual_seed(feature_seed(config.feature_seed, layer, redraws))
    return gaussian_projection(config.num_random_features, config.head_dim, orthogonal=config.orthogonal_features,
                               norm_scaling=config.feature_norm_scaling, generator=generator)


def load_example(name: str):
    """``examples/<name>.py`` as a module (they are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"examples_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"examples_{name}"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def build_tokenizer(vocab_size: int = 300):
    """A lowercase word-level tokenizer with BERT's special tokens and pair template, trained on
    ``pydoc_data.topics`` by the MLM example's own function: fast (offsets for the token-classification and
    question-answering pipelines)."""
    import pydoc_data.topics

    return load_example("train_mlm").train_word_tokenizer(pydoc_data.topics.topics.values(), vocab_size)


# -- op inputs --------------------------------------------------------------------------------------------------


def features(batch=2, heads=2, length=37, m=6, d=5, *, stabilised=True, spread=2.0, dtype=torch.float64, seed=0):
    """Positive features as the maps hand them over: keys divided by exp(log_scale), log scales detached."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, length, m, generator=g, dtype=dtype) + 0.05
    k = torch.rand(batch, heads, length, m, generator=g, dtype=dtype) + 0.05
    v = torch.randn(batch, heads, length, d, generator=g, dtype=dtype)
    log_scale = torch.randn(batch, heads, length, generator=g, dtype=dtype) * spread if stabilised else None
    return q, k, v, log_scale


def key_mask(batch, length, seed=0):
    """Random holes, and a left-padded row whose first chunks see no key at all."""
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[-1, : length // 3] = False
    return mask


def grads(fn, tensors, weight):
    """``fn(*tensors)`` and the gradients of ``(out * weight).sum()`` w.r.t. fresh leaf copies of the tensors."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    return out, torch.autograd.grad((out * weight).sum(), tensors)


def favor_inputs(batch=2, heads=2, length=37, d=5, m=7, *, spread=1.0, seed=0):
    """float64 q, k, v (B, H, N, d) and a projection (m, d) for the ops that compute exp features inside."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    projection = torch.randn(m, d, generator=g, dtype=torch.float64)
    return q * spread, k * spread, v, projection


def plain_favor(x, projection, norm_coef, offset):
    """exp(x P^T - a |x|^2 + b), unstabilised, straight from the definition (arXiv 2009.14794, Lemma 1)."""
    return torch.exp(x @ projection.T - norm_coef * (x * x).sum(-1, keepdim=True) + offset)


# -- the cost model behind implementation="auto" ---------------------------------------------------------------


def multiply_adds(n, s, m, d, *, causal, chunk_size=64):
    """The cost model ``auto`` checks (multiply-adds per head, written here from the docs, not from ops.py):
    quadratic N S (m + d + 1); chunked causal N (C (m + d + 1) + 2 m (d + 1)) with C = min(chunk_size, N);
    bidirectional linear (N + S) m (d + 1)."""
    width = m + d + 1
    quadratic = n * s * width
    if causal:
        linear = n * (min(chunk_size, n) * width + 2 * m * (d + 1))
    else:
        linear = (n + s) * m * (d + 1)
    return quadratic, linear


def expected_choice(n, s, m, d, *, causal, chunk_size=64):
    """The path the cost model counts fewer multiply-adds for ("quadratic" on a tie)."""
    quadratic, linear = multiply_adds(n, s, m, d, causal=causal, chunk_size=chunk_size)
    return "quadratic" if quadratic <= linear else "chunked"  # a tie goes to the quadratic path


# -- references -------------------------------------------------------------------------------------------------


def kernel_attention_reference(feature_map, q, k, v, *, scale=1.0, causal, key_mask=None):
    """The whole kernel attention in float64, feature map included: sum_j phi(q_i).phi(k_j) v_j /
    sum_j phi(q_i).phi(k_j) with phi(q), phi(k) the map's plain (unstabilised) ``kernel_features`` of q sqrt(scale)
    and k sqrt(scale), masked and future keys removed, through ``hf_performer.ops.naive_kernel_attention``.
    q, k, v: (B, H, N, d), (B, H, S, d), (B, H, S, d_v); returns (B, H, N, d_v). A query that sees no key gets 0."""
    root = math.sqrt(scale)
    phi_q, phi_k = feature_map.kernel_features(q * root, k * root, key_mask=key_mask, causal=causal)
    return naive_kernel_attention(phi_q.double(), phi_k.double(), v.double(), causal=causal, key_mask=key_mask)


def hybrid_attention_reference(q, k, v, mask, *, window, causal, phi, qk_scale, softmax_scale=None, gate=None):
    """LoLCATs' hybrid attention (arXiv 2410.10254 sec. 3.2) from its formula, dense, in float64, for the N queries
    that are the last N of the S keys: W_i = the real keys in the window (causal pos_i - w < pos_j <= pos_i,
    bidirectional |pos_i - pos_j| < w), R_i = the other real keys (causal: only earlier ones), positions counting
    real tokens (``mask`` (B, S)); out_i = [g sum_W exp(s - m) v + (1 - g) sum_R phi(q).phi(k) v] / [same, v = 1],
    s = q.k * softmax_scale (None: d ** -0.5), m the row max over W, phi of q * qk_scale and k * qk_scale, g
    (h,) (None: 0.5). (B, h, N, d); a query that sees no key gets NaN (callers compare real queries only)."""
    q, k, v = q.double(), k.double(), v.double()
    heads, queries, dim = q.shape[1], q.shape[2], q.shape[-1]
    gate = torch.full((heads,), 0.5, dtype=torch.float64) if gate is None else gate.double()
    gate = gate.view(1, heads, 1, 1)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)
    distance = pos[:, None, -queries:, None] - pos[:, None, None, :]  # (B, 1, N, S): pos_i - pos_j
    real_key = mask.bool()[:, None, None, :]
    if causal:
        in_window = real_key & (distance >= 0) & (distance < window)
        other = real_key & (distance >= window)
    else:
        in_window = real_key & (distance.abs() < window)
        other = real_key & (distance.abs() >= window)
    scores = q @ k.transpose(-1, -2) * (dim**-0.5 if softmax_scale is None else softmax_scale)  # (B, h, N, S)
    row_max = scores.masked_fill(~in_window, float("-inf")).amax(-1, keepdim=True)
    exact = torch.exp((scores - row_max).masked_fill(~in_window, float("-inf")))
    kernel = (phi(q * qk_scale) @ phi(k * qk_scale).transpose(-1, -2)).masked_fill(~other, 0.0)
    weights = gate * exact + (1 - gate) * kernel
    return (weights @ v) / weights.sum(-1, keepdim=True)


# -- the two-process run of integration/test_distributed.py -------------------------------------------------------

DISTRIBUTED_CONFIG = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, nb_features=8,
                          attention_chunk_size=8, attention_implementation="chunked", feature_seed=5)
DDP_STEPS, DDP_ACCUMULATION, DDP_INTERVAL = 4, 2, 2
FSDP_STEPS, FSDP_INTERVAL, FSDP_BATCH, DISTRIBUTED_LENGTH = 3, 2, 2, 16


def distributed_model() -> PerformerForCausalLM:
    """The same initial weights in every process (the seed is set before the config, whose validation draws)."""
    torch.manual_seed(0)
    return PerformerForCausalLM(PerformerConfig(**DISTRIBUTED_CONFIG))


def fsdp_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, DISTRIBUTED_CONFIG["vocab_size"], (FSDP_BATCH, DISTRIBUTED_LENGTH),
                         generator=torch.Generator().manual_seed(1000 * step + rank))


# -- remote code ------------------------------------------------------------------------------------------------

# The first lines of a subprocess script that must load checkpoints with trust_remote_code=True as a user without
# hf_performer would: importing it fails (a meta-path finder refuses it), and the script checks that it does.
HIDE_HF_PERFORMER = textwrap.dedent(
    """
    import importlib.abc, sys, json, torch

    class HideHfPerformer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_performer" or name.startswith("hf_performer."):
                raise ImportError("hf_performer is hidden in this process")
            return None

    sys.meta_path.insert(0, HideHfPerformer())
    try:
        import hf_performer  # noqa
        raise SystemExit("hf_performer should not be importable here")
    except ImportError:
        pass
    """
)
