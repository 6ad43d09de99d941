"""Banded attention: each query sees only keys near it, at O(N * window) cost, never an N x N mask.

Two users:
  * ``sliding_window_attention``: exact softmax local heads (the Performer reference mixes them with kernel heads).
  * ``windowed_kernel_attention``: TF KernelAttention's ``use_causal_windowed`` (Performer chunks, arXiv
    2009.14794 sec. "causal windowed"): kernel scores, chunk-level causality, optional exponential decay.

Both accept keys that start with a cached prefix: ``k``/``v`` have length S = P + N where the last N belong to the
N queries, so streaming decoding runs the same code as training. Windows are decided by token positions (which
count real tokens only), so left- or right-padding does not move them; real tokens are assumed contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_windows(x: torch.Tensor, start: int, step: int, size: int, count: int) -> torch.Tensor:
    """Windows ``x[..., start + b*step : start + b*step + size, :]`` for b < count, zero outside x.

    x: (B, H, S, D) -> (B, H, count, size, D). Uses ``unfold`` (a strided view), so no data is copied twice.
    """
    length = x.shape[-2]
    left = max(0, -start)
    needed = start + (count - 1) * step + size
    right = max(0, needed - length)
    x = F.pad(x, (0, 0, left, right))
    x = x[..., start + left : start + left + (count - 1) * step + size, :]
    return x.unfold(-2, size, step).transpose(-1, -2)  # (B, H, count, size, D)


def _blocks(x: torch.Tensor, block: int, count: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, count, block, D), zero-padded at the end."""
    pad = count * block - x.shape[-2]
    return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (count, block))


