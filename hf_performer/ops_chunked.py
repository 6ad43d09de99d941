"""Chunked causal path: causal kernel attention in chunks of C tokens, exact inside a chunk with a masked (C, C)
product and a running (m, d + 1) state across chunks (arXiv 2006.16236 sec. 3.3 for the recurrence; the chunked form
follows arXiv 2202.10447 sec. 4 and flash-linear-attention). O(N C (m + d) + N m d) time, O(N (m + d)) memory.

Two custom ops, each a forward and a backward op, sharing one block machinery (``_Block`` and the loops
``_forward_blocks`` / ``_backward_blocks``):

* ``chunked_causal_*``: q, k are features (B, H, N, m), with per-key log scales for exponential maps or without;
* ``chunked_exp_*``: q, k are the inputs (B, H, N, d) of exponential features exp(x P^T - a |x|^2 + b), computed
  block by block inside the op, forward and backward (``ops.causal_exp_attention``), so no (B, H, N, m) feature
  tensor nor its gradient is ever allocated.

On CPU with more than one torch thread, the head groups of a call (sequences of one or more heads, each carrying
its own state through its token blocks) run as tasks on single-threaded workers (``HEAD_GROUP_TASKS``).

The backward ops recompute every per-chunk quantity from q, k, v and one saved state per block of chunks, so no
(N, m, d) tensor ever exists; being custom ops, their Python loops are opaque to torch.compile (nothing unrolls).
Notation and the stabiliser as in ``ops.py``; ``ops_naive.py`` is the reference, ``ops_triton.py`` the same
algorithm as fused Triton kernels.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops_common import (
    NEG_LOG_SCALE,
    _compute_dtype,
    _output_gradients,
    _safe,
    exp_projection_backward,
    exp_projection_features,
)

# A block runs without per-query scales when every query's running max of key log scales is within this many nats of
# the max at the end of its chunk (nearly always); the fp32 range left to the normaliser is then exp(-87 + FAST_SPAN).
FAST_SPAN = 20.0

# Tokens (summed over heads) handled per step of the chunk loop: the block's features and (C, C) scores stay in the
# CPU's cache, which doubles the speed of the small batched matmuls compared with one pass over the whole sequence.
# The backward's per-block temporaries (features, state gradients, scores) are what must fit: 2048 tokens measured
# 5-9% faster forward + backward than 4096 at m = 128, d = 64 on one thread (1024 about the same as 2048, more blocks).
BLOCK_TOKENS = 2048


# ----------------------------------------------------------------------------------------------------------------
# Block machinery, shared by both ops
# ----------------------------------------------------------------------------------------------------------------


class _Features:
    """What the exp op (``chunked_exp_*``) needs to compute exp-projection features block by block:
    P (m, d), a, b, and which keys are real ((G, Np) bool, padding of the last chunk included)."""

    def __init__(self, projection: Tensor, norm_coef: float, offset: float, keep: Tensor):
        self.projection, self.norm_coef, self.offset, self.keep = projection, norm_coef, offset, keep

    def queries(self, x: Tensor) -> Tensor:
        return exp_projection_features(x, self.projection, self.norm_coef, self.offset)[0]

    def keys(self, x: Tensor, heads: slice, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Masked key features (R, m) and log scales (hb, T), NEG_LOG_SCALE at masked keys."""
        features, log_scale = exp_projection_features(x, self.projection, self.norm_coef, self.offset)
        keep = self.keep[heads, start:end]  # (hb, T)
        features.mul_(keep.reshape(-1, 1))
        return features, log_scale.view(keep.shape).masked_fill_(~keep, NEG_LOG_SCALE)

    def backward(self, grad_features: Tensor, features: Tensor, x: Tensor) -> Tensor:
        return exp_projection_backward(grad_features, features, x, self.projection, self.norm_coef)


