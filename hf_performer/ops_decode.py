"""Decoding one token from a filled state: exponential features of that token and the state update, directly.

The general paths (``ops_quadratic`` for one token under ``auto``, ``ops_chunked``) pay for machinery a single query
against a single new key never needs: an (N, S) score matrix and its masks, a running max over the keys, ``cat``s
for the ones column, an autograd node per feature map. Per layer and step that was ~40 small ops; this is ~15, no
concatenation, the same numbers (tests/ops/test_ops.py compares it with the quadratic path and the reference).

With the state (kv, c0) at scale c0 and the new key's log scale l (FAVOR+'s exp(k P^T - a |k|^2 + b) split as
features * exp(l), ``ops_common.exp_projection_features``), the new scale is c1 = max(c0, l) and

    kv1 = exp(c0 - c1) kv + exp(l - c1) phi(k)^T [v | 1],    out = phi(q) kv1[:, :d] / phi(q) kv1[:, d],

both factors <= 1 (the running-max stabiliser of ``ops.py``, arXiv 1805.02867); the query's own scale cancels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops_common import NEG_LOG_SCALE, _compute_dtype, _safe


def exp_decode_step(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, norm_coef: float, offset: float,
                    kv: Tensor, c0: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, 1, d), P (m, d), state kv (B, H, m, d + 1) at scale c0 (B, H), key_mask (B, 1) or None
    -> out (B, H, 1, d) in v's dtype, the new state kv1 (a new tensor: the given one is left as it was) and c1."""
    ct = _compute_dtype(q.dtype)
    batch, heads, _, d = v.shape
    qk = torch.stack([q, k]).to(ct).view(2, batch, heads, d)  # (2, B, H, d): one projection for both
    logits = qk @ projection.to(ct).t()  # (2, B, H, m)
    top = logits.amax(dim=-1, keepdim=True)  # (2, B, H, 1)
    features = logits.sub_(top).exp_()  # (2, B, H, m), each row's max is 1
    q_features, k_features = features.unbind(0)  # (B, H, m)
    log_scale = top[1, ..., 0] + offset  # (B, H): the key's
    if norm_coef:
        log_scale = log_scale - norm_coef * qk[1].square().sum(-1)
    if key_mask is not None:
        log_scale = log_scale.masked_fill(~key_mask[:, -1:].bool(), NEG_LOG_SCALE)  # (B, 1) over the heads
    c0 = c0.to(ct)
    c1 = torch.maximum(c0, log_scale)  # (B, H)
    keep = torch.exp(c0 - c1)  # (B, H): the old sums at the new scale
    weight = torch.exp(log_scale - c1)  # (B, H): the new key at the new scale (0 when masked)
    v_aug = torch.empty(batch, heads, 1, d + 1, dtype=ct, device=v.device)  # [v | 1] * weight, no cat
    torch.mul(v.to(ct).view(batch, heads, 1, d), weight[..., None, None], out=v_aug[..., :d])
    v_aug[..., d] = weight.unsqueeze(-1)
    kv1 = _update(kv.to(ct), keep, k_features, v_aug)  # (B, H, m, d+1)
    out_aug = q_features.unsqueeze(-2) @ kv1  # (B, H, 1, d+1)
    out = out_aug[..., :d] / _safe(out_aug[..., d:])
    return out.to(v.dtype), kv1, c1


def _update(kv: Tensor, keep: Tensor, k_features: Tensor, v_aug: Tensor) -> Tensor:
    """keep * kv + phi(k)^T v_aug: kv (B, H, m, d+1), keep (B, H), k_features (B, H, m), v_aug (B, H, 1, d+1)."""
    kv1 = kv * keep[..., None, None]  # (B, H, m, d+1), a new tensor
    return kv1.addcmul_(k_features.unsqueeze(-1), v_aug)  # the rank-one update, broadcast (m, 1) x (1, d+1)
