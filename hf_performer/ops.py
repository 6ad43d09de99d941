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
    arXiv 2202.10447 sec. 4 and flash-linear-attention). Forward and backward are one custom op each: the backward
    recomputes every per-chunk quantity from q, k, v and one saved state per block of chunks, so training memory is
    O(N (m + d)) and no (N, m, d) tensor ever exists. Non-causal attention is the same sum without masks, O(N m d).
  * ``auto``: whichever of the two a flop count says is cheaper for these N, m, d (``choose_implementation``).
  * ``triton``: the chunked algorithm as fused Triton kernels (``triton_ops.py``), the state kept in registers; what
    ``auto`` runs instead of ``chunked`` on CUDA tensors when Triton is installed.
All accumulate in float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Log scale given to masked or absent keys: exp(NEG_LOG_SCALE - c) == 0 for any real c, and stays finite.
NEG_LOG_SCALE = -1e30

State = tuple[torch.Tensor, torch.Tensor | None]  # (kv (B, H, m, d+1) fp32, log_scale (B, H) fp32 or None)

IMPLEMENTATIONS = ("auto", "chunked", "quadratic", "triton")

# A block runs without per-query scales when every query's running max of key log scales is within this many nats of
# the max at the end of its chunk (nearly always); the fp32 range left to the normaliser is then exp(-87 + FAST_SPAN).
FAST_SPAN = 20.0

# Tokens (summed over heads) handled per step of the chunk loop: the block's features and (C, C) scores stay in the
# CPU's cache, which doubles the speed of the small batched matmuls compared with one pass over the whole sequence.
# The backward's per-block temporaries (features, state gradients, scores) are what must fit: 2048 tokens measured
# 5-9% faster forward + backward than 4096 at m = 128, d = 64 on one thread (1024 about the same as 2048, more blocks).
BLOCK_TOKENS = 2048



def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d + 1): a column of ones turns k^T v into [k^T v | sum k]."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _safe(normaliser: torch.Tensor) -> torch.Tensor:
    """A query that sees no key at all has normaliser 0; dividing by 1 instead makes its output 0."""
    return torch.where(normaliser.abs() > 1e-30, normaliser, torch.ones_like(normaliser))


def _output_gradients(grad_out: Tensor, out: Tensor, normaliser: Tensor) -> tuple[Tensor, Tensor]:
    """out = numerator / z: d numerator = dy / z and dz = -(dy . out) / z, 0 where the output was forced to 0.
    grad_out, out (..., d), normaliser (..., 1) -> (..., d), (..., 1)."""
    safe = _safe(normaliser)
    d_normaliser = (grad_out * out).sum(-1, keepdim=True).div_(safe).mul_(normaliser.abs() > 1e-30).neg_()
    return grad_out / safe, d_normaliser


def _normalise(out_aug: torch.Tensor) -> torch.Tensor:
    """Split [numerator | normaliser] and divide."""
    return out_aug[..., :-1] / _safe(out_aug[..., -1:])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_keys(k, k_log_scale, key_mask):
    """Zero masked keys and push their log scale to NEG_LOG_SCALE so they affect neither sums nor maxima."""
    if key_mask is None:
        return k, k_log_scale
    keep = key_mask[:, None, :].to(torch.bool)  # (B, 1, S)
    k = k * keep.unsqueeze(-1).to(k.dtype)
    if k_log_scale is not None:
        k_log_scale = k_log_scale.masked_fill(~keep, NEG_LOG_SCALE)
    return k, k_log_scale


def empty_state(batch: int, heads: int, num_features: int, head_dim: int, stabilised: bool, device) -> State:
    kv = torch.zeros(batch, heads, num_features, head_dim + 1, device=device, dtype=torch.float32)
    log_scale = torch.full((batch, heads), NEG_LOG_SCALE, device=device) if stabilised else None
    return kv, log_scale


# ----------------------------------------------------------------------------------------------------------------
# Exponential features of a projection, computed where they are used
# ----------------------------------------------------------------------------------------------------------------


def exp_projection_features(x: Tensor, projection: Tensor, norm_coef: float, offset: float) -> tuple[Tensor, Tensor]:
    """Stabilised features of logits = x P^T - a |x|^2 + b (FAVOR+ and its relatives, arXiv 2009.14794 Lemma 1):
    x (..., d), P (m, d) -> exp(x P^T - max_j (x P^T)_j) (R, m) and log_scale = max_j (x P^T)_j - a |x|^2 + b (R,),
    R = x[..., 0].numel(), so that features * exp(log_scale) = exp(logits). Three passes, no autograd."""
    rows = x.reshape(-1, x.shape[-1])  # (R, d)
    logits = rows @ projection.t()  # (R, m)
    row_max = logits.amax(dim=-1, keepdim=True)  # (R, 1)
    features = logits.sub_(row_max).exp_()  # (R, m), in place: the logits are not needed again
    log_scale = row_max.squeeze(-1) + offset  # (R,)
    if norm_coef:
        log_scale = log_scale - norm_coef * rows.square().sum(dim=-1)
    return features, log_scale


