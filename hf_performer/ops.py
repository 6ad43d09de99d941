"""Linear (kernel) attention math: plain functions of tensors, free of any Hugging Face plumbing.

Notation: B batch, H heads, N query length, S key length, m features, d head dim, C chunk length.
Inputs are feature-mapped queries ``q`` (B, H, N, m) and keys ``k`` (B, H, S, m), values ``v`` (B, H, S, d).

Exponential feature maps hand over keys divided by a per-token scale, ``k_true = k * exp(k_log_scale)``. Causal
sums carry that scale with a running maximum c_t = max_{u<=t} log_scale_u: the state is kept as
sum_u k_true_u v_u^T * exp(-c_t) and rescaled by exp(c_{t-1} - c_t) when the maximum grows (the online-softmax trick
of arXiv 1805.02867 applied to kernel sums). The factor exp(-c_t) is common to the numerator and the normaliser of
query t, so it cancels exactly, and it depends only on keys u <= t, so a token-by-token decoder computes the same
numbers as the chunked training pass. ``k_log_scale`` is a constant here (the feature maps detach it): no gradient
flows to it, and none is needed, since the scale cancels.

The recurrent state is one tensor ``kv`` (B, H, m, d + 1): the last column is the normaliser sum_u phi(k_u), kept
next to sum_u phi(k_u) v_u^T so both come out of the same matmul, plus ``log_scale`` (B, H) for exponential maps.

Four algorithms, one result (``implementation=``):
  * ``quadratic``: build the kernelised (N, S) attention matrix, as TF ``KernelAttention(is_short_seq=True)``;
    O(N S (m + d)) time, O(N S) memory, cheapest for short inputs and for decoding one token.
  * ``chunked``: causal attention in chunks of C tokens, exact inside a chunk with a masked (C, C) product and a
    running (m, d + 1) state across chunks (arXiv 2006.16236 sec. 3.3 for the recurrence; the chunked form follows
    arXiv 2202.10447 sec. 4 and flash-linear-attention). Custom ops, forward and backward: the backward
    recomputes every per-chunk quantity from q, k, v and one saved state per block of chunks, so training memory is
    O(N (m + d)) and no (N, m, d) tensor ever exists. Non-causal attention is the same sum without masks, O(N m d).
  * ``auto``: whichever of the two a flop count says is cheaper for these N, m, d (``choose_implementation``).
  * ``triton``: the chunked algorithm as fused Triton kernels (``ops_triton.py``), the state kept in registers; what
    ``auto`` runs instead of ``chunked`` on CUDA tensors when Triton is installed.
All accumulate in float32 (float64 for float64 inputs) whatever the input dtype.

This file is the public API and the dispatch between them; each path sits in its own file next to the float64
O(N^2) reference they are all tested against (flat, so a checkpoint's remote-code copy gets every file):
  * ``ops_common.py``: NEG_LOG_SCALE, the State type, small helpers, exponential projection features;
  * ``ops_naive.py``: ``naive_kernel_attention``, the reference;
  * ``ops_quadratic.py``: the quadratic path;
  * ``ops_chunked.py``: the chunked path, two custom ops (given features / exponential features computed inside);
  * ``ops_triton.py``: the Triton kernels (imported only when used).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops_chunked import chunked_causal_attention, chunked_exp_attention
from .ops_decode import exp_decode_step
from .ops_common import (  # noqa: F401  (re-exported: the feature maps, tests and benchmarks import them from here)
    NEG_LOG_SCALE,
    ExpProjectionFeatures,
    State,
    _append_ones,
    _compute_dtype,
    _mask_keys,
    _normalise,
    empty_state,
)
from .ops_naive import naive_kernel_attention  # noqa: F401  (re-exported)
from .ops_quadratic import quadratic_attention

IMPLEMENTATIONS = ("auto", "chunked", "quadratic", "triton")


# ----------------------------------------------------------------------------------------------------------------
# Choosing an algorithm
# ----------------------------------------------------------------------------------------------------------------


def choose_implementation(
    length: int, key_length: int, num_features: int, head_dim: int, *, causal: bool, chunk_size: int = 64
) -> str:
    """``quadratic`` or ``chunked``, whichever needs fewer multiply-adds per head (TF KernelAttention's
    ``is_short_seq`` made automatic). Quadratic: N S (m + d + 1). Linear, bidirectional: (N + S) m (d + 1); causal,
    where every token also pays its chunk's masked (C, C) product: N (C (m + d + 1) + 2 m (d + 1))."""
    width = num_features + head_dim + 1
    quadratic = length * key_length * width
    if causal:
        chunk = min(chunk_size, length)
        linear = length * (chunk * width + 2 * num_features * (head_dim + 1))
    else:
        linear = (length + key_length) * num_features * (head_dim + 1)
    return "quadratic" if quadratic <= linear else "chunked"


