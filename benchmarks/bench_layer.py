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

from common import (  # noqa: E402
    KEEP_FREED_MEMORY,
    RESULTS,
    BusyCore,
    fmt,
    machine_line,
    markdown_table,
    matmul_rate,
    measure,
    run_worker,
    thread_settings,
    worker_main,
)

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
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts, each measured in turn (default: 1 and torch's default)")
    parser.add_argument("--busy-core", type=int, default=None,
                        help="also measure the default thread count with a busy-loop process pinned to this core")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the workers with glibc keeping freed memory (common.KEEP_FREED_MEMORY)")
    parser.add_argument("--max-pp", type=int, default=4096, help="longest N for performer-pytorch")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed repeats per cell")
    parser.add_argument("--reps", type=int, default=5, help="most timed repeats per cell")
    parser.add_argument("--output", default="bench_layer", help="results name under benchmarks/results/")
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; run nothing")
    opts = parser.parse_args()
    stem = RESULTS / opts.output
    if opts.replot:
        plot(json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".png"))
        return
    lengths = [1024, 2048, 4096] + ([] if opts.quick else [8192, 16384])
    settings = thread_settings(opts.threads, opts.busy_core)
    results = {"settings": {}}
    for name, threads, busy in settings:
        rate = matmul_rate(threads)
        setting = {"machine": machine_line(threads, rate), "threads": threads, "busy_core": busy,
                   "rows": {n: {m: None for m in METHODS} for n in lengths}}
        print(f"{name}: {setting['machine']}", file=sys.stderr)
        with BusyCore(busy):
            for method in opts.methods:
                cells = [{"length": n, "label": f"{method} N={n}"} for n in lengths
                         if method != "performer-pytorch" or n <= opts.max_pp]
                print(f"  {method}:", file=sys.stderr, flush=True)
                measured = run_worker(__file__, dict(method=method, threads=threads, budget_s=opts.budget,
                                                     max_reps=opts.reps), cells,
                                      extra_env=KEEP_FREED_MEMORY if opts.keep_freed_memory else None)
                for cell, result in zip(cells, measured):
                    setting["rows"][cell["length"]][method] = result
        results["settings"][name] = setting
    report = render(results, opts)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, stem.with_suffix(".png"))


def _settings(results) -> dict:
    """{name: setting}; files written before thread counts were measured side by side hold one setting."""
    return results["settings"] if "settings" in results else {"": results}


def _times(row):
    return {m: (None if row.get(m) is None else row[m]["min_s"]) for m in METHODS}


def _ratio(a, b):
    return None if a is None or b is None else a / b


