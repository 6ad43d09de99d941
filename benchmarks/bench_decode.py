"""Per-token decode latency and cache memory against context length: PerformerForCausalLM (recurrent state) vs a
GPT-2-shaped transformers model of the same size (KV cache).

    .venv/bin/python benchmarks/bench_decode.py            # contexts 256 ... 32768
    .venv/bin/python benchmarks/bench_decode.py --quick    # contexts 256 ... 4096

The Performer reaches each context by a real chunked prefill (linear cost) and its contexts are timed round-robin.
GPT-2's KV cache is filled with random keys/values of the right shape instead of a quadratic prefill: its decode
cost depends only on the cache size.
Prints a markdown table and writes benchmarks/results/bench_decode.{md,png}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import hf_performer  # noqa: F401
from hf_performer import PerformerConfig, PerformerForCausalLM
from hf_performer.cache_performer import CACHE_NAME  # past_key_values before transformers 5.24, cache after

RESULTS = Path(__file__).parent / "results"


def timed_decode(model, cache, next_token, steps: int, attention_mask=None) -> float:
    """Median seconds of one decode step (a new token appended to `cache`)."""
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
            out = model(next_token, use_cache=True, **{CACHE_NAME: cache}, **kwargs)
            times.append(time.perf_counter() - start)
            cache = out[CACHE_NAME]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask[:, :1]], dim=1)
    return statistics.median(times[1:])


def performer_at(model, context: int):
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, context))
        cache = model(ids, use_cache=True)[CACHE_NAME]
    return cache


def gpt2_cache_at(model, context: int) -> DynamicCache:
    config = model.config
    head_dim = config.n_embd // config.n_head
    cache = DynamicCache(config=config)
    for layer in range(config.n_layer):
        keys = torch.randn(1, config.n_head, context, head_dim)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384, 32768]
    torch.manual_seed(0)
    vocab = 8192
    performer = PerformerForCausalLM(PerformerConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        nb_features=128, max_position_embeddings=max(contexts) + 64, ff_mult=4,
    )).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
        n_positions=max(contexts) + 64, bos_token_id=None, eos_token_id=None,
    )).eval()
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"Performer {params(performer):.1f}M params, GPT-2 {params(gpt2):.1f}M params, "
          f"torch threads {torch.get_num_threads()}")

    rows = []
    token = torch.randint(0, vocab, (1, 1))
    # Performer caches are small: keep one per context and time them round-robin, so a change in machine load
    # during the run cannot masquerade as a dependence on the context length.
    # the same model with its weights laid out for matrix-vector products (optimize_for_decoding), timed alongside
    relaid = copy.deepcopy(performer).optimize_for_decoding()
    models = {"default": performer, "relaid": relaid}
    p_caches = {(name, context): performer_at(model, context) for name, model in models.items()
                for context in tqdm(contexts, desc=f"Performer prefill ({name})")}
    p_samples = {key: [] for key in p_caches}
    with torch.inference_mode():
        for _ in tqdm(range(args.steps), desc="Performer decode (round-robin)"):
            for (name, context), cache in p_caches.items():
                start = time.perf_counter()
                models[name](token, use_cache=True, **{CACHE_NAME: cache})
                p_samples[name, context].append(time.perf_counter() - start)
    for context in tqdm(contexts, desc="GPT-2 contexts"):
        p_bytes = cache_bytes(p_caches["default", context])
        p_time = statistics.median(p_samples["default", context][1:])
        r_time = statistics.median(p_samples["relaid", context][1:])
        g_cache = gpt2_cache_at(gpt2, context)
        g_bytes = cache_bytes(g_cache)
        mask = torch.ones(1, context + 1, dtype=torch.long)
        g_time = timed_decode(gpt2, g_cache, token, args.steps, attention_mask=mask)
        rows.append((context, p_time, r_time, g_time, p_bytes, g_bytes))

    base = rows[0][2]
    lines = [
        "| context | Performer ms/token | + optimize_for_decoding() | GPT-2 ms/token | optimized / GPT-2 | "
        "optimized vs its 256 | Performer cache MiB | GPT-2 cache MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for context, p_time, r_time, g_time, p_bytes, g_bytes in rows:
        lines.append(f"| {context} | {p_time * 1e3:.2f} | {r_time * 1e3:.2f} | {g_time * 1e3:.2f} | "
                     f"{r_time / g_time:.2f} | {r_time / base:.2f}x | {p_bytes / 2**20:.2f} | {g_bytes / 2**20:.1f} |")
    # the 256-token comparison once more, the two models alternating step by step (load changes hit both)
    p_cache, g_cache = performer_at(relaid, contexts[0]), gpt2_cache_at(gpt2, contexts[0])
    ratios = []
    with torch.inference_mode():
        for step in range(args.steps):
            start = time.perf_counter()
            relaid(token, use_cache=True, **{CACHE_NAME: p_cache})
            middle = time.perf_counter()
            mask = torch.ones(1, contexts[0] + step + 1, dtype=torch.long)
            g_cache = gpt2(token, use_cache=True, **{CACHE_NAME: g_cache}, attention_mask=mask)[CACHE_NAME]
            ratios.append((middle - start) / (time.perf_counter() - middle))
    paired = statistics.median(ratios[1:])
    lines.append("")
    lines.append(f"Alternating step by step at {contexts[0]} tokens: optimized Performer / GPT-2 = {paired:.2f} "
                 f"(median of {args.steps - 1} paired ratios).")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_decode.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r[0] for r in rows]
    left.plot(xs, [r[1] * 1e3 for r in rows], "o-", label="Performer (recurrent state)")
    left.plot(xs, [r[2] * 1e3 for r in rows], "o--", label="Performer, optimize_for_decoding()")
    left.plot(xs, [r[3] * 1e3 for r in rows], "s-", label="GPT-2 (KV cache)")
    left.set(xscale="log", xlabel="context length", ylabel="ms per generated token", title="decode latency")
    right.plot(xs, [r[4] / 2**20 for r in rows], "o-", label="Performer")
    right.plot(xs, [r[5] / 2**20 for r in rows], "s-", label="GPT-2")
    right.set(xscale="log", yscale="log", xlabel="context length", ylabel="cache MiB", title="cache memory")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "bench_decode.png", dpi=120)
    print(f"wrote {RESULTS / 'bench_decode.md'} and {RESULTS / 'bench_decode.png'}")


if __name__ == "__main__":
    main()
