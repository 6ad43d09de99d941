"""How close does a Performer get to softmax attention, and how much faster is it? Byte-level language modelling on
the embedded corpus (CPython's documentation topics): same shape, parameter count and token budget for every model.

    python benchmarks/quality_lm.py            # the default run, ~15 min on 2 CPU cores
    python benchmarks/quality_lm.py --quick    # a smoke run, ~2 min (results/quality_lm_quick.*)

Models: a stock ``LlamaForCausalLM`` (softmax attention through SDPA) and Performers of the same shape (RMSNorm,
SwiGLU feed-forward, rotary positions, tied embeddings): FAVOR+, FAVOR+ with half of the heads exact over a local
window, and ReLU random features. Each trains on the same bytes at 512 and 4096 context (one 4096-token step is 8 x
512 or 1 x 4096), then reports validation loss (nats/byte, lower is better) and training tokens/s. Writes
``results/quality_lm.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_clm import embedded_corpus  # noqa: E402  (one definition of the corpus and its split)

from hf_performer import PerformerConfig, PerformerForCausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS_PER_STEP = 4096


def variants(local_window: int) -> dict[str, dict | None]:
    """Performer config fields per variant; None is the softmax baseline (Llama)."""
    return {
        "softmax (Llama)": None,
        "FAVOR+": dict(feature_map="favor+"),
        "FAVOR+ + local heads": dict(feature_map="favor+", local_attn_heads=2, local_window_size=local_window),
        "ReLU features": dict(feature_map="relu"),
    }


def build_model(fields: dict | None, args, vocab_size: int) -> torch.nn.Module:
    shape = dict(vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, intermediate_size=args.intermediate_size,
                 tie_word_embeddings=True, max_position_embeddings=max(args.contexts))
    torch.manual_seed(0)
    if fields is None:
        return LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=args.heads, rms_norm_eps=1e-5,
                                            attention_bias=False, mlp_bias=False, attn_implementation="sdpa"))
    return PerformerForCausalLM(PerformerConfig(**shape, norm_type="rmsnorm", layer_norm_eps=1e-5, ff_glu=True,
                                                hidden_act="silu", mlp_bias=False, attention_bias=False,
                                                feature_redraw_interval=0, **fields))


def byte_streams(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    corpus = embedded_corpus()
    streams = []
    for split in ("train", "validation"):
        ids = tokenizer("\n\n".join(corpus[split]["text"]), add_special_tokens=False)["input_ids"]
        streams.append(torch.tensor(ids, dtype=torch.long))
    return streams[0], streams[1]


def batches(stream: torch.Tensor, context: int, steps: int, seed: int):
    """Random windows of the train stream: ``TOKENS_PER_STEP // context`` rows of ``context`` tokens per step."""
    generator = torch.Generator().manual_seed(seed)
    rows = TOKENS_PER_STEP // context
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - context, (rows,), generator=generator)
        yield torch.stack([stream[start : start + context] for start in starts.tolist()])


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, context: int, max_tokens: int) -> float:
    """Mean loss over consecutive validation windows (the same bytes for every model at a given context)."""
    model.eval()
    usable = min(len(stream) // context, max(1, max_tokens // context)) * context
    windows = stream[:usable].view(-1, context)
    losses = [model(input_ids=window[None], labels=window[None]).loss.item() for window in windows]
    model.train()
    return sum(losses) / len(losses)


def train_one(name, fields, args, context, train, validation, vocab_size) -> dict:
    model = build_model(fields, args, vocab_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))),
    )
    curve, timed_tokens, timed_seconds = [], 0, 0.0
    for step, batch in enumerate(batches(train, context, args.steps, seed=1)):
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        elapsed = time.perf_counter() - started
        if step >= 2:  # the first steps pay for allocation and lazy initialisation
            timed_tokens += batch.numel()
            timed_seconds += elapsed
        curve.append(loss.item())
        if args.verbose and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"    step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    result = dict(
        model=name,
        context=context,
        parameters=sum(p.numel() for p in model.parameters()),
        validation_loss=validation_loss(model, validation, context, args.eval_tokens),
        train_tokens_per_s=timed_tokens / timed_seconds,
        train_tokens=args.steps * TOKENS_PER_STEP,
        curve=curve,
    )
    print(f"  {name:22s} ctx {context:5d}: val loss {result['validation_loss']:.4f}, "
          f"{result['train_tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def unigram_loss(train: torch.Tensor, validation: torch.Tensor, vocab_size: int) -> float:
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    return float(-(counts / counts.sum()).log()[validation].mean())


def write_table(results: list[dict], args, unigram: float) -> str:
    contexts = sorted({r["context"] for r in results})
    names = list(dict.fromkeys(r["model"] for r in results))
    cell = {(r["model"], r["context"]): r for r in results}
    header = "| model | parameters | " + " | ".join(
        f"val loss @{c} | tokens/s @{c}" for c in contexts) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(contexts))]
    for name in names:
        row = [name, f"{cell[(name, contexts[0])]['parameters']:,}"]
        for context in contexts:
            r = cell[(name, context)]
            row += [f"{r['validation_loss']:.3f}", f"{r['train_tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"| unigram baseline (no context) | - | " + " | ".join(
        f"{unigram:.3f} | -" for _ in contexts) + " |")
    setup = (f"hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, intermediate "
             f"{args.intermediate_size}; {args.steps} steps x {TOKENS_PER_STEP} tokens "
             f"({args.steps * TOKENS_PER_STEP:,} training tokens per run); byte-level; "
             f"validation on {args.eval_tokens:,} bytes; torch {torch.__version__}, {torch.get_num_threads()} "
             f"thread(s), {platform.processor() or platform.machine()}")
    return "\n".join(lines) + f"\n\nSetup: {setup}.\n"