def render(results, opts) -> str:
    settings = _settings(results)
    command = "python benchmarks/bench_layer.py" + (" --quick" if opts.quick else "") + (
        f" --busy-core {opts.busy_core}" if opts.busy_core is not None else "") + (
        " --keep-freed-memory" if opts.keep_freed_memory else "")
    parts = [f"# One causal layer, forward + backward (`{command}`)", "",
             f"Hidden {HIDDEN}, {HEADS} heads, {FEATURES} features, FFN {FFN} (GLU), batch 1, fp32; best of repeats, "
             "ms; memory: growth of resident memory over one forward + backward, MiB."
             + (" Workers ran with glibc keeping freed memory (" + ", ".join(
                 f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ")." if opts.keep_freed_memory else ""), ""]
    # the targets' ratios, one column per setting
    names = list(settings)
    summary = []
    for length in next(iter(settings.values()))["rows"]:
        cells = [length]
        for name in names:
            t = _times(settings[name]["rows"][length])
            cells += [fmt(_ratio(t["llama-sdpa"], t["performer"]), ".2f"),
                      fmt(_ratio(t["performer"], t["llama-identity-qk"]), ".2f")]
        summary.append(cells)
    headers = ["N"] + [f"{label} ({name})" for name in names for label in ("SDPA / Performer", "Performer / identity-qk")]
    parts += ["Side by side (time ratios within each setting):", "", markdown_table(headers, summary), ""]
    first = next(iter(settings.values()))["rows"]
    scaling = []
    for name in names:
        rows = settings[name]["rows"]
        perf = {n: _times(r)["performer"] for n, r in rows.items()}
        long, short = max(perf), 4096 if 4096 in perf else None
        scaling.append([name or "—", fmt(_ratio(perf[long], perf.get(short)) if short else None, ".2f"),
                        fmt(1e3 * perf[long] if perf[long] else None)])
    if len(first) > 3:
        parts += [f"Performer time({max(first)}) / time(4096) (linear: {max(first) // 4096}):", "",
                  markdown_table(["setting", "ratio", f"ms at {max(first)}"], scaling), ""]
    busy = [n for n in names if settings[n]["busy_core"] is not None]
    quiet = [n for n in names if settings[n]["busy_core"] is None and settings[n]["threads"] == settings[busy[0]]["threads"]] if busy else []
    if busy and quiet:
        rows = []
        for length in first:
            t_busy, t_quiet = _times(settings[busy[0]]["rows"][length]), _times(settings[quiet[0]]["rows"][length])
            rows.append([length] + [fmt(_ratio(t_busy[m], t_quiet[m]), ".2f") for m in ("performer", "llama-sdpa")])
        parts += [f"Contention: time with a busy-loop process on one core / quiet time ({busy[0]}):", "",
                  markdown_table(["N", "Performer", "Llama SDPA"], rows), ""]
    for name, setting in settings.items():
        rows = []
        for length, row in setting["rows"].items():
            t = _times(row)
            perf, sdpa, ident, pp, ident_qk = (t[m] for m in METHODS)
            ms = lambda value: fmt(None if value is None else 1e3 * value)  # noqa: E731
            mib = lambda m: fmt(None if row.get(m) is None else row[m]["growth_bytes"] / 2**20)  # noqa: E731
            rows.append([length, ms(perf), ms(sdpa), ms(ident), ms(ident_qk), ms(pp),
                         fmt(_ratio(sdpa, perf), ".2f"), fmt(_ratio(perf, ident), ".2f"),
                         fmt(_ratio(perf, ident_qk), ".2f"), fmt(_ratio(sdpa, ident), ".2f"),
                         fmt(_ratio(pp, sdpa), ".2f"), mib("performer"), mib("llama-sdpa"), mib("performer-pytorch")])
        parts += [f"## {name}" if name else "", "", setting["machine"] + ".", "", markdown_table(
            ["N", "Performer ms", "Llama SDPA ms", "Llama identity ms", "identity keeping q, k ms",
             "performer-pytorch ms", "SDPA / Performer", "Performer / identity", "Performer / identity keeping q, k",
             "SDPA / identity", "perf-pt / SDPA", "Performer MiB", "Llama SDPA MiB", "perf-pt MiB"], rows), ""]
    return "\n".join(parts)


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
    settings = _settings(results)
    quiet = [n for n, s in settings.items() if s.get("busy_core") is None]
    main_name = max(quiet, key=lambda n: settings[n].get("threads", 0))  # the default thread count, quiet
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = {}
    for method in METHODS:
        points = [(int(n), row[method]) for n, row in settings[main_name]["rows"].items() if row[method] is not None]
        if not points:
            continue
        xs = [n for n, _ in points]
        label = names.get(method, method) + (f" ({main_name})" if main_name else "")
        line, = axes[0].plot(xs, [r["min_s"] for _, r in points], "o-", label=label)
        colors[method] = line.get_color()
        axes[1].plot(xs, [r["growth_bytes"] / 2**20 for _, r in points], "o-", color=line.get_color(), label=label)
    for name, style in zip([n for n in settings if n != main_name], ("--", ":", "-.")):
        for method in ("performer", "llama-sdpa"):  # the other settings: the two that the targets compare
            points = [(int(n), row[method]) for n, row in settings[name]["rows"].items() if row.get(method)]
            if points and method in colors:
                axes[0].plot([n for n, _ in points], [r["min_s"] for _, r in points], style, marker=".",
                             color=colors[method], label=f"{names[method]} ({name})")
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
