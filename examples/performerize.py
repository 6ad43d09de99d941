"""Performerize a pretrained softmax model: switch it to kernel attention and recover its quality.

    python examples/performerize.py                                  # ~3 minutes on one CPU core
    python examples/performerize.py --teacher path/to/local/model --output runs/performerized

1. The softmax model ("teacher") is loaded from a local path. With no ``--teacher`` (or an empty directory) a tiny
   Llama is first trained from scratch on the Python documentation shipped with CPython (``pydoc_data.topics``,
   byte tokens) and saved there, so nothing is downloaded.
2. The same checkpoint is loaded again with ``attn_implementation="performer"`` (FAVOR+ random features; the
   random projections are drawn from ``config.performer_feature_seed``): the weights are the teacher's, only the
   attention function changes, and quality drops because FAVOR+ only estimates softmax attention.
3. Attention distillation: every attention layer of the student is fed the teacher's input of that layer and
   trained to reproduce the teacher's attention output (relative MSE), so layers are corrected independently and
   errors do not compound (in the spirit of "Finetuning Pretrained Transformers into RNNs", arXiv 2103.13076, and
   LoLCATs' attention transfer, arXiv 2410.10254). Only attention weights change.
4. A short end-to-end fine-tune distils the teacher's next-token distribution (KL) plus the usual LM loss.

Quality is the perplexity on held-out topics (every 10th topic, never trained on), reported next to the teacher's.
The teacher path must hold a model whose attention dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``
(Llama, Mistral, Qwen2, GPT-2, ...) and that takes byte tokens (vocabulary >= 256) unless you adapt ``encode``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_performer  # noqa: F401  (registers attn_implementation="performer")
from hf_performer.attention_backend import dispatches_attention


# ----------------------------------------------------------------------------------------------------------------
# Data: CPython's own documentation as bytes
# ----------------------------------------------------------------------------------------------------------------


def load_text_splits() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors; validation is every 10th topic in sorted order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = "\n\n".join(topics[name] for i, name in enumerate(names) if i % 10 != 9)
    valid = "\n\n".join(topics[name] for i, name in enumerate(names) if i % 10 == 9)
    return encode(train), encode(valid)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def random_batches(data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])  # (B, L)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, length: int, max_windows: int, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over the first ``max_windows`` non-overlapping windows of ``data``."""
    model.eval()
    windows = data[: (len(data) // length) * length].view(-1, length)[:max_windows]
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------------------------
# Step 1: a small softmax model to start from (skipped when --teacher holds one)
# ----------------------------------------------------------------------------------------------------------------


def train_teacher(path: Path, train: torch.Tensor, args) -> None:
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.teacher_steps,
                                                   pct_start=0.1)
    batches = random_batches(train, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
    for step in range(args.teacher_steps):
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if args.verbose and step % 50 == 0:
            print(f"  teacher step {step:4d}  loss {loss.item():.3f}")
    model.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# Step 3: layer-wise attention distillation
# ----------------------------------------------------------------------------------------------------------------


def attention_modules(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if dispatches_attention(module)]


class AttentionTap:
    """Records each teacher attention layer's input and output, and feeds the recorded inputs to the student's
    layers (so each student layer sees exactly what its teacher layer saw) while recording the student outputs."""

    def __init__(self, teacher, student):
        self.teacher_layers, self.student_layers = attention_modules(teacher), attention_modules(student)
        if len(self.teacher_layers) != len(self.student_layers) or not self.teacher_layers:
            raise ValueError("teacher and student must have the same attention layers")
        self.inputs, self.targets, self.outputs = {}, {}, {}
        self.handles = []
        for i, (t, s) in enumerate(zip(self.teacher_layers, self.student_layers)):
            self.handles += [
                t.register_forward_pre_hook(self._record_input(i), with_kwargs=True),
                t.register_forward_hook(self._record(self.targets, i)),
                s.register_forward_pre_hook(self._replace_input(i), with_kwargs=True),
                s.register_forward_hook(self._record(self.outputs, i)),
            ]

    def _record_input(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _replace_input(self, i):
        def hook(module, args, kwargs):
            if i not in self.inputs:
                return None
            if args:
                return (self.inputs[i], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.inputs[i]}
        return hook

    @staticmethod
    def _record(store, i):
        def hook(module, args, output):
            store[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over layers of ||student - teacher||^2 / ||teacher||^2 (scale-free across layers)."""
        errors = [(self.outputs[i] - self.targets[i]).pow(2).sum() / self.targets[i].pow(2).sum()
                  for i in range(len(self.teacher_layers))]
        return torch.stack(errors).mean()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def attention_distillation(teacher, student, batches, steps: int, lr: float, verbose: bool) -> tuple[float, float]:
    """Train the student's attention weights to match the teacher's attention outputs; returns the relative
    error (mean over layers) on the first batch before and after."""
    tap = AttentionTap(teacher, student)
    parameters = [p for layer in tap.student_layers for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    probe = next(batches)

    def error_on(ids):
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)
            student(input_ids=ids, use_cache=False)
            return tap.loss().item()

    before = error_on(probe)
    student.train()
    for step in range(steps):
        ids = next(batches)
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)
        student(input_ids=ids, use_cache=False)
        loss = tap.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if verbose and step % 25 == 0:
            print(f"  attention distillation step {step:4d}  relative error {loss.item():.4f}")
    student.eval()
    after = error_on(probe)
    tap.remove()
    return before, after


# ----------------------------------------------------------------------------------------------------------------
# Step 4: end-to-end distillation fine-tune
# ----------------------------------------------------------------------------------------------------------------


def logit_distillation(teacher, student, batches, steps: int, lr: float, verbose: bool) -> None:
    """KL(teacher || student) on next-token distributions plus the LM loss (Hinton et al., arXiv 1503.02531)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    for step in range(steps):
        ids = next(batches)
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits, dim=-1)
        out = student(input_ids=ids, labels=ids, use_cache=False)
        kl = F.kl_div(F.log_softmax(out.logits, dim=-1), target, log_target=True, reduction="batchmean") / ids.shape[1]
        loss = kl + out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if verbose and step % 25 == 0:
            print(f"  fine-tune step {step:4d}  kl {kl.item():.4f}  lm {out.loss.item():.3f}")
    student.eval()


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    train, valid = load_text_splits()
    teacher_path = Path(args.teacher)
    if not (teacher_path / "config.json").exists():
        print(f"no model at {teacher_path}: training a small softmax Llama there ({args.teacher_steps} steps)")
        train_teacher(teacher_path, train, args)

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, attn_implementation="sdpa").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    config = AutoConfig.from_pretrained(teacher_path)
    config.performer_feature_map = args.feature_map
    config.performer_nb_features = args.nb_features
    config.performer_feature_seed = args.seed
    student = AutoModelForCausalLM.from_pretrained(teacher_path, config=config, attn_implementation="performer").eval()

    def ppl(model):
        return perplexity(model, valid, args.seq_len, args.eval_windows)

    results = {"softmax (original)": ppl(teacher), "performer, no recovery": ppl(student)}
    batches = random_batches(train, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed + 1))
    error_before, error_after = attention_distillation(teacher, student, batches, args.distill_steps,
                                                       args.distill_lr, args.verbose)
    results["+ attention distillation"] = ppl(student)
    logit_distillation(teacher, student, batches, args.finetune_steps, args.finetune_lr, args.verbose)
    results["+ logit distillation fine-tune"] = ppl(student)

    if args.output:
        student.save_pretrained(args.output)
    reference = results["softmax (original)"]
    print(f"\nheld-out perplexity (byte level, {args.eval_windows} windows of {args.seq_len} bytes), "
          f"{args.feature_map} with m={args.nb_features}:")
    print("| model | perplexity | vs original |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} | {value / reference:.3f}x |")
    print(f"attention output relative error (mean over layers): {error_before:.4f} -> {error_after:.4f}")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s" + (f"; performerized model saved to {args.output}" if args.output else ""))
    return {"perplexity": results, "attention_error": (error_before, error_after), "seconds": elapsed}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/softmax-llama-pydoc",
                        help="local softmax model; trained here first if the directory has no model")
    parser.add_argument("--output", default="runs/performerized-llama-pydoc")
    parser.add_argument("--feature-map", default="favor+")
    parser.add_argument("--nb-features", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the matrices are tiny, and more threads than free cores (a busy "
                             "machine) makes OpenMP spin: measured 10x slower with 2 threads on a loaded 2-core box")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    outcome = run(arguments)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(outcome, indent=2))
