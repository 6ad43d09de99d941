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
import torch.nn.functional as F
from torch import Tensor

from .ops_common import NEG_LOG_SCALE, _compute_dtype, _safe


def exp_decode_step(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, norm_coef: float, offset: float,
                    kv: Tensor, c0: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, 1, d), P (m, d), state kv (B, H, m, d + 1) at scale c0 (B, H), key_mask (B, 1) or None
    -> out (B, H, 1, d) in v's dtype, the new state kv1 (a new tensor: the given one is left as it was) and c1."""
    ct = _compute_dtype(q.dtype)
    batch, heads, _, d = v.shape
    rows, m = batch * heads, projection.shape[0]
    qk = _as(torch.stack([q, k]), ct).view(2 * rows, d)  # (2BH, d): one projection for both
    logits = torch.mm(qk, _as(projection, ct).t())  # (2BH, m)
    top = logits.amax(dim=-1, keepdim=True)  # (2BH, 1)
    features = logits.sub_(top).exp_()  # (2BH, m), each row's max is 1
    q_features, k_features = features[:rows], features[rows:]  # (BH, m)
    log_scale = top[rows:, 0] + offset  # (BH,): the key's
    if norm_coef:
        keys = qk[rows:]  # (BH, d)
        log_scale.sub_(torch.linalg.vecdot(keys, keys), alpha=norm_coef)
    log_scale = log_scale.view(batch, heads)
    if key_mask is not None:
        log_scale = log_scale.masked_fill(~key_mask[:, -1:].bool(), NEG_LOG_SCALE)  # (B, 1) over the heads
    c0 = _as(c0, ct)
    c1 = torch.maximum(c0, log_scale)  # (B, H)
    weight = torch.exp(log_scale - c1)  # (B, H): the new key at the new scale (0 when masked), <= 1
    # phi(k)^T ([v | 1] weight) as (phi(k) weight)^T [v | 1]: no (d+1)-wide temporary but the padded v
    k_weighted = (k_features * weight.view(rows, 1)).view(rows, m, 1)  # (BH, m, 1)
    v_aug = F.pad(_as(v, ct), (0, 1), value=1.0).view(rows, 1, d + 1)  # (BH, 1, d+1)
    kv1 = _update(_as(kv, ct), c0, c1, k_weighted, v_aug)  # (B, H, m, d+1)
    out_aug = torch.bmm(q_features.view(rows, 1, m), kv1.view(rows, m, d + 1))  # (BH, 1, d+1)
    out = out_aug[..., :d] / _safe(out_aug[..., d:])  # no key seen yet: 0
    return _as(out.view(batch, heads, 1, d), v.dtype), kv1, c1


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without a dispatch when it is one already: a decode step is mostly per-op overhead."""
    return x if x.dtype == dtype else x.to(dtype)


def _update(kv: Tensor, c0: Tensor, c1: Tensor, k_weighted: Tensor, v_aug: Tensor) -> Tensor:
    """exp(c0 - c1) kv + k_weighted v_aug, a new (B, H, m, d+1) tensor. The running max rarely moves (a new
    record among the keys' log scales), and where it moves nowhere the old sums keep their scale: one pass over
    the state instead of two. The test needs the values, so it is taken eagerly on the CPU only (no device sync,
    nothing data-dependent in a traced graph)."""
    batch, heads, m, width = kv.shape
    rows = batch * heads
    if kv.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.equal(c0, c1)):
        kv1 = torch.baddbmm(kv.reshape(rows, m, width), k_weighted, v_aug)  # (BH, m, d+1)
    else:
        kv1 = (kv * torch.exp(c0 - c1).view(batch, heads, 1, 1)).reshape(rows, m, width)  # the old sums rescaled
        kv1.baddbmm_(k_weighted, v_aug)  # the rank-one update
    return kv1.view(batch, heads, m, width)
