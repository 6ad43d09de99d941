"""How well does each softmax-approximating feature map reproduce exact softmax attention?

For q, k ~ N(0, s / sqrt(d) I) (so the logits q . k have standard deviation s) and v ~ N(0, I), we compare the
kernel attention output against exact softmax attention computed in float64, and report the relative Frobenius
error ||out - exact|| / ||exact|| averaged over seeds (each seed draws new inputs and new random features; every
map sees the same inputs for a given seed). Maps: FAVOR+ (arXiv 2009.14794), FAVOR++ (OPRF, arXiv 2205.15317),
hyperbolic (2009.14794 Lemma 1), trigonometric RFF (Rahimi & Recht 2007), each with orthogonal or iid projections.

    .venv/bin/python benchmarks/feature_map_quality.py            # table on stdout, .md/.json/.png in results/
    .venv/bin/python benchmarks/feature_map_quality.py --seeds 3  # quicker

The test suite imports ``relative_output_error`` from here, so the numbers it asserts are the numbers printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from hf_performer.feature_maps import get_feature_map_class
from hf_performer.ops import linear_attention

RESULTS = Path(__file__).resolve().parent / "results"

# label -> (registry name, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "favor+ orthogonal": ("favor+", {"orthogonal": True}),
    "favor+ iid": ("favor+", {"orthogonal": False}),
    "favor++ orthogonal": ("favor++", {"orthogonal": True}),
    "favor++ iid": ("favor++", {"orthogonal": False}),
    "hyperbolic orthogonal": ("hyperbolic", {"orthogonal": True}),
    "hyperbolic iid": ("hyperbolic", {"orthogonal": False}),
    "rff orthogonal": ("rff", {"orthogonal": True}),
    "rff iid": ("rff", {"orthogonal": False}),
}
NUM_FEATURES = (64, 128, 256, 512)
LOGIT_STDS = (0.25, 0.5, 0.75, 1.0)


def make_inputs(seed: int, logit_std: float, head_dim: int, length: int):
    """q, k, v (1, 1, N, d) in float64 with std(q . k) = logit_std."""
    generator = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(logit_std / math.sqrt(head_dim))
    q, k, v = (torch.randn(1, 1, length, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    return q * sigma, k * sigma, v


def exact_attention(q, k, v) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # (1, 1, N, d), float64


def relative_output_error(
    variant: str,
    num_features: int,
    logit_std: float,
    seed: int,
    *,
    head_dim: int = 64,
    length: int = 256,
) -> float:
    """||kernel attention - softmax attention||_F / ||softmax attention||_F for one seed."""
    name, options = VARIANTS[variant]
    q, k, v = make_inputs(seed, logit_std, head_dim, length)
    feature_map = get_feature_map_class(name)(head_dim, num_features=num_features, **options)
    feature_map.new_feature_map(torch.Generator().manual_seed(10_000 + seed))
    q_features, k_features, k_log_scale = feature_map.attention_features(q.float(), k.float())
    out = linear_attention(q_features, k_features, v.float(), k_log_scale=k_log_scale).double()
    exact = exact_attention(q, k, v)
    return float((out - exact).norm() / exact.norm())


def quality_grid(variants, num_features, logit_stds, seeds, *, head_dim=64, length=256) -> list[dict]:
    rows = []
    for variant in variants:
        for logit_std in logit_stds:
            for m in num_features:
                errors = [
                    relative_output_error(variant, m, logit_std, seed, head_dim=head_dim, length=length)
                    for seed in seeds
                ]
                rows.append({
                    "variant": variant,
                    "logit_std": logit_std,
                    "num_features": m,
                    "mean": statistics.fmean(errors),
                    "stderr": statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) > 1 else 0.0,
                    "errors": errors,
                })
    return rows


# (challenger, baseline): the two claims of the papers, compared on the same inputs and seeds
COMPARISONS = (
    ("favor++ orthogonal", "favor+ orthogonal"),
    ("favor++ iid", "favor+ iid"),
    ("favor+ orthogonal", "favor+ iid"),
    ("favor++ orthogonal", "favor++ iid"),
)


def comparison_table(rows, num_features) -> str:
    """Ratio of mean errors (< 1: the challenger is better) and how many seeds the challenger wins."""
    by_key = {(r["variant"], r["logit_std"], r["num_features"]): r for r in rows}
    lines = [
        "Paired comparisons on the same inputs: ratio of mean errors (challenger / baseline; below 1 = better), "
        "and the number of seeds on which the challenger's error is lower.",
        "",
        "| challenger vs baseline | logit std | " + " | ".join(f"m = {m}" for m in num_features) + " |",
        "|---|---|" + "---|" * len(num_features),
    ]
    for challenger, baseline in COMPARISONS:
        for logit_std in dict.fromkeys(r["logit_std"] for r in rows):
            cells = []
            for m in num_features:
                a, b = by_key[(challenger, logit_std, m)], by_key[(baseline, logit_std, m)]
                wins = sum(x < y for x, y in zip(a["errors"], b["errors"]))
                cells.append(f"{a['mean'] / b['mean']:.2f} ({wins}/{len(a['errors'])})")
            lines.append(f"| {challenger} vs {baseline} | {logit_std:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows, num_features, *, head_dim, length, seeds) -> str:
    lines = [
        f"Relative error of the attention output vs exact softmax attention (d = {head_dim}, N = {length}, "
        f"mean over {len(seeds)} seeds; ± is one standard error). Command: "
        f"`.venv/bin/python benchmarks/feature_map_quality.py --seeds {len(seeds)} --head-dim {head_dim} "
        f"--length {length}`.",
        "",
        "| map | logit std | " + " | ".join(f"m = {m}" for m in num_features) + " |",
        "|---|---|" + "---|" * len(num_features),
    ]
    by_key = {(r["variant"], r["logit_std"], r["num_features"]): r for r in rows}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for logit_std in dict.fromkeys(r["logit_std"] for r in rows):
            cells = []
            for m in num_features:
                r = by_key[(variant, logit_std, m)]
                cells.append(f"{r['mean']:.3f} ± {r['stderr']:.3f}")
            lines.append(f"| {variant} | {logit_std:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    """Top row: the positive estimators; bottom row: trigonometric RFF (orders of magnitude worse) against FAVOR+."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stds = list(dict.fromkeys(r["logit_std"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {"favor+": "tab:blue", "favor++": "tab:red", "hyperbolic": "tab:green", "rff": "tab:purple"}
    panels = [
        [v for v in variants if not v.startswith("rff")],
        [v for v in variants if v.startswith("rff")] + ["favor+ orthogonal"],
    ]
    row_titles = ["positive features", "trigonometric RFF vs FAVOR+"]
    fig, axes = plt.subplots(2, len(stds), figsize=(4.2 * len(stds), 7.5), squeeze=False)
    for row, selected in enumerate(panels):
        for ax, logit_std in zip(axes[row], stds):
            for variant in selected:
                sel = [r for r in rows if r["variant"] == variant and r["logit_std"] == logit_std]
                family, kind = variant.rsplit(" ", 1)
                ax.errorbar(
                    [r["num_features"] for r in sel], [r["mean"] for r in sel], yerr=[r["stderr"] for r in sel],
                    color=colors.get(family), linestyle="--" if kind == "iid" else "-", marker="o", markersize=3,
                    capsize=2, label=variant,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{row_titles[row]}, logit std {logit_std:g}", fontsize=10)
            ax.set_xlabel("features m")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].set_ylabel(f"{row_titles[row]}:\nrelative error of attention output")
        axes[row][-1].legend(fontsize=7)
    fig.suptitle("Kernel attention vs exact softmax attention (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved .json; run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads((args.out / "feature_map_quality.json").read_text()), args.out / "feature_map_quality.png")
        return
    torch.set_num_threads(1)  # small matrices: threads only add contention (QR of 64x64 slows 100x on a busy box)
    seeds = list(range(args.seeds))
    rows = quality_grid(VARIANTS, NUM_FEATURES, LOGIT_STDS, seeds, head_dim=args.head_dim, length=args.length)
    table = markdown_table(rows, NUM_FEATURES, head_dim=args.head_dim, length=args.length, seeds=seeds)
    table += "\n" + comparison_table(rows, NUM_FEATURES)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feature_map_quality.md").write_text(table)
    (args.out / "feature_map_quality.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "feature_map_quality.png")
    print(f"wrote {args.out / 'feature_map_quality.md'}, .json and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
