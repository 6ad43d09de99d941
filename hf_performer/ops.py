"""Linear (kernel) attention math: plain functions of tensors, free of any Hugging Face plumbing.

Notation: B batch, H heads, N query length, S key length, m features, d head dim.
Inputs are feature-mapped queries ``q`` (B, H, N, m) and keys ``k`` (B, H, S, m), values ``v`` (B, H, S, d).

Exponential feature maps hand over keys divided by a per-token scale, ``k_true = k * exp(k_log_scale)``. Causal
sums carry that scale with a running maximum c_t = max_{u<=t} log_scale_u: the state is kept as
sum_u k_true_u v_u^T * exp(-c_t) and rescaled by exp(c_{t-1} - c_t) when the maximum grows (the online-softmax trick
of arXiv 1805.02867 applied to kernel sums). The factor exp(-c_t) is common to the numerator and the normaliser of
query t, so it cancels exactly, and it depends only on keys u <= t, so a token-by-token decoder computes the same
numbers as the chunked training pass.

The recurrent state is one tensor ``kv`` (B, H, m, d + 1): the last column is the normaliser sum_u phi(k_u), kept
next to sum_u phi(k_u) v_u^T so both come out of the same matmul, plus ``log_scale`` (B, H) for exponential maps.
"""

from __future__ import annotations

import torch

# Log scale given to masked or absent keys: exp(NEG_LOG_SCALE - c) == 0 for any real c, and stays finite.
NEG_LOG_SCALE = -1e30

State = tuple[torch.Tensor, torch.Tensor | None]  # (kv (B, H, m, d+1) fp32, log_scale (B, H) fp32 or None)


def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d + 1): a column of ones turns k^T v into [k^T v | sum k]."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalise(out_aug: torch.Tensor) -> torch.Tensor:
    """Split [numerator | normaliser] and divide; a query that sees no key at all gets 0."""
    numerator, normaliser = out_aug[..., :-1], out_aug[..., -1:]
    safe = torch.where(normaliser.abs() > 1e-30, normaliser, torch.ones_like(normaliser))
    return numerator / safe


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
# Bidirectional
# ----------------------------------------------------------------------------------------------------------------


def linear_attention(q, k, v, *, k_log_scale=None, key_mask=None) -> torch.Tensor:
    """Non-causal kernel attention in O(N m d): out = phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1)."""
    out_dtype = v.dtype
    q, k, v_aug = q.float(), k.float(), _append_ones(v.float())
    k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
    if k_log_scale is not None:
        shift = k_log_scale.amax(dim=-1, keepdim=True)  # (B, H, 1): one constant per row cancels
        k = k * torch.exp(k_log_scale - shift).unsqueeze(-1)
    kv = k.transpose(-1, -2) @ v_aug  # (B, H, m, d+1)
    return _normalise(q @ kv).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Causal, chunked
# ----------------------------------------------------------------------------------------------------------------


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_log_scale: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, State]:
    """Causal kernel attention in chunks (exact within a chunk, a running (m, d+1) state across chunks).

    Returns the output (B, H, N, d) and the state after the last token, from which decoding continues.
    Memory is O(N (C + m d / C)) per head; the per-token (m, d) states are never materialised.
    """
    batch, heads, length, num_features = q.shape
    head_dim = v.shape[-1]
    out_dtype = v.dtype
    stabilised = k_log_scale is not None
    q, k, v_aug = q.float(), k.float(), _append_ones(v.float())
    k, k_log_scale = _mask_keys(k, k_log_scale, key_mask)
    if initial_state is None:
        initial_state = empty_state(batch, heads, num_features, head_dim, stabilised, q.device)
    kv0, c0 = initial_state
    if stabilised != (c0 is not None):
        raise ValueError("initial_state and k_log_scale disagree on whether the features are stabilised")

    chunk = max(1, min(chunk_size, length))
    padded = -(-length // chunk) * chunk
    if padded != length:
        pad = padded - length
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v_aug = torch.nn.functional.pad(v_aug, (0, 0, 0, pad))
        if stabilised:
            k_log_scale = torch.nn.functional.pad(k_log_scale, (0, pad), value=NEG_LOG_SCALE)
    n_chunks = padded // chunk
    qc = q.view(batch, heads, n_chunks, chunk, num_features)  # (B, H, n, C, m)
    kc = k.view(batch, heads, n_chunks, chunk, num_features)  # (B, H, n, C, m)
    vc = v_aug.view(batch, heads, n_chunks, chunk, head_dim + 1)  # (B, H, n, C, d+1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = qc @ kc.transpose(-1, -2)  # (B, H, n, C, C)

    if not stabilised:
        scores = scores * causal
        chunk_kv = kc.transpose(-1, -2) @ vc  # (B, H, n, m, d+1)
        running = torch.cumsum(chunk_kv, dim=2)  # state after each chunk
        kv_before = torch.cat([torch.zeros_like(running[:, :, :1]), running[:, :, :-1]], dim=2) + kv0.unsqueeze(2)
        out_aug = scores @ vc + qc @ kv_before  # (B, H, n, C, d+1)
        new_state = (kv0 + running[:, :, -1], None)
    else:
        # c_t: running max of key log scales, starting from the state's (B, H, n*C).
        c = torch.maximum(torch.cummax(k_log_scale, dim=-1).values, c0.unsqueeze(-1))
        cc = c.view(batch, heads, n_chunks, chunk)  # (B, H, n, C)
        lc = k_log_scale.view(batch, heads, n_chunks, chunk)  # (B, H, n, C)
        c_end = cc[..., -1]  # (B, H, n)
        c_before = torch.cat([c0.unsqueeze(-1), c_end[..., :-1]], dim=-1)  # (B, H, n)
        # Inside a chunk: weight of key u for query t >= u is exp(l_u - c_t) <= 1.
        decay = (lc.unsqueeze(-2) - cc.unsqueeze(-1)).masked_fill(~causal, float("-inf")).exp()  # (B, H, n, C, C)
        scores = scores * decay
        # Each chunk's keys brought to the scale of the chunk's end, then summed into the running state.
        k_end = kc * torch.exp(lc - c_end.unsqueeze(-1)).unsqueeze(-1)  # (B, H, n, C, m)
        chunk_kv = k_end.transpose(-1, -2) @ vc  # (B, H, n, m, d+1)
        carry = torch.exp(c_before - c_end)  # (B, H, n): rescale the previous state to this chunk's end
        states = []
        kv = kv0
        for i in range(n_chunks):
            states.append(kv)
            kv = kv * carry[:, :, i, None, None] + chunk_kv[:, :, i]
        kv_before = torch.stack(states, dim=2)  # (B, H, n, m, d+1), at scale c_before
        inter = (qc @ kv_before) * torch.exp(c_before.unsqueeze(-1) - cc).unsqueeze(-1)  # (B, H, n, C, d+1)
        out_aug = scores @ vc + inter
        new_state = (kv, c_end[..., -1])

    out = _normalise(out_aug).reshape(batch, heads, padded, head_dim)[:, :, :length]
    return out.to(out_dtype), new_state
