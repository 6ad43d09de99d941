"""What every attention path shares: the key-scale constant, the state type, small tensor helpers, and the
exponential features of a projection (FAVOR+ and its relatives) with their gradient.

Imports nothing from the other ``ops_*`` files, so each of them (``ops_naive``, ``ops_quadratic``, ``ops_chunked``,
``ops_triton``) imports from here alone and ``ops.py`` (public API and dispatch) sits on top. Notation and the
stabiliser are described in ``ops.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Log scale given to masked or absent keys: exp(NEG_LOG_SCALE - c) == 0 for any real c, and stays finite.
NEG_LOG_SCALE = -1e30

State = tuple[torch.Tensor, torch.Tensor | None]  # (kv (B, H, m, d+1) fp32, log_scale (B, H) fp32 or None)


def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d + 1): a column of ones turns k^T v into [k^T v | sum k]."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _safe(normaliser: torch.Tensor) -> torch.Tensor:
    """A query that sees no key at all has normaliser 0; dividing by 1 instead makes its output 0."""
    return torch.where(normaliser.abs() > 1e-30, normaliser, 1.0)


def _output_gradients(grad_out: Tensor, out: Tensor, normaliser: Tensor, *, into: Tensor | None = None):
    """out = numerator / z: d numerator = dy / z and dz = -(dy . out) / z, 0 where the output was forced to 0.
    grad_out, out (..., d), normaliser (..., 1) -> (..., d), (..., 1); with ``into`` (..., d + 1, in the compute
    dtype), both are written there side by side (no concatenation) and ``into`` is returned."""
    safe = _safe(normaliser)
    d_normaliser = (grad_out * out).sum(-1, keepdim=True).div_(safe)
    d_normaliser.mul_(normaliser.abs() > 1e-30).neg_()
    if into is None:
        return grad_out / safe, d_normaliser
    torch.div(grad_out, safe, out=into[..., :-1])
    into[..., -1:] = d_normaliser
    return into


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

