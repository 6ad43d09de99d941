"""Per-token decode latency: eager generate-style steps vs the same step compiled (``PerformerDecodeStep`` under
``torch.compile``), 6 layers, hidden 512, 128 features, batch 1. Answers issue 15's "a compiled decode step for
generate() if it pays". Interleaved repeats, medians, ratio from one run.

    .venv/bin/python benchmarks/bench_decode_compiled.py --threads 1
"""

import argparse
import statistics
import time

import torch

from hf_performer import PerformerConfig, PerformerDecodeStep, PerformerForCausalLM
from hf_performer.cache_performer import CACHE_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                             nb_features=128, ff_glu=True, intermediate_size=1024)
    model = PerformerForCausalLM(config).eval()
    step = PerformerDecodeStep(model)
    compiled = torch.compile(step, backend=args.backend, dynamic=False)
    prompt = torch.randint(0, 32000, (1, args.context))
    with torch.no_grad():
        kv, log_scale, positions = step.initial_state(model(prompt, use_cache=True)[CACHE_NAME])
        token = prompt[:, -1:]
        for _ in range(3):  # compile and warm up
            compiled(token, positions, kv, log_scale)
        times = {"eager": [], "compiled": []}
        for _ in range(args.steps):
            for name, fn in (("eager", step), ("compiled", compiled)):
                start = time.perf_counter()
                logits, _, _ = fn(token, positions, kv, log_scale)
                times[name].append(time.perf_counter() - start)
        eager_logits, _, _ = step(token, positions, kv, log_scale)
        compiled_logits, _, _ = compiled(token, positions, kv, log_scale)
    eager, fast = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"| threads | eager ms/token | compiled ({args.backend}) ms/token | eager / compiled | max |logit diff| |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.threads} | {eager * 1e3:.2f} | {fast * 1e3:.2f} | {eager / fast:.2f}x | "
          f"{(eager_logits - compiled_logits).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