def _resolve(implementation: str, *args, **kwargs) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    if torch.onnx.is_in_onnx_export() and kwargs.get("causal"):
        # ONNX cannot express the chunked custom op (a loop over the sequence with a running state): the exported
        # graph computes causal attention as the masked (N, N) kernel matrix, exactly, at O(N^2) cost.
        return "quadratic"
    if implementation != "auto":
        return implementation
    if torch.compiler.is_compiling():
        # Traced (torch.compile, torch.export): a choice by length would guard on the sequence length and
        # specialise the graph to it; the linear path is right for every length.
        return "chunked"
    return choose_implementation(*args, **kwargs)


def _use_triton(implementation: str, resolved: str, x: Tensor, num_features: int) -> bool:
    """The fused Triton kernels (``ops_triton.py``) run the chunked causal algorithm when asked for, and under
    ``auto`` for CUDA tensors when Triton is installed and m features fit the GPU's shared memory; the module (and
    Triton) is imported only then."""
    if implementation == "triton":
        return True
    if implementation != "auto" or resolved != "chunked" or not x.is_cuda:
        return False
    from .ops_triton import fits, usable

    return usable(x) and fits(x, num_features)


def _decode_fast_path(implementation: str, length: int, initial_state, q, k, v) -> bool:
    """One new token, a filled state and no gradient: ``ops_decode.exp_decode_step`` (what ``generate`` runs every
    step). Asking for ``triton`` keeps the kernels; gradients (training through a state) keep the general paths."""
    if length != 1 or initial_state is None or initial_state[1] is None or implementation == "triton":
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                            or initial_state[0].requires_grad))


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def linear_attention(q, k, v, *, k_log_scale=None, key_mask=None, implementation: str = "auto") -> torch.Tensor:
    """Non-causal kernel attention: phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1), O((N + S) m d) time and
    O((N + S)(m + d)) memory; ``quadratic`` builds the (N, S) matrix instead (cheaper for short inputs)."""
    impl = _resolve(implementation, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], causal=False)
    # "triton": non-causal attention is two plain matmuls, already fused enough; it takes the linear path.
    if impl == "quadratic":
        k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
        return quadratic_attention(q, k, v, causal=False, k_log_scale=k_log_scale, initial_state=None)[0]
    return linear_attention_output(q, kernel_sums(k, v, k_log_scale=k_log_scale, key_mask=key_mask)).to(v.dtype)


def kernel_sums(k, v, *, k_log_scale=None, key_mask=None) -> torch.Tensor:
    """[sum_u phi(k_u) v_u^T | sum_u phi(k_u)] (B, H, m, d + 1) over the real keys, in float32: the whole key side
    of non-causal kernel attention, which cross-attention computes once per encoded sequence. With key log scales
    the sums are taken at the row's largest scale (a common factor, which cancels in the normaliser)."""
    ct = _compute_dtype(k.dtype)
    v_aug = _append_ones(v.to(ct))  # (B, H, S, d+1)
    # Key scales and the mask weigh the (S, d+1) values rather than the (S, m) keys: fewer numbers to touch.
    weight = None
    if k_log_scale is not None:
        log_scale = k_log_scale.to(ct)
        if key_mask is not None:
            log_scale = log_scale.masked_fill(~key_mask[:, None, :].bool(), NEG_LOG_SCALE)
        weight = torch.exp(log_scale - log_scale.amax(dim=-1, keepdim=True))  # (B, H, S): one shift per row cancels
    if key_mask is not None:
        keep = key_mask[:, None, :].to(ct)  # (B, 1, S)
        weight = keep if weight is None else weight * keep
    if weight is not None:
        v_aug = v_aug * weight.unsqueeze(-1)
    return k.to(ct).transpose(-1, -2) @ v_aug  # (B, H, m, d+1)