def exp_projection_backward(grad_features: Tensor, features: Tensor, x: Tensor, projection: Tensor,
                            norm_coef: float) -> Tensor:
    """Gradient w.r.t. x of exp(logits - sg(log_scale)) (the log scale is a constant, see ``FeatureMap``):
    dx = (G * f) P - 2 a x sum_j (G * f)_j; shapes as ``exp_projection_features``, result (R, d)."""
    rows = x.reshape(-1, x.shape[-1])  # (R, d)
    features = features.reshape(rows.shape[0], -1)  # (R, m)
    grad_logits = grad_features.reshape(features.shape) * features  # (R, m)
    grad_rows = grad_logits @ projection  # (R, d)
    if norm_coef:
        grad_rows.addcmul_(rows, grad_logits.sum(dim=-1, keepdim=True), value=-2.0 * norm_coef)
    return grad_rows


class ExpProjectionFeatures(torch.autograd.Function):
    """``exp_projection_features`` with its gradient, as one autograd node: composing the same from torch ops takes
    ~10 passes over the (R, m) features and their gradient, this takes 3 forward and 3 backward."""

    @staticmethod
    def forward(ctx, x, projection, norm_coef: float, offset: float):
        features, log_scale = exp_projection_features(x, projection, norm_coef, offset)
        ctx.save_for_backward(x, features, projection)
        ctx.norm_coef = norm_coef
        ctx.mark_non_differentiable(log_scale)
        return features.view(*x.shape[:-1], -1), log_scale.view(x.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_features, grad_log_scale):
        x, features, projection = ctx.saved_tensors
        grad_x = exp_projection_backward(grad_features, features, x, projection, ctx.norm_coef)
        return grad_x.view(x.shape), None, None, None


