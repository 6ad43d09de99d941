"""Quadratic ("short sequence") path: the kernelised (N, S) attention matrix, plain autograd, as TF
``KernelAttention(is_short_seq=True)``; O(N S (m + d)) time, O(N S) memory, the cheapest for short inputs and for
decoding one token. Notation and the stabiliser as in ``ops.py``.
"""

from __future__ import annotations

import torch

from .ops_common import State, _append_ones, _compute_dtype, _normalise


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """max_{u <= t} x_u along the last dimension. ONNX has no cummax: while exporting to ONNX the same maxima come
    from a masked amax over the (S, S) triangle, which this path can afford (its scores are (N, S) already)."""
    if not torch.onnx.is_in_onnx_export():
        return torch.cummax(x, dim=-1).values
    length = x.shape[-1]
    later = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # (S, S): u' > u
    return x.unsqueeze(-2).masked_fill(later, float("-inf")).amax(dim=-1)  # (..., S)


def quadratic_attention(q, k, v, *, causal: bool, k_log_scale, initial_state: State | None):
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
            c = _running_max(log_scale)  # (B, H, S)
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
