"""One causal layer, forward + backward: a Performer layer against a same-shape transformers Llama layer.

    .venv/bin/python benchmarks/bench_layer.py [--threads T]            # N = 1024 ... 16384, ~8 minutes
    .venv/bin/python benchmarks/bench_layer.py --quick [--threads T]    # N = 1024 ... 4096

Hidden 512, 8 heads (d = 64), fp32, batch 1, inputs_embeds in, the sum of the last hidden state backpropagated:

* ``performer``: ``PerformerModel`` with one causal layer, FAVOR+ with 128 features, rotary positions, RMSNorm and
  a GLU feed-forward of width 1024 (``ff_glu=True``: the same three 512 x 1024 matmuls as Llama's MLP);
* ``llama-sdpa``: ``LlamaModel`` with one layer, intermediate size 1024, attention through SDPA (causal);
* ``llama-identity``: the same Llama with an "identity attention" registered through
  ``transformers.AttentionInterface`` (attention output = V): the cost of everything but attention, the
  Performer paper's optimal baseline;
* ``llama-identity-qk``: the same, but q and k stay in the autograd graph (output = V + 0 * (sum q + sum k)). Plain
  identity attention makes the output independent of q and k, so autograd skips the backward of the q and k
  projections (4 of the layer's 21 large matmuls, 9-14% of its time); any real attention pays for them. This is
  the baseline "everything but attention" that a Performer layer can actually approach;
* ``performer-pytorch``: one causal ``performer_pytorch.Performer`` layer of the same shape (dim 512, 8 heads,
  128 features, GLU feed-forward with ff_mult 2), for reference; skipped above ``--max-pp`` tokens (its memory grows
  as N m d).

Each method runs in its own process, lengths in increasing order (time: best of repeats; memory: growth of resident
memory over one forward + backward). Prints markdown tables and writes benchmarks/results/bench_layer.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, fmt, machine_line, markdown_table, matmul_rate, measure, run_worker, worker_main  # noqa

HIDDEN, HEADS, FEATURES, FFN = 512, 8, 128, 1024
METHODS = ("performer", "llama-sdpa", "llama-identity", "performer-pytorch", "llama-identity-qk")


def identity_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention output = V, in the (B, N, H, d) layout attention functions return."""
    return value.transpose(1, 2).contiguous(), None


def identity_attention_keeping_qk(module, query, key, value, attention_mask, **kwargs):
    """Output = V, with q and k tied in at zero weight so their projections' backward still runs."""
    tie = (query.sum() + key.sum()) * 0.0
    return (value + tie).transpose(1, 2).contiguous(), None