def _window_layout(queries: int, keys: int, block: int, back: int, forward: int):
    """Query block b holds queries [b*block, (b+1)*block); they need keys back..forward of them, i.e. key indices
    [P + b*block - back, P + (b+1)*block - 1 + forward] where P = keys - queries is the cached prefix."""
    prefix = keys - queries
    count = max(1, -(-queries // block))
    return prefix - back, back + block + forward, count


def _gather_side(q_positions, k_positions, key_mask, block, start, size, count):
    """Positions of the queries (B, 1, n, block, 1), of their window keys (B, 1, n, 1, W) and the key validity."""
    q_pos = _blocks(q_positions[:, None, :, None].float(), block, count)  # (B, 1, n, block, 1)
    k_pos = gather_windows(k_positions[:, None, :, None].float(), start, block, size, count)  # (B, 1, n, W, 1)
    valid = gather_windows(key_mask[:, None, :, None].float(), start, block, size, count)  # 0 outside
    return q_pos, k_pos.transpose(-1, -2), valid.transpose(-1, -2) > 0.5


def window_reach(window: int, blocked: bool) -> int:
    """How many tokens back (or ahead) a query may look: what a decoding cache must keep."""
    return 2 * window - 1 if blocked else window - 1


def _banded_scores(q, k, v, *, window, causal, q_positions, k_positions, key_mask, scale, blocked, block=None):
    """The banded layout of ``sliding_window_attention``: float32 scores (B, H, n, b, W) with -inf outside each
    query's window, which keys are allowed, and the windows' values (B, H, n, W, d). Queries go in blocks of
    ``block`` (default ``window``; sliding windows take any block, blocked ones need ``window``)."""
    batch, heads, length, dim = q.shape
    keys = k.shape[-2]
    scale = dim**-0.5 if scale is None else scale
    if key_mask is None:
        key_mask = torch.ones(batch, keys, dtype=torch.bool, device=q.device)
    reach = window_reach(window, blocked)
    back, forward = reach, (0 if causal else reach)
    block = window if block is None else block
    start, size, count = _window_layout(length, keys, block, back, forward)
    qb = _blocks(q, block, count)  # (B, H, n, b, d)
    kw = gather_windows(k, start, block, size, count)  # (B, H, n, W, d)
    vw = gather_windows(v, start, block, size, count)  # (B, H, n, W, d)
    q_pos, k_pos, valid = _gather_side(q_positions, k_positions, key_mask, block, start, size, count)
    distance = q_pos - k_pos  # (B, 1, n, b, W)
    if blocked:
        gap = torch.div(q_pos, window, rounding_mode="floor") - torch.div(k_pos, window, rounding_mode="floor")
        allowed = valid & ((gap == 0) | (gap == 1) | ((gap == -1) & (not causal)))
    else:
        allowed = valid & (distance.abs() < window)
    if causal:
        allowed = allowed & (distance >= 0)
    # float32 at least (float64 stays float64, for gradcheck)
    scores = (qb @ kw.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # (B, H, n, b, W)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores, allowed, vw


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    blocked: bool = False,
) -> torch.Tensor:
    """Exact softmax attention restricted to a window of ``window`` tokens.

    Causal: query at position p sees keys at positions p - window + 1 ... p. Bidirectional: |p - p_k| < window.
    ``blocked=True`` follows the local-attention package instead: positions are cut into blocks of ``window``, a
    query sees its own block and the previous one (causal: only keys at or before it; bidirectional: also the next
    block), i.e. between window and 2 * window - 1 keys.
    q (B, H, N, d); k, v (B, H, S, d) with S >= N (a cached prefix first); positions (B, N) and (B, S);
    key_mask (B, S) bool. A query that sees no key outputs 0.
    """
    length = q.shape[-2]
    scores, allowed, vw = _banded_scores(q, k, v, window=window, causal=causal, q_positions=q_positions,
                                         k_positions=k_positions, key_mask=key_mask, scale=scale, blocked=blocked)
    has_key = allowed.any(-1, keepdim=True)
    weights = torch.where(has_key, scores, torch.zeros_like(scores)).softmax(-1) * has_key
    out = weights.to(vw.dtype) @ vw  # (B, H, n, w, d)
    return out.flatten(2, 3)[:, :, :length]


def sliding_window_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    causal: bool,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-normalised pieces of ``sliding_window_attention`` (sliding windows, arguments as there), for kinds that
    add other scores to the same normaliser (LoLCATs, arXiv 2410.10254 sec. 3.2): sum_j exp(s_ij - m_i) v_j
    (B, H, N, d) and sum_j exp(s_ij - m_i) (B, H, N) over each query's window, in float32 (float64 for float64
    inputs), with m_i the row maximum over the window (kept in the graph: the result depends on it). A query that
    sees no key gets 0 and 0. Windows are cut to the S keys, so a window longer than the input costs O(N S)."""
    length = q.shape[-2]
    ct = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    window = min(window, k.shape[-2])  # every key is closer than S: a longer window reaches no further
    scores, allowed, vw = _banded_scores(q, k, v.to(ct), window=window, causal=causal, q_positions=q_positions,
                                         k_positions=k_positions, key_mask=key_mask, scale=scale, blocked=False,
                                         block=max(1, min(window, length)))
    scores = scores.to(ct)  # (B, H, n, b, W)
    has_key = allowed.any(-1, keepdim=True)
    row_max = torch.where(has_key, scores, torch.zeros_like(scores)).amax(-1, keepdim=True)  # (B, H, n, b, 1)
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 outside the window
    numerator = (weights @ vw).flatten(2, 3)[:, :, :length]  # (B, H, N, d)
    denominator = weights.sum(-1).flatten(2, 3)[:, :, :length]  # (B, H, N)
    return numerator, denominator


def windowed_kernel_attention(
    q_features: torch.Tensor,
    k_features: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_length: int,
    window_length: int,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    k_log_scale: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    decay: float | None = None,
) -> torch.Tensor:
    """TF KernelAttention's causal windowed attention, exactly and at O(N * window * chunk) cost.

    Positions are cut into chunks of ``chunk_length``; a query in chunk i sees every key of chunks
    i - window_length + 1 ... i (inside its own chunk in both directions, as in TF), with weight
    ``decay ** (i - j)`` for a key in chunk j when ``decay`` is set. With chunk_length = 1 it is causal at the token
    level: a sliding window of ``window_length`` tokens of kernel attention, which streams token by token.
    Features as from a FeatureMap: keys divided by exp(k_log_scale) (stabilised here per window).
    """
    batch, heads, length, _ = q_features.shape
    keys = k_features.shape[-2]
    if key_mask is None:
        key_mask = torch.ones(batch, keys, dtype=torch.bool, device=q_features.device)
    back = window_length * chunk_length
    start, size, count = _window_layout(length, keys, chunk_length, back, chunk_length - 1)
    v_aug = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1).float()], dim=-1)
    qb = _blocks(q_features.float(), chunk_length, count)  # (B, H, n, C, m)
    kw = gather_windows(k_features.float(), start, chunk_length, size, count)  # (B, H, n, W, m)
    vw = gather_windows(v_aug, start, chunk_length, size, count)  # (B, H, n, W, d+1)
    q_pos, k_pos, valid = _gather_side(q_positions, k_positions, key_mask, chunk_length, start, size, count)
    chunk_gap = torch.div(q_pos, chunk_length, rounding_mode="floor") - torch.div(
        k_pos, chunk_length, rounding_mode="floor"
    )  # (B, 1, n, C, W)
    allowed = valid & (chunk_gap >= 0) & (chunk_gap < window_length)
    weights = allowed.float()
    if decay is not None:
        weights = weights * torch.pow(torch.tensor(float(decay)), chunk_gap.clamp_min(0))
    scores = qb @ kw.transpose(-1, -2)  # (B, H, n, C, W)
    if k_log_scale is not None:
        log_scale = gather_windows(k_log_scale.float().unsqueeze(-1), start, chunk_length, size, count)
        log_scale = log_scale.transpose(-1, -2)  # (B, H, n, 1, W)
        masked = log_scale.masked_fill(~allowed, float("-inf"))
        shift = masked.amax(-1, keepdim=True)  # per query: cancels in its normaliser
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        weights = weights * torch.exp(masked - shift)
    out_aug = (scores * weights) @ vw  # (B, H, n, C, d+1)
    numerator, normaliser = out_aug[..., :-1], out_aug[..., -1:]
    out = numerator / torch.where(normaliser.abs() > 1e-30, normaliser, torch.ones_like(normaliser))
    return out.flatten(2, 3)[:, :, :length].to(v.dtype)


def masked_softmax_attention(q, k, v, *, key_mask: torch.Tensor, causal: bool, scale: float | None = None):
    """Exact softmax attention of N queries over S >= N keys (the last N are the queries' own), through
    ``scaled_dot_product_attention``; padded keys are masked and a query with no key to see outputs 0.
    q (B, H, N, d); k, v (B, H, S, d); key_mask (B, S) bool."""
    batch, _, length, _ = q.shape
    total = k.shape[2]
    allowed = key_mask[:, None, None, :].expand(batch, 1, length, total)  # (B, 1, N, S)
    if causal:
        future = torch.ones(length, total, dtype=torch.bool, device=q.device).triu(total - length + 1)
        allowed = allowed & ~future
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale)
    return out * has_key.to(out.dtype)
