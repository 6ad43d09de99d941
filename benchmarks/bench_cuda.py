"""Causal kernel attention on a CUDA GPU, forward + backward: the Triton kernels against the PyTorch chunked path,
exact causal SDPA (flash attention where available) and performer-pytorch's pure-PyTorch causal function.

    python benchmarks/bench_cuda.py                      # N = 1024 ... 65536, fp32 and bf16 inputs
    python benchmarks/bench_cuda.py --lengths 4096 16384 --dtypes bf16
    python benchmarks/bench_cuda.py --smoke              # no GPU: the same code on CPU in Triton's interpreter, N=64

B=1, H=8, m=128, d=64 as benchmarks/bench_attention.py; FAVOR+ features precomputed (the kernels' inputs). Times:
CUDA events, best of repeats after a warm-up, ms; memory: torch.cuda.max_memory_allocated over one forward +
backward minus what was allocated before it, MiB; useful FLOP/s: 12 N m d H / time (bench_attention's count), also
as a fraction of the same GPU's dense matmul rate in the input dtype, measured in the same run. Prints a markdown
table and writes benchmarks/results/bench_cuda.{md,json,png} (``--smoke`` writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # must be set before Triton defines the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from hf_performer import ops  # noqa: E402
from hf_performer.feature_maps import FavorPlusFeatureMap  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH, HEADS, FEATURES, HEAD_DIM = 1, 8, 128, 64
METHODS = ("triton", "chunked", "sdpa", "performer-pytorch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(method: str, length: int, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device) for _ in range(3))
    if method == "sdpa":
        return [t.to(dtype).requires_grad_() for t in (q, k, v)], None
    feature_map = FavorPlusFeatureMap(HEAD_DIM, num_features=FEATURES).to(device)
    scale = HEAD_DIM**-0.25
    with torch.no_grad():
        q_features = feature_map.query_features(q * scale)  # (B, H, N, m)
        k_features, log_scale = feature_map.key_features(k * scale)  # (B, H, N, m), (B, H, N)
        if method == "performer-pytorch":  # it takes plain features; finite for these inputs
            k_features = k_features * torch.exp(log_scale - log_scale.amax()).unsqueeze(-1)
            log_scale = None
    return [t.to(dtype).contiguous().requires_grad_() for t in (q_features, k_features, v)], log_scale


def attention(method: str, log_scale):
    if method == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method in ("triton", "chunked"):
        return lambda q, k, v: ops.causal_linear_attention(q, k, v, k_log_scale=log_scale, implementation=method)[0]
    if method == "performer-pytorch":
        from performer_pytorch import performer_pytorch as pp

        return pp.causal_linear_attention_noncuda
    raise ValueError(method)


def timed(step, device: str, reps: int) -> float:
    """Best seconds of ``step`` (CUDA events on a GPU, wall clock otherwise)."""
    import time

    step()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - begin)
    return best


def measure(method: str, length: int, dtype: torch.dtype, device: str, reps: int) -> dict | None:
    try:
        tensors, log_scale = inputs(method, length, dtype, device)
        fn = attention(method, log_scale)

        def step():
            for t in tensors:
                t.grad = None
            out = fn(*tensors)
            out.backward(torch.ones_like(out))

        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        return {"s": timed(step, device, reps), "peak_bytes": peak}
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # out of memory, or no flash kernel for a dtype
        print(f"  {method} N={length}: {type(error).__name__}: {str(error).splitlines()[0]}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
        return None


def matmul_rate(dtype: torch.dtype, device: str, size: int = 8192) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, 10)


def useful_flops(length: int) -> int:
    return 12 * length * FEATURES * HEAD_DIM * HEADS * BATCH


def render(results: dict) -> str:
    lines = [f"# Causal kernel attention on CUDA, forward + backward (`python benchmarks/bench_cuda.py`)", "",
             results["machine"], ""]
    for name, table in results["tables"].items():
        rate = results["matmul_rate"][name]
        lines += [f"## {name} inputs (dense matmul {rate / 1e12:.1f} TFLOP/s)", ""]
        headers = ["N"] + [f"{m} ms" for m in METHODS] + ["SDPA / triton", "chunked / triton", "triton TFLOP/s",
                                                           "% of matmul"] + [f"{m} MiB" for m in METHODS]
        lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
        for length, row in table.items():
            def ms(method):
                return f"{row[method]['s'] * 1e3:.2f}" if row.get(method) else "—"

            def ratio(method):
                return f"{row[method]['s'] / row['triton']['s']:.2f}" if row.get(method) and row.get("triton") else "—"

            def mib(method):
                cell = row.get(method)
                return f"{cell['peak_bytes'] / 2**20:.0f}" if cell and cell["peak_bytes"] is not None else "—"

            flops = useful_flops(int(length)) / row["triton"]["s"] if row.get("triton") else None
            lines.append("| " + " | ".join(
                [str(length)] + [ms(m) for m in METHODS] + [ratio("sdpa"), ratio("chunked"),
                                                            "—" if flops is None else f"{flops / 1e12:.2f}",
                                                            "—" if flops is None else f"{100 * flops / rate:.0f}"]
                + [mib(m) for m in METHODS]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = results["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        for method in METHODS:
            points = [(int(n), row[method]["s"] * 1e3) for n, row in table.items() if row.get(method)]
            if points:
                ax.loglog(*zip(*points), marker="o", label=method)
        ax.set_title(f"causal fwd+bwd, {name} inputs")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms (best of repeats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-pp", type=int, default=8192, help="longest N for performer-pytorch (memory N m d)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, N=64: checks the script")
    opts = parser.parse_args()
    if opts.smoke:
        device, opts.lengths, opts.dtypes, opts.reps = "cpu", [64], ["fp32"], 1
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA device: run on a GPU machine, or use --smoke to check the script on CPU")
    machine = (torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter smoke run)")
    results = {"machine": f"{machine}, torch {torch.__version__}, B={BATCH}, H={HEADS}, m={FEATURES}, d={HEAD_DIM}",
               "tables": {}, "matmul_rate": {}}
    for name in opts.dtypes:
        dtype = DTYPES[name]
        results["matmul_rate"][name] = matmul_rate(dtype, device, 256 if opts.smoke else 8192)
        table = results["tables"][name] = {}
        for length in opts.lengths:
            table[length] = {}
            for method in opts.methods:
                if method == "performer-pytorch" and length > opts.max_pp:
                    continue
                table[length][method] = measure(method, length, dtype, device, opts.reps)
            print(f"{name} N={length}: " + ", ".join(
                f"{m} {c['s'] * 1e3:.2f} ms" for m, c in table[length].items() if c), file=sys.stderr, flush=True)
    report = render(results)
    print(report)
    if not opts.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_cuda.md").write_text(report + "\n")
        (RESULTS / "bench_cuda.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, RESULTS / "bench_cuda.png")


if __name__ == "__main__":
    main()