def linear_attention_output(q, kv: torch.Tensor) -> torch.Tensor:
    """Queries' features (B, H, N, m) against ``kernel_sums`` (B, H, m, d + 1): (B, H, N, d) in float32."""
    return _normalise(q.to(kv.dtype) @ kv)


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_log_scale: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[torch.Tensor, State]:
    """Causal kernel attention; returns the output (B, H, N, d) and the state after the last token, from which
    a later call (decoding) continues with ``initial_state``.

    ``implementation``: ``chunked`` (O(N C (m + d) + N m d) time, O(N (m + d)) memory, forward and backward; C = 64
    measured fastest on CPU, see benchmarks/bench_attention.py), ``quadratic`` (the masked (N, N) matrix; what
    decoding one token uses under ``auto``), ``triton`` (the chunked algorithm as fused Triton kernels,
    ``ops_triton.py``; CUDA; every call, one-token decoding included) or ``auto`` (the cheaper of chunked and
    quadratic by ``choose_implementation``, chunked through the Triton kernels on CUDA when Triton is installed and
    the features fit the GPU's shared memory). Gradients reach q, k, v and ``initial_state``'s kv; ``k_log_scale``
    is treated as a constant (the feature maps detach it).
    """
    batch, heads, length, num_features = q.shape
    head_dim = v.shape[-1]
    stabilised = k_log_scale is not None
    if initial_state is not None and stabilised != (initial_state[1] is not None):
        raise ValueError("initial_state and k_log_scale disagree on whether the features are stabilised")
    if initial_state is None:
        initial_state = empty_state(batch, heads, num_features, head_dim, stabilised, q.device)
    if length == 0:
        return v.new_zeros(batch, heads, 0, head_dim), initial_state
    k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
    impl = _resolve(implementation, length, length, num_features, head_dim, causal=True, chunk_size=chunk_size)
    if impl == "quadratic":
        return quadratic_attention(q, k, v, causal=True, k_log_scale=k_log_scale, initial_state=initial_state)
    kv0, c0 = initial_state
    chunk = max(1, min(chunk_size, length))
    if _use_triton(implementation, impl, q, num_features):
        from .ops_triton import causal_attention as triton_causal_attention

        out, kv, c_end = triton_causal_attention(q, k, v, k_log_scale, kv0, c0, chunk_size)
        return out, (kv, c_end)
    out, kv, c_end = chunked_causal_attention(q, k, v, k_log_scale, kv0, c0, chunk)
    return out, (kv, c_end)


def causal_exp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    norm_coef: float,
    logit_offset: float,
    key_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    chunk_size: int = 64,
    implementation: str = "auto",
) -> tuple[torch.Tensor, State]:
    """``causal_linear_attention`` on the features phi(x) = exp(x P^T - a |x|^2 + b) of q and k (B, H, N, d)
    (FAVOR+: a = 1/2, b = -log(m)/2), with ``projection`` P (m, d) a constant. Same result and state; but the chunked
    path computes the features inside its blocks, forward and backward, so no (B, H, N, m) feature tensor (nor its
    gradient) is ever allocated: on CPU that saves more time than the features' own matmuls cost."""
    if projection.requires_grad:
        raise ValueError("causal_exp_attention treats the projection as a constant; it got one that requires grad")
    length = q.shape[-2]
    if _decode_fast_path(implementation, length, initial_state, q, k, v):
        out, kv, c_end = exp_decode_step(q, k, v, projection, norm_coef, logit_offset, *initial_state, key_mask)
        return out, (kv, c_end)
    impl = _resolve(implementation, length, length, projection.shape[0], v.shape[-1], causal=True,
                    chunk_size=chunk_size)
    ct = _compute_dtype(q.dtype)
    use_triton = _use_triton(implementation, impl, q, projection.shape[0])
    if impl == "quadratic" or length == 0 or use_triton:
        # Features first: the quadratic path and the Triton kernels take them as inputs.
        q_features, _ = ExpProjectionFeatures.apply(q.to(ct), projection.to(ct), norm_coef, logit_offset)
        k_features, k_log_scale = ExpProjectionFeatures.apply(k.to(ct), projection.to(ct), norm_coef, logit_offset)
        impl = "triton" if use_triton else impl
        return causal_linear_attention(q_features, k_features, v, k_log_scale=k_log_scale, key_mask=key_mask,
                                       initial_state=initial_state, chunk_size=chunk_size, implementation=impl)
    batch, heads = q.shape[:2]
    if initial_state is None:
        initial_state = empty_state(batch, heads, projection.shape[0], v.shape[-1], True, q.device)
    kv0, c0 = initial_state
    if c0 is None:
        raise ValueError("initial_state has no log scale, but exponential features need one")
    chunk = max(1, min(chunk_size, length))
    out, kv, c_end = chunked_exp_attention(q, k, v, projection, key_mask, kv0, c0, chunk, norm_coef, logit_offset)
    return out, (kv, c_end)
