"""Fused Triton kernels for causal kernel attention on CUDA: the same result and state as ``ops_chunked.py``.

Optional: Triton is imported here only, inside ``try``, and ``ops.causal_linear_attention`` loads this module only
for CUDA tensors (``implementation="auto"``) or when asked (``implementation="triton"``). The PyTorch chunked path
stays the reference and the CPU path; this file is tested against it and against the float64 O(N^2) reference on
CPU through Triton's interpreter (``TRITON_INTERPRET=1``, see tests/ops/test_triton_ops.py).

Layout (arXiv 2006.16236 sec. 3.3 for the recurrence, arXiv 2202.10447 sec. 4 for the chunked form): one program
per (batch * head, block of columns) walks the sequence chunk by chunk, the running (m, d) state and the (m,)
normaliser sum in registers, so nothing of size N m d (or even N/C m d) touches memory. Four kernels:

* forward: out_t = [sum_u w_tu (q_t . k_u) v_u] / [sum_u w_tu (q_t . k_u)], programs over value-column blocks;
* dq (forward order), dk and dv (reverse order): each keeps its own slice of the state or of the state's gradient.

Stabiliser: keys come divided by a per-token scale exp(l_u) (exponential feature maps, see ``ops.py``), and every
weight is w_tu = exp(l_u - c_t) <= 1 with c_t the running maximum, the chunk hand-offs exp(c_prev - c_t) <= 1. This
is ``ops_chunked._Block``'s exact mode; in registers those exponentials are free, so there is no fast/exact switch.
Everything accumulates in float32 (float64 for float64 inputs), and the dots are plain fp32 FMAs (no TF32, so no
tensor cores yet: half inputs are upcast; bf16 operands with fp32 accumulation are the obvious next step on a GPU).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Optional

import torch
from torch import Tensor

from .ops_common import NEG_LOG_SCALE, _compute_dtype, _output_gradients

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: ops.py never calls in here without Triton
    triton = None



def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): slow, for tests of these kernels without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def usable(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: CUDA with Triton, or any device under the interpreter."""
    return available() and (x.is_cuda or interpreting())


def _block(size: int, cap: int | None = None) -> int:
    """Power-of-two block covering ``size`` (tl.dot needs at least 16), at most ``cap`` when given."""
    block = max(16, 1 << max(0, size - 1).bit_length())
    return block if cap is None else min(block, cap)


def shared_memory_bytes(num_features: int, dtype: torch.dtype) -> int:
    """Upper bound on the shared memory one program of the widest kernels (forward, dv) takes: they hold whole
    (C, m) query and key tiles, so it grows with the feature count m. Fitted to what Triton 3.9 allocates for
    sm_90 (tests/ops/compile_triton_kernels.py checks the bound): fp32 256 B per feature-tile column, fp64 640 B."""
    block = _block(num_features)  # the kernels' feature tile
    return 640 * block + 16384 if dtype == torch.float64 else 256 * block + 12288


def shared_memory_limit(x: Tensor) -> int | None:
    """Shared memory per block that ``x``'s GPU offers a kernel (opt-in maximum); None off CUDA (interpreter)."""
    if not x.is_cuda:
        return None
    properties = torch.cuda.get_device_properties(x.device)
    return getattr(properties, "shared_memory_per_block_optin", 0) or 48 * 1024


def fits(x: Tensor, num_features: int) -> bool:
    """Whether m features fit the kernels' tiles on ``x``'s GPU (e.g. m <= 256 on 99 KiB consumer GPUs, m <= 512
    on A100 / H100 in fp32); ``auto`` falls back to the PyTorch chunked path otherwise."""
    limit = shared_memory_limit(x)
    return limit is None or shared_memory_bytes(num_features, _compute_dtype(x.dtype)) <= limit


