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

Three algorithms, one result (``implementation=``):
  * ``quadratic``: build the kernelised (N, S) attention matrix, as TF ``KernelAttention(is_short_seq=True)``;
    O(N S (m + d)) time, O(N S) memory, cheapest for short inputs and for decoding one token.
  * ``chunked``: causal attention in chunks of C tokens, exact inside a chunk with a masked (C, C) product and a
    running (m, d + 1) state across chunks (arXiv 2006.16236 sec. 3.3 for the recurrence; the chunked form follows
    arXiv 2202.10447 sec. 4 and flash-linear-attention). Forward and backward are one custom op each: the backward
    recomputes every per-chunk quantity from q, k, v and one saved state per block of chunks, so training memory is
    O(N (m + d)) and no (N, m, d) tensor ever exists. Non-causal attention is the same sum without masks, O(N m d).
  * ``auto``: whichever of the two a flop count says is cheaper for these N, m, d (``choose_implementation``).
All accumulate in float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Log scale given to masked or absent keys: exp(NEG_LOG_SCALE - c) == 0 for any real c, and stays finite.
NEG_LOG_SCALE = -1e30

State = tuple[torch.Tensor, torch.Tensor | None]  # (kv (B, H, m, d+1) fp32, log_scale (B, H) fp32 or None)

IMPLEMENTATIONS = ("auto", "chunked", "quadratic")

# Tokens handled per step of the chunk loop: the block's (C, C) scores and (C, m) features stay in the CPU's cache,
# which doubles the speed of the small batched matmuls compared with one pass over the whole sequence.
BLOCK_TOKENS = 512

# Inside a chunk the per-token running maxima c_t are folded into the queries as exp(c_end - c_t) when they span at
# most this many nats (nearly always): no (C, C) matrix of exponentials is needed. Wider spans use exact weights.
FAST_SCALE_SPAN = 20.0


def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d + 1): a column of ones turns k^T v into [k^T v | sum k]."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _safe(normaliser: torch.Tensor) -> torch.Tensor:
    """A query that sees no key at all has normaliser 0; dividing by 1 instead makes its output 0."""
    return torch.where(normaliser.abs() > 1e-30, normaliser, torch.ones_like(normaliser))


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


