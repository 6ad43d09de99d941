"""The fused Triton kernels (hf_performer/ops_triton.py) against the float64 O(N^2) reference and the PyTorch
chunked path: values, gradients (also gradcheck), states, masks, dtypes and the model-level dispatch. Without a GPU
they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1): the same kernel code, executed by numpy."""

from __future__ import annotations

import pytest
import torch

from hf_performer import PerformerForCausalLM, ops, ops_triton
from hf_performer.ops import causal_linear_attention, empty_state, naive_kernel_attention

from helpers import (REPO, expected_choice, favor_inputs, features, grads, key_mask, multiply_adds, plain_favor,
                     tiny_config)

pytestmark = pytest.mark.skipif(not ops_triton.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in Triton's interpreter


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("stabilised", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_size,length", [(16, 37), (32, 70), (16, 16)])
def test_triton_matches_naive(stabilised, masked, chunk_size, length):
    """m=6, d=5 (padded to 16-wide blocks in the kernels), ragged last chunks, left padding with empty chunks."""
    q, k, v, log_scale = on_device(*features(length=length, stabilised=stabilised))
    mask = key_mask(2, length).to(DEVICE) if masked else None
    weight = torch.randn(2, 2, length, 5, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = grads(
        lambda q, k, v: naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale, key_mask=mask),
        (q, k, v), weight,
    )
    out, out_grads = grads(
        lambda q, k, v: causal_linear_attention(q, k, v, k_log_scale=log_scale, key_mask=mask,
                                                chunk_size=chunk_size, implementation="triton")[0],
        (q, k, v), weight,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_triton_splits_feature_and_value_columns_across_programs():
    """m=40, d=36: wider than one 32-column tile, so several programs share each sequence in every kernel."""
    q, k, v, log_scale = on_device(*features(length=50, m=40, d=36, spread=2.0, seed=7))
    weight = torch.randn(2, 2, 50, 36, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = grads(lambda q, k, v: naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale),
                           (q, k, v), weight)
    out, out_grads = grads(lambda q, k, v: causal_linear_attention(q, k, v, k_log_scale=log_scale, chunk_size=16,
                                                                   implementation="triton")[0], (q, k, v), weight)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("stabilised", [True, False])
def test_triton_state_and_its_gradient_match_the_chunked_path(stabilised):
    """A prefix's state continued by the kernels: same output, leaving state and gradients (also into the
    entering state and from the leaving one) as the PyTorch chunked op."""
    q, k, v, log_scale = on_device(*features(length=53, stabilised=stabilised, spread=3.0))
    prefix, rest = slice(0, 20), slice(20, None)
    ls = (lambda s: None) if log_scale is None else (lambda s: log_scale[..., s])
    _, (kv0, c0) = causal_linear_attention(q[..., prefix, :], k[..., prefix, :], v[..., prefix, :],
                                           k_log_scale=ls(prefix), implementation="chunked")
    kv0 = kv0.detach()
    results = {}
    for implementation in ("chunked", "triton"):
        tensors = [t[..., rest, :].detach().clone().requires_grad_() for t in (q, k, v)]
        state0 = kv0.clone().requires_grad_()
        out, (kv, c) = causal_linear_attention(*tensors, k_log_scale=ls(rest), initial_state=(state0, c0),
                                               chunk_size=16, implementation=implementation)
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=DEVICE)
        loss = (out * weights).sum() + (kv * kv.detach()).sum()
        results[implementation] = (out, kv, c, torch.autograd.grad(loss, [*tensors, state0]))
    (out_a, kv_a, c_a, grads_a), (out_b, kv_b, c_b, grads_b) = results["chunked"], results["triton"]
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kv_b, kv_a, rtol=1e-10, atol=1e-12)
    if stabilised:
        torch.testing.assert_close(c_b, c_a)
    else:
        assert c_a is None and c_b is None
    for got, want in zip(grads_b, grads_a):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_triton_gradcheck():
    q, k, v, log_scale = on_device(*features(batch=1, heads=2, length=19, m=4, d=3, spread=1.5))
    kv0 = torch.rand(1, 2, 4, 4, dtype=torch.float64, device=DEVICE) + 0.1
    c0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64, device=DEVICE)

    def attention(q, k, v, kv0):
        out, (kv, _) = causal_linear_attention(q, k, v, k_log_scale=log_scale, initial_state=(kv0, c0),
                                               chunk_size=16, implementation="triton")
        return out, kv

    inputs = [t.clone().requires_grad_() for t in (q, k, v, kv0)]
    assert torch.autograd.gradcheck(attention, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_triton_fp32_accuracy_against_float64():
    """Issue 8: max relative error below 1e-5 in fp32 (dots in full precision, no TF32)."""
    q, k, v, log_scale = on_device(*features(length=150, m=32, d=16, spread=4.0, seed=3))
    ref = naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale)
    out, _ = causal_linear_attention(q.float(), k.float(), v.float(), k_log_scale=log_scale.float(),
                                     chunk_size=32, implementation="triton")
    assert out.dtype == torch.float32
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs_accumulate_in_fp32(dtype):
    q, k, v, log_scale = on_device(*features(length=40, spread=1.0, seed=5))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, (kv, c) = causal_linear_attention(q, k, v, k_log_scale=log_scale.float(), chunk_size=16,
                                           implementation="triton")
    assert out.dtype == dtype and kv.dtype == torch.float32
    ref = naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_triton_exp_features_match_naive():
    """causal_exp_attention through the kernels: features from ExpProjectionFeatures, then the Triton op."""
    q, k, v, projection = on_device(*favor_inputs(spread=2.5))
    mask = key_mask(2, 37).to(DEVICE)
    weight = torch.randn(2, 2, 37, 5, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = grads(
        lambda q, k, v: naive_kernel_attention(plain_favor(q, projection, 0.5, -0.3),
                                               plain_favor(k, projection, 0.5, -0.3), v, causal=True, key_mask=mask),
        (q, k, v), weight,
    )
    out, out_grads = grads(
        lambda q, k, v: ops.causal_exp_attention(q, k, v, projection, norm_coef=0.5, logit_offset=-0.3,
                                                 key_mask=mask, chunk_size=16, implementation="triton")[0],
        (q, k, v), weight,
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for got, want in zip(out_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("feature_map", ["favor+", "relu"])
def test_model_with_triton_attention_equals_chunked(feature_map):
    """A whole model (left-padded batch) with attention_implementation='triton': the same logits and parameter
    gradients as 'chunked', and generate() (chunked prefill through the kernels) equals the uncached greedy loop."""
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    models, logits, weight_grads = {}, {}, {}
    for implementation in ("chunked", "triton"):
        torch.manual_seed(0)
        model = PerformerForCausalLM(tiny_config(feature_map=feature_map, attention_implementation=implementation,
                                                 attention_chunk_size=16)).to(DEVICE)
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        models[implementation], logits[implementation] = model, out.logits
        weight_grads[implementation] = model.model.layers[0].self_attn.q_proj.weight.grad
    real = mask.bool()
    torch.testing.assert_close(logits["triton"][real], logits["chunked"][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_grads["triton"], weight_grads["chunked"], rtol=1e-4, atol=1e-6)
    model = models["triton"].eval()
    prompt = ids[:1, :33]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    reference = prompt
    for _ in range(4):
        next_token = model(reference, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        reference = torch.cat([reference, next_token], dim=1)
    assert torch.equal(generated, reference)


def test_auto_uses_the_kernels_exactly_for_cuda_tensors(monkeypatch):
    """'auto' runs the kernels for CUDA tensors only, and only where the cost model (``helpers.multiply_adds``:
    quadratic N^2 (m + d + 1) against chunked N (C (m + d + 1) + 2 m (d + 1))) picks the chunked path; on CPU it
    and 'chunked' stay on the PyTorch path even where Triton (its interpreter) could run them; 'triton' asks for
    them. No timing: which path is faster on a machine is for benchmarks/bench_cuda.py."""
    calls = []
    kernels = ops_triton.causal_attention

    def spy(q, *args, **kwargs):
        calls.append(q.device.type)
        return kernels(q, *args, **kwargs)

    monkeypatch.setattr(ops_triton, "causal_attention", spy)
    q, k, v, log_scale = features(length=300)  # CPU tensors
    # 300 tokens, m = 6, d = 5, C = 64: quadratic 300 * 300 * 12 = 1,080,000 > chunked 300 * (64 * 12 + 72) = 252,000
    assert multiply_adds(300, 300, 6, 5, causal=True) == (1_080_000, 252_000)
    assert ops.choose_implementation(300, 300, 6, 5, causal=True) == "chunked"
    for implementation in ("auto", "chunked"):
        causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation=implementation)
    assert calls == []
    if ops_triton.interpreting():
        causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation="triton")
        assert calls == ["cpu"]
    # 8 tokens: quadratic 8 * 8 * 12 = 768 <= chunked 8 * (8 * 12 + 72) = 1,344, so 'auto' never takes the kernels
    short = [t[:, :, :8] for t in (q, k, v)]
    assert multiply_adds(8, 8, 6, 5, causal=True) == (768, 1_344)
    assert expected_choice(8, 8, 6, 5, causal=True) == ops.choose_implementation(8, 8, 6, 5, causal=True) == "quadratic"
    before = list(calls)
    causal_linear_attention(*short, k_log_scale=log_scale[..., :8], implementation="auto")
    assert calls == before
    if torch.cuda.is_available():
        causal_linear_attention(*on_device(q, k, v), k_log_scale=log_scale.to(DEVICE), implementation="auto")
        assert calls[-1] == "cuda"
        count = len(calls)
        causal_linear_attention(*on_device(*short), k_log_scale=log_scale[..., :8].to(DEVICE), implementation="auto")
        assert len(calls) == count  # the quadratic path: no kernel launch


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, log_scale = features(length=20)  # CPU tensors
    with pytest.raises(ValueError, match="CUDA tensors .*implementation='chunked'"):
        causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation="triton")


def test_empty_state_from_either_path_feeds_the_kernels():
    q, k, v, log_scale = on_device(*features(length=24))
    state = empty_state(2, 2, 6, 5, True, q.device)
    out, _ = causal_linear_attention(q, k, v, k_log_scale=log_scale, initial_state=(state[0].double(), state[1]),
                                     implementation="triton")
    torch.testing.assert_close(out, naive_kernel_attention(q, k, v, causal=True, k_log_scale=log_scale))


def test_kernels_compile_for_nvidia_gpus():
    """Code generation and ptxas for sm_80 (A100) and sm_90 (H100), fp32 and fp64, with the package's launch
    options, within the A100's shared memory per block (163 KiB) at m=128 and within the bound that 'auto' checks
    against the GPU at every m compiled: what the interpreter cannot check."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_triton_kernels.py")
    root = str(REPO)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 20
    failures = [row for row in rows if not row["ok"]]
    assert not failures, failures
    assert max(row["shared"] for row in rows if row["features"] == 128) <= 166912
    for row in rows:  # the bound 'auto' uses to fall back to the chunked path on smaller GPUs
        dtype = torch.float64 if row["dtype"] == "fp64" else torch.float32
        assert row["shared"] <= ops_triton.shared_memory_bytes(row["features"], dtype), row


def test_feature_counts_that_do_not_fit_the_gpu_fall_back_or_fail_clearly(monkeypatch):
    """m=266 (the default for d_head=64) needs a 512-wide feature tile: it fits an H100's 227 KiB of shared memory
    per block but not a 99 KiB consumer GPU, where 'auto' must take the chunked path and 'triton' must say why."""
    q, k, v, log_scale = on_device(*features(length=20, m=266, dtype=torch.float32))
    monkeypatch.setattr(ops_triton, "shared_memory_limit", lambda x: 227 * 1024)
    assert ops_triton.fits(q, 266)
    monkeypatch.setattr(ops_triton, "shared_memory_limit", lambda x: 99 * 1024)
    assert not ops_triton.fits(q, 266) and ops_triton.fits(q, 256)
    with pytest.raises(ValueError, match="266 features need about .* KiB of shared memory.*offers 99 KiB"):
        causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation="triton")


def test_cuda_benchmark_script_runs_in_the_interpreter():
    """benchmarks/bench_cuda.py --smoke: the GPU benchmark's code path (inputs, timing, table) on CPU, so the script
    does not rot before a GPU is at hand."""
    import os
    import subprocess
    import sys

    root = REPO
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_cuda.py"), "--smoke", "--methods", "triton", "chunked", "sdpa"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(root)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| 64 |")]
    assert len(table) == 1 and "—" not in table[0].split("|")[2:5], done.stdout