if triton is not None:
    # A jit function may read a global only when it is a constexpr.
    _NEG = tl.constexpr(NEG_LOG_SCALE)
    # 8 warps, no software pipelining: the (C, m) tiles and the state slice stay in registers without spilling
    # (ptxas, fp32, m = 128, d = 64: under 1 KB of spills per thread, vs 5-13 KB with 4 warps and 3 stages, whose
    # pipelined loads also need more shared memory than an A100 has in fp64).
    LAUNCH = dict(num_warps=8, num_stages=1)

    @triton.jit
    def _tile(ptr, g, N, width, rows, mask_r, cols, mask_cols, DTYPE: tl.constexpr):
        """Rows x columns of a (G, N, width) tensor in the compute dtype, zeros outside it."""
        return tl.load(ptr + g * N * width + rows[:, None] * width + cols[None, :],
                       mask=mask_r[:, None] & mask_cols[None, :], other=0.0).to(DTYPE)

    @triton.jit
    def _store_tile(ptr, value, g, N, width, rows, mask_r, cols, mask_cols):
        tl.store(ptr + g * N * width + rows[:, None] * width + cols[None, :], value,
                 mask=mask_r[:, None] & mask_cols[None, :])

    @triton.jit
    def _load_state(ptr, g, M, D, offs_m, mask_m, offs_d, mask_d, DTYPE: tl.constexpr):
        """A (BM, BD) slice of an (m, d + 1) state [sum k v^T | sum k] and its last column's (BM,) slice."""
        base = ptr + g * M * (D + 1)
        kv = tl.load(base + offs_m[:, None] * (D + 1) + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0).to(DTYPE)
        ksum = tl.load(base + offs_m * (D + 1) + D, mask=mask_m, other=0.0).to(DTYPE)
        return kv, ksum

    @triton.jit
    def _store_state(ptr, kv, ksum, g, M, D, offs_m, mask_m, offs_d, mask_d, with_sum):
        base = ptr + g * M * (D + 1)
        tl.store(base + offs_m[:, None] * (D + 1) + offs_d[None, :], kv, mask=mask_m[:, None] & mask_d[None, :])
        if with_sum:
            tl.store(base + offs_m * (D + 1) + D, ksum, mask=mask_m)

    @triton.jit
    def _chunk_weights(L, Cmax, g, N, rows, mask_r, DTYPE: tl.constexpr):
        """Key log scales l (C,), running maxima c (C,) and causal weights w_tu = exp(l_u - c_t) <= 1 (C, C).
        Padded rows load -1e30: their weights are 0, and c stays non-decreasing over the real rows."""
        log_scale = tl.load(L + g * N + rows, mask=mask_r, other=_NEG).to(DTYPE)
        c = tl.load(Cmax + g * N + rows, mask=mask_r, other=_NEG).to(DTYPE)
        causal = rows[:, None] >= rows[None, :]  # (C, C): t >= u
        weights = tl.where(causal, tl.exp(tl.minimum(log_scale[None, :] - c[:, None], 0.0)), 0.0)
        return log_scale, c, weights

    @triton.jit
    def _entering_scale(Cmax, c0, g, N, start, DTYPE: tl.constexpr):
        """Scale of the state entering the chunk at ``start``: the running maximum just before it, or c0."""
        c_before = tl.load(Cmax + g * N + start - 1, mask=start > 0, other=0.0).to(DTYPE)
        return tl.where(start > 0, c_before, c0)

    @triton.jit
    def _advance(kv, ksum, k, v, log_scale, c_prev, c_end):
        """The state after a chunk, at the scale c_end of its last real row (every factor <= 1)."""
        decay = tl.exp(c_prev - c_end)
        k_end = k * tl.exp(log_scale - c_end)[:, None]  # (C, BM): keys at the leaving scale
        return kv * decay + tl.dot(tl.trans(k_end), v, input_precision="ieee"), ksum * decay + tl.sum(k_end, 0)

    @triton.jit
    def _retreat(d_kv, q, dnum, c, c_before, c_end):
        """The state's gradient before a chunk (reverse pass), at the entering scale c_before; also the chunk's
        queries at that scale, (C, BM)."""
        q_before = q * tl.exp(tl.minimum(c_before - c, 0.0))[:, None]
        d_kv = d_kv * tl.exp(c_before - c_end) + tl.dot(tl.trans(q_before), dnum, input_precision="ieee")
        return d_kv, q_before

    @triton.jit
    def _forward_kernel(Q, K, V, L, Cmax, KV0, C0, OUT, DEN, KV_END, N, M, D,
                        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        DTYPE: tl.constexpr):
        """out_t = [sum_u w_tu (q_t . k_u) v_u] / [sum_u w_tu (q_t . k_u)]; programs over value-column blocks."""
        g = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements for large batches
        col_block = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        kv, ksum = _load_state(KV0, g, M, D, offs_m, mask_m, offs_d, mask_d, DTYPE)  # (BM, BD), (BM,)
        c_prev = tl.load(C0 + g).to(DTYPE)  # scale of the state entering the chunk
        for start in range(0, N, BLOCK_C):
            rows = start + offs_c
            mask_r = rows < N
            q = _tile(Q, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, BM)
            k = _tile(K, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, BM)
            v = _tile(V, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, BD)
            log_scale, c, weights = _chunk_weights(L, Cmax, g, N, rows, mask_r, DTYPE)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * weights  # (C, C)
            carry = tl.exp(tl.minimum(c_prev - c, 0.0))  # (C,): the state's scale brought to each query's, <= 1
            numerator = tl.dot(scores, v, input_precision="ieee") + carry[:, None] * tl.dot(
                q, kv, input_precision="ieee")  # (C, BD)
            normaliser = tl.sum(scores, 1) + carry * tl.sum(q * ksum[None, :], 1)  # (C,)
            safe = tl.where(tl.abs(normaliser) > 1e-30, normaliser, 1.0)  # a query with no key: output 0
            _store_tile(OUT, numerator / safe[:, None], g, N, D, rows, mask_r, offs_d, mask_d)
            if col_block == 0:
                tl.store(DEN + g * N + rows, normaliser, mask=mask_r)
            c_end = tl.max(c, 0)  # the last real row's running max
            kv, ksum = _advance(kv, ksum, k, v, log_scale, c_prev, c_end)
            c_prev = c_end
        _store_state(KV_END, kv, ksum, g, M, D, offs_m, mask_m, offs_d, mask_d, col_block == 0)

    @triton.jit
    def _dq_kernel(Q, K, V, L, Cmax, KV0, C0, DNUM, DDEN, DQ, N, M, D,
                   BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
        """dq_t = sum_{u<=t} w_tu ([dnum_t, dden_t] . [v_u, 1]) k_u; programs over feature-column blocks."""
        g = tl.program_id(0).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        kv, ksum = _load_state(KV0, g, M, D, offs_m, mask_m, offs_d, mask_d, DTYPE)  # (BM, D), (BM,)
        c_prev = tl.load(C0 + g).to(DTYPE)
        for start in range(0, N, BLOCK_C):
            rows = start + offs_c
            mask_r = rows < N
            k = _tile(K, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, BM)
            v = _tile(V, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, D)
            dnum = _tile(DNUM, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, D)
            dden = tl.load(DDEN + g * N + rows, mask=mask_r, other=0.0).to(DTYPE)  # (C,)
            log_scale, c, weights = _chunk_weights(L, Cmax, g, N, rows, mask_r, DTYPE)
            d_scores = (tl.dot(dnum, tl.trans(v), input_precision="ieee") + dden[:, None]) * weights  # (C, C)
            carry = tl.exp(tl.minimum(c_prev - c, 0.0))
            dq = tl.dot(d_scores, k, input_precision="ieee") + carry[:, None] * (
                tl.dot(dnum, tl.trans(kv), input_precision="ieee") + dden[:, None] * ksum[None, :])  # (C, BM)
            _store_tile(DQ, dq, g, N, M, rows, mask_r, offs_m, mask_m)
            c_end = tl.max(c, 0)
            kv, ksum = _advance(kv, ksum, k, v, log_scale, c_prev, c_end)
            c_prev = c_end

    @triton.jit
    def _dk_kernel(Q, V, L, Cmax, C0, DNUM, DDEN, GRAD_KV, DK, D_KV0, N, M, D,
                   BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
        """dk_u = sum_{t>=u} w_tu ([dnum_t, dden_t] . [v_u, 1]) q_t, last chunk first; the gradient of the state
        entering each chunk is carried at that chunk's scale (its factors are <= 1), and leaves as d kv0."""
        g = tl.program_id(0).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        d_kv, d_ksum = _load_state(GRAD_KV, g, M, D, offs_m, mask_m, offs_d, mask_d, DTYPE)  # at scale c_end
        c0 = tl.load(C0 + g).to(DTYPE)
        n_chunks = tl.cdiv(N, BLOCK_C)
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK_C
            rows = start + offs_c
            mask_r = rows < N
            q = _tile(Q, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, BM)
            v = _tile(V, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, D)
            dnum = _tile(DNUM, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, D)
            dden = tl.load(DDEN + g * N + rows, mask=mask_r, other=0.0).to(DTYPE)
            log_scale, c, weights = _chunk_weights(L, Cmax, g, N, rows, mask_r, DTYPE)
            c_end = tl.max(c, 0)
            d_scores = (tl.dot(dnum, tl.trans(v), input_precision="ieee") + dden[:, None]) * weights  # (C, C)
            key_scale = tl.exp(log_scale - c_end)  # (C,) <= 1
            dk = tl.dot(tl.trans(d_scores), q, input_precision="ieee") + key_scale[:, None] * (
                tl.dot(v, tl.trans(d_kv), input_precision="ieee") + d_ksum[None, :])  # (C, BM)
            _store_tile(DK, dk, g, N, M, rows, mask_r, offs_m, mask_m)
            c_before = _entering_scale(Cmax, c0, g, N, start, DTYPE)
            d_kv, q_before = _retreat(d_kv, q, dnum, c, c_before, c_end)
            d_ksum = d_ksum * tl.exp(c_before - c_end) + tl.sum(q_before * dden[:, None], 0)
        _store_state(D_KV0, d_kv, d_ksum, g, M, D, offs_m, mask_m, offs_d, mask_d, True)

    @triton.jit
    def _dv_kernel(Q, K, L, Cmax, C0, DNUM, GRAD_KV, DV, N, M, D,
                   BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
        """dv_u = sum_{t>=u} w_tu (q_t . k_u) dnum_t, last chunk first; programs over value-column blocks."""
        g = tl.program_id(0).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        d_kv, d_ksum = _load_state(GRAD_KV, g, M, D, offs_m, mask_m, offs_d, mask_d, DTYPE)  # (M, BD); sum unused
        c0 = tl.load(C0 + g).to(DTYPE)
        n_chunks = tl.cdiv(N, BLOCK_C)
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK_C
            rows = start + offs_c
            mask_r = rows < N
            q = _tile(Q, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, M)
            k = _tile(K, g, N, M, rows, mask_r, offs_m, mask_m, DTYPE)  # (C, M)
            dnum = _tile(DNUM, g, N, D, rows, mask_r, offs_d, mask_d, DTYPE)  # (C, BD)
            log_scale, c, weights = _chunk_weights(L, Cmax, g, N, rows, mask_r, DTYPE)
            c_end = tl.max(c, 0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * weights  # (C, C): rows t, columns u
            key_scale = tl.exp(log_scale - c_end)
            dv = tl.dot(tl.trans(scores), dnum, input_precision="ieee") + key_scale[:, None] * tl.dot(
                k, d_kv, input_precision="ieee")  # (C, BD)
            _store_tile(DV, dv, g, N, D, rows, mask_r, offs_d, mask_d)
            c_before = _entering_scale(Cmax, c0, g, N, start, DTYPE)
            d_kv, q_before = _retreat(d_kv, q, dnum, c, c_before, c_end)




# Tile caps: a program holds its (C, m) query and key tiles and an (m, 32) slice of the state (or of its gradient),
# ~13k fp32 values, for 8 warps' registers at m = 128 (see LAUNCH). Untuned: no GPU was at hand when these kernels
# were written; tests/ops/test_triton_ops.py compiles them for sm_80 / sm_90 and benchmarks/bench_cuda.py times them.
MAX_CHUNK, MAX_COLUMNS = 32, 32


def _launch_options(q: Tensor, v: Tensor, chunk: int) -> dict:
    m, d = q.shape[-1], v.shape[-1]
    dtype = tl.float64 if q.dtype == torch.float64 else tl.float32
    return dict(BLOCK_C=_block(chunk, MAX_CHUNK), BLOCK_M=_block(m), BLOCK_D=_block(d), DTYPE=dtype)


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's (models split over GPUs, device_map="auto")."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()



def _as_groups(x: Tensor) -> Tensor:
    """(B, H, N, .) or (B, H, N) -> a contiguous (B*H, N, .) / (B*H, N) tensor."""
    return x.reshape(-1, *x.shape[2:]).contiguous()


def _scales(log_scale: Tensor | None, c0: Tensor | None, groups: int, length: int, ct, device):
    """(l, c, c0) as (G, N), (G, N), (G,) in the compute dtype; all zeros (weights 1) without log scales."""
    if log_scale is None:
        zeros = torch.zeros(groups, length, dtype=ct, device=device)
        return zeros, zeros, torch.zeros(groups, dtype=ct, device=device)
    log_scale = _as_groups(log_scale.to(ct))
    c0 = torch.full((groups,), NEG_LOG_SCALE, dtype=ct, device=device) if c0 is None else c0.reshape(groups).to(ct)
    c = torch.maximum(torch.cummax(log_scale, dim=-1).values, c0.unsqueeze(-1))
    return log_scale, c.contiguous(), c0.contiguous()


def _forward_impl(q, k, v, log_scale, kv0, c0, chunk):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    g = batch * heads
    ct = _compute_dtype(q.dtype)
    q3, k3, v3 = _as_groups(q), _as_groups(k), _as_groups(v)
    l3, c3, c03 = _scales(log_scale, c0, g, length, ct, q.device)
    kv0 = kv0.reshape(g, m, d + 1).to(ct).contiguous()
    out = torch.empty(g, length, d, dtype=ct, device=q.device)
    normaliser = torch.empty(g, length, dtype=ct, device=q.device)
    kv_end = torch.empty(g, m, d + 1, dtype=ct, device=q.device)
    options = _launch_options(q, v, chunk)
    options["BLOCK_D"] = _block(d, MAX_COLUMNS)  # value columns split across programs
    grid = (g, triton.cdiv(d, options["BLOCK_D"]))
    with _on_device(q):
        _forward_kernel[grid](q3, k3, v3, l3, c3, kv0, c03, out, normaliser, kv_end, length, m, d, **options,
                              **LAUNCH)
    c_end = (c3[:, -1] if length else c03).clone()  # a fresh tensor: no view of c3 nor alias of the input c0
    return (out.view(batch, heads, length, d).to(v.dtype), normaliser.view(batch, heads, length),
            kv_end.view(batch, heads, m, d + 1), c_end.reshape(batch, heads))


def _backward_impl(grad_out, grad_kv, q, k, v, log_scale, kv0, c0, out, normaliser, chunk):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    g = batch * heads
    ct = _compute_dtype(q.dtype)
    q3, k3, v3 = _as_groups(q), _as_groups(k), _as_groups(v)
    l3, c3, c03 = _scales(log_scale, c0, g, length, ct, q.device)
    dy, y, z = _as_groups(grad_out.to(ct)), _as_groups(out.to(ct)), normaliser.reshape(g, length, 1).to(ct)
    d_num, d_den = _output_gradients(dy, y, z)  # (G, N, d), (G, N, 1)
    d_num, d_den = d_num.contiguous(), d_den.squeeze(-1).contiguous()
    grad_kv = grad_kv.reshape(g, m, d + 1).to(ct).contiguous()
    dq = torch.empty(g, length, m, dtype=ct, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(g, length, d, dtype=ct, device=q.device)
    d_kv0 = torch.empty(g, m, d + 1, dtype=ct, device=q.device)
    options = _launch_options(q, v, chunk)
    feature_blocks = dict(options, BLOCK_M=_block(m, MAX_COLUMNS))
    value_blocks = dict(options, BLOCK_D=_block(d, MAX_COLUMNS))
    kv0 = kv0.reshape(g, m, d + 1).to(ct).contiguous()
    with _on_device(q):
        _dq_kernel[(g, triton.cdiv(m, feature_blocks["BLOCK_M"]))](
            q3, k3, v3, l3, c3, kv0, c03, d_num, d_den, dq, length, m, d, **feature_blocks, **LAUNCH)
        _dk_kernel[(g, triton.cdiv(m, feature_blocks["BLOCK_M"]))](
            q3, v3, l3, c3, c03, d_num, d_den, grad_kv, dk, d_kv0, length, m, d, **feature_blocks, **LAUNCH)
        _dv_kernel[(g, triton.cdiv(d, value_blocks["BLOCK_D"]))](
            q3, k3, l3, c3, c03, d_num, grad_kv, dv, length, m, d, **value_blocks, **LAUNCH)
    return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
            d_kv0.view(batch, heads, m, d + 1))


# One op namespace per copy of this module, as in ops_chunked.py (a remote-code copy can sit next to ours).
_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{_NAMESPACE}::triton_causal_forward", mutates_args=())
def _triton_forward(q: Tensor, k: Tensor, v: Tensor, log_scale: Optional[Tensor], kv0: Tensor, c0: Optional[Tensor],
                    chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, normaliser, kv_end, c_end); opaque to torch.compile."""
    return _forward_impl(q, k, v, log_scale, kv0, c0, chunk_size)


@_triton_forward.register_fake
def _(q, k, v, log_scale, kv0, c0, chunk_size):
    batch, heads, length, m = q.shape
    d = v.shape[-1]
    ct = _compute_dtype(q.dtype)
    return (v.new_empty(batch, heads, length, d), q.new_empty(batch, heads, length, dtype=ct),
            q.new_empty(batch, heads, m, d + 1, dtype=ct), q.new_empty(batch, heads, dtype=ct))


@torch.library.custom_op(f"{_NAMESPACE}::triton_causal_backward", mutates_args=())
def _triton_backward(grad_out: Tensor, grad_kv: Tensor, q: Tensor, k: Tensor, v: Tensor, log_scale: Optional[Tensor],
                     kv0: Tensor, c0: Optional[Tensor], out: Tensor, normaliser: Tensor,
                     chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_kv0)."""
    return _backward_impl(grad_out, grad_kv, q, k, v, log_scale, kv0, c0, out, normaliser, chunk_size)


@_triton_backward.register_fake
def _(grad_out, grad_kv, q, k, v, log_scale, kv0, c0, out, normaliser, chunk_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_kv)


def _setup_context(ctx, inputs, output):
    q, k, v, log_scale, kv0, c0, chunk_size = inputs
    out, normaliser, _, _ = output
    ctx.save_for_backward(q, k, v, log_scale, kv0, c0, out, normaliser)
    ctx.chunk_size = chunk_size


def _backward(ctx, grad_out, grad_normaliser, grad_kv, grad_c):
    q, k, v, log_scale, kv0, c0, out, normaliser = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_kv is None:
        grad_kv = torch.zeros(*kv0.shape, dtype=_compute_dtype(q.dtype), device=q.device)
    dq, dk, dv, d_kv0 = _triton_backward(grad_out.contiguous(), grad_kv.contiguous(), q, k, v, log_scale, kv0, c0,
                                         out, normaliser, ctx.chunk_size)
    return dq, dk, dv, None, d_kv0.to(kv0.dtype), None, None


torch.library.register_autograd(_triton_forward, _backward, setup_context=_setup_context)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, log_scale: Tensor | None, kv0: Tensor, c0: Tensor | None,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunked causal kernel attention with the Triton kernels: q, k (B, H, N, m) features (masked keys already
    zeroed, their ``log_scale`` at NEG_LOG_SCALE), v (B, H, N, d), entering state kv0 (B, H, m, d + 1) at scale c0
    (B, H) -> out (B, H, N, d), kv_end (B, H, m, d + 1), c_end (B, H) or None without log scales. Differentiable
    in q, k, v and kv0, like ``ops.causal_linear_attention``."""
    if not available():
        raise RuntimeError("the Triton kernels need the `triton` package (pip install triton)")
    if not (q.is_cuda or interpreting()):
        raise ValueError(
            f"the Triton kernels run on CUDA tensors (got {q.device}); on CPU use implementation='chunked', or set "
            "TRITON_INTERPRET=1 to run them (slowly) in Triton's interpreter"
        )
    if not fits(q, q.shape[-1]):
        raise ValueError(
            f"{q.shape[-1]} features need about {shared_memory_bytes(q.shape[-1], _compute_dtype(q.dtype)) // 1024} "
            f"KiB of shared memory per program in the Triton kernels, this GPU offers "
            f"{shared_memory_limit(q) // 1024} KiB: use implementation='chunked' (or 'auto', which falls back to it), "
            "or fewer features (nb_features)"
        )
    out, _, kv_end, c_end = _triton_forward(q.contiguous(), k.contiguous(), v.contiguous(), log_scale, kv0, c0,
                                            int(chunk_size))
    return out, kv_end, (c_end if log_scale is not None else None)
