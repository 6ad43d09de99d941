"""The chunk loop's head groups as tasks on single-threaded workers (``ops_chunked.HEAD_GROUP_TASKS``): the same
numbers as running the groups in turn, and no change to the caller's thread settings, grad or inference mode, nor
to a forked child's ability to run the op."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from hf_performer import ops_chunked

from helpers import favor_inputs, features, key_mask


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads (workers are used whatever the core count), several blocks and head groups per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(ops_chunked, "BLOCK_TOKENS", 16)
    yield
    torch.set_num_threads(threads)


def _features_op(dtype, masked):
    q, k, v, log_scale = features(batch=2, heads=3, length=45, m=6, d=5, dtype=torch.float64)
    mask = key_mask(2, 45) if masked else None
    if mask is not None:  # the features op takes masked keys already zeroed, their log scale pushed down
        keep = mask[:, None, :]
        k = k * keep.unsqueeze(-1)
        log_scale = log_scale.masked_fill(~keep, ops_chunked.NEG_LOG_SCALE)
    kv0, c0 = torch.zeros(2, 3, 6, 6, dtype=torch.float64), torch.full((2, 3), ops_chunked.NEG_LOG_SCALE)

    def run(q, k, v):
        return ops_chunked.chunked_causal_attention(q, k, v, log_scale.to(dtype), kv0, c0.double(), 4)[0]

    return run, (q.to(dtype), k.to(dtype), v.to(dtype))


def _exp_op(dtype, masked):
    q, k, v, projection = favor_inputs(batch=2, heads=3, length=45, d=5, m=7)
    mask = key_mask(2, 45) if masked else None
    kv0, c0 = torch.zeros(2, 3, 7, 6), torch.full((2, 3), ops_chunked.NEG_LOG_SCALE)

    def run(q, k, v):
        return ops_chunked.chunked_exp_attention(q, k, v, projection.to(dtype), mask, kv0.to(dtype), c0, 4, 0.2,
                                                 0.0)[0]

    return run, (q.to(dtype), k.to(dtype), v.to(dtype))


def _outputs_and_grads(run, inputs, tasks: bool, monkeypatch):
    monkeypatch.setattr(ops_chunked, "HEAD_GROUP_TASKS", tasks)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = run(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return [out.detach(), *torch.autograd.grad((out * weight).sum(), leaves)]


@pytest.mark.parametrize("op", [_features_op, _exp_op])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_tasks_compute_what_the_groups_in_turn_do(two_threads, monkeypatch, op, dtype, masked):
    run, inputs = op(dtype, masked)
    seen = set()
    block_init = ops_chunked._Block.__init__

    def spy(self, *args, **kwargs):
        seen.add(threading.current_thread().name)
        block_init(self, *args, **kwargs)

    monkeypatch.setattr(ops_chunked._Block, "__init__", spy)
    pooled = _outputs_and_grads(run, inputs, True, monkeypatch)
    assert seen and all(name.startswith("hf_performer_heads") for name in seen), seen  # the workers ran the blocks
    seen.clear()
    serial = _outputs_and_grads(run, inputs, False, monkeypatch)
    assert seen == {threading.current_thread().name}
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12  # only a matmul's thread count can change the rounding
    for a, b in zip(pooled, serial):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_fewer_groups_than_workers_run_in_turn_on_all_threads(two_threads, monkeypatch):
    """One head group per sequence and only one sequence: a pool of two would leave a worker idle."""
    q, k, v, projection = favor_inputs(batch=1, heads=1, length=45, d=5, m=7)
    monkeypatch.setattr(ops_chunked, "BLOCK_TOKENS", 4096)
    seen = set()
    block_init = ops_chunked._Block.__init__
    monkeypatch.setattr(ops_chunked._Block, "__init__",
                        lambda self, *a, **kw: seen.add(threading.current_thread().name) or block_init(self, *a, **kw))
    ops_chunked.chunked_exp_attention(q, k, v, projection, None, torch.zeros(1, 1, 7, 6, dtype=torch.float64),
                                      torch.full((1, 1), ops_chunked.NEG_LOG_SCALE), 4, 0.2, 0.0)
    assert seen == {threading.current_thread().name}


def test_workers_are_single_threaded_and_the_caller_keeps_its_threads(two_threads):
    run, inputs = _exp_op(torch.float32, False)
    run(*inputs)
    assert torch.get_num_threads() == 2
    pool = ops_chunked._POOLS[2]
    assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2


def test_grad_and_inference_mode_reach_the_workers(two_threads, monkeypatch):
    run, inputs = _exp_op(torch.float32, True)
    monkeypatch.setattr(ops_chunked, "HEAD_GROUP_TASKS", False)
    expected = run(*inputs)
    monkeypatch.setattr(ops_chunked, "HEAD_GROUP_TASKS", True)
    with torch.inference_mode():  # in-place writes into inference tensors fail outside inference mode
        inferred = run(*inputs)
    with torch.no_grad():
        without_grad = run(*inputs)
    torch.testing.assert_close(inferred, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(without_grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tasks", [False, True])
def test_autocast_around_the_op_changes_nothing_inside(two_threads, monkeypatch, tasks):
    """CPU autocast (Trainer's bf16 on CPU) reaches inside a custom op on the calling thread only; the op turns it
    off, so the in-loop products stay fp32 on every thread (they used to fail: bf16 into an fp32 accumulator)."""
    run, inputs = _exp_op(torch.float32, True)
    expected = _outputs_and_grads(run, inputs, tasks, monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _outputs_and_grads(run, inputs, tasks, monkeypatch)
    for a, b in zip(autocast, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _child(queue):
    torch.set_num_threads(2)
    run, inputs = _exp_op(torch.float32, False)
    queue.put(run(*inputs).tolist())  # plain lists: a tensor would travel as shared memory the exiting child owns


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork (POSIX)")
def test_a_forked_child_starts_its_own_workers(two_threads):
    run, inputs = _exp_op(torch.float32, False)
    expected = run(*inputs)  # the parent has workers now; a forked child inherits none of their threads
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    try:
        result = queue.get(timeout=120)  # with the parent's dead pool, the child would wait forever
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    torch.testing.assert_close(torch.tensor(result), expected, rtol=1e-6, atol=1e-6)
