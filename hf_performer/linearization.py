"""Linearize a pretrained softmax model: the same weights with kernel attention, then its quality recovered.

    from hf_performer import linearize
    result = linearize(model, tokenizer, feature_map="hedgehog", output_dir="runs/minilm")
    result.model, result.metrics

    hf-performer-linearize --model_name_or_path PATH --output_dir DIR [--feature_map hedgehog] [TrainingArguments]

Stages, each a ``transformers.Trainer`` run (so accelerate / torchrun, bf16, gradient checkpointing, resume and
progress bars work as in any fine-tune):

1. Attention transfer (Hedgehog arXiv 2402.04347, LoLCATs arXiv 2410.10254 sec. 3.1): every attention module runs
   the host's softmax attention *and* kernel attention on the same q, k, v; the softmax output goes on, so each
   layer sees the teacher's inputs, and the kernel output is trained to match it (relative MSE over real tokens).
   Only the attention's own parameters train (learned feature maps such as ``hedgehog``, the hybrid's window
   factors); maps with nothing to learn (``favor+``, ``relu``, ``taylor``) skip this stage, unless
   ``transfer_attention_weights`` trains the attention modules' projections too (layer by layer against the
   frozen original, each layer fed the original's input: ``LayerwiseTransferTrainer``).
2. End-to-end distillation from a frozen copy of the original model: KL of the next-token distribution for causal
   LMs (plus ``lm_loss_weight`` times the usual LM loss), hidden-state MSE plus (1 - cosine) of the mean-pooled
   sentence embedding for encoders. Every weight trains, or LoRA adapters (``lora_r > 0``, through ``peft``;
   merged before saving) plus the feature maps.

Then both models are evaluated on held-out text (perplexity for LMs; for encoders the cosine of each sentence
embedding to the original's and the correlation of pairwise similarities) and a table is printed.

Output: a standard transformers folder. Llama-family decoders (``convert_llama.NATIVE_MODEL_TYPES``) are saved as
``PerformerForCausalLM`` (constant memory per generated token through ``PerformerCache``); every other model keeps
its architecture with ``attn_implementation="performer"`` written into its config and the package's code next to
it, so ``AutoModel.from_pretrained(DIR)`` after ``import hf_performer`` (or with ``trust_remote_code=True`` where
it is not installed) runs kernel attention as saved.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .attention_backend import (
    ATTN_IMPLEMENTATION,
    KERNEL_ATTRIBUTE,
    PerformerKernel,
    dispatches_attention,
    performer_attention_forward,
    prepare_model_for_performer_attention,
)
from .attention import check_hybrid_feature_map, hybrid_feature_maps
from .convert_llama import check_convertible, convert_llama_to_performer, converts_natively

logger = logging.get_logger(__name__)

TRANSFER_IMPLEMENTATION = "performer_transfer"
# LoLCATs' window (arXiv 2410.10254 uses 64 on 2k-token Llama inputs); 8 recovers all-MiniLM-L6-v2 to 0.97 cosine
# after the default transfer stage on ~30-token sentences (benchmarks/bench_linearize.py)
DEFAULT_WINDOW_SIZE = 8
MODEL_KINDS = ("auto", "encoder", "causal_lm")


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LinearizeArguments:
    """What to convert and how (``hf-performer-linearize --help`` lists them with the TrainingArguments)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Local path of the softmax model."})
    model_kind: str = field(default="auto", metadata={"help": f"One of {MODEL_KINDS}: encoder (AutoModel, sentence "
                            "embeddings) or causal_lm (AutoModelForCausalLM); auto reads config.architectures."})
    feature_map: str = field(default="hedgehog", metadata={"help": "A name from hf_performer.available_feature_maps()."})
    nb_features: int | None = field(default=None, metadata={"help": "Number of features (default: the map's)."})
    feature_map_kwargs: str | None = field(default=None, metadata={"help": "JSON dict of extra feature-map options."})
    window_size: int | None = field(default=None, metadata={"help": "> 0: LoLCATs hybrid, exact softmax over this "
                                    "many neighbouring tokens plus kernel attention over the rest; 0: kernel attention "
                                    f"only; default: {DEFAULT_WINDOW_SIZE} for maps the hybrid accepts (hedgehog, "
                                    "relu, taylor, ...), 0 for exponential ones (favor+, favor++, ...)."})
    feature_seed: int = field(default=0, metadata={"help": "Seed of random feature projections."})
    transfer_steps: int = field(default=200, metadata={"help": "Stage 1 (attention transfer) optimizer steps; 0 skips it."})
    transfer_learning_rate: float = field(default=1e-2, metadata={"help": "Stage 1 learning rate."})
    transfer_attention_weights: bool = field(default=False, metadata={"help": "Stage 1 also trains every attention "
                                             "module's own weights (q, k, v, o projections), layer by layer against "
                                             "the frozen original's attention output on the same input; lets maps "
                                             "with nothing to learn (favor+, relu) transfer too (try a learning "
                                             "rate near 2e-3)."})
    distill_steps: int = field(default=100, metadata={"help": "Stage 2 steps when neither --max_steps nor "
                               "--num_train_epochs is given; 0 skips stage 2, -1 runs --num_train_epochs."})
    lm_loss_weight: float = field(default=0.0, metadata={"help": "Causal LMs: weight of the LM loss next to the KL."})
    lora_r: int = field(default=0, metadata={"help": "> 0: stage 2 trains LoRA adapters of this rank (peft) and "
                        "the feature maps instead of every weight."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str | None = field(default=None, metadata={"help": "Comma-separated module names for LoRA "
                                            "(default: the attention projections peft knows for the model)."})
    keep_dropout: bool = field(default=False, metadata={"help": "Keep the model's dropout while training (default: "
                               "off, since the student matches a deterministic teacher; the saved config keeps it)."})
    convert_natively: bool = field(default=True, metadata={"help": "Save Llama-family decoders as PerformerForCausalLM."})
    eval_every: int = field(default=0, metadata={"help": "> 0: evaluate every this many steps of each stage "
                            "(the curve in linearize_results.json, for plots of quality against training tokens)."})
    max_eval_samples: int = field(default=256, metadata={"help": "Held-out sentences / blocks to evaluate on."})

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        for name in ("transfer_steps", "distill_steps", "window_size", "lora_r", "eval_every"):
            value = getattr(self, name)
            if name == "window_size" and value is None:
                continue  # resolved below, once the feature map is known
            lowest = -1 if name == "distill_steps" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        if self.nb_features is not None and (isinstance(self.nb_features, bool) or not isinstance(self.nb_features, int)
                                             or self.nb_features <= 0):
            raise ValueError(f"nb_features must be a positive int, got {self.nb_features!r}")
        if isinstance(self.feature_map_kwargs, str):
            try:
                self.feature_map_kwargs = json.loads(self.feature_map_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"feature_map_kwargs must be a JSON object, got {self.feature_map_kwargs!r}: "
                                 f"{error}") from None
        if self.feature_map_kwargs is not None and not isinstance(self.feature_map_kwargs, dict):
            raise ValueError(f"feature_map_kwargs must be a JSON object (dict), got {self.feature_map_kwargs!r}")
        from .feature_maps import FEATURE_MAPS  # the registry, which users may extend

        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.window_size is None:
            self.window_size = DEFAULT_WINDOW_SIZE if accepts_window(self.feature_map, self.feature_map_kwargs) else 0
            logger.info(f"window_size={self.window_size} for feature_map={self.feature_map!r} (pass --window_size to "
                        "choose; 0 turns the exact-attention window off)")
        elif self.window_size > 0 and not accepts_window(self.feature_map, self.feature_map_kwargs):
            raise ValueError(f"window_size={self.window_size} needs a feature_map with plain per-token features, one "
                             f"of {hybrid_feature_maps()}; {self.feature_map!r} is exponential (use window_size=0)")


def accepts_window(feature_map: str, feature_map_kwargs: dict | None = None) -> bool:
    """Whether ``feature_map`` (with these options) can run the hybrid window + kernel attention."""
    from .feature_maps import FEATURE_MAPS, build_feature_map

    heads = 1 if FEATURE_MAPS[feature_map].per_head else None
    built = build_feature_map(feature_map, 8, options=feature_map_kwargs, num_heads=heads)  # bad options raise
    try:
        check_hybrid_feature_map(built)
    except ValueError:
        return False
    return True


@dataclass
class DataArguments:
    """Training text. With none of these the embedded corpus is used: CPython's documentation
    (``pydoc_data.topics``), every 10th topic held out for evaluation."""

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name or local path (load_dataset)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A local .txt / .json / .jsonl / .csv file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: int = field(default=10, metadata={"help": "Held-out share when the data has no "
                                             "validation split."})
    max_seq_length: int = field(default=128, metadata={"help": "Encoders: longest sentence in tokens; causal LMs: "
                                "block length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})


@dataclass
class LinearizeResult:
    model: nn.Module
    teacher: nn.Module
    metrics: dict[str, dict[str, float]]
    curve: list[dict[str, Any]]
    log_history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per stage, Trainer's logs
    seconds: float = 0.0  # wall time of conversion and training, evaluations not counted


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def embedded_corpus() -> tuple[list[str], list[str]]:
    """(train, held-out) documents of CPython's documentation; held out: every 10th topic in sorted order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[name] for i, name in enumerate(names) if i % 10 != 9]
    held_out = [topics[name] for i, name in enumerate(names) if i % 10 == 9]
    return train, held_out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def split_sentences(documents: list[str], min_chars: int = 24, max_chars: int = 400) -> list[str]:
    """Sentence-like pieces of prose (code listings and headings are mostly dropped by the length bounds)."""
    sentences = []
    for document in documents:
        for piece in _SENTENCE_END.split(document):
            piece = " ".join(piece.split())
            if min_chars <= len(piece) <= max_chars:
                sentences.append(piece)
    return sentences


def _load_texts(data: DataArguments) -> tuple[list[str], list[str]]:
    if data.dataset_name is None and data.train_file is None:
        return embedded_corpus()
    from datasets import load_dataset

    if data.train_file is not None:
        suffix = Path(data.train_file).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json"}.get(suffix, suffix)
        raw = load_dataset(builder, data_files={"train": data.train_file})
    else:
        raw = load_dataset(data.dataset_name, data.dataset_config)
    if "validation" not in raw:
        raw = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=0)
        raw["validation"] = raw.pop("test")
    for split in ("train", "validation"):
        if data.text_column not in raw[split].column_names:
            raise ValueError(f"text_column={data.text_column!r} is not a column of the {split} split; it has "
                             f"{raw[split].column_names}")
    texts = lambda split: [t for t in raw[split][data.text_column] if isinstance(t, str) and t.strip()]  # noqa: E731
    return texts("train"), texts("validation")


def build_datasets(tokenizer, kind: str, data: DataArguments, max_eval_samples: int):
    """(train, held-out) lists of tokenised examples: sentences for encoders, ``max_seq_length`` blocks of the
    concatenated text for causal LMs."""
    train_texts, eval_texts = _load_texts(data)
    if kind == "encoder":
        train_texts, eval_texts = split_sentences(train_texts), split_sentences(eval_texts)
        encode = lambda texts: [  # noqa: E731
            {"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=data.max_seq_length)["input_ids"]
        ]
        train, held_out = encode(train_texts), encode(eval_texts)
    else:
        def blocks(texts):
            ids = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
            n = data.max_seq_length
            return [{"input_ids": ids[s:s + n]} for s in range(0, len(ids) - n + 1, n)]

        train, held_out = blocks(train_texts), blocks(eval_texts)
    if data.max_train_samples is not None:
        train = train[: data.max_train_samples]
    if not train or not held_out:
        raise ValueError(f"no training ({len(train)}) or held-out ({len(held_out)}) examples; give more text or a "
                         "smaller --max_seq_length")
    # a spread-out, deterministic sample of the held-out set
    stride = max(1, len(held_out) // max_eval_samples)
    return train, held_out[::stride][:max_eval_samples]


class _Collator:
    """Pads to the longest example (right padding) with an attention mask; the tokenizer's pad id or 0."""

    def __init__(self, pad_token_id: int | None):
        self.pad = 0 if pad_token_id is None else int(pad_token_id)

    def __call__(self, examples):
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: attention transfer
# ----------------------------------------------------------------------------------------------------------------

# The (B, N) 0/1 mask of real query tokens of the batch being transferred (attention functions do not see it).
_QUERY_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("performer_query_mask", default=None)
_TRANSFER_LOSS = "_performer_transfer_loss"


def attention_transfer_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention (returned, so the next layer sees the teacher's input) and kernel attention of the same
    q, k, v; their relative squared error over real query tokens is left on the module for the loss."""
    teacher, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                        **kwargs)  # (B, N, H, d)
    student, _ = performer_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=0.0, **kwargs)  # (B, N, H, d)
    real = _QUERY_MASK.get()
    real = real if real is not None and real.shape == teacher.shape[:2] else None
    setattr(module, _TRANSFER_LOSS, relative_squared_error(student, teacher, real))
    return teacher, None


def relative_squared_error(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None = None):
    """sum (student - teacher)^2 / sum teacher^2 over the real tokens, in float32: the scale-free error every layer
    (and the encoder's token states) train on. student, teacher (B, N, ...); token_mask (B, N), 1 = real."""
    teacher = teacher.detach().float()
    error, reference = (student.float() - teacher).pow(2), teacher.pow(2)
    if token_mask is not None:
        weights = token_mask.to(error.device, torch.float32).reshape(*token_mask.shape, *[1] * (error.dim() - 2))
        error, reference = error * weights, reference * weights
    return error.sum() / reference.sum().clamp_min(1e-12)


def register_attention_transfer() -> None:
    AttentionInterface.register(TRANSFER_IMPLEMENTATION, attention_transfer_forward)
    AttentionMaskInterface.register(TRANSFER_IMPLEMENTATION, sdpa_mask)


register_attention_transfer()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not isinstance(m, PerformerKernel) and dispatches_attention(m)
            and hasattr(m, KERNEL_ATTRIBUTE)]


def kernel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the kernels attached to ``model``'s attention modules (feature maps, window factors)."""
    return [p for m in model.modules() if isinstance(m, PerformerKernel) for p in m.parameters()]


class AttentionTransferTrainer(Trainer):
    """Trains only the kernel parameters to reproduce each layer's softmax attention output."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token = _QUERY_MASK.set(inputs.get("attention_mask"))
        try:
            outputs = model(**inputs, use_cache=False)
        finally:
            _QUERY_MASK.reset(token)
        modules = _attention_modules(self.accelerator.unwrap_model(model))
        losses = [getattr(m, _TRANSFER_LOSS) for m in modules if getattr(m, _TRANSFER_LOSS, None) is not None]
        if not losses:
            raise RuntimeError("no attention module ran attention transfer; does the model dispatch its attention "
                               "through transformers' AttentionInterface?")
        loss = torch.stack(losses).mean()
        for m in modules:
            setattr(m, _TRANSFER_LOSS, None)
        return (loss, outputs) if return_outputs else loss


class LayerwiseTransferTrainer(Trainer):
    """Stage 1 with the attention modules' own weights trainable (``transfer_attention_weights``; T2R, arXiv
    2103.13076, and ``examples/performerize.py``): the shared-q, k transfer above cannot train the projections (its
    softmax target would move with them), so the frozen teacher runs first and each of its attention modules'
    input and output are recorded; each student module is fed the teacher's input (layers train independently,
    errors do not compound) and its output is matched to the teacher's: relative MSE over real tokens, mean over
    layers."""

    def __init__(self, *args, teacher: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        teacher_modules = [m for m in teacher.modules() if dispatches_attention(m)]
        student_modules = _attention_modules(self.model)
        if len(teacher_modules) != len(student_modules) or not student_modules:
            raise ValueError(f"teacher and student attention modules do not pair up ({len(teacher_modules)} vs "
                             f"{len(student_modules)})")
        self.pairs = list(zip(teacher_modules, student_modules))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher.to(self.args.device)
        teacher_inputs, targets, outputs = {}, {}, {}

        def record_input(i):
            def hook(module, args, kwargs):
                teacher_inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        def replace_input(i):
            def hook(module, args, kwargs):
                if args:
                    return (teacher_inputs[i], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": teacher_inputs[i]}
            return hook

        def record_output(store, i):
            def hook(module, args, output):
                store[i] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = []
        for i, (teacher_module, student_module) in enumerate(self.pairs):
            handles += [teacher_module.register_forward_pre_hook(record_input(i), with_kwargs=True),
                        teacher_module.register_forward_hook(record_output(targets, i)),
                        student_module.register_forward_pre_hook(replace_input(i), with_kwargs=True),
                        student_module.register_forward_hook(record_output(outputs, i))]
        try:
            with torch.no_grad():
                self.teacher(**inputs, use_cache=False)
            result = model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        mask = inputs.get("attention_mask")
        loss = torch.stack([relative_squared_error(outputs[i], targets[i], mask) for i in range(len(self.pairs))]).mean()
        return (loss, result) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: distillation
# ----------------------------------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers' pooling): (B, N, D) -> (B, D)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, N, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class DistillationTrainer(Trainer):
    """Matches a frozen teacher: next-token KL for causal LMs, hidden states and pooled embeddings for encoders."""

    def __init__(self, *args, teacher: nn.Module, kind: str, lm_loss_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.lm_loss_weight = kind, lm_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher.to(self.args.device)
        mask = inputs.get("attention_mask")
        with torch.no_grad():
            target = self.teacher(**inputs, use_cache=False)
        outputs = model(**inputs, use_cache=False)
        if self.kind == "causal_lm":
            loss = distillation_kl(outputs.logits, target.logits, mask)
            if self.lm_loss_weight:
                loss = loss + self.lm_loss_weight * _lm_loss(outputs.logits, inputs["input_ids"], mask)
        else:
            loss = encoder_distillation_loss(outputs.last_hidden_state, target.last_hidden_state, mask)
        return (loss, outputs) if return_outputs else loss


def distillation_kl(student_logits, teacher_logits, attention_mask=None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over real tokens."""
    log_p = F.log_softmax(teacher_logits.float(), -1)
    log_q = F.log_softmax(student_logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, N)
    if attention_mask is None:
        return kl.mean()
    weights = attention_mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1)


def _lm_loss(logits, input_ids, attention_mask=None) -> torch.Tensor:
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100) if attention_mask is not None else input_ids[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def encoder_distillation_loss(student_hidden, teacher_hidden, attention_mask=None) -> torch.Tensor:
    """Relative MSE of the token states plus (1 - cosine) of the mean-pooled sentence embeddings."""
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    mse = relative_squared_error(student_hidden, teacher_hidden, attention_mask)
    cosine = F.cosine_similarity(mean_pool(student_hidden, attention_mask), mean_pool(teacher_hidden, attention_mask), -1)
    return mse + (1 - cosine).mean()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sentence_embeddings(model, examples, collator, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings (N, D) of tokenised sentences, in float32."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
        hidden = model(**batch).last_hidden_state
        chunks.append(F.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1).cpu())
    return torch.cat(chunks)


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Mean / min cosine of paired embeddings, and the Pearson correlation of the two pairwise-similarity
    matrices (upper triangle): how well the converted model ranks sentence pairs as the original does."""
    cosine = (student * teacher).sum(-1)
    rows, cols = torch.triu_indices(len(student), len(student), offset=1)
    a, b = (student @ student.T)[rows, cols].double(), (teacher @ teacher.T)[rows, cols].double()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return {"mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item(),
            "similarity_correlation": correlation.item()}


@torch.no_grad()
def perplexity(model, examples, collator, batch_size: int = 16) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
        logits = model(**batch, use_cache=False).logits
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))


def evaluate(student, teacher, kind, examples, collator, teacher_reference=None) -> dict[str, float]:
    """The stage-end metrics of ``student`` on held-out ``examples`` (the teacher's reference is reused)."""
    if kind == "causal_lm":
        return {"perplexity": perplexity(student, examples, collator)}
    reference = teacher_reference if teacher_reference is not None else sentence_embeddings(teacher, examples, collator)
    return embedding_agreement(sentence_embeddings(student, examples, collator), reference)


class QualityCurveCallback(TrainerCallback):
    """Evaluates every ``every`` steps and records (stage, step, tokens seen, training seconds, metrics)."""

    def __init__(self, stage, every, measure, tokens_per_step, curve, offset_tokens=0, clock=None):
        self.stage, self.every, self.measure, self.curve = stage, every, measure, curve
        self.tokens_per_step, self.offset_tokens, self.clock = tokens_per_step, offset_tokens, clock

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            seconds = self.clock() if self.clock is not None else None
            self.curve.append({"stage": self.stage, "step": state.global_step,
                               "tokens": self.offset_tokens + state.global_step * self.tokens_per_step,
                               "seconds": seconds, **self.measure()})
            model.train()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def model_kind(model: nn.Module) -> str:
    """``causal_lm`` for a model with an LM head that generates, else ``encoder``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return "causal_lm" if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM") else "encoder"


def _stage_arguments(base: TrainingArguments, stage: str, **overrides) -> TrainingArguments:
    output_dir = str(Path(base.output_dir) / stage) if base.output_dir else None
    return dataclasses.replace(base, output_dir=output_dir, **overrides)


def _with_lora(model, options: LinearizeArguments):
    from peft import LoraConfig, get_peft_model

    targets = options.lora_target_modules.split(",") if options.lora_target_modules else None
    lora = get_peft_model(model, LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, target_modules=targets,
                                            lora_dropout=0.0))
    for parameter in kernel_parameters(lora):  # learned feature maps keep training next to the adapters
        parameter.requires_grad_(True)
    return lora


def linearize(
    model: nn.Module,
    tokenizer=None,
    *,
    train_dataset: list[dict] | None = None,
    eval_dataset: list[dict] | None = None,
    training_args: TrainingArguments | None = None,
    data_args: DataArguments | None = None,
    output_dir: str | None = None,
    **options,
) -> LinearizeResult:
    """Convert ``model`` (any transformers model whose attention dispatches through ``AttentionInterface``) to
    kernel attention and recover its quality; ``options`` are ``LinearizeArguments`` fields. The model is not
    changed: the result holds a new one (and the frozen original as ``teacher``).

    Data: ``train_dataset`` / ``eval_dataset`` (lists of ``{"input_ids": [...]}``), or text through ``data_args``
    and ``tokenizer`` (default: the embedded corpus). With ``output_dir`` the result is saved there (see the
    module docstring); stage checkpoints go to ``training_args.output_dir``.
    """
    args = options.pop("args", None)
    if args is None:
        args = LinearizeArguments(**options)
    elif options or not isinstance(args, LinearizeArguments):
        raise TypeError("pass either args=LinearizeArguments(...) or its fields as keyword arguments, not both")
    kind = model_kind(model) if args.model_kind == "auto" else args.model_kind
    native = kind == "causal_lm" and args.convert_natively and converts_natively(model.config)
    if native:  # what would stop the native conversion at the end stops it before any training
        check_convertible(model.config)
    data_args = data_args or DataArguments()
    if train_dataset is None or eval_dataset is None:
        if tokenizer is None:
            raise ValueError("linearize needs a tokenizer (or train_dataset and eval_dataset)")
        built_train, built_eval = build_datasets(tokenizer, kind, data_args, args.max_eval_samples)
        train_dataset = built_train if train_dataset is None else train_dataset
        eval_dataset = built_eval if eval_dataset is None else eval_dataset
    if training_args is None:
        training_args = TrainingArguments(output_dir=output_dir or "linearize-runs", **CLI_TRAINING_DEFAULTS)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else getattr(model.config, "pad_token_id", None)
    collator = _Collator(pad)

    clock = _TrainingClock()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model)
    restore_dropout = (lambda: None) if args.keep_dropout else _disable_dropout(student)
    prepare_model_for_performer_attention(
        student, feature_map=args.feature_map, nb_features=args.nb_features, feature_seed=args.feature_seed,
        feature_map_kwargs=args.feature_map_kwargs, window_size=args.window_size,  # 0 overrides a saved window
    )
    with clock.paused():
        teacher_reference = sentence_embeddings(teacher, eval_dataset, collator) if kind == "encoder" else None

    def measure() -> dict[str, float]:
        """The student as it will run: kernel attention, also when called mid-transfer (the transfer function
        returns the softmax output, which would measure the teacher)."""
        transferring = student.config._attn_implementation == TRANSFER_IMPLEMENTATION
        if transferring:
            student.set_attn_implementation(ATTN_IMPLEMENTATION)
        try:
            with clock.paused():
                return evaluate(student, teacher, kind, eval_dataset, collator, teacher_reference)
        finally:
            if transferring:
                student.set_attn_implementation(TRANSFER_IMPLEMENTATION)

    with clock.paused():
        metrics = {"original (softmax)": evaluate(teacher, teacher, kind, eval_dataset, collator, teacher_reference)}
    metrics["kernel attention, no training"] = measure()
    curve: list[dict[str, Any]] = [{"stage": "start", "step": 0, "tokens": 0, "seconds": clock.seconds(),
                                    **metrics["kernel attention, no training"]}]
    tokens_per_step = _tokens_per_step(train_dataset, training_args)
    tokens = 0
    history: dict[str, list] = {}

    # -- stage 1 ---------------------------------------------------------------------------------------------------
    trainable = kernel_parameters(student)
    if args.transfer_attention_weights:  # the attention modules' weights, their kernels included
        trainable = list({id(p): p for m in _attention_modules(student) for p in m.parameters()}.values())
    if args.transfer_steps and trainable:
        student.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        stage_args = _stage_arguments(training_args, "transfer", max_steps=args.transfer_steps,
                                      learning_rate=args.transfer_learning_rate, num_train_epochs=1.0)
        if args.transfer_attention_weights:
            trainer = LayerwiseTransferTrainer(model=student, args=stage_args, train_dataset=train_dataset,
                                               data_collator=collator, teacher=teacher)
        else:
            student.set_attn_implementation(TRANSFER_IMPLEMENTATION)
            trainer = AttentionTransferTrainer(model=student, args=stage_args, train_dataset=train_dataset,
                                               data_collator=collator)
        if args.eval_every:
            trainer.add_callback(QualityCurveCallback("transfer", args.eval_every, measure, tokens_per_step, curve,
                                                      clock=clock.seconds))
        trainer.train(resume_from_checkpoint=_resume(stage_args))
        history["transfer"] = trainer.state.log_history
        student.set_attn_implementation(ATTN_IMPLEMENTATION)
        tokens = args.transfer_steps * tokens_per_step
        metrics["+ attention transfer"] = measure()
    elif args.transfer_steps:
        logger.warning(f"feature_map={args.feature_map!r} has no parameters to learn: attention transfer skipped")

    # -- stage 2 ---------------------------------------------------------------------------------------------------
    # --max_steps wins; distill_steps=-1 (the command line sets it when --num_train_epochs is given) runs epochs
    explicit = training_args.max_steps > 0 or args.distill_steps == -1
    if explicit or args.distill_steps > 0:
        student.requires_grad_(True)
        trained = _with_lora(student, args) if args.lora_r else student
        overrides = {} if explicit else {"max_steps": args.distill_steps}
        stage_args = _stage_arguments(training_args, "distill", **overrides)
        trainer = DistillationTrainer(model=trained, args=stage_args, train_dataset=train_dataset,
                                      data_collator=collator, teacher=teacher, kind=kind,
                                      lm_loss_weight=args.lm_loss_weight)
        if args.eval_every:
            trainer.add_callback(QualityCurveCallback("distill", args.eval_every, measure, tokens_per_step, curve,
                                                      offset_tokens=tokens, clock=clock.seconds))
        trainer.train(resume_from_checkpoint=_resume(stage_args))
        history["distill"] = trainer.state.log_history
        if args.lora_r:
            student = trained.merge_and_unload()
        metrics["+ distillation" + (" (LoRA)" if args.lora_r else "")] = measure()
    restore_dropout()  # the returned model fine-tunes like the original
    student.eval()

    final = student
    if native:
        final = convert_llama_to_performer(student)
    result = LinearizeResult(final, teacher, metrics, curve, history, seconds=clock.seconds())
    if output_dir:
        save_linearized(final, output_dir, tokenizer)
        _write_report(Path(output_dir), result, kind, args)
    return result


class _TrainingClock:
    """Wall seconds since it was made, the time spent inside ``paused()`` blocks (evaluations) left out."""

    def __init__(self):
        self.started, self.excluded = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.excluded

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began


def _disable_dropout(model: nn.Module):
    """Dropout to 0 for training against a deterministic teacher: ``nn.Dropout`` modules, and the rates modules
    keep as plain floats for ``F.dropout`` (``attention_dropout``, OPT's and BART's ``dropout`` /
    ``activation_dropout``, ``layerdrop``). Returns a function that puts every rate back; config.json is never
    touched."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            saved.append((module, "p", module.p))
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and name.endswith(_DROPOUT_SUFFIXES):
                saved.append((module, name, value))
                setattr(module, name, 0.0)

    def restore():
        for module, name, value in saved:
            setattr(module, name, value)

    return restore


_DROPOUT_SUFFIXES = ("dropout", "dropout_prob", "dropout_rate", "layerdrop")


def _tokens_per_step(dataset, training_args) -> int:
    lengths = [len(e["input_ids"]) for e in dataset[:256]]
    return int(round(sum(lengths) / len(lengths) * training_args.per_device_train_batch_size
                     * training_args.gradient_accumulation_steps * max(1, training_args.world_size)))


def _resume(stage_args: TrainingArguments):
    """resume_from_checkpoint=True only when the stage has a checkpoint to resume from."""
    if not stage_args.resume_from_checkpoint or not stage_args.output_dir:
        return None
    if stage_args.resume_from_checkpoint not in ("True", "true", True):
        return stage_args.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(stage_args.output_dir) if Path(stage_args.output_dir).is_dir() else None


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------

_REMOTE_MODULE = "modeling_linearized"


def save_linearized(model: nn.Module, output_dir: str, tokenizer=None) -> None:
    """Save a linearized model so that it loads with kernel attention and no extra argument.

    A native Performer is saved as it is. A host model gets ``"attn_implementation": "performer"`` in its
    config.json and, for ``trust_remote_code=True`` loading without hf_performer installed, a small module that
    registers the attention and subclasses the host class, with the package's code beside it (``auto_map``)."""
    output = Path(output_dir)
    model.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    if model.config.model_type == "performer":
        return
    host = type(model)
    auto_class = "AutoModelForCausalLM" if model_kind(model) == "causal_lm" else "AutoModel"
    _copy_package_code(output)
    (output / f"{_REMOTE_MODULE}.py").write_text(
        f'"""{host.__name__} with kernel (Performer) attention, written by hf_performer.linearize."""\n\n'
        f"from transformers import {host.__name__} as _Host\n\n"
        "from .attention_backend import register_performer_attention\n\n"
        "register_performer_attention()\n\n\n"
        f"class Linearized{host.__name__}(_Host):\n"
        "    def __init__(self, config, *args, **kwargs):\n"
        '        config._attn_implementation = "performer"  # the kernels attach while the modules are built\n'
        "        super().__init__(config, *args, **kwargs)\n"
    )
    config_path = output / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = ATTN_IMPLEMENTATION
    config.setdefault("auto_map", {})[auto_class] = f"{_REMOTE_MODULE}.Linearized{host.__name__}"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_package_code(output: Path) -> None:
    from transformers.dynamic_module_utils import get_relative_import_files

    backend = Path(__file__).with_name("attention_backend.py")
    for path in [backend, *get_relative_import_files(str(backend))]:
        shutil.copy(path, output / Path(path).name)


def _write_report(output: Path, result: LinearizeResult, kind: str, args: LinearizeArguments) -> None:
    (output / "linearize_results.json").write_text(json.dumps(
        {"kind": kind, "options": dataclasses.asdict(args), "metrics": result.metrics, "curve": result.curve,
         "training_seconds": result.seconds},
        indent=2, default=str) + "\n")


def results_table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per stage, one column per metric."""
    columns = list(next(iter(metrics.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _load(args: LinearizeArguments):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required (a local folder with a transformers model)")
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    kind = args.model_kind
    if kind == "auto":
        architectures = config.architectures or []
        kind = "causal_lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "encoder"
    loader = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    model = loader.from_pretrained(args.model_name_or_path, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token_id is None and kind == "encoder":
        raise ValueError(f"the tokenizer of {args.model_name_or_path} has no pad token; encoders need one")
    return model, tokenizer, kind


# TrainingArguments defaults of the command (and of linearize() without training_args); any flag overrides them
CLI_TRAINING_DEFAULTS = dict(per_device_train_batch_size=16, learning_rate=1e-4, logging_steps=25,
                             save_strategy="no", report_to="none", lr_scheduler_type="cosine", warmup_steps=10)


def _given_options(parser, argv: list[str]) -> set[str]:
    """The destinations of the options on ``argv``, however spelled (``--num_train_epochs``, ``--num-train-epochs``,
    an unambiguous prefix, ``--flag=value``)."""
    actions = parser._option_string_actions  # option string -> action (argparse has no public mapping)
    given = set()
    for token in argv:
        if not token.startswith("-") or token == "-":
            continue
        key = token.split("=", 1)[0]
        action = actions.get(key)
        if action is None:
            matches = {id(a): a for option, a in actions.items() if option.startswith(key)}
            action = next(iter(matches.values())) if len(matches) == 1 else None
        if action is not None:
            given.add(action.dest)
    return given


def main(argv: list[str] | None = None) -> LinearizeResult:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((LinearizeArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.set_defaults(**CLI_TRAINING_DEFAULTS)
    args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    given = _given_options(parser, argv)
    if "num_train_epochs" in given and "max_steps" not in given and "distill_steps" not in given:
        args.distill_steps = -1  # the user asked for epochs of stage 2
    model, tokenizer, kind = _load(args)
    args.model_kind = kind
    started = time.perf_counter()
    result = linearize(model, tokenizer, args=args, data_args=data_args, training_args=training_args,
                       output_dir=training_args.output_dir)
    print(results_table(result.metrics))
    print(f"{time.perf_counter() - started:.0f} s ({result.seconds:.0f} s converting and training, the rest "
          f"evaluating); saved to {training_args.output_dir}")
    return result


def cli(argv: list[str] | None = None) -> int:
    """The ``hf-performer-linearize`` console script: ``main`` with exit status 0 (console scripts pass the return
    value to ``sys.exit``, which would print a returned result and exit with 1)."""
    main(argv)
    return 0


__all__ = [
    "DataArguments",
    "LinearizeArguments",
    "LinearizeResult",
    "attention_transfer_forward",
    "embedding_agreement",
    "linearize",
    "main",
    "results_table",
    "save_linearized",
]
