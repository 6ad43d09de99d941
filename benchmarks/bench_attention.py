"""Kernel attention alone, forward + backward: hf_performer's ops against exact attention and performer-pytorch.

    .venv/bin/python benchmarks/bench_attention.py [--threads T]            # N = 512 ... 65536, ~10 minutes
    .venv/bin/python benchmarks/bench_attention.py --quick [--threads T]    # N = 512 ... 8192, ~3 minutes

B=1, H=8, m=128 features, d=64, fp32, on the CPU. Each method runs in its own process, lengths in increasing order;
each cell is forward + backward (best and median of repeats) and its peak memory (inputs plus the growth of resident
memory over one forward + backward). Exact attention stops at N = 16384 causal / 8192 bidirectional (quadratic
time). Compared:

* ``ours``: ``ops.causal_linear_attention`` (chunked) / ``ops.linear_attention`` on FAVOR+ features with per-token
  key scales (the feature map itself is not timed: this is the kernel the useful FLOPs measure);
* ``ours+features`` (causal): ``ops.causal_exp_attention``, what a causal FAVOR+ layer runs: the features are
  computed inside the chunked op from q and k (B, H, N, d), forward and backward, and are timed;
* ``sdpa``: exact ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, N, d) queries, keys and values;
* ``performer-pytorch``: its pure-PyTorch causal function ``causal_linear_attention_noncuda`` (what its CPU
  models run) and its ``linear_attention``, on the same features (``pip install performer-pytorch``, the ``bench``
  extra). Its causal path builds (N, m, d) tensors per head; lengths whose estimate exceeds ``--max-gb`` are skipped.

Useful FLOPs are 4 N m d per head for a forward and 3x that for forward + backward; they are reported as a
fraction of the fp32 matmul rate measured in the same run. Also measured: the chunk size (C = 16 ... 256) and where
the quadratic short-sequence path beats the chunked one. Prints markdown tables and writes
benchmarks/results/bench_attention.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    KEEP_FREED_MEMORY,
    RESULTS,
    fmt,
    machine_line,
    markdown_table,
    matmul_rate,
    measure,
    run_worker,
    tensor_bytes,
    worker_main,
)

BATCH, HEADS, FEATURES, HEAD_DIM = 1, 8, 128, 64


def useful_flops(length: int, features: int = FEATURES, head_dim: int = HEAD_DIM) -> int:
    """Forward + backward: 3 x (4 N m d) per head."""
    return 3 * 4 * length * features * head_dim * HEADS * BATCH


def executed_macs(features: int = FEATURES, head_dim: int = HEAD_DIM, chunk: int = 64) -> tuple[int, int]:
    """Multiply-adds per token and head of the chunked causal op (ops_chunked._Block), (forward, backward).

    Forward: chunk k^T v and q times the entering state, m (d+1) each; q k^T, C m; scores times v, C (d+1).
    Backward, recomputing what it needs: k^T v again, q^T dout and the dq / dk terms through the states, m (d+1)
    each; k dkv for dv, m d; q k^T again and the dq / dk intra-chunk terms, C m each; dout v^T, C (d+1); dv's
    intra-chunk term, C d."""
    m, d, c = features, head_dim, chunk
    forward = 2 * m * (d + 1) + c * m + c * (d + 1)
    backward = 4 * m * (d + 1) + m * d + 3 * c * m + c * (d + 1) + c * d
    return forward, backward


def small_bmm_rate(threads: int, features: int = FEATURES, head_dim: int = HEAD_DIM, chunk: int = 64,
                   reps: int = 50) -> float:
    """FLOP/s of the op's typical product, (X, C, m) @ (X, m, d + 1), at the op's block size (X = BLOCK_TOKENS / C
    chunks: what one step of its loop multiplies, in cache)."""
    import torch

    from common import best_seconds, set_threads
    from hf_performer import ops_chunked

    set_threads(threads)
    batch = ops_chunked.BLOCK_TOKENS // chunk
    a, b = torch.randn(batch, chunk, features), torch.randn(batch, features, head_dim + 1)
    out = torch.bmm(a, b)  # written in place below: the compute rate, not first-touch page faults
    seconds = best_seconds(lambda: torch.bmm(a, b, out=out), reps)
    return 2 * batch * chunk * features * (head_dim + 1) / seconds


# -- worker --------------------------------------------------------------------------------------------------------


def make_inputs(method: str, length: int, features: int, seed: int = 0):
    import torch

    from hf_performer.feature_maps import FavorPlusFeatureMap

    torch.manual_seed(seed)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    q, k, v = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    if method == "sdpa":
        return [t.requires_grad_() for t in (q, k, v)], None
    feature_map = FavorPlusFeatureMap(HEAD_DIM, num_features=features)
    if method == "ours+features":
        scale = HEAD_DIM**-0.25
        return [(t * scale).requires_grad_() for t in (q, k)] + [v.requires_grad_()], feature_map.fused_feature_args()
    with torch.no_grad():
        scale = HEAD_DIM**-0.25
        q_features = feature_map.query_features(q * scale)  # (B, H, N, m)
        k_features, log_scale = feature_map.key_features(k * scale)  # (B, H, N, m), (B, H, N)
        if method.startswith("performer-pytorch"):
            # performer-pytorch takes plain (unstabilised) features; with these inputs they stay finite.
            k_features = k_features * torch.exp(log_scale - log_scale.amax()).unsqueeze(-1)
            log_scale = None
    return [t.contiguous().requires_grad_() for t in (q_features, k_features, v)], log_scale


def attention_fn(method: str, causal: bool, log_scale, chunk_size: int, implementation: str):
    import torch

    if method == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method == "ours":
        from hf_performer import ops

        if causal:
            return lambda q, k, v: ops.causal_linear_attention(
                q, k, v, k_log_scale=log_scale, chunk_size=chunk_size, implementation=implementation
            )[0]
        return lambda q, k, v: ops.linear_attention(q, k, v, k_log_scale=log_scale, implementation=implementation)
    if method == "ours+features":
        from hf_performer import ops

        return lambda q, k, v: ops.causal_exp_attention(
            q, k, v, **log_scale, chunk_size=chunk_size, implementation=implementation
        )[0]
    if method == "performer-pytorch":
        from performer_pytorch import performer_pytorch as pp

        return pp.causal_linear_attention_noncuda if causal else pp.linear_attention
    raise ValueError(method)


def worker(args: dict) -> dict:
    import torch

    from hf_performer import ops_chunked

    if args["method"].endswith(" per-op threads"):
        ops_chunked.HEAD_GROUP_TASKS = False
        args = {**args, "method": args["method"].removesuffix(" per-op threads")}
    inputs, log_scale = make_inputs(args["method"], args["length"], args["features"])  # fused: the map's args
    fn = attention_fn(args["method"], args["causal"], log_scale, args["chunk_size"], args["implementation"])

    def step():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    out_bytes = BATCH * HEADS * args["length"] * HEAD_DIM * 4  # (B, H, N, d) fp32
    input_bytes = tensor_bytes(*inputs, log_scale if torch.is_tensor(log_scale) else None)
    result = measure(step, budget_s=args["budget_s"], max_reps=args["max_reps"])
    result.update(input_bytes=input_bytes, output_bytes=out_bytes, peak_bytes=input_bytes + result["growth_bytes"])
    return result


# -- driver --------------------------------------------------------------------------------------------------------


def estimate_pp_bytes(length: int) -> int:
    """performer-pytorch's causal path keeps its (N, m, d) context and running sum for backward, and einsum
    temporaries of the same size: up to 6 such tensors per head (1.6 GB measured at N = 2048)."""
    return 6 * BATCH * HEADS * length * FEATURES * HEAD_DIM * 4


def row(method, causal, cells, opts):
    """Run one method over ``cells`` (dicts with length and optionally chunk_size / implementation) in one process."""
    common = dict(method=method, causal=causal, threads=opts.threads, chunk_size=64, implementation="chunked",
                  features=FEATURES, budget_s=opts.budget, max_reps=opts.reps)
    for cell in cells:
        cell["label"] = f"{method} {'causal' if causal else 'bidirectional'} " + " ".join(
            f"{key}={value}" for key, value in cell.items())
    print(f"  {method}, {'causal' if causal else 'bidirectional'}:", file=sys.stderr, flush=True)
    return run_worker(__file__, common, cells, extra_env=KEEP_FREED_MEMORY if opts.keep_freed_memory else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N up to 8192, fewer baselines (a few minutes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip performer-pytorch above this estimate")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed repeats per cell")
    parser.add_argument("--reps", type=int, default=5, help="most timed repeats per cell")
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; run nothing")
    parser.add_argument("--side-by-side", action="store_true",
                        help="only the causal FAVOR+ op and causal SDPA at 1 thread, torch's default and (with "
                             "--busy-core) the default beside a busy core: results/bench_attention_threads.*")
    parser.add_argument("--busy-core", type=int, default=None, help="with --side-by-side: the core to keep busy")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the workers with glibc keeping freed memory (common.KEEP_FREED_MEMORY)")
    opts = parser.parse_args()
    if opts.side_by_side:
        side_by_side(opts)
        return
    if opts.replot:
        plot(json.loads((RESULTS / "bench_attention.json").read_text()), RESULTS / "bench_attention.png")
        return
    import torch

    opts.threads = opts.threads or torch.get_num_threads()
    lengths = [512, 1024, 2048, 4096, 8192] + ([] if opts.quick else [16384, 32768, 65536])
    # Exact attention is quadratic: these are the longest lengths that fit the time budget of a run.
    max_sdpa = {True: 4096, False: 2048} if opts.quick else {True: 16384, False: 8192}
    max_pp = 2048 if opts.quick else max(n for n in lengths if estimate_pp_bytes(n) <= opts.max_gb * 2**30)
    chunk_length = 4096 if opts.quick else 8192
    rate = matmul_rate(opts.threads)
    header = machine_line(opts.threads, rate)
    print(header, file=sys.stderr)

    results = {"machine": header, "causal": {}, "bidirectional": {}, "chunk": {}, "short": {}}
    for causal in (True, False):
        mode = "causal" if causal else "bidirectional"
        limits = {"ours": max(lengths), "sdpa": max_sdpa[causal], "performer-pytorch": max_pp if causal else max(lengths)}
        if causal:
            limits["ours+features"] = max(lengths)
        table = results[mode] = {n: {} for n in lengths}
        for method, limit in limits.items():
            cells = [{"length": n} for n in lengths if n <= limit]
            extra = []
            if method == "ours" and causal:
                # Chunk sizes at one length, and the quadratic path against the chunked one on short inputs.
                extra = [{"length": chunk_length, "chunk_size": c} for c in (16, 32, 128, 256)]
                extra += [{"length": n, "implementation": impl} for n in (32, 64, 128, 256, 512)
                          for impl in ("quadratic", "chunked")]
            measured = row(method, causal, [dict(c) for c in cells + extra], opts)
            for cell, result in zip(cells, measured):
                table[cell["length"]][method] = result
            for n in lengths:
                table[n].setdefault(method, None)
            if extra:
                for cell, result in zip(extra, measured[len(cells):]):
                    if "chunk_size" in cell:
                        results["chunk"][cell["chunk_size"]] = result
                    else:
                        results["short"].setdefault(cell["length"], {})[cell["implementation"]] = result
                results["chunk"][64] = table[chunk_length]["ours"]
                results["chunk"] = dict(sorted(results["chunk"].items()))

    rate = max(rate, matmul_rate(opts.threads))  # the machine is shared: keep the best rate seen
    results["matmul_flops"] = rate
    results["small_bmm_flops"] = small_bmm_rate(opts.threads)
    report = render(results, rate, chunk_length, opts)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_attention.md").write_text(report + "\n")
    (RESULTS / "bench_attention.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(results, RESULTS / "bench_attention.png")


def side_by_side(opts) -> None:
    """What the causal layer runs (``ours+features``), the same op with every small op spread over the threads
    instead of head groups on single-threaded workers (``ops_chunked.HEAD_GROUP_TASKS = False``), and causal SDPA,
    N = 1024 ... 16384, per thread setting."""
    import torch

    from common import BusyCore, thread_settings

    default = torch.get_num_threads()
    lengths = [1024, 2048, 4096] + ([] if opts.quick else [8192, 16384])
    settings = thread_settings(None, opts.busy_core)
    methods = ("ours+features", "ours+features per-op threads", "sdpa")
    results = {}
    for name, threads, busy in settings:
        opts.threads = threads
        results[name] = {"machine": machine_line(threads, matmul_rate(threads)), "rows": {n: {} for n in lengths}}
        print(name, file=sys.stderr)
        with BusyCore(busy):
            for method in methods if threads > 1 else ("ours+features", "sdpa"):
                cells = [{"length": n} for n in lengths]
                for cell, result in zip(lengths, row(method, True, cells, opts)):
                    results[name]["rows"][cell][method] = result
    names = list(results)
    table = [[n] + [cell for name in names for cell in (
        *(fmt(ms(results[name]["rows"][n].get(m)), ".1f") for m in methods),
        fmt(ratio(results[name]["rows"][n]["ours+features"], results[name]["rows"][n]["sdpa"]), ".2f"))]
        for n in lengths]
    headers = ["N"] + [f"{label} ({name})" for name in names
                       for label in ("ours ms", "ours, per-op threads ms", "SDPA ms", "SDPA / ours")]
    command = "python benchmarks/bench_attention.py --side-by-side" + (" --quick" if opts.quick else "") + (
        f" --busy-core {opts.busy_core}" if opts.busy_core is not None else "") + (
        " --keep-freed-memory" if opts.keep_freed_memory else "")
    parts = [f"# Causal FAVOR+ op against causal SDPA, per thread setting (`{command}`)", "",
             f"B={BATCH}, H={HEADS}, m={FEATURES}, d={HEAD_DIM}, fp32, forward + backward, best of repeats. ours: "
             "`ops.causal_exp_attention` (features computed inside, as a layer runs it), head groups as tasks on "
             "single-threaded workers; per-op threads: the same op with `ops_chunked.HEAD_GROUP_TASKS = False`.", "",
             *[f"* {name}: {results[name]['machine']}" for name in names], "", markdown_table(headers, table)]
    quiet = [n for n in names if "busy" not in n and results[n]["machine"] and n.startswith(f"{default} ")]
    busy = [n for n in names if "busy" in n]
    if quiet and busy:
        contention = [[n] + [fmt(ratio(results[quiet[0]]["rows"][n].get(m), results[busy[0]]["rows"][n].get(m)),
                                     ".2f") for m in methods] for n in lengths]
        parts += ["", f"Busy / quiet time at {default} threads:", "",
                  markdown_table(["N", "ours", "ours, per-op threads", "SDPA"], contention)]
    report = "\n".join(parts)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_attention_threads.md").write_text(report + "\n")
    (RESULTS / "bench_attention_threads.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def ms(result, key="min_s"):
    return None if result is None else 1e3 * result[key]


def mb(result):
    return None if result is None else result["peak_bytes"] / 2**20


def ratio(a, b):
    return None if a is None or b is None else b["min_s"] / a["min_s"]


def render(results, rate, chunk_length, opts) -> str:
    from hf_performer import ops

    command = "python benchmarks/bench_attention.py" + (" --quick" if opts.quick else "")
    parts = [
        f"# Kernel attention, forward + backward (`{command}`)",
        "",
        results["machine"] + f"; the best matmul rate of the run: {rate / 1e9:.0f} GFLOP/s.",
        f"B={BATCH}, H={HEADS}, m={FEATURES}, d={HEAD_DIM}, fp32. Times are the best of repeats (median in the JSON), "
        "ms. Peak memory: inputs plus the growth of resident memory over one forward + backward, MiB. "
        "Useful FLOP/s: 12 N m d H / time.",
    ]
    for mode in ("causal", "bidirectional"):
        rows = []
        for length, row in results[mode].items():
            ours, sdpa, pp, fused = row["ours"], row["sdpa"], row["performer-pytorch"], row.get("ours+features")
            useful = None if ours is None else useful_flops(int(length)) / ours["min_s"]
            io = None if ours is None else (ours["input_bytes"] + ours["output_bytes"])
            rows.append([
                length, fmt(ms(ours), ".1f"), fmt(ms(sdpa), ".1f"), fmt(ms(pp), ".1f"),
                fmt(ratio(ours, sdpa), ".2f"), fmt(ratio(ours, pp), ".2f"),
                fmt(None if useful is None else useful / 1e9, ".1f"),
                fmt(None if useful is None else 100 * useful / rate, ".0f"),
                fmt(mb(ours)), fmt(None if io is None else ours["peak_bytes"] / io, ".2f"), fmt(mb(sdpa)), fmt(mb(pp)),
            ])
            if mode == "causal":
                rows[-1][4:4] = [fmt(ms(fused), ".1f"), fmt(ratio(fused, sdpa), ".2f")]
                rows[-1].append(fmt(mb(fused)))
        headers = ["N", "ours ms", "SDPA ms", "perf-pt ms", "SDPA / ours", "perf-pt / ours", "useful GFLOP/s",
                   "% of matmul", "ours MiB", "ours peak / (in + out)", "SDPA MiB", "perf-pt MiB"]
        if mode == "causal":
            headers[4:4] = ["ours+features ms", "SDPA / ours+features"]
            headers.append("ours+features MiB")
        parts += ["", f"## {mode.capitalize()}", "", markdown_table(headers, rows)]
    forward, backward = executed_macs()
    useful_fraction = 6 * FEATURES * HEAD_DIM / (forward + backward)  # 12 m d flops = 6 m d multiply-adds
    bmm = results.get("small_bmm_flops")
    if bmm:
        ceiling = 100 * useful_fraction * bmm / rate
        longest = max((n for n, row in results["causal"].items() if row["ours"] is not None), key=int)
        reached = 100 * useful_flops(int(longest)) / results["causal"][longest]["ours"]["min_s"] / rate
        parts += [
            "", "## What the algorithm can reach (causal, C=64)", "",
            f"Multiply-adds per token and head: {forward:,} forward + {backward:,} backward (recomputing) = "
            f"{forward + backward:,}, of which the useful count credits 6 m d = {6 * FEATURES * HEAD_DIM:,}: "
            f"{100 * useful_fraction:.1f}% at best, if every product ran at the large-matmul rate. The op's "
            f"products ((X, 64, {FEATURES}) @ (X, {FEATURES}, {HEAD_DIM + 1})) run at {bmm / 1e9:.0f} GFLOP/s here, "
            f"{100 * bmm / rate:.0f}% of it, so the attainable '% of matmul' is about {ceiling:.0f}%; at "
            f"N={longest} the op reaches {reached:.0f}%, {100 * reached / ceiling:.0f}% of that ceiling.",
        ]
    rows = []
    for chunk, result in results["chunk"].items():
        useful = None if result is None else useful_flops(chunk_length) / result["min_s"]
        rows.append([chunk, fmt(ms(result), ".1f"), fmt(ms(result, "median_s"), ".1f"),
                     fmt(None if useful is None else 100 * useful / rate, ".0f"), fmt(mb(result))])
    parts += ["", f"## Chunk size (causal, N={chunk_length})", "",
              markdown_table(["C", "best ms", "median ms", "% of matmul", "MiB"], rows)]
    rows = []
    for length, pair in results["short"].items():
        quad, chunked = pair["quadratic"], pair["chunked"]
        auto = ops.choose_implementation(int(length), int(length), FEATURES, HEAD_DIM, causal=True)
        rows.append([length, fmt(ms(quad), ".2f"), fmt(ms(chunked), ".2f"), auto])
    parts += ["", "## Short sequences (causal): quadratic vs chunked, and what `implementation=\"auto\"` picks", "",
              markdown_table(["N", "quadratic ms", "chunked ms", "auto"], rows)]
    return "\n".join(parts)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.6))
    names = {"ours": "hf_performer (chunked)", "ours+features": "hf_performer, FAVOR+ features inside the op",
             "sdpa": "exact SDPA", "performer-pytorch": "performer-pytorch"}
    for col, mode in enumerate(("causal", "bidirectional")):
        for method, label in names.items():
            points = [(int(n), row[method]) for n, row in results[mode].items() if row.get(method) is not None]
            if not points:
                continue
            xs = [n for n, _ in points]
            axes[0, col].plot(xs, [r["min_s"] for _, r in points], "o-", label=label)
            axes[1, col].plot(xs, [r["peak_bytes"] / 2**20 for _, r in points], "o-", label=label)
        for row, ylabel in enumerate(("forward + backward, s", "peak memory, MiB")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        # Below the column, outside the axes: a legend inside would cover the lines.
        axes[1, col].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)
        axes[0, col].set_title(f"{mode} attention: time, B=1 H=8 m=128 d=64 fp32")
        axes[1, col].set_title(f"{mode} attention: peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    if not worker_main(worker):
        main()
