"""The float64 O(N^2) reference every fast path is tested against (values, gradients, states): the masked kernel
matrix built outright. For tests only; notation as in ``ops.py``.
"""

from __future__ import annotations

import torch


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