class _Block:
    """One block of tokens [start, end) cut into nb chunks of C, with everything forward and backward share.

    Per chunk i: ce_i is the running max at its last token, cp_i = ce_{i-1} the scale of the state entering it.
    fast (or no log scale): queries carry a = exp(ce - c_t), keys e = exp(l_u - ce); a masked product of those is
    exactly exp(l_u - c_t) q.k, and the state entering chunk i is wanted at scale ce_i ("ref" = ce).
    exact: weights exp(l_u - c_t) as a (C, C) matrix, the entering state at scale cp_i ("ref" = cp).
    """

    def __init__(self, q, k, v, log_scale, c, c_start, start, end, chunk, ct):
        g = q.shape[0]
        length = end - start
        nb = -(-length // chunk)
        pad = nb * chunk - length
        self.nb, self.length, self.chunk = nb, length, chunk
        qb, kb, vb = q[:, start:end].to(ct), k[:, start:end].to(ct), v[:, start:end].to(ct)
        if pad:
            qb, kb, vb = (F.pad(x, (0, 0, 0, pad)) for x in (qb, kb, vb))
        self.q = qb.reshape(g, nb, chunk, -1)  # (G, nb, C, m)
        self.k = kb.reshape(g, nb, chunk, -1)  # (G, nb, C, m)
        self.v = _append_ones(vb).view(g, nb, chunk, -1)  # (G, nb, C, d+1)
        self.mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # (C, C), u <= t
        lower = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril(-1)  # (nb, nb), j < i
        self.stabilised = log_scale is not None
        self.fast = True
        if not self.stabilised:
            self.qa, self.kt = self.q, self.k
            self.decay = lower.to(ct)  # F[i, j] = 1 for j < i
            self.w_start = q.new_ones(g, nb, dtype=ct)  # (G, nb)
            self.w_end = q.new_ones(g, nb, dtype=ct)  # (G, nb)
            self.start_to_end = q.new_ones(g, dtype=ct)  # (G,)
            return
        lb, cb = log_scale[:, start:end].to(ct), c[:, start:end].to(ct)  # (G, T)
        if pad:
            lb = F.pad(lb, (0, pad), value=NEG_LOG_SCALE)
            cb = torch.cat([cb, cb[:, -1:].expand(g, pad)], dim=-1)
        lb, cb = lb.view(g, nb, chunk), cb.view(g, nb, chunk)  # (G, nb, C)
        ce = cb[..., -1]  # (G, nb)
        cp = torch.cat([c_start.unsqueeze(-1), ce[:, :-1]], dim=-1)  # (G, nb)
        # Queries with no key yet (c_t = NEG) see nothing; their gap is irrelevant and is not counted.
        gap = (ce.unsqueeze(-1) - cb).masked_fill(cb <= NEG_LOG_SCALE / 2, 0.0)  # (G, nb, C)
        self.fast = bool(gap.max() <= FAST_SCALE_SPAN)
        self.e = torch.exp(lb - ce.unsqueeze(-1))  # (G, nb, C), <= 1
        self.kt = self.k * self.e.unsqueeze(-1)  # (G, nb, C, m): keys at their chunk's end scale
        if self.fast:
            self.a = torch.exp(gap)  # (G, nb, C), <= exp(FAST_SCALE_SPAN)
            self.qa = self.q * self.a.unsqueeze(-1)  # (G, nb, C, m)
            ref = ce
        else:
            exponent = lb.unsqueeze(-2) - cb.unsqueeze(-1)  # (G, nb, C, C): l_u - c_t
            self.weights = exponent.masked_fill(~self.mask, float("-inf")).exp()
            self.g = torch.exp(cp.unsqueeze(-1) - cb)  # (G, nb, C), <= 1
            ref = cp
        # decay[i, j] = exp(ce_j - ref_i) for j < i: how chunk j's keys enter the state seen by chunk i.
        exponent = ce.unsqueeze(-2) - ref.unsqueeze(-1)  # (G, nb, nb)
        self.decay = exponent.masked_fill(~lower, float("-inf")).exp()
        self.w_start = torch.exp(c_start.unsqueeze(-1) - ref)  # (G, nb): the block's entering state
        self.w_end = torch.exp(ce - ce[:, -1:])  # (G, nb): chunk j's keys in the block's final state
        self.start_to_end = torch.exp(c_start - ce[:, -1])  # (G,)
        self.ref_to_end = torch.exp(ref[:, -1] - ce[:, -1])  # (G,)

    def chunk_kv(self) -> Tensor:
        return self.kt.transpose(-1, -2) @ self.v  # (G, nb, m, d+1)

    def entering_states(self, kv_chunks: Tensor, state: Tensor) -> Tensor:
        """State seen by each chunk (at scale ref_i): sum_{j<i} decay[i, j] U_j + w_start[i] S_start."""
        g, nb, m, d1 = kv_chunks.shape
        states = (self.decay @ kv_chunks.reshape(g, nb, m * d1)).view(g, nb, m, d1)
        return states.add_(self.w_start[..., None, None] * state.unsqueeze(1))  # (G, nb, m, d+1)

    def scores(self) -> Tensor:
        """Masked intra-chunk attention weights (G, nb, C, C)."""
        if self.fast:
            return (self.qa @ self.kt.transpose(-1, -2)).masked_fill_(~self.mask, 0.0)
        return (self.q @ self.k.transpose(-1, -2)).mul_(self.weights)


def _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk_size, block_size):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    g = batch * heads
    ct = _compute_dtype(q.dtype)
    q3, k3, v3 = q.reshape(g, length, m), k.reshape(g, length, m), v.reshape(g, length, d)
    out = torch.empty(g, length, d, dtype=v.dtype, device=v.device)
    normaliser = torch.empty(g, length, dtype=ct, device=v.device)
    n_blocks = -(-length // block_size)
    block_states = torch.empty(g, n_blocks, m, d + 1, dtype=ct, device=v.device)  # state entering each block
    state = kv0.reshape(g, m, d + 1).to(ct)
    log_scale, c, c_start = _running_max(log_scale, c0, g, length, ct)
    for b in range(n_blocks):
        start, end = b * block_size, min(length, (b + 1) * block_size)
        block_states[:, b] = state
        blk = _Block(q3, k3, v3, log_scale, c, c_start, start, end, chunk_size, ct)
        kv_chunks = blk.chunk_kv()  # (G, nb, m, d+1)
        entering = blk.entering_states(kv_chunks, state)  # (G, nb, m, d+1)
        if blk.fast:
            out_aug = blk.qa @ entering  # (G, nb, C, d+1)
        else:
            out_aug = (blk.q @ entering).mul_(blk.g.unsqueeze(-1))
        out_aug = out_aug.add_(blk.scores() @ blk.v).view(g, -1, d + 1)[:, : blk.length]  # (G, T, d+1)
        out[:, start:end] = _normalise(out_aug)
        normaliser[:, start:end] = out_aug[..., -1]
        state = entering[:, -1] * blk.ref_to_end[:, None, None] + kv_chunks[:, -1] if blk.stabilised else (
            entering[:, -1] + kv_chunks[:, -1]
        )
        if log_scale is not None:
            c_start = c[:, end - 1]
    c_end = c_start if log_scale is not None else q.new_zeros(g, dtype=ct)
    return (
        out.view(batch, heads, length, d),
        normaliser.view(batch, heads, length),
        state.view(batch, heads, m, d + 1),
        c_end.reshape(batch, heads).clone(),
        block_states.view(batch, heads, n_blocks, m, d + 1),
    )


def _running_max(log_scale, c0, g, length, ct):
    """(log_scale (G, N), c (G, N) = max(c0, max_{u<=t} log_scale_u), c0 (G,)), all None without log scale."""
    if log_scale is None:
        return None, None, None
    log_scale = log_scale.reshape(g, length).to(ct)
    c_start = c0.reshape(g).to(ct)
    c = torch.maximum(torch.cummax(log_scale, dim=-1).values, c_start.unsqueeze(-1))  # (G, N)
    return log_scale, c, c_start


def _chunked_backward_impl(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size,
                           block_size):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    g = batch * heads
    ct = _compute_dtype(q.dtype)
    q3, k3, v3 = q.reshape(g, length, m), k.reshape(g, length, m), v.reshape(g, length, d)
    dy3, y3 = grad_out.reshape(g, length, d), out.reshape(g, length, d)
    z3 = normaliser.reshape(g, length)
    states = block_states.reshape(g, -1, m, d + 1)
    dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
    d_state = grad_kv.reshape(g, m, d + 1).to(ct)  # gradient w.r.t. the state leaving the current block
    log_scale, c, c0 = _running_max(log_scale, c0, g, length, ct)
    for b in reversed(range(states.shape[1])):
        start, end = b * block_size, min(length, (b + 1) * block_size)
        c_start = None if log_scale is None else (c0 if b == 0 else c[:, start - 1])
        blk = _Block(q3, k3, v3, log_scale, c, c_start, start, end, chunk_size, ct)
        nb, chunk, pad = blk.nb, blk.chunk, blk.nb * blk.chunk - blk.length
        dy, y, z = dy3[:, start:end].to(ct), y3[:, start:end].to(ct), z3[:, start:end]
        if pad:
            dy, y, z = F.pad(dy, (0, 0, 0, pad)), F.pad(y, (0, 0, 0, pad)), F.pad(z, (0, pad))
        # out = numerator / z: d numerator = dy / z, dz = -(dy . out) / z (0 where the output was forced to 0).
        safe = _safe(z)
        d_z = -(dy * y).sum(-1) / safe * (z.abs() > 1e-30)  # (G, T)
        d_out = torch.cat([dy / safe.unsqueeze(-1), d_z.unsqueeze(-1)], dim=-1).view(g, nb, chunk, d + 1)

        kv_chunks = blk.chunk_kv()  # (G, nb, m, d+1)
        entering = blk.entering_states(kv_chunks, states[:, b])  # (G, nb, m, d+1)
        d_scores = (d_out @ blk.v.transpose(-1, -2)).masked_fill_(~blk.mask, 0.0)  # (G, nb, C, C)
        scores = blk.scores()  # (G, nb, C, C)
        if blk.fast:
            d_qa = d_scores @ blk.kt + d_out @ entering.transpose(-1, -2)  # (G, nb, C, m)
            d_entering = blk.qa.transpose(-1, -2) @ d_out  # (G, nb, m, d+1)
        else:
            d_scores = d_scores.mul_(blk.weights)  # gradient w.r.t. q.k^T
            d_q = d_scores @ blk.k + (d_out @ entering.transpose(-1, -2)).mul_(blk.g.unsqueeze(-1))
            d_entering = (blk.q * blk.g.unsqueeze(-1)).transpose(-1, -2) @ d_out
        # Each chunk's keys reach later chunks of this block (decay^T) and the state leaving the block (w_end).
        flat = d_entering.reshape(g, nb, m * (d + 1))
        d_kv_chunks = (blk.decay.transpose(-1, -2) @ flat).view(g, nb, m, d + 1)
        d_kv_chunks.add_(blk.w_end[..., None, None] * d_state.unsqueeze(1))  # (G, nb, m, d+1)
        d_state = (blk.w_start.unsqueeze(-2) @ flat).view(g, m, d + 1) + blk.start_to_end[:, None, None] * d_state

        d_kt_state = blk.v @ d_kv_chunks.transpose(-1, -2)  # (G, nb, C, m)
        if blk.fast:
            d_kt = d_scores.transpose(-1, -2) @ blk.qa + d_kt_state
            d_q = d_qa * blk.a.unsqueeze(-1) if blk.stabilised else d_qa
            d_k = d_kt * blk.e.unsqueeze(-1) if blk.stabilised else d_kt
        else:
            d_k = d_scores.transpose(-1, -2) @ blk.q + d_kt_state.mul_(blk.e.unsqueeze(-1))
        d_v = scores.transpose(-1, -2) @ d_out[..., :d] + blk.kt @ d_kv_chunks[..., :d]  # (G, nb, C, d)
        dq[:, start:end] = d_q.view(g, -1, m)[:, : blk.length]
        dk[:, start:end] = d_k.view(g, -1, m)[:, : blk.length]
        dv[:, start:end] = d_v.view(g, -1, d)[:, : blk.length]
    return (
        dq.view(q.shape),
        dk.view(k.shape),
        dv.view(v.shape),
        d_state.view(batch, heads, m, d + 1),
    )


@torch.library.custom_op("hf_performer::chunked_causal_forward", mutates_args=())
def _chunked_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_scale: Optional[Tensor],
    kv0: Tensor,
    c0: Optional[Tensor],
    chunk_size: int,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, normaliser, kv_end, c_end, block_states); opaque to torch.compile, so its Python loop is not unrolled."""
    return _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk_size, block_size)


@_chunked_forward.register_fake
def _(q, k, v, log_scale, kv0, c0, chunk_size, block_size):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    ct = _compute_dtype(q.dtype)
    n_blocks = (length + block_size - 1) // block_size
    return (
        v.new_empty(batch, heads, length, d),
        q.new_empty(batch, heads, length, dtype=ct),
        q.new_empty(batch, heads, m, d + 1, dtype=ct),
        q.new_empty(batch, heads, dtype=ct),
        q.new_empty(batch, heads, n_blocks, m, d + 1, dtype=ct),
    )


@torch.library.custom_op("hf_performer::chunked_causal_backward", mutates_args=())
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
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_kv0), recomputing every per-chunk quantity block by block, last block first."""
    return _chunked_backward_impl(
        grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size, block_size
    )


