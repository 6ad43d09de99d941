"""Banded attention (local softmax heads, TF windowed causal kernel attention) against dense masked references."""

import pytest
import torch

from hf_performer.local_ops import sliding_window_attention, windowed_kernel_attention


def dense_reference(scores, v, allowed):
    """Softmax over the allowed keys of a dense (B, H, N, S) score matrix, in float64; no key -> 0."""
    scores = scores.double().masked_fill(~allowed, float("-inf"))
    has = allowed.any(-1, keepdim=True)
    weights = torch.where(has, scores, torch.zeros_like(scores)).softmax(-1) * has
    return weights @ v.double()


def positions_from(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_equals_dense_masked_softmax(causal, window):
    torch.manual_seed(window)
    B, H, N, d = 2, 3, 19, 8
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    mask = torch.ones(B, N, dtype=torch.bool)
    if causal:
        mask[1, :5] = False  # left padding
    else:
        mask[1, -4:] = False  # right padding
    pos = positions_from(mask)
    out = sliding_window_attention(q, k, v, window=window, causal=causal, q_positions=pos, k_positions=pos,
                                   key_mask=mask)
    distance = pos[:, None, :, None] - pos[:, None, None, :]
    allowed = mask[:, None, None, :] & (distance.abs() < window)
    if causal:
        allowed &= distance >= 0
    expected = dense_reference(q @ k.transpose(-1, -2) * d**-0.5, v, allowed)
    torch.testing.assert_close(out[mask[:, None, :].expand(B, H, N)].double(),
                               expected[mask[:, None, :].expand(B, H, N)], rtol=1e-5, atol=1e-6)


def test_sliding_window_with_cached_prefix_equals_full_pass():
    torch.manual_seed(0)
    B, H, N, d, window = 2, 2, 23, 4, 5
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    pos = torch.arange(N).expand(B, N)
    full = sliding_window_attention(q, k, v, window=window, causal=True, q_positions=pos, k_positions=pos)
    for t in (0, 4, 11, 22):
        lo = max(0, t - window + 1)
        step = sliding_window_attention(q[:, :, t:t + 1], k[:, :, lo:t + 1], v[:, :, lo:t + 1], window=window,
                                        causal=True, q_positions=pos[:, t:t + 1], k_positions=pos[:, lo:t + 1])
        torch.testing.assert_close(step[:, :, 0], full[:, :, t])


@pytest.mark.parametrize("chunk, window, decay", [(1, 3, None), (1, 4, 0.5), (3, 2, None), (4, 2, 0.7)])
@pytest.mark.parametrize("stabilised", [False, True])
def test_windowed_kernel_attention_equals_dense_reference(chunk, window, decay, stabilised):
    torch.manual_seed(chunk * 10 + window)
    B, H, N, m, d = 2, 2, 17, 6, 5
    qf, kf, v = torch.rand(B, H, N, m), torch.rand(B, H, N, m), torch.randn(B, H, N, d)
    log_scale = torch.randn(B, H, N) * 3 if stabilised else None
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :4] = False
    pos = positions_from(mask)
    out = windowed_kernel_attention(qf, kf, v, chunk_length=chunk, window_length=window, q_positions=pos,
                                    k_positions=pos, k_log_scale=log_scale, key_mask=mask, decay=decay)
    true_keys = kf.double() * (log_scale.double().exp().unsqueeze(-1) if stabilised else 1)
    gap = (pos[:, None, :, None] // chunk) - (pos[:, None, None, :] // chunk)
    allowed = mask[:, None, None, :] & (gap >= 0) & (gap < window)
    weights = allowed.double() * (decay ** gap.clamp_min(0).double() if decay else 1.0)
    scores = (qf.double() @ true_keys.transpose(-1, -2)) * weights
    expected = (scores @ v.double()) / scores.sum(-1, keepdim=True)
    real = mask[:, None, :].expand(B, H, N)
    torch.testing.assert_close(out[real].double(), expected[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_windows_follow_the_local_attention_package(causal):
    """blocked=True: own block of `window` positions plus the previous one (and the next one when bidirectional)."""
    torch.manual_seed(1)
    B, H, N, d, window = 1, 2, 22, 4, 4
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    pos = torch.arange(N).expand(B, N)
    out = sliding_window_attention(q, k, v, window=window, causal=causal, q_positions=pos, k_positions=pos,
                                   blocked=True)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    gap = i // window - j // window
    allowed = (gap == 0) | (gap == 1) | ((gap == -1) & (not causal))
    if causal:
        allowed = allowed & (j <= i)
    expected = dense_reference(q @ k.transpose(-1, -2) * d**-0.5, v, allowed.expand(B, H, N, N))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