class _Features:
    """What the chunked op needs to compute exp-projection features block by block (``causal_exp_attention``):
    P (m, d), a, b, and which keys are real ((G, Np) bool, padding of the last chunk included)."""

    def __init__(self, projection: Tensor, norm_coef: float, offset: float, keep: Tensor):
        self.projection, self.norm_coef, self.offset, self.keep = projection, norm_coef, offset, keep

    def queries(self, x: Tensor) -> Tensor:
        return exp_projection_features(x, self.projection, self.norm_coef, self.offset)[0]

    def keys(self, x: Tensor, heads: slice, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Masked key features (R, m) and log scales (hb, T), NEG_LOG_SCALE at masked keys."""
        features, log_scale = exp_projection_features(x, self.projection, self.norm_coef, self.offset)
        keep = self.keep[heads, start:end]  # (hb, T)
        features.mul_(keep.reshape(-1, 1))
        return features, log_scale.view(keep.shape).masked_fill_(~keep, NEG_LOG_SCALE)

    def backward(self, grad_features: Tensor, features: Tensor, x: Tensor) -> Tensor:
        return exp_projection_backward(grad_features, features, x, self.projection, self.norm_coef)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def naive_kernel_attention(q, k, v, *, causal: bool, k_log_scale=None, key_mask=None) -> torch.Tensor:
    """O(N*S) reference in float64: A = q k_true^T, masked, row-normalised, times v. For tests only."""
    q, k, v = q.double(), k.double(), v.double()
    if k_log_scale is not None:
        k = k * torch.exp(k_log_scale.double()).unsqueeze(-1)
    scores = q @ k.transpose(-1, -2)  # (B, H, N, S)
    n, s = scores.shape[-2:]
    if causal:
        future = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(s - n + 1)
        scores = scores.masked_fill(future, 0.0)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), 0.0)
    normaliser = scores.sum(-1, keepdim=True)
    normaliser = torch.where(normaliser.abs() > 1e-300, normaliser, torch.ones_like(normaliser))
    return (scores @ v) / normaliser


# ----------------------------------------------------------------------------------------------------------------
# Choosing an algorithm
# ----------------------------------------------------------------------------------------------------------------


def choose_implementation(
    length: int, key_length: int, num_features: int, head_dim: int, *, causal: bool, chunk_size: int = 64
) -> str:
    """``quadratic`` or ``chunked``, whichever needs fewer multiply-adds per head (TF KernelAttention's
    ``is_short_seq`` made automatic). Quadratic: N S (m + d + 1). Linear: (N + S) m (d + 1) without a mask; with
    one, every token also pays a masked (C, C) product, N (C (m + d + 1) + 2 m (d + 1))."""
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
    return choose_implementation(*args, **kwargs) if implementation == "auto" else implementation


def _use_triton(implementation: str, resolved: str, x: Tensor, num_features: int) -> bool:
    """The fused Triton kernels (``triton_ops.py``) run the chunked causal algorithm when asked for, and under
    ``auto`` for CUDA tensors when Triton is installed and m features fit the GPU's shared memory; the module (and
    Triton) is imported only then."""
    if implementation == "triton":
        return True
    if implementation != "auto" or resolved != "chunked" or not x.is_cuda:
        return False
    from .triton_ops import fits, usable

    return usable(x) and fits(x, num_features)


# ----------------------------------------------------------------------------------------------------------------
# Quadratic ("short sequence") path: plain autograd
# ----------------------------------------------------------------------------------------------------------------


def _quadratic_attention(q, k, v, *, causal: bool, k_log_scale, initial_state: State | None):
    """Kernelised (N, S) attention matrix, masked and row-normalised; continues from ``initial_state`` if causal.

    Each query's keys are weighted by exp(log_scale_u - c_t) <= 1 with the same c_t as the chunked path (running
    maximum for causal, global maximum otherwise), so nothing overflows.
    """
    ct = _compute_dtype(q.dtype)
    q, k, v_aug = q.to(ct), k.to(ct), _append_ones(v.to(ct))
    length, key_length = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2)  # (B, H, N, S)
    future = None
    if causal:
        future = torch.ones(length, key_length, dtype=torch.bool, device=q.device).triu(key_length - length + 1)
    kv0, c0 = initial_state if initial_state is not None else (None, None)
    c = None
    if k_log_scale is not None:
        log_scale = k_log_scale.to(ct)  # (B, H, S)
        if causal:
            c = torch.cummax(log_scale, dim=-1).values  # (B, H, S)
            if c0 is not None:
                c = torch.maximum(c, c0.to(ct).unsqueeze(-1))
            exponent = log_scale.unsqueeze(-2) - c[..., -length:].unsqueeze(-1)  # (B, H, N, S)
            scores = scores * exponent.masked_fill(future, float("-inf")).exp()
        else:
            c = log_scale.amax(dim=-1, keepdim=True)  # (B, H, 1)
            scores = scores * torch.exp(log_scale - c).unsqueeze(-2)
    elif causal:
        scores = scores.masked_fill(future, 0.0)
    out_aug = scores @ v_aug  # (B, H, N, d+1)
    new_state = None
    if causal:
        if kv0 is None:
            kv0 = q.new_zeros(*q.shape[:2], q.shape[-1], v_aug.shape[-1])
        kv0 = kv0.to(ct)
        if c is None:
            out_aug = out_aug + q @ kv0
            new_state = (kv0 + k.transpose(-1, -2) @ v_aug, None)
        else:
            c_end = c[..., -1]  # (B, H)
            if c0 is not None:
                # The state is at scale c0; query t wants scale c_t >= c0.
                carry = torch.exp(c0.to(ct).unsqueeze(-1) - c[..., -length:])  # (B, H, N)
                out_aug = out_aug + (q @ kv0) * carry.unsqueeze(-1)
                kv0 = kv0 * torch.exp(c0.to(ct) - c_end)[..., None, None]
            k_end = k * torch.exp(log_scale - c_end.unsqueeze(-1)).unsqueeze(-1)  # (B, H, S, m)
            new_state = (kv0 + k_end.transpose(-1, -2) @ v_aug, c_end)
    return _normalise(out_aug).to(v.dtype), new_state


# ----------------------------------------------------------------------------------------------------------------
# Chunked causal path: one custom op forward, one backward
# ----------------------------------------------------------------------------------------------------------------


def _block_layout(groups: int, length: int, chunk: int) -> tuple[int, int]:
    """(heads per block, tokens per block) for about BLOCK_TOKENS tokens per block. A block is either whole
    sequences of several heads or part of one head's sequence, so its (X, C, .) chunk view never needs a copy."""
    if length <= BLOCK_TOKENS:
        return max(1, min(groups, BLOCK_TOKENS // length)), length
    return 1, max(1, BLOCK_TOKENS // chunk) * chunk


class _Block:
    """hb heads x nb chunks of C tokens (X = hb * nb chunks), with everything forward and backward share.

    Chunk i adds its own keys through a masked (C, C) product with ``values`` and earlier keys through the state
    entering it, E_i = alpha_i E_{i-1} + U_{i-1} with U_j = k_j^T ``state_values``_j. Three modes:

    * plain (no log scale): every scale is 1 and the weights are the causal mask.
    * fast (log scales, and every query's running max c_t within FAST_SPAN nats of its chunk's ce_i): chunk i is
      computed at the scale ce_i of its last token: its values carry exp(l_u - ce_i), E_i is at scale ce_i, and query
      t's numerator and normaliser both carry exp(c_t - ce_i) >= exp(-FAST_SPAN), which cancels in their ratio; so
      there are no (C, C) exponentials and no per-query scales. A chunk's keys join the state already at the next
      chunk's scale, exp(l_u - ce_{i+1}), so the scan is one fused op per chunk.
    * exact (otherwise): weights exp(l_u - c_t) <= 1, E_i at scale cp_i = ce_{i-1}, brought to query t by
      ``row_scale = exp(cp_i - c_t)`` <= 1. Nothing can overflow or lose range, whatever the log scales do.
    """

    def __init__(self, q, k, v, log_scale, c, c_start, heads: slice, start: int, end: int, chunk: int, ct,
                 features: _Features | None = None, fill_running_max: bool = False):
        """With ``features``, q and k are (G, Np, d) inputs of the feature map: their features are computed here,
        the keys' log scales written to ``log_scale`` (and, with ``fill_running_max``, the running max to ``c``)."""
        hb, nb = heads.stop - heads.start, (end - start) // chunk
        x = hb * nb
        self.hb, self.nb, self.chunk = hb, nb, chunk
        self.features = features
        if features is None:
            self.q = q[heads, start:end].to(ct).reshape(x, chunk, -1)  # (X, C, m), a view for fp32 inputs
            self.k = k[heads, start:end].to(ct).reshape(x, chunk, -1)  # (X, C, m)
        else:
            self.q_in, self.k_in = q[heads, start:end].to(ct), k[heads, start:end].to(ct)  # (hb, T, d)
            self.q = features.queries(self.q_in).view(x, chunk, -1)  # (X, C, m)
            k_features, key_log_scale = features.keys(self.k_in, heads, start, end)  # (hb*T, m), (hb, T)
            self.k = k_features.view(x, chunk, -1)  # (X, C, m)
            log_scale[heads, start:end] = key_log_scale
            if fill_running_max:
                running = torch.cummax(key_log_scale, dim=-1).values  # (hb, T)
                c[heads, start:end] = torch.maximum(running, c_start[heads].unsqueeze(-1))
        v_aug = _append_ones(v[heads, start:end].to(ct)).view(x, chunk, -1)  # (X, C, d+1)
        self.values = self.state_values = v_aug  # (X, C, d+1) of the intra-chunk product / of the state
        self.value_scale = self.state_scale = None  # (X, C, 1): what values / state_values carry beyond v_aug
        self.weights = self.row_scale = None
        # Scan: E_0 = alpha0 S, E_i = steps[i-1] E_{i-1} + U_{i-1} for i = 1 .. nb, E_nb the leaving state; None: 1.
        self.alpha0 = self.steps = None
        self.fast = log_scale is None
        if log_scale is None:
            return
        lb = log_scale[heads, start:end].to(ct).view(hb, nb, chunk)  # (hb, nb, C)
        cb = c[heads, start:end].to(ct).view(hb, nb, chunk)  # (hb, nb, C)
        c_start = c_start[heads]  # (hb,)
        ce = cb[..., -1]  # (hb, nb)
        gap = (ce.unsqueeze(-1) - cb).masked_fill_(cb <= NEG_LOG_SCALE / 2, 0.0)  # queries with no key yet: 0
        self.fast = bool(gap.max() <= FAST_SPAN)
        if self.fast:
            ce_next = torch.cat([ce[:, 1:], ce[:, -1:]], dim=-1)  # (hb, nb)
            self.value_scale = torch.exp(lb - ce.unsqueeze(-1)).view(x, chunk, 1)
            self.state_scale = torch.exp(lb - ce_next.unsqueeze(-1)).view(x, chunk, 1)
            self.values = v_aug * self.value_scale
            self.state_values = v_aug * self.state_scale
            self.alpha0 = torch.exp(c_start - ce[:, 0])[:, None, None]  # (hb, 1, 1)
            self.steps = torch.exp(ce - ce_next)[..., None, None]  # (hb, nb, 1, 1)
            return
        cp = torch.cat([c_start.unsqueeze(-1), ce[:, :-1]], dim=-1)  # (hb, nb)
        cp_next = torch.cat([ce[:, :-1], ce[:, -1:]], dim=-1)  # (hb, nb): cp_{i+1}, then the last token's
        self.state_scale = torch.exp(lb - ce.unsqueeze(-1)).view(x, chunk, 1)
        self.state_values = v_aug * self.state_scale
        # exp(-inf) and denormals are slow on CPU: clamp the future (u > t) to 0 before exp and mask it after.
        exponent = (lb.unsqueeze(-2) - cb.unsqueeze(-1)).clamp_(max=0.0)  # (hb, nb, C, C): l_u - c_t
        self.weights = exponent.exp_().view(x, chunk, chunk).tril_()
        self.row_scale = torch.exp(cp.unsqueeze(-1) - cb).view(x, chunk, 1)  # (X, C, 1)
        self.steps = torch.exp(cp - cp_next)[..., None, None]  # (hb, nb, 1, 1)

    def chunk_kv(self) -> Tensor:
        return self.k.transpose(-1, -2) @ self.state_values  # (X, m, d+1)

    def mask(self, scores: Tensor) -> Tensor:
        """Causal mask (and weights) of a (X, C, C) product, in place."""
        return scores.tril_() if self.weights is None else scores.mul_(self.weights)

    def scores(self) -> Tensor:
        return self.mask(self.q @ self.k.transpose(-1, -2))  # (X, C, C)

    def scan(self, kv: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """kv (X, m, d+1) per chunk and the block's entering state (hb, m, d+1) -> the state entering each chunk
        (X, m, d+1) and the state leaving the block (hb, m, d+1, at the last token's scale).

        One fused op per chunk on cache-sized rows: torch's cumsum over a non-last dimension is ~30x slower on
        CPU, and a cumsum at one common scale could overflow."""
        hb, nb = self.hb, self.nb
        kvs = kv.view(hb, nb, *kv.shape[1:]).unbind(1)
        states = kv.new_empty(hb, nb + 1, *kv.shape[1:])  # entering states, then the leaving one
        rows = states.unbind(1)
        if self.alpha0 is None:
            rows[0].copy_(state)
        else:
            torch.mul(state, self.alpha0, out=rows[0])
        steps = [None] * nb if self.steps is None else self.steps.unbind(1)
        for i in range(1, nb + 1):
            if steps[i - 1] is None:
                torch.add(rows[i - 1], kvs[i - 1], out=rows[i])
            else:
                torch.addcmul(kvs[i - 1], rows[i - 1], steps[i - 1], out=rows[i])
        return states[:, :nb].flatten(0, 1), rows[nb]

    def scan_backward(self, d_entering: Tensor, d_leaving: Tensor) -> tuple[Tensor, Tensor]:
        """Transpose of ``scan``: gradients w.r.t. the per-chunk kv (X, m, d+1) and the entering state (hb, ...)."""
        hb, nb = self.hb, self.nb
        d_rows = d_entering.view(hb, nb, *d_entering.shape[1:]).unbind(1)
        grads = d_entering.new_empty(hb, nb + 1, *d_entering.shape[1:])  # w.r.t. each E_i, all paths
        rows = grads.unbind(1)
        rows[nb].copy_(d_leaving)
        steps = [None] * nb if self.steps is None else self.steps.unbind(1)
        for i in range(nb, 0, -1):
            if steps[i - 1] is None:
                torch.add(d_rows[i - 1], rows[i], out=rows[i - 1])
            else:
                torch.addcmul(d_rows[i - 1], rows[i], steps[i - 1], out=rows[i - 1])
        d_state = rows[0] if self.alpha0 is None else rows[0] * self.alpha0
        return grads[:, 1:].flatten(0, 1), d_state  # U_{i-1} enters E_i with factor 1


def _running_max(log_scale, c0, ct):
    """(log_scale, c = max(c0, max_{u<=t} log_scale_u), c0), all (G, N) / (G,) and None without log scale."""
    if log_scale is None:
        return None, None, None
    log_scale, c0 = log_scale.to(ct), c0.to(ct)
    return log_scale, torch.maximum(torch.cummax(log_scale, dim=-1).values, c0.unsqueeze(-1)), c0


def _flatten_inputs(q, k, v, log_scale, chunk):
    """(G, Np, .) views of the inputs, padded to a whole number of chunks (a copy only when N % C != 0)."""
    batch, heads, length, m = q.shape
    g, pad = batch * heads, -length % chunk
    q, k, v = q.reshape(g, length, m), k.reshape(g, length, m), v.reshape(g, length, v.shape[-1])
    if log_scale is not None:
        log_scale = log_scale.reshape(g, length)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        if log_scale is not None:
            log_scale = F.pad(log_scale, (0, pad), value=NEG_LOG_SCALE)
    return q, k, v, log_scale


def _blocks(groups: int, length: int, chunk: int):
    """(heads slice, token-block index, start, end) in forward order: head groups outside, tokens inside."""
    hb, tokens = _block_layout(groups, length, chunk)
    for g0 in range(0, groups, hb):
        for index, start in enumerate(range(0, length, tokens)):
            yield slice(g0, min(groups, g0 + hb)), index, start, min(length, start + tokens)


def _feature_inputs(projection, key_keep, norm_coef, offset, groups, heads, length, padded, ct, device):
    """(_Features or None, log_scale and running-max buffers (G, Np)) for the fused-feature path."""
    if projection is None:
        return None, None, None
    keep = torch.zeros(groups, padded, dtype=torch.bool, device=device)
    if key_keep is None:
        keep[:, :length] = True
    else:  # (B, N) -> every head of its batch row
        keep[:, :length] = key_keep.to(torch.bool).repeat_interleave(heads, dim=0)
    features = _Features(projection.to(ct), norm_coef, offset, keep)
    log_scale = torch.empty(groups, padded, dtype=ct, device=device)
    return features, log_scale, torch.empty(groups, padded, dtype=ct, device=device)


def _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk, projection=None, key_keep=None, norm_coef=0.0,
                          offset=0.0):
    batch, heads, length, m_in = q.shape
    d = v.shape[-1]
    m = m_in if projection is None else projection.shape[0]
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, l3 = _flatten_inputs(q, k, v, log_scale, chunk)
    g, padded = q3.shape[:2]
    features, l_fused, c_fused = _feature_inputs(projection, key_keep, norm_coef, offset, g, heads, length, padded,
                                                  ct, q.device)
    if features is None:
        log_scale, c, c0 = _running_max(l3, None if c0 is None else c0.reshape(g), ct)
    else:  # log scales and their running max are filled in block by block
        log_scale, c, c0 = l_fused, c_fused, c0.reshape(g).to(ct)
    out = torch.empty(g, padded, d, dtype=v.dtype, device=v.device)
    normaliser = torch.empty(g, padded, dtype=ct, device=v.device)
    tokens = _block_layout(g, padded, chunk)[1]
    block_states = torch.empty(g, -(-padded // tokens), m, d + 1, dtype=ct, device=v.device)  # entering states
    kv0 = kv0.reshape(g, m, d + 1).to(ct)
    kv_end = torch.empty(g, m, d + 1, dtype=ct, device=v.device)
    for heads_, index, start, end in _blocks(g, padded, chunk):
        if start == 0:
            state = kv0[heads_]  # (hb, m, d+1), at scale c_start
        c_start = None if c is None else (c0 if start == 0 else c[:, start - 1])
        blk = _Block(q3, k3, v3, log_scale, c, c_start, heads_, start, end, chunk, ct, features, True)
        block_states[heads_, index] = state
        entering, state = blk.scan(blk.chunk_kv(), state)  # (X, m, d+1), (hb, m, d+1)
        out_aug = blk.q @ entering  # (X, C, d+1): what earlier chunks contribute
        if blk.row_scale is not None:
            out_aug.mul_(blk.row_scale)
        out_aug.baddbmm_(blk.scores(), blk.values)  # plus this chunk's own keys
        z = out_aug[..., -1:]  # (X, C, 1)
        normaliser[heads_, start:end] = z.reshape(blk.hb, -1)
        y = _workspace(out[heads_, start:end].view(-1, chunk, d), ct)
        torch.div(out_aug[..., :-1], _safe(z), out=y)
        _write_back(out[heads_, start:end], y)
        if end == padded:
            kv_end[heads_] = state
    c_end = c[:, -1] if c is not None else q.new_zeros(g, dtype=ct)
    if padded != length:
        out, normaliser = out[:, :length].contiguous(), normaliser[:, :length].contiguous()
    running_max = q.new_empty(0, dtype=ct) if c_fused is None else c_fused.view(batch, heads, padded)
    return (
        out.view(batch, heads, length, d),
        normaliser.view(batch, heads, length),
        kv_end.view(batch, heads, m, d + 1),
        c_end.reshape(batch, heads).clone(),
        block_states.view(batch, heads, -1, m, d + 1),
        running_max,
    )


def _chunked_backward_impl(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk,
                           projection=None, key_keep=None, norm_coef=0.0, offset=0.0, running_max=None):
    batch, heads, length, m_in = q.shape
    d = v.shape[-1]
    m = block_states.shape[-2]
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, l3 = _flatten_inputs(q, k, v, log_scale, chunk)
    g, padded = q3.shape[:2]
    pad = padded - length
    dy3, y3 = grad_out.reshape(g, length, d), out.reshape(g, length, d)
    z3 = normaliser.reshape(g, length)
    if pad:
        dy3, y3, z3 = F.pad(dy3, (0, 0, 0, pad)), F.pad(y3, (0, 0, 0, pad)), F.pad(z3, (0, pad))
    features, l_fused, _ = _feature_inputs(projection, key_keep, norm_coef, offset, g, heads, length, padded, ct,
                                           q.device)
    if features is None:
        log_scale, c, c0 = _running_max(l3, None if c0 is None else c0.reshape(g), ct)
    else:
        log_scale, c, c0 = l_fused, running_max.reshape(g, padded), c0.reshape(g).to(ct)
    states = block_states.reshape(g, -1, m, d + 1)
    dq = torch.empty(g, padded, m_in, dtype=q.dtype, device=q.device)
    dk = torch.empty(g, padded, m_in, dtype=k.dtype, device=k.device)
    dv = torch.empty(g, padded, d, dtype=v.dtype, device=v.device)
    d_kv0 = torch.empty(g, m, d + 1, dtype=ct, device=q.device)
    grad_kv = grad_kv.reshape(g, m, d + 1).to(ct)
    for heads_, index, start, end in reversed(list(_blocks(g, padded, chunk))):
        if end == padded:
            d_state = grad_kv[heads_]  # gradient w.r.t. the state leaving this block, (hb, m, d+1)
        c_start = None if c is None else (c0 if start == 0 else c[:, start - 1])
        blk = _Block(q3, k3, v3, log_scale, c, c_start, heads_, start, end, chunk, ct, features)
        x = blk.hb * blk.nb
        dy, y = dy3[heads_, start:end].to(ct).reshape(x, chunk, d), y3[heads_, start:end].to(ct).reshape(x, chunk, d)
        z = z3[heads_, start:end].reshape(x, chunk, 1)
        # y = numerator / z: d numerator = dy / z, dz = -(dy . y) / z (0 where the output was forced to 0).
        d_out = torch.cat(_output_gradients(dy, y, z), dim=-1)  # (X, C, d+1)
        d_out_scaled = d_out if blk.row_scale is None else d_out * blk.row_scale

        entering, _ = blk.scan(blk.chunk_kv(), states[heads_, index])  # (X, m, d+1)
        d_scores = blk.mask(d_out @ blk.values.transpose(-1, -2))  # (X, C, C): gradient w.r.t. q k^T
        d_entering = blk.q.transpose(-1, -2) @ d_out_scaled  # (X, m, d+1)
        d_kv, d_state = blk.scan_backward(d_entering, d_state)  # (X, m, d+1), (hb, m, d+1)

        # Each gradient is accumulated in place in its slice of the output (fp32 inputs) or in an fp32 scratch;
        # with fused features, the gradients w.r.t. the features go back through the feature map first.
        fused = features is not None
        d_q = _workspace(dq[heads_, start:end].view(x, chunk, -1), ct, fused, m)
        torch.bmm(d_out_scaled, entering.transpose(-1, -2), out=d_q).baddbmm_(d_scores, blk.k)
        d_k = _workspace(dk[heads_, start:end].view(x, chunk, -1), ct, fused, m)
        torch.bmm(blk.state_values, d_kv.transpose(-1, -2), out=d_k).baddbmm_(d_scores.transpose(-1, -2), blk.q)
        if fused:
            d_q = features.backward(d_q, blk.q, blk.q_in)  # (hb*T, d)
            d_k = features.backward(d_k, blk.k, blk.k_in)
        d_v = _workspace(dv[heads_, start:end].view(x, chunk, d), ct)
        torch.bmm(blk.scores().transpose(-1, -2), d_out[..., :d], out=d_v)  # through this chunk's product
        if blk.value_scale is not None:
            d_v.mul_(blk.value_scale)
        through_state = blk.k @ d_kv[..., :d]  # (X, C, d)
        if blk.state_scale is not None:
            through_state.mul_(blk.state_scale)
        d_v.add_(through_state)
        for full, block in ((dq, d_q), (dk, d_k), (dv, d_v)):
            _write_back(full[heads_, start:end], block)
        if start == 0:
            d_kv0[heads_] = d_state
    if pad:
        dq, dk, dv = dq[:, :length], dk[:, :length], dv[:, :length]
    return (
        dq.reshape(q.shape),
        dk.reshape(k.shape),
        dv.reshape(v.shape),
        d_kv0.view(batch, heads, m, d + 1),
    )


def _workspace(dst: Tensor, ct: torch.dtype, scratch: bool = False, width: int | None = None) -> Tensor:
    """``dst`` itself when it can hold fp32 accumulation, else an fp32 scratch of its shape (last dim ``width``)."""
    if not scratch and dst.dtype == ct and dst.is_contiguous():
        return dst
    shape = dst.shape if width is None else (*dst.shape[:-1], width)
    return torch.empty(shape, dtype=ct, device=dst.device)


def _write_back(dst: Tensor, block: Tensor) -> None:
    if block.data_ptr() != dst.data_ptr():
        dst.copy_(block.view(dst.shape))


# One op namespace per copy of this module: a checkpoint's remote-code copy can be imported next to the package.
_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_causal_forward", mutates_args=())
def _chunked_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_scale: Optional[Tensor],
    kv0: Tensor,
    c0: Optional[Tensor],
    chunk_size: int,
    projection: Optional[Tensor],
    key_keep: Optional[Tensor],
    norm_coef: float,
    offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, normaliser, kv_end, c_end, block_states, running_max); opaque to torch.compile, so its Python loop is
    not unrolled. With ``projection``, q and k are the feature map's inputs (see ``causal_exp_attention``)."""
    return _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset)


@_chunked_forward.register_fake
def _(q, k, v, log_scale, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset):
    batch, heads, length, m = q.shape
    if projection is not None:
        m = projection.shape[0]
    d = v.shape[-1]
    ct = _compute_dtype(q.dtype)
    padded = length + (-length % chunk_size)
    n_blocks = -(-padded // _block_layout(batch * heads, padded, chunk_size)[1])
    running_max = q.new_empty(0, dtype=ct) if projection is None else q.new_empty(batch, heads, padded, dtype=ct)
    return (
        v.new_empty(batch, heads, length, d),
        q.new_empty(batch, heads, length, dtype=ct),
        q.new_empty(batch, heads, m, d + 1, dtype=ct),
        q.new_empty(batch, heads, dtype=ct),
        q.new_empty(batch, heads, n_blocks, m, d + 1, dtype=ct),
        running_max,
    )


@torch.library.custom_op(f"{_NAMESPACE}::chunked_causal_backward", mutates_args=())
def _chunked_backward(
    grad_out: Tensor,
    grad_kv: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_scale: Optional[Tensor],
    c0: Optional[Tensor],
    out: Tensor,
    normaliser: Tensor,
    block_states: Tensor,
    chunk_size: int,
    projection: Optional[Tensor],
    key_keep: Optional[Tensor],
    norm_coef: float,
    offset: float,
    running_max: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_kv0), recomputing every per-chunk quantity block by block, last block first."""
    return _chunked_backward_impl(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size,
                                  projection, key_keep, norm_coef, offset, running_max)


@_chunked_backward.register_fake
def _(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size, projection, key_keep,
      norm_coef, offset, running_max):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_kv)


def _setup_context(ctx, inputs, output):
    q, k, v, log_scale, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset = inputs
    out, normaliser, _, _, block_states, running_max = output
    ctx.save_for_backward(q, k, v, log_scale, c0, out, normaliser, block_states, projection, key_keep, running_max)
    ctx.chunk_size, ctx.norm_coef, ctx.offset = chunk_size, norm_coef, offset
    ctx.kv0_dtype = kv0.dtype


def _backward(ctx, grad_out, grad_normaliser, grad_kv, grad_c, grad_states, grad_running_max):
    q, k, v, log_scale, c0, out, normaliser, block_states, projection, key_keep, running_max = ctx.saved_tensors
    batch, heads = q.shape[:2]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_kv is None:
        grad_kv = q.new_zeros(batch, heads, *block_states.shape[-2:], dtype=block_states.dtype)
    dq, dk, dv, dkv0 = _chunked_backward(
        grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, ctx.chunk_size, projection,
        key_keep, ctx.norm_coef, ctx.offset, running_max,
    )
    return dq, dk, dv, None, dkv0.to(ctx.kv0_dtype), None, None, None, None, None, None


torch.library.register_autograd(_chunked_forward, _backward, setup_context=_setup_context)


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
        return _quadratic_attention(q, k, v, causal=False, k_log_scale=k_log_scale, initial_state=None)[0]
    ct = _compute_dtype(q.dtype)
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
    kv = k.to(ct).transpose(-1, -2) @ v_aug  # (B, H, m, d+1)
    return _normalise(q.to(ct) @ kv).to(v.dtype)


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
    ``triton_ops.py``; CUDA; every call, one-token decoding included) or ``auto`` (the cheaper of chunked and
    quadratic by ``choose_implementation``, chunked through the Triton kernels on CUDA when Triton is installed and
    the features fit the GPU's shared memory). Gradients reach q, k, v and ``initial_state``'s kv; ``k_log_scale`` is treated as a constant (the feature maps detach it).
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
        return _quadratic_attention(q, k, v, causal=True, k_log_scale=k_log_scale, initial_state=initial_state)
    kv0, c0 = initial_state
    chunk = max(1, min(chunk_size, length))
    if _use_triton(implementation, impl, q, num_features):
        from .triton_ops import causal_attention as triton_causal_attention

        out, kv, c_end = triton_causal_attention(q, k, v, k_log_scale, kv0, c0, chunk_size)
        return out, (kv, c_end)
    out, _, kv, c_end, _, _ = _chunked_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), k_log_scale, kv0, c0, chunk, None, None, 0.0, 0.0
    )
    return out, (kv, c_end if stabilised else None)


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
    out, _, kv, c_end, _, _ = _chunked_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), None, kv0, c0, chunk, projection.detach(), key_mask,
        float(norm_coef), float(logit_offset),
    )
    return out, (kv, c_end)