def plot(results: list[dict], path: Path) -> None:
    """Top row: smoothed train loss per variant (validation loss as a dot at the end). The variants' curves lie
    within a few hundredths of each other, so each has its own line style, and the bottom row shows every curve's
    difference to softmax's (same batches, so the difference is what the attention changes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", "-.", ":"]
    contexts = sorted({r["context"] for r in results})
    figure, axes = plt.subplots(2, len(contexts), figsize=(6 * len(contexts), 7.4), sharex="col",
                                gridspec_kw={"height_ratios": [3, 2]}, squeeze=False)

    def smoothed(curve):
        window = max(1, len(curve) // 20)
        values = torch.tensor(curve)
        smooth = values.unfold(0, window, 1).mean(1) if len(curve) >= window else values
        return [(i + window) * TOKENS_PER_STEP / 1e6 for i in range(len(smooth))], smooth

    for column, context in enumerate(contexts):
        top, bottom = axes[0, column], axes[1, column]
        runs = [r for r in results if r["context"] == context]
        reference = smoothed(runs[0]["curve"])[1]
        for index, r in enumerate(runs):
            tokens, smooth = smoothed(r["curve"])
            style = dict(linestyle=styles[index % len(styles)], linewidth=2.2 if index == 0 else 1.6)
            line, = top.plot(tokens, smooth.tolist(), label=f"{r['model']} (val {r['validation_loss']:.3f})", **style)
            # side by side, so that equal validation losses do not hide each other's dot
            top.scatter([r["train_tokens"] / 1e6 + 0.008 * index], [r["validation_loss"]], color=line.get_color(),
                        marker="o", zorder=3)
            size = min(len(smooth), len(reference))
            bottom.plot(tokens[:size], (smooth[:size] - reference[:size]).tolist(), color=line.get_color(), **style)
        top.set_title(f"context {context}")
        top.set_ylim(top=min(top.get_ylim()[1], 3.8))  # the first steps' fall from 5.6 says nothing about a variant
        bottom.axhline(0.0, color="0.5", linewidth=0.8)
        bottom.set_xlabel("training tokens (millions)")
        bottom.set_ylim(-0.25, 0.15)
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
        top.legend(fontsize=8, loc="upper right")
    axes[0, 0].set_ylabel("train loss, nats/byte (dots: validation)")
    axes[1, 0].set_ylabel(f"train loss minus {results[0]['model']}'s")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, short validation")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 120; quick 15)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=172)
    parser.add_argument("--local_window", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval_tokens", type=int, default=None, help="validation bytes (default 32768; quick 8192)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (names as in the table)")
    parser.add_argument("--output", default=None,
                        help="path prefix of .md/.json/.png (default results/quality_lm, quick: results/quality_lm_quick)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; train nothing")
    args = parser.parse_args(argv)
    args.steps = args.steps or (15 if args.quick else 120)
    args.eval_tokens = args.eval_tokens or (8192 if args.quick else 32768)
    args.output = args.output or str(RESULTS / ("quality_lm_quick" if args.quick else "quality_lm"))
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.replot:
        output = Path(args.output)
        results = json.loads(output.with_suffix(".json").read_text())["results"]
        plot(results, output.with_suffix(".png"))
        print(f"redrew {output}.png from {output}.json")
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = ByT5Tokenizer()
    train, validation = byte_streams(tokenizer)
    unigram = unigram_loss(train, validation, len(tokenizer))
    print(f"{len(train):,} train / {len(validation):,} validation bytes; unigram baseline {unigram:.4f} nats/byte")
    started = time.perf_counter()
    results = []
    for context in args.contexts:
        for name, fields in variants(args.local_window).items():
            if args.only and name not in args.only:
                continue
            results.append(train_one(name, fields, args, context, train, validation, len(tokenizer)))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table = write_table(results, args, unigram)
    output.with_suffix(".md").write_text(table)
    output.with_suffix(".json").write_text(json.dumps(
        dict(args=vars(args), unigram_loss=unigram, results=results), indent=1) + "\n")
    plot(results, output.with_suffix(".png"))
    print("\n" + table)
    print(f"wrote {output}.md/.json/.png in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