def _block_layout(groups: int, length: int, chunk: int, tasks: int = 1) -> tuple[int, int]:
    """(heads per block, tokens per block) for about BLOCK_TOKENS tokens per block. A block is either whole
    sequences of several heads or part of one head's sequence, so its (X, C, .) chunk view never needs a copy.
    Short sequences share a block between heads, but never so many that fewer than ``tasks`` head groups are left
    for the workers (``_head_group_tasks``). The tokens per block, hence the saved block states, depend on the
    length alone."""
    if length <= BLOCK_TOKENS:
        return max(1, min(groups, BLOCK_TOKENS // length, groups // tasks)), length
    return 1, max(1, BLOCK_TOKENS // chunk) * chunk


class _Block:
    """hb heads x nb chunks of C tokens (X = hb * nb chunks), with everything forward and backward share.

    Chunk i adds its own keys through a masked (C, C) product with ``values`` and earlier keys through the state
    entering it, E_i = alpha_i E_{i-1} + U_{i-1} with U_j = k_j^T ``state_values``_j. Three modes:

    * plain (no log scale): every scale is 1 and the weights are the causal mask.
    * fast (log scales, and every query's running max c_t within FAST_SPAN nats of its chunk's ce_i): chunk i is
      computed at the scale ce_i of its last token: its values carry exp(l_u - ce_i), E_i is at scale ce_i, and query
      t's numerator and normaliser both carry exp(c_t - ce_i) >= exp(-FAST_SPAN), which cancels in their ratio; so
      there are no (C, C) exponentials and no per-query scales. A chunk's keys join the state already at the next
      chunk's scale, exp(l_u - ce_{i+1}), so the scan is one fused op per chunk.
    * exact (otherwise): weights exp(l_u - c_t) <= 1, E_i at scale cp_i = ce_{i-1}, brought to query t by
      ``row_scale = exp(cp_i - c_t)`` <= 1. Nothing can overflow or lose range, whatever the log scales do.
    """

    def __init__(self, q, k, v, log_scale, c, c_start, heads: slice, start: int, end: int, chunk: int, ct,
                 values: Tensor, features: _Features | None = None, fill_running_max: bool = False):
        """With ``features``, q and k are (G, Np, d) inputs of the feature map: their features are computed here,
        the keys' log scales written to ``log_scale`` (and, with ``fill_running_max``, the running max to ``c``).
        ``values``: the loop's (X_max, C, d+1) buffer from ``_values_buffer``, whose ones column is already set."""
        hb, nb = heads.stop - heads.start, (end - start) // chunk
        x = hb * nb
        self.hb, self.nb, self.chunk = hb, nb, chunk
        self.features = features
        if features is None:
            self.q = q[heads, start:end].to(ct).reshape(x, chunk, -1)  # (X, C, m), a view for fp32 inputs
            self.k = k[heads, start:end].to(ct).reshape(x, chunk, -1)  # (X, C, m)
        else:
            self.q_in, self.k_in = q[heads, start:end].to(ct), k[heads, start:end].to(ct)  # (hb, T, d)
            self.q = features.queries(self.q_in).view(x, chunk, -1)  # (X, C, m)
            k_features, key_log_scale = features.keys(self.k_in, heads, start, end)  # (hb*T, m), (hb, T)
            self.k = k_features.view(x, chunk, -1)  # (X, C, m)
            log_scale[heads, start:end] = key_log_scale
            if fill_running_max:
                running = torch.cummax(key_log_scale, dim=-1).values  # (hb, T)
                c[heads, start:end] = torch.maximum(running, c_start[heads].unsqueeze(-1))
        v_aug = values[:x]  # (X, C, d+1): [v | 1] without a fresh concatenation per block
        v_aug[..., :-1].copy_(v[heads, start:end].reshape(x, chunk, -1))
        self.values = self.state_values = v_aug  # (X, C, d+1) of the intra-chunk product / of the state
        self.value_scale = self.state_scale = None  # (X, C, 1): what values / state_values carry beyond v_aug
        self.weights = self.row_scale = None
        # Scan: E_0 = alpha0 S, E_i = steps[i-1] E_{i-1} + U_{i-1} for i = 1 .. nb, E_nb the leaving state; None: 1.
        self.alpha0 = self.steps = None
        self.fast = log_scale is None
        if log_scale is None:
            return
        lb = log_scale[heads, start:end].to(ct).view(hb, nb, chunk)  # (hb, nb, C)
        cb = c[heads, start:end].to(ct).view(hb, nb, chunk)  # (hb, nb, C)
        c_start = c_start[heads]  # (hb,)
        ce = cb[..., -1]  # (hb, nb)
        gap = (ce.unsqueeze(-1) - cb).masked_fill_(cb <= NEG_LOG_SCALE / 2, 0.0)  # queries with no key yet: 0
        self.fast = bool(gap.max() <= FAST_SPAN)
        if self.fast:
            ce_next = torch.cat([ce[:, 1:], ce[:, -1:]], dim=-1)  # (hb, nb)
            self.value_scale = torch.exp(lb - ce.unsqueeze(-1)).view(x, chunk, 1)
            self.state_scale = torch.exp(lb - ce_next.unsqueeze(-1)).view(x, chunk, 1)
            self.values = v_aug * self.value_scale
            self.state_values = v_aug * self.state_scale
            self.alpha0 = torch.exp(c_start - ce[:, 0])[:, None, None]  # (hb, 1, 1)
            self.steps = torch.exp(ce - ce_next)[..., None, None]  # (hb, nb, 1, 1)
            return
        cp = torch.cat([c_start.unsqueeze(-1), ce[:, :-1]], dim=-1)  # (hb, nb)
        cp_next = torch.cat([ce[:, :-1], ce[:, -1:]], dim=-1)  # (hb, nb): cp_{i+1}, then the last token's
        self.state_scale = torch.exp(lb - ce.unsqueeze(-1)).view(x, chunk, 1)
        self.state_values = v_aug * self.state_scale
        # exp(-inf) and denormals are slow on CPU: clamp the future (u > t) to 0 before exp and mask it after.
        exponent = (lb.unsqueeze(-2) - cb.unsqueeze(-1)).clamp_(max=0.0)  # (hb, nb, C, C): l_u - c_t
        self.weights = exponent.exp_().view(x, chunk, chunk).tril_()
        self.row_scale = torch.exp(cp.unsqueeze(-1) - cb).view(x, chunk, 1)  # (X, C, 1)
        self.steps = torch.exp(cp - cp_next)[..., None, None]  # (hb, nb, 1, 1)

    def chunk_kv(self) -> Tensor:
        return self.k.transpose(-1, -2) @ self.state_values  # (X, m, d+1)

    def mask(self, scores: Tensor) -> Tensor:
        """Causal mask (and weights) of a (X, C, C) product, in place."""
        return scores.tril_() if self.weights is None else scores.mul_(self.weights)

    def scores(self) -> Tensor:
        return self.mask(self.q @ self.k.transpose(-1, -2))  # (X, C, C)

    def scan(self, kv: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """kv (X, m, d+1) per chunk and the block's entering state (hb, m, d+1) -> the state entering each chunk
        (X, m, d+1) and the state leaving the block (hb, m, d+1, at the last token's scale).

        One fused op per chunk on cache-sized rows: torch's cumsum over a non-last dimension is ~30x slower on
        CPU, and a cumsum at one common scale could overflow."""
        hb, nb = self.hb, self.nb
        kvs = kv.view(hb, nb, *kv.shape[1:]).unbind(1)
        states = kv.new_empty(hb, nb + 1, *kv.shape[1:])  # entering states, then the leaving one
        rows = states.unbind(1)
        if self.alpha0 is None:
            rows[0].copy_(state)
        else:
            torch.mul(state, self.alpha0, out=rows[0])
        steps = [None] * nb if self.steps is None else self.steps.unbind(1)
        for i in range(1, nb + 1):
            if steps[i - 1] is None:
                torch.add(rows[i - 1], kvs[i - 1], out=rows[i])
            else:
                torch.addcmul(kvs[i - 1], rows[i - 1], steps[i - 1], out=rows[i])
        return states[:, :nb].flatten(0, 1), rows[nb]

    def scan_backward(self, d_entering: Tensor, d_leaving: Tensor) -> tuple[Tensor, Tensor]:
        """Transpose of ``scan``: gradients w.r.t. the per-chunk kv (X, m, d+1) and the entering state (hb, ...)."""
        hb, nb = self.hb, self.nb
        d_rows = d_entering.view(hb, nb, *d_entering.shape[1:]).unbind(1)
        grads = d_entering.new_empty(hb, nb + 1, *d_entering.shape[1:])  # w.r.t. each E_i, all paths
        rows = grads.unbind(1)
        rows[nb].copy_(d_leaving)
        steps = [None] * nb if self.steps is None else self.steps.unbind(1)
        for i in range(nb, 0, -1):
            if steps[i - 1] is None:
                torch.add(d_rows[i - 1], rows[i], out=rows[i - 1])
            else:
                torch.addcmul(d_rows[i - 1], rows[i], steps[i - 1], out=rows[i - 1])
        d_state = rows[0] if self.alpha0 is None else rows[0] * self.alpha0
        return grads[:, 1:].flatten(0, 1), d_state  # U_{i-1} enters E_i with factor 1


def _values_buffer(heads: slice, tokens: int, chunk: int, d: int, ct: torch.dtype, device) -> Tensor:
    """One (X_max, C, d+1) buffer per head group for every block's [v | 1], its ones column set once: a group's
    blocks run one after another, so they can share it (a ``cat`` per block was 2% of the op's time at N = 4096)."""
    buffer = torch.empty((heads.stop - heads.start) * tokens // chunk, chunk, d + 1, dtype=ct, device=device)
    buffer[..., -1] = 1.0
    return buffer


def _running_max(log_scale, c0, ct):
    """(log_scale, c = max(c0, max_{u<=t} log_scale_u), c0), all (G, N) / (G,) and None without log scale."""
    if log_scale is None:
        return None, None, None
    log_scale, c0 = log_scale.to(ct), c0.to(ct)
    return log_scale, torch.maximum(torch.cummax(log_scale, dim=-1).values, c0.unsqueeze(-1)), c0


def _flatten_inputs(q, k, v, log_scale, chunk):
    """(G, Np, .) views of the inputs, padded to a whole number of chunks (a copy only when N % C != 0)."""
    batch, heads, length, m = q.shape
    g, pad = batch * heads, -length % chunk
    q, k, v = q.reshape(g, length, m), k.reshape(g, length, m), v.reshape(g, length, v.shape[-1])
    if log_scale is not None:
        log_scale = log_scale.reshape(g, length)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        if log_scale is not None:
            log_scale = F.pad(log_scale, (0, pad), value=NEG_LOG_SCALE)
    return q, k, v, log_scale


def _head_groups(groups: int, length: int, chunk: int, tasks: int) -> tuple[list[slice], list[tuple[int, int, int]]]:
    """The head groups (slices of the G = B * H sequences) and, in forward order, the token blocks (index, start,
    end) that each of them runs through: every group carries its own state, so groups are independent tasks."""
    hb, tokens = _block_layout(groups, length, chunk, tasks)
    heads = [slice(g0, min(groups, g0 + hb)) for g0 in range(0, groups, hb)]
    return heads, [(index, start, min(length, start + tokens)) for index, start in enumerate(range(0, length, tokens))]


# ----------------------------------------------------------------------------------------------------------------
# Head groups as tasks of single-threaded workers (CPU)
# ----------------------------------------------------------------------------------------------------------------

# Run the head groups of a chunk loop as tasks on single-threaded workers (CPU, more than one torch thread), rather
# than every small op of every block as its own OpenMP parallel region: one synchronisation per op call instead of
# ~30 per block, and workers pull groups as they free up, so a core that another process holds slows its worker
# alone. False: every op spreads over the threads itself, as torch does by default.
HEAD_GROUP_TASKS = True

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
_WORKER = threading.local()  # .active in a pool's threads: an op called there runs its groups itself


def _start_workers(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads, each with a one-thread OpenMP team. ``torch.set_num_threads`` sets the calling
    thread's team size and also process-wide defaults (MKL's, the count new threads start with), so the caller's
    count is put back once every worker has set its own."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="hf_performer_heads")
    ready = threading.Barrier(workers + 1)

    def single_threaded():
        torch.get_num_threads()  # torch sizes a thread's team on its first parallel call: do that first, then
        torch.set_num_threads(1)  # shrink it
        _WORKER.active = True
        ready.wait()  # every worker blocks here, so the pool starts all of them

    for _ in range(workers):
        pool.submit(single_threaded)
    ready.wait()
    torch.set_num_threads(workers)
    return pool


def _forget_workers():  # a forked child has none of its parent's threads, and a lock held by one stays held
    global _POOL_LOCK
    _POOLS.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _head_group_tasks(device: torch.device, groups: int) -> int:
    """How many workers the chunk loop may run its head groups on: 1 (run them here, in turn) off the CPU, with one
    torch thread, with fewer sequences (B * H) than threads, inside a worker, or with ``HEAD_GROUP_TASKS`` off."""
    if not HEAD_GROUP_TASKS or device.type != "cpu" or getattr(_WORKER, "active", False):
        return 1
    threads = torch.get_num_threads()
    return threads if groups >= threads else 1


def _run_tasks(task, items: list, workers: int) -> None:
    """``task(item)`` for every item: on the pool, grad and inference mode as here (a new thread starts with
    autograd on: in-place writes into this op's outputs would be refused); in turn, each op on all threads, with one
    worker or fewer items than workers (8 heads of one sequence on 16 cores would leave half of them idle)."""
    if workers <= 1 or len(items) < workers:
        for item in items:
            task(item)
        return
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = _start_workers(workers)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(item):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            task(item)

    for future in [pool.submit(run, item) for item in items]:
        future.result()


def _without_autocast(impl):
    """Run an op's implementation with autocast off, whoever calls it: autocast reaches inside a custom op (none is
    registered for it), and it would run the in-cache products in bf16 against fp32 accumulators (an error), as
    it would on the calling thread only, not on the workers."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return impl(*args, **kwargs)

    return run


def _exp_features(projection: Tensor, key_keep: Tensor | None, norm_coef: float, offset: float, groups: int,
                  heads: int, length: int, padded: int, ct: torch.dtype) -> _Features:
    """``_Features`` for (G, Np) padded inputs: the padding of the last chunk is no key, nor are the keys that
    ``key_keep`` (B, N) masks (in every head of their batch row)."""
    keep = torch.zeros(groups, padded, dtype=torch.bool, device=projection.device)
    if key_keep is None:
        keep[:, :length] = True
    else:
        keep[:, :length] = key_keep.to(torch.bool).repeat_interleave(heads, dim=0)
    return _Features(projection.to(ct), norm_coef, offset, keep)


def _forward_blocks(q3, k3, v3, log_scale, c, c0, kv0, chunk: int, m: int, ct: torch.dtype,
                    features: _Features | None = None):
    """The chunk loop over (G, Np, .) inputs padded to whole chunks, log scales ``log_scale`` and their running max
    ``c`` (G, Np) from c0 (G,), or all None; entering state kv0 -> out (G, Np, d), normaliser (G, Np), the leaving
    state (G, m, d+1) and the state entering each block (G, blocks, m, d+1). With ``features``, q3 and k3 are the
    feature map's inputs and the blocks fill ``log_scale`` and ``c`` in as they go."""
    g, padded = q3.shape[:2]
    d = v3.shape[-1]
    out = torch.empty(g, padded, d, dtype=v3.dtype, device=v3.device)
    normaliser = torch.empty(g, padded, dtype=ct, device=v3.device)
    workers = _head_group_tasks(v3.device, g)
    head_groups, spans = _head_groups(g, padded, chunk, workers)
    block_states = torch.empty(g, len(spans), m, d + 1, dtype=ct, device=v3.device)  # entering states
    kv0 = kv0.reshape(g, m, d + 1).to(ct)
    kv_end = torch.empty(g, m, d + 1, dtype=ct, device=v3.device)

    def run_head_group(heads_: slice):  # writes the group's rows of every output, nothing else
        values = _values_buffer(heads_, spans[0][2], chunk, d, ct, v3.device)
        state = kv0[heads_]  # (hb, m, d+1), at scale c_start
        for index, start, end in spans:
            c_start = None if c is None else (c0 if start == 0 else c[:, start - 1])
            blk = _Block(q3, k3, v3, log_scale, c, c_start, heads_, start, end, chunk, ct, values, features, True)
            block_states[heads_, index] = state
            entering, state = blk.scan(blk.chunk_kv(), state)  # (X, m, d+1), (hb, m, d+1)
            out_aug = blk.q @ entering  # (X, C, d+1): what earlier chunks contribute
            if blk.row_scale is not None:
                out_aug.mul_(blk.row_scale)
            out_aug.baddbmm_(blk.scores(), blk.values)  # plus this chunk's own keys
            z = out_aug[..., -1:]  # (X, C, 1)
            normaliser[heads_, start:end] = z.reshape(blk.hb, -1)
            y = _workspace(out[heads_, start:end].view(-1, chunk, d), ct)
            torch.div(out_aug[..., :-1], _safe(z), out=y)
            _write_back(out[heads_, start:end], y)
        kv_end[heads_] = state

    _run_tasks(run_head_group, head_groups, workers)
    return out, normaliser, kv_end, block_states


def _forward_outputs(batch: int, heads: int, length: int, out, normaliser, kv_end, c_end, block_states):
    """The loop's (G, ...) results as the ops return them: (B, H, ...), the chunk padding cut off."""
    if out.shape[1] != length:
        out, normaliser = out[:, :length].contiguous(), normaliser[:, :length].contiguous()
    m, d1 = kv_end.shape[-2:]
    return (
        out.view(batch, heads, length, d1 - 1),
        normaliser.view(batch, heads, length),
        kv_end.view(batch, heads, m, d1),
        c_end.reshape(batch, heads).clone(),
        block_states.view(batch, heads, -1, m, d1),
    )


def _backward_blocks(q3, k3, v3, log_scale, c, c0, grad_out, grad_kv, out, normaliser, block_states, chunk: int,
                     ct: torch.dtype, features: _Features | None = None):
    """The chunk loop backward, last block first: inputs as ``_forward_blocks`` took them (``c`` now complete),
    grad_out, out (B, H, N, d), normaliser (B, H, N), grad_kv (B, H, m, d+1) and the block states the forward
    returned -> dq, dk, dv (G, N, .), d_kv0 (G, m, d+1)."""
    g, padded = q3.shape[:2]
    m_in, d, m = q3.shape[-1], v3.shape[-1], block_states.shape[-2]
    length = out.shape[-2]
    pad = padded - length
    dy3, y3 = grad_out.reshape(g, length, d), out.reshape(g, length, d)
    z3 = normaliser.reshape(g, length)
    if pad:
        dy3, y3, z3 = F.pad(dy3, (0, 0, 0, pad)), F.pad(y3, (0, 0, 0, pad)), F.pad(z3, (0, pad))
    states = block_states.reshape(g, -1, m, d + 1)
    dq = torch.empty(g, padded, m_in, dtype=q3.dtype, device=q3.device)
    dk = torch.empty(g, padded, m_in, dtype=k3.dtype, device=k3.device)
    dv = torch.empty(g, padded, d, dtype=v3.dtype, device=v3.device)
    d_kv0 = torch.empty(g, m, d + 1, dtype=ct, device=q3.device)
    grad_kv = grad_kv.reshape(g, m, d + 1).to(ct)
    workers = _head_group_tasks(q3.device, g)
    head_groups, spans = _head_groups(g, padded, chunk, workers)

    def run_head_group(heads_: slice):  # writes the group's rows of dq, dk, dv and d_kv0, nothing else
        values = _values_buffer(heads_, spans[0][2], chunk, d, ct, q3.device)
        d_out_buffer = torch.empty_like(values)
        d_state = grad_kv[heads_]  # gradient w.r.t. the state leaving the current block, (hb, m, d+1)
        for index, start, end in reversed(spans):
            c_start = None if c is None else (c0 if start == 0 else c[:, start - 1])
            blk = _Block(q3, k3, v3, log_scale, c, c_start, heads_, start, end, chunk, ct, values, features)
            x = blk.hb * blk.nb
            dy = dy3[heads_, start:end].to(ct).reshape(x, chunk, d)
            y = y3[heads_, start:end].to(ct).reshape(x, chunk, d)
            z = z3[heads_, start:end].reshape(x, chunk, 1)
            # y = numerator / z: d numerator = dy / z, dz = -(dy . y) / z (0 where the output was forced to 0).
            d_out = _output_gradients(dy, y, z, into=d_out_buffer[:x])  # (X, C, d+1)
            d_out_scaled = d_out if blk.row_scale is None else d_out * blk.row_scale

            entering, _ = blk.scan(blk.chunk_kv(), states[heads_, index])  # (X, m, d+1)
            d_scores = blk.mask(d_out @ blk.values.transpose(-1, -2))  # (X, C, C): gradient w.r.t. q k^T
            d_entering = blk.q.transpose(-1, -2) @ d_out_scaled  # (X, m, d+1)
            d_kv, d_state = blk.scan_backward(d_entering, d_state)  # (X, m, d+1), (hb, m, d+1)

            # Each gradient is accumulated in place in its slice of the output (fp32 inputs) or in an fp32
            # scratch; with fused features, the gradients w.r.t. the features go back through the feature map.
            fused = features is not None
            d_q = _workspace(dq[heads_, start:end].view(x, chunk, -1), ct, fused, m)
            torch.bmm(d_out_scaled, entering.transpose(-1, -2), out=d_q).baddbmm_(d_scores, blk.k)
            d_k = _workspace(dk[heads_, start:end].view(x, chunk, -1), ct, fused, m)
            torch.bmm(blk.state_values, d_kv.transpose(-1, -2), out=d_k).baddbmm_(d_scores.transpose(-1, -2), blk.q)
            if fused:
                d_q = features.backward(d_q, blk.q, blk.q_in)  # (hb*T, d)
                d_k = features.backward(d_k, blk.k, blk.k_in)
            d_v = _workspace(dv[heads_, start:end].view(x, chunk, d), ct)
            torch.bmm(blk.scores().transpose(-1, -2), d_out[..., :d], out=d_v)  # through this chunk's product
            if blk.value_scale is not None:
                d_v.mul_(blk.value_scale)
            through_state = blk.k @ d_kv[..., :d]  # (X, C, d)
            if blk.state_scale is not None:
                through_state.mul_(blk.state_scale)
            d_v.add_(through_state)
            for full, block in ((dq, d_q), (dk, d_k), (dv, d_v)):
                _write_back(full[heads_, start:end], block)
        d_kv0[heads_] = d_state

    _run_tasks(run_head_group, head_groups, workers)
    if pad:
        # contiguous: the fake (meta) kernels promise contiguous gradients, and torch.compile trusts them
        dq, dk, dv = dq[:, :length].contiguous(), dk[:, :length].contiguous(), dv[:, :length].contiguous()
    return dq, dk, dv, d_kv0


def _gradients(q, k, v, dq, dk, dv, d_kv0):
    """The loop's (G, ...) gradients as the backward ops return them, shaped like q, k, v and kv0."""
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), d_kv0.view(*q.shape[:2], *d_kv0.shape[1:])


def _zero_if_unused(grad_out, grad_kv, q, out, block_states):
    """Autograd hands None for an output nobody used: zeros of the output's (grad_out) or the state's shape."""
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_kv is None:
        grad_kv = q.new_zeros(*q.shape[:2], *block_states.shape[-2:], dtype=block_states.dtype)
    return grad_out, grad_kv


def _fake_forward(q, v, m: int, chunk_size: int):
    """Shapes of the forward outputs both ops share: out, normaliser, kv_end, c_end, block_states."""
    batch, heads, length = q.shape[:3]
    d = v.shape[-1]
    ct = _compute_dtype(q.dtype)
    padded = length + (-length % chunk_size)
    n_blocks = -(-padded // _block_layout(batch * heads, padded, chunk_size)[1])  # arithmetic: lengths may be symbolic
    return (
        v.new_empty(batch, heads, length, d),
        q.new_empty(batch, heads, length, dtype=ct),
        q.new_empty(batch, heads, m, d + 1, dtype=ct),
        q.new_empty(batch, heads, dtype=ct),
        q.new_empty(batch, heads, n_blocks, m, d + 1, dtype=ct),
    )


def _workspace(dst: Tensor, ct: torch.dtype, scratch: bool = False, width: int | None = None) -> Tensor:
    """``dst`` itself when it can hold fp32 accumulation, else an fp32 scratch of its shape (last dim ``width``)."""
    if not scratch and dst.dtype == ct and dst.is_contiguous():
        return dst
    shape = dst.shape if width is None else (*dst.shape[:-1], width)
    return torch.empty(shape, dtype=ct, device=dst.device)


def _write_back(dst: Tensor, block: Tensor) -> None:
    if block.data_ptr() != dst.data_ptr():
        dst.copy_(block.view(dst.shape))


# One op namespace per copy of this module: a checkpoint's remote-code copy can be imported next to the package.
_NAMESPACE = re.sub(r"\W", "_", __name__)


# ----------------------------------------------------------------------------------------------------------------
# Op 1, given features: q, k (B, H, N, m), optional key log scales (B, H, N)
# ----------------------------------------------------------------------------------------------------------------


@_without_autocast
def _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk):
    batch, heads, length, m = q.shape
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, l3 = _flatten_inputs(q, k, v, log_scale, chunk)
    g = q3.shape[0]
    log_scale, c, c0 = _running_max(l3, None if c0 is None else c0.reshape(g), ct)
    out, normaliser, kv_end, block_states = _forward_blocks(q3, k3, v3, log_scale, c, c0, kv0, chunk, m, ct)
    c_end = c[:, -1] if c is not None else q.new_zeros(g, dtype=ct)
    return _forward_outputs(batch, heads, length, out, normaliser, kv_end, c_end, block_states)


@_without_autocast
def _chunked_backward_impl(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk):
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, l3 = _flatten_inputs(q, k, v, log_scale, chunk)
    log_scale, c, c0 = _running_max(l3, None if c0 is None else c0.reshape(q3.shape[0]), ct)
    grads = _backward_blocks(q3, k3, v3, log_scale, c, c0, grad_out, grad_kv, out, normaliser, block_states, chunk,
                             ct)
    return _gradients(q, k, v, *grads)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_causal_forward", mutates_args=())
def _chunked_forward(
    q: Tensor, k: Tensor, v: Tensor, log_scale: Optional[Tensor], kv0: Tensor, c0: Optional[Tensor], chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, normaliser, kv_end, c_end, block_states); c_end is 0 without log scales."""
    return _chunked_forward_impl(q, k, v, log_scale, kv0, c0, chunk_size)


@_chunked_forward.register_fake
def _(q, k, v, log_scale, kv0, c0, chunk_size):
    return _fake_forward(q, v, q.shape[-1], chunk_size)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_causal_backward", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_kv0), recomputing every per-chunk quantity block by block, last block first."""
    return _chunked_backward_impl(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states,
                                  chunk_size)


@_chunked_backward.register_fake
def _(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states, chunk_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_kv)


def _chunked_setup_context(ctx, inputs, output):
    q, k, v, log_scale, kv0, c0, chunk_size = inputs
    out, normaliser, _, _, block_states = output
    ctx.save_for_backward(q, k, v, log_scale, c0, out, normaliser, block_states)
    ctx.chunk_size, ctx.kv0_dtype = chunk_size, kv0.dtype


def _chunked_autograd(ctx, grad_out, grad_normaliser, grad_kv, grad_c, grad_states):
    q, k, v, log_scale, c0, out, normaliser, block_states = ctx.saved_tensors
    grad_out, grad_kv = _zero_if_unused(grad_out, grad_kv, q, out, block_states)
    dq, dk, dv, dkv0 = _chunked_backward(grad_out, grad_kv, q, k, v, log_scale, c0, out, normaliser, block_states,
                                         ctx.chunk_size)
    return dq, dk, dv, None, dkv0.to(ctx.kv0_dtype), None, None


torch.library.register_autograd(_chunked_forward, _chunked_autograd, setup_context=_chunked_setup_context)


def chunked_causal_attention(q: Tensor, k: Tensor, v: Tensor, log_scale: Tensor | None, kv0: Tensor,
                             c0: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """q, k (B, H, N, m) features (masked keys already zeroed, their ``log_scale`` at NEG_LOG_SCALE), v (B, H, N, d),
    entering state kv0 (B, H, m, d + 1) at scale c0 (B, H), 1 <= chunk_size <= N -> out (B, H, N, d),
    kv_end (B, H, m, d + 1), c_end (B, H) or None without log scales. Differentiable in q, k, v and kv0."""
    out, _, kv_end, c_end, _ = _chunked_forward(q.contiguous(), k.contiguous(), v.contiguous(), log_scale, kv0, c0,
                                                chunk_size)
    return out, kv_end, (c_end if log_scale is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Op 2, exponential features computed inside: q, k (B, H, N, d), features exp(x P^T - a |x|^2 + b)
# ----------------------------------------------------------------------------------------------------------------


@_without_autocast
def _exp_forward_impl(q, k, v, kv0, c0, chunk, projection, key_keep, norm_coef, offset):
    batch, heads, length, _ = q.shape
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, _ = _flatten_inputs(q, k, v, None, chunk)
    g, padded = q3.shape[:2]
    features = _exp_features(projection, key_keep, norm_coef, offset, g, heads, length, padded, ct)
    # The keys' log scales and their running max are filled in block by block.
    log_scale = torch.empty(g, padded, dtype=ct, device=q.device)
    c = torch.empty(g, padded, dtype=ct, device=q.device)
    out, normaliser, kv_end, block_states = _forward_blocks(q3, k3, v3, log_scale, c, c0.reshape(g).to(ct), kv0, chunk,
                                                            projection.shape[0], ct, features)
    outputs = _forward_outputs(batch, heads, length, out, normaliser, kv_end, c[:, -1], block_states)
    return (*outputs, c.view(batch, heads, padded))


@_without_autocast
def _exp_backward_impl(grad_out, grad_kv, q, k, v, c0, out, normaliser, block_states, running_max, chunk,
                       projection, key_keep, norm_coef, offset):
    heads, length = q.shape[1:3]
    ct = _compute_dtype(q.dtype)
    q3, k3, v3, _ = _flatten_inputs(q, k, v, None, chunk)
    g, padded = q3.shape[:2]
    features = _exp_features(projection, key_keep, norm_coef, offset, g, heads, length, padded, ct)
    log_scale = torch.empty(g, padded, dtype=ct, device=q.device)  # filled in again block by block
    grads = _backward_blocks(q3, k3, v3, log_scale, running_max.reshape(g, padded), c0.reshape(g).to(ct), grad_out,
                             grad_kv, out, normaliser, block_states, chunk, ct, features)
    return _gradients(q, k, v, *grads)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_exp_forward", mutates_args=())
def _exp_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv0: Tensor,
    c0: Tensor,
    chunk_size: int,
    projection: Tensor,
    key_keep: Optional[Tensor],
    norm_coef: float,
    offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, normaliser, kv_end, c_end, block_states, running_max (B, H, Np) the backward reuses)."""
    return _exp_forward_impl(q, k, v, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset)


@_exp_forward.register_fake
def _(q, k, v, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset):
    batch, heads, length = q.shape[:3]
    padded = length + (-length % chunk_size)
    running_max = q.new_empty(batch, heads, padded, dtype=_compute_dtype(q.dtype))
    return (*_fake_forward(q, v, projection.shape[0], chunk_size), running_max)


@torch.library.custom_op(f"{_NAMESPACE}::chunked_exp_backward", mutates_args=())
def _exp_backward(
    grad_out: Tensor,
    grad_kv: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    c0: Tensor,
    out: Tensor,
    normaliser: Tensor,
    block_states: Tensor,
    running_max: Tensor,
    chunk_size: int,
    projection: Tensor,
    key_keep: Optional[Tensor],
    norm_coef: float,
    offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_kv0), the features and every per-chunk quantity recomputed block by block."""
    return _exp_backward_impl(grad_out, grad_kv, q, k, v, c0, out, normaliser, block_states, running_max, chunk_size,
                              projection, key_keep, norm_coef, offset)


@_exp_backward.register_fake
def _(grad_out, grad_kv, q, k, v, c0, out, normaliser, block_states, running_max, chunk_size, projection, key_keep,
      norm_coef, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_kv)


def _exp_setup_context(ctx, inputs, output):
    q, k, v, kv0, c0, chunk_size, projection, key_keep, norm_coef, offset = inputs
    out, normaliser, _, _, block_states, running_max = output
    ctx.save_for_backward(q, k, v, c0, out, normaliser, block_states, running_max, projection, key_keep)
    ctx.chunk_size, ctx.norm_coef, ctx.offset, ctx.kv0_dtype = chunk_size, norm_coef, offset, kv0.dtype


def _exp_autograd(ctx, grad_out, grad_normaliser, grad_kv, grad_c, grad_states, grad_running_max):
    q, k, v, c0, out, normaliser, block_states, running_max, projection, key_keep = ctx.saved_tensors
    grad_out, grad_kv = _zero_if_unused(grad_out, grad_kv, q, out, block_states)
    dq, dk, dv, dkv0 = _exp_backward(grad_out, grad_kv, q, k, v, c0, out, normaliser, block_states, running_max,
                                     ctx.chunk_size, projection, key_keep, ctx.norm_coef, ctx.offset)
    return dq, dk, dv, dkv0.to(ctx.kv0_dtype), None, None, None, None, None, None


torch.library.register_autograd(_exp_forward, _exp_autograd, setup_context=_exp_setup_context)


def chunked_exp_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, key_mask: Tensor | None, kv0: Tensor,
                          c0: Tensor, chunk_size: int, norm_coef: float,
                          offset: float) -> tuple[Tensor, Tensor, Tensor]:
    """``chunked_causal_attention`` on the features exp(x P^T - a |x|^2 + b) of q, k (B, H, N, d), computed inside
    the op; ``projection`` P (m, d) a constant, ``key_mask`` (B, N) bool or None, a = norm_coef, b = offset
    -> out (B, H, N, d), kv_end (B, H, m, d + 1), c_end (B, H). Differentiable in q, k, v and kv0."""
    out, _, kv_end, c_end, _, _ = _exp_forward(q.contiguous(), k.contiguous(), v.contiguous(), kv0, c0, chunk_size,
                                               projection.detach(), key_mask, float(norm_coef), float(offset))
    return out, kv_end, c_end