def build(method: str, length: int):
    import torch

    if method == "performer":
        from hf_performer import PerformerConfig, PerformerModel

        config = PerformerConfig(
            vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, nb_features=FEATURES,
            intermediate_size=FFN, ff_glu=True, hidden_act="silu", norm_type="rmsnorm", mlp_bias=False,
            causal=True, feature_map="favor+", max_position_embeddings=max(length, 8192),
        )
        model = PerformerModel(config)
        return lambda x: model(inputs_embeds=x, use_cache=False).last_hidden_state
    if method.startswith("llama"):
        from transformers import AttentionInterface, LlamaConfig, LlamaModel

        AttentionInterface.register("identity", identity_attention)
        AttentionInterface.register("identity_qk", identity_attention_keeping_qk)
        implementation = {"llama-sdpa": "sdpa", "llama-identity": "identity", "llama-identity-qk": "identity_qk"}
        config = LlamaConfig(
            vocab_size=128, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=max(length, 8192),
            attn_implementation=implementation[method],
        )
        model = LlamaModel(config)
        return lambda x: model(inputs_embeds=x, use_cache=False).last_hidden_state
    if method == "performer-pytorch":
        from performer_pytorch import Performer

        model = Performer(dim=HIDDEN, depth=1, heads=HEADS, dim_head=HIDDEN // HEADS, nb_features=FEATURES,
                          causal=True, ff_glu=True, ff_mult=FFN // HIDDEN)
        return model
    raise ValueError(method)


def worker(args: dict) -> dict:
    import contextlib
    import io

    import torch

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # performer-pytorch prints a warning about its CUDA kernel
        forward = build(args["method"], args["length"])
    x = torch.randn(1, args["length"], HIDDEN)

    def step():
        forward(x).sum().backward()

    return measure(step, budget_s=args["budget_s"], max_reps=args["max_reps"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N up to 4096")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--max-pp", type=int, default=4096, help="longest N for performer-pytorch")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed repeats per cell")
    parser.add_argument("--reps", type=int, default=5, help="most timed repeats per cell")
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; run nothing")
    opts = parser.parse_args()
    if opts.replot:
        plot(json.loads((RESULTS / "bench_layer.json").read_text()), RESULTS / "bench_layer.png")
        return
    import torch

    opts.threads = opts.threads or torch.get_num_threads()
    lengths = [1024, 2048, 4096] + ([] if opts.quick else [8192, 16384])
    rate = matmul_rate(opts.threads)
    results = {"machine": machine_line(opts.threads, rate), "rows": {}}
    print(results["machine"], file=sys.stderr)
    results["rows"] = {n: {} for n in lengths}
    for method in METHODS:
        cells = [{"length": n, "label": f"{method} N={n}"} for n in lengths
                 if method != "performer-pytorch" or n <= opts.max_pp]
        print(f"  {method}:", file=sys.stderr, flush=True)
        measured = run_worker(__file__, dict(method=method, threads=opts.threads, budget_s=opts.budget,
                                             max_reps=opts.reps), cells)
        for n in lengths:
            results["rows"][n][method] = None
        for cell, result in zip(cells, measured):
            results["rows"][cell["length"]][method] = result
    report = render(results, opts)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_layer.md").write_text(report + "\n")
    (RESULTS / "bench_layer.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "bench_layer.png")


def render(results, opts) -> str:
    def t(result):
        return None if result is None else result["min_s"]

    def div(a, b):
        return None if a is None or b is None else a / b

    rows = []
    for length, row in results["rows"].items():
        perf, sdpa, ident, pp, ident_qk = (t(row.get(m)) for m in METHODS)
        rows.append([
            length, fmt(None if perf is None else 1e3 * perf), fmt(None if sdpa is None else 1e3 * sdpa),
            fmt(None if ident is None else 1e3 * ident), fmt(None if ident_qk is None else 1e3 * ident_qk),
            fmt(None if pp is None else 1e3 * pp),
            fmt(div(sdpa, perf), ".2f"), fmt(div(perf, ident), ".2f"), fmt(div(perf, ident_qk), ".2f"),
            fmt(div(sdpa, ident), ".2f"),
            fmt(div(pp, sdpa), ".2f"),
            fmt(None if row["performer"] is None else row["performer"]["growth_bytes"] / 2**20),
            fmt(None if row["llama-sdpa"] is None else row["llama-sdpa"]["growth_bytes"] / 2**20),
            fmt(None if row["performer-pytorch"] is None else row["performer-pytorch"]["growth_bytes"] / 2**20),
        ])
    command = "python benchmarks/bench_layer.py" + (" --quick" if opts.quick else "")
    return "\n".join([
        f"# One causal layer, forward + backward (`{command}`)",
        "",
        results["machine"] + ".",
        f"Hidden {HIDDEN}, {HEADS} heads, {FEATURES} features, FFN {FFN} (GLU), batch 1, fp32; best of repeats, ms; "
        "memory: growth of resident memory over one forward + backward, MiB.",
        "",
        markdown_table(
            ["N", "Performer ms", "Llama SDPA ms", "Llama identity ms", "identity keeping q, k ms",
             "performer-pytorch ms", "SDPA / Performer", "Performer / identity", "Performer / identity keeping q, k",
             "SDPA / identity",  "perf-pt / SDPA",
             "Performer MiB", "Llama SDPA MiB", "perf-pt MiB"],
            rows,
        ),
    ])


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {  # the README's names
        "performer": "Performer layer (hf_performer)",
        "llama-sdpa": "Llama layer, SDPA attention",
        "llama-identity": "Llama layer, identity attention (output = V)",
        "llama-identity-qk": "Llama layer, identity attention keeping q, k",
        "performer-pytorch": "performer-pytorch layer",
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for method in METHODS:
        points = [(int(n), row[method]) for n, row in results["rows"].items() if row[method] is not None]
        if not points:
            continue
        xs = [n for n, _ in points]
        axes[0].plot(xs, [r["min_s"] for _, r in points], "o-", label=names.get(method, method))
        axes[1].plot(xs, [r["growth_bytes"] / 2**20 for _, r in points], "o-", label=names.get(method, method))
    ylabels = ("forward + backward, s", "memory the step adds, MiB")
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("time of one forward + backward")
    axes[1].set_title("peak memory of one forward + backward:\n"
                      "peak resident set during the step minus resident set before it",
                      fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"one causal layer: hidden {HIDDEN}, {HEADS} heads, {FEATURES} features, GLU FFN {FFN}, batch 1, fp32")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if not worker_main(worker):
        main()
