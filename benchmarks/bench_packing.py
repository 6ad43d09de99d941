"""Training throughput of packed (padding-free) against padded batches, on documents of mixed lengths.

The same documents (lengths drawn log-uniformly from 32..1024 tokens, fixed seed, in random order) go through a small
causal Performer, forward + backward, in batches of ``--batch`` documents, two ways:

* padded: a (B, longest) batch, right-padded, ``attention_mask``, pad labels -100 (what ``DataCollatorWithPadding``
  gives);
* packed: one (1, total) row of the concatenated documents with ``position_ids`` restarting at 0
  (``DataCollatorWithFlattening``); projections and feed-forward run on the real tokens only, attention on each
  document alone.

Tokens/s counts real tokens only (the same number both ways). Each thread count runs in its own process; within it
the two ways alternate repeat by repeat (padded, packed, padded, ...), so that a change of machine load hits both,
and the speed-up is the median of the per-repeat ratios.

    .venv/bin/python benchmarks/bench_packing.py            # 1 and 2 threads, ~3 minutes
    .venv/bin/python benchmarks/bench_packing.py --replot   # redraw the .png from the saved .json

Writes benchmarks/results/bench_packing.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, fmt, machine_line, markdown_table, matmul_rate, run_worker, worker_main  # noqa: E402

MODEL = dict(vocab_size=384, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344,
             nb_features=64, max_position_embeddings=2048, norm_type="rmsnorm", ff_glu=True, hidden_act="silu",
             mlp_bias=False, pad_token_id=0, feature_redraw_interval=0)


def document_lengths(count: int, shortest: int, longest: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [int(round(math.exp(rng.uniform(math.log(shortest), math.log(longest))))) for _ in range(count)]


def make_batches(lengths: list[int], batch: int, vocab: int, seed: int):
    """The documents as padded batches and as packed rows: [(padded inputs, packed inputs)] per batch."""
    import torch
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    flatten = DataCollatorWithFlattening(return_tensors="pt")
    pairs = []
    for start in range(0, len(documents), batch):
        group = documents[start : start + batch]
        longest = max(len(d) for d in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for row, document in enumerate(group):
            ids[row, : len(document)] = torch.tensor(document)
            mask[row, : len(document)] = 1
        padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        packed = dict(flatten([{"input_ids": d, "labels": d} for d in group]))
        pairs.append((padded, packed))
    return pairs


def worker(args: dict) -> dict:
    import torch

    from hf_performer import PerformerConfig, PerformerForCausalLM

    torch.manual_seed(0)
    model = PerformerForCausalLM(PerformerConfig(**MODEL)).train()
    lengths = document_lengths(args["documents"], args["shortest"], args["longest"], args["seed"])
    pairs = make_batches(lengths, args["batch"], MODEL["vocab_size"], args["seed"])

    def run(kind: int) -> float:
        start = time.perf_counter()
        for pair in pairs:
            model(**pair[kind]).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # The two ways compute the same loss (packed == per-document): a quick check that the benchmark compares like
    # with like.
    with torch.no_grad():
        padded_loss = model(**pairs[0][0]).loss.item()
        packed_loss = model(**pairs[0][1]).loss.item()
    run(0), run(1)  # warm-up
    padded, packed = [], []
    for _ in range(args["repeats"]):
        padded.append(run(0))
        packed.append(run(1))
    tokens = sum(lengths)
    slots = sum(pair[0]["input_ids"].numel() for pair in pairs)
    return {
        "tokens": tokens, "padded_slots": slots, "batches": len(pairs), "padded_s": padded, "packed_s": packed,
        "min_s": min(packed), "first_batch_loss": {"padded": padded_loss, "packed": packed_loss},
        "lengths": lengths,
    }


def summarize(result: dict) -> dict:
    ratios = [a / b for a, b in zip(result["padded_s"], result["packed_s"])]
    tokens = result["tokens"]
    return {
        "padded_tok_s": tokens / statistics.median(result["padded_s"]),
        "packed_tok_s": tokens / statistics.median(result["packed_s"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "padding_share": 1 - tokens / result["padded_slots"],
    }


def render(results: dict) -> str:
    rows = []
    for threads, result in results["runs"].items():
        if result is None:
            rows.append([threads] + ["—"] * 5)
            continue
        s = summarize(result)
        rows.append([threads, fmt(s["padded_tok_s"], ",.0f"), fmt(s["packed_tok_s"], ",.0f"), fmt(s["ratio"], ".2f"),
                     f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}", fmt(100 * s["padding_share"], ".0f")])
    opts = results["options"]
    any_run = next((r for r in results["runs"].values() if r is not None), None)
    loss_line = ""
    if any_run is not None:
        loss = any_run["first_batch_loss"]
        loss_line = (f" First batch's loss, padded {loss['padded']:.6f} vs packed {loss['packed']:.6f} "
                     "(the same computation).")
    return "\n".join([
        "# Packed vs padded training batches (`python benchmarks/bench_packing.py`)",
        "",
        *(f"{line}." for line in results["machines"]),
        f"{opts['documents']} documents, lengths log-uniform in {opts['shortest']}..{opts['longest']} tokens (seed "
        f"{opts['seed']}, random order), batches of {opts['batch']}; causal Performer (hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, {MODEL['nb_features']} FAVOR+ "
        f"features, SwiGLU {MODEL['intermediate_size']}), forward + backward, fp32. Tokens/s: real tokens over the "
        f"median of {opts['repeats']} repeats of all batches; speed-up: median (min-max) of the per-repeat ratios, "
        "the two ways alternating." + loss_line,
        "",
        markdown_table(["threads", "padded tokens/s", "packed tokens/s", "packed / padded", "range",
                        "padding, % of padded slots"], rows),
    ])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(threads, summarize(r)) for threads, r in results["runs"].items() if r is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.38
    for offset, key, label in ((-width / 2, "padded_tok_s", "padded (B, longest) + attention_mask"),
                               (width / 2, "packed_tok_s", "packed (1, total) + position_ids")):
        xs = [i + offset for i in range(len(runs))]
        bars = ax.bar(xs, [s[key] for _, s in runs], width, label=label)
        if key == "packed_tok_s":
            for bar, (_, s) in zip(bars, runs):
                ax.annotate(f"{s['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(runs)), [f"{threads} thread{'s' if int(threads) > 1 else ''}" for threads, _ in runs])
    ax.set_ylabel("training tokens/s (real tokens, forward + backward)")
    opts = results["options"]
    padding = runs[0][1]["padding_share"] if runs else float("nan")
    ax.set_title(f"{opts['documents']} documents of {opts['shortest']}..{opts['longest']} tokens (log-uniform), "
                 f"batches of {opts['batch']}\npadding: {100 * padding:.0f}% of the padded batches' slots",
                 fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, fontsize=9, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, one process each")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--shortest", type=int, default=32)
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="documents per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; run nothing")
    opts = parser.parse_args()
    if opts.replot:
        plot(json.loads((RESULTS / "bench_packing.json").read_text()), RESULTS / "bench_packing.png")
        return
    options = {k: v for k, v in vars(opts).items() if k not in ("threads", "replot")}
    results = {"options": options, "machines": [], "runs": {}}
    for threads in opts.threads:
        results["machines"].append(machine_line(threads, matmul_rate(threads)))
        print(results["machines"][-1], file=sys.stderr)
        measured = run_worker(__file__, {**options, "threads": threads}, [{"label": f"{threads} threads"}])
        results["runs"][str(threads)] = measured[0]
    report = render(results)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_packing.md").write_text(report + "\n")
    (RESULTS / "bench_packing.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "bench_packing.png")


if __name__ == "__main__":
    if not worker_main(worker):
        main()
