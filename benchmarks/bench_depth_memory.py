"""Training activation memory against depth, with and without gradient checkpointing.

The Performer reference offers reversible layers (RevNet, arXiv 1707.04585) so activation memory does not grow
with depth. We offer gradient checkpointing instead (see the README for why): this script measures what it buys.
Each configuration runs in a fresh subprocess and reports its peak resident memory above the model's own.

    .venv/bin/python benchmarks/bench_depth_memory.py [--quick]

Prints a markdown table and writes benchmarks/results/bench_depth_memory.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, resource, sys, torch
import hf_performer
from hf_performer import PerformerConfig, PerformerForCausalLM
layers, checkpointing, length = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
torch.manual_seed(0)
model = PerformerForCausalLM(PerformerConfig(vocab_size=256, hidden_size=256, num_hidden_layers=layers,
                                             num_attention_heads=4, nb_features=64)).train()
if checkpointing:
    model.activation_checkpointing_enable()
ids = torch.randint(0, 256, (4, length))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(ids, labels=ids).loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"activation_mib": (after - before) / 1024}))
"""


def measure(layers: int, checkpointing: bool, length: int) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, str(layers), "1" if checkpointing else "0", str(length)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["activation_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args()
    depths = [2, 4, 8] if args.quick else [2, 4, 8, 16]
    rows = []
    for depth in depths:
        plain = measure(depth, False, args.length)
        checkpointed = measure(depth, True, args.length)
        rows.append((depth, plain, checkpointed))
        print(f"depth {depth}: {plain:.0f} MiB plain, {checkpointed:.0f} MiB checkpointed", flush=True)
    lines = ["| layers | activation MiB | with gradient checkpointing | ratio |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {d} | {p:.0f} | {c:.0f} | {p / max(c, 1e-9):.1f}x |" for d, p, c in rows]
    table = "\n".join(lines)
    print(f"\nbatch 4 x {args.length} tokens, hidden 256, 4 heads, 64 features\n{table}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_depth_memory.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="plain")
    axis.plot([r[0] for r in rows], [r[2] for r in rows], "s-", label="gradient checkpointing")
    axis.set(xlabel="layers", ylabel="peak activation MiB (RSS)", title=f"training memory, {args.length} tokens")
    axis.legend()
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "bench_depth_memory.png", dpi=120)
    print(f"wrote {RESULTS / 'bench_depth_memory.md'} and .png")


if __name__ == "__main__":
    main()