@_chunked_backward.register_fake
def _(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size, block_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_kv)


def _setup_context(ctx, inputs, output):
    q, k, v, log_scale, kv0, c0, chunk_size, block_size = inputs
    out, normaliser, _, _, block_states = output
    ctx.save_for_backward(q, k, v, log_scale, c0, out, normaliser, block_states)
    ctx.sizes = (chunk_size, block_size)
    ctx.kv0_dtype = kv0.dtype


def _backward(ctx, grad_out, grad_normaliser, grad_kv, grad_c, grad_states):
    q, k, v, log_scale, c0, out, normaliser, block_states = ctx.saved_tensors
    batch, heads, _, m = q.shape
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_kv is None:
        grad_kv = q.new_zeros(batch, heads, m, v.shape[-1] + 1, dtype=block_states.dtype)
    dq, dk, dv, dkv0 = _chunked_backward(
        grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, *ctx.sizes
    )
    return dq, dk, dv, None, dkv0.to(ctx.kv0_dtype), None, None, None


torch.library.register_autograd(
    "hf_performer::chunked_causal_forward", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def linear_attention(q, k, v, *, k_log_scale=None, key_mask=None, implementation: str = "auto") -> torch.Tensor:
    """Non-causal kernel attention: phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1), O((N + S) m d) time and
    O((N + S)(m + d)) memory; ``quadratic`` builds the (N, S) matrix instead (cheaper for short inputs)."""
    k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
    impl = _resolve(implementation, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], causal=False)
    if impl == "quadratic":
        return _quadratic_attention(q, k, v, causal=False, k_log_scale=k_log_scale, initial_state=None)[0]
    ct = _compute_dtype(q.dtype)
    q, k, v_aug = q.to(ct), k.to(ct), _append_ones(v.to(ct))
    if k_log_scale is not None:
        shift = k_log_scale.amax(dim=-1, keepdim=True)  # (B, H, 1): one constant per row cancels
        k = k * torch.exp(k_log_scale.to(ct) - shift).unsqueeze(-1)
    kv = k.transpose(-1, -2) @ v_aug  # (B, H, m, d+1)
    return _normalise(q @ kv).to(v.dtype)


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
    """Causal kernel attention; returns the output (B, H, N, d) and the state after the last token.

    ``implementation``: ``chunked`` (O(N C (m + d) + N m d) time, O(N (m + d)) memory, forward and backward),
    ``quadratic`` (the masked (N, N) matrix; what decoding one token uses) or ``auto`` (the cheaper one by
    ``choose_implementation``). Gradients reach q, k, v and ``initial_state``'s kv; ``k_log_scale`` is a constant.
    """
    batch, heads, length, num_features = q.shape
    head_dim = v.shape[-1]
    stabilised = k_log_scale is not None
    k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
    if initial_state is not None and stabilised != (initial_state[1] is not None):
        raise ValueError("initial_state and k_log_scale disagree on whether the features are stabilised")
    impl = _resolve(implementation, length, length, num_features, head_dim, causal=True, chunk_size=chunk_size)
    if impl == "quadratic" or length == 0:
        return _quadratic_attention(q, k, v, causal=True, k_log_scale=k_log_scale, initial_state=initial_state)
    if initial_state is None:
        initial_state = empty_state(batch, heads, num_features, head_dim, stabilised, q.device)
    kv0, c0 = initial_state
    chunk = max(1, min(chunk_size, length))
    block = max(1, BLOCK_TOKENS // chunk) * chunk
    out, _, kv, c_end, _ = _chunked_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), k_log_scale, kv0, c0, chunk, block
    )
    return out, (kv, c_end if stabilised else None)
