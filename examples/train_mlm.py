"""Masked-LM pretraining of a small bidirectional Performer with Trainer + datasets, against a same-size softmax BERT.

The default run downloads nothing: it trains on the Python documentation that ships with every CPython
(``pydoc_data.topics``, split by topic into train and validation, as ``train_clm.py`` does) with a lowercase
word-level tokenizer trained here on the training split (``tokenizers``, BERT's special tokens). Masking is
``DataCollatorForLanguageModeling`` (15 %, 80/10/10); the held-out blocks are masked once, with a fixed seed, so
every model is scored on the same masked tokens. ``--compare_bert`` also trains ``BertForMaskedLM`` of the same
hidden size / layers / heads / intermediate size the same way (same data, masks, steps, seed, optimizer).

    python examples/train_mlm.py --compare_bert --torch_threads 1  # both models, ~8 minutes on a busy 2-core CPU
    python examples/train_mlm.py --dataset_name Salesforce/wikitext --dataset_config wikitext-2-raw-v1
    python examples/train_mlm.py --train_file my_corpus.txt [--validation_file my_val.txt]
    torchrun --nproc_per_node 2 examples/train_mlm.py               # DDP, gloo on CPU

Every ``TrainingArguments`` flag works (``--bf16``, ``--gradient_checkpointing``, ``--torch_compile``, ...). The
Performer (model, tokenizer, model card, ``eval_results.json``) is saved to ``--output_dir``, the BERT baseline to
``<output_dir>-bert``; at the end the saved Performer fills a masked sentence through ``pipeline("fill-mask")``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports, so the reported total is what the user waits

import copy
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)

import hf_performer  # noqa: F401  (registers model_type="performer" with the Auto classes)
from hf_performer import PerformerConfig, PerformerFeatureRedrawCallback, PerformerForMaskedLM
from hf_performer.model_card import push_folder_to_hub, save_model_card

logger = logging.getLogger("train_mlm")

# Both models together fit ~8 minutes of a busy 2-core CPU machine (measured: see the README).
TRAINING_DEFAULTS = dict(
    output_dir="runs/performer-mlm-pydoc",
    max_steps=300,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=30,
    weight_decay=0.01,
    logging_steps=20,
    eval_strategy="steps",
    eval_steps=100,
    save_strategy="no",
    report_to="none",
    seed=42,
    ddp_find_unused_parameters=False,  # every parameter takes part in every step
)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue training a saved masked LM (local path or Hub id)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer path or Hub id (needs a mask token); default: a word-level tokenizer trained "
                          "here on the training split."},
    )
    vocab_size: int = field(default=4000, metadata={"help": "Vocabulary of the tokenizer trained here."})
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    feature_map: str = field(default="favor+", metadata={"help": "One of hf_performer.available_feature_maps()."})
    nb_features: int | None = None
    feature_redraw_interval: int = field(
        default=100, metadata={"help": "Optimizer steps between redraws of the random features; 0 = never."}
    )
    compare_bert: bool = field(
        default=False,
        metadata={"help": "Also train a same-size softmax BertForMaskedLM the same way and compare."},
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads per process; default: torch's, or 1 when the machine is already busy."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "More PerformerConfig fields as JSON, e.g. '{\"position_embedding_type\": \"absolute\"}'."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets Hub id (downloads it)."})
    dataset_config: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "A .txt, .json/.jsonl or .csv file."})
    validation_file: str | None = None
    text_column: str = "text"
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Validation share of the training data when there is no validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Sequence length in tokens, [CLS] and [SEP] included."})
    mlm_probability: float = 0.15
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    fill_mask_text: str = "The [MASK] statement is used to wrap the execution of a block with methods defined by a " \
                          "context manager."
    top_k: int = 5


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def embedded_corpus() -> DatasetDict:
    """CPython's documentation topics: one document per topic; every 10th topic (sorted by name) is validation
    (the split of train_clm.py)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    split = {"train": [], "validation": []}
    for index, name in enumerate(names):
        split["validation" if index % 10 == 5 else "train"].append(topics[name])
    return DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in split.items()})


def load_raw_datasets(data_args: DataArguments) -> DatasetDict:
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config)
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        extension = Path(data_args.train_file).suffix.lstrip(".")
        extension = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        raw = load_dataset(extension, data_files=files)
    else:
        return embedded_corpus()
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw = DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    return raw


def train_word_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer with BERT's special tokens and templates, trained on ``texts`` (no files,
    no download). Words outside its vocabulary become [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],  # Performer has no token types
    )


def tokenize_and_group(raw: DatasetDict, tokenizer, data_args: DataArguments, training_args) -> DatasetDict:
    """Documents become one token stream ([SEP] between documents), cut into blocks of ``block_size - 2`` tokens,
    each wrapped as ``[CLS] block [SEP]`` (BERT's layout; the collator never masks the special tokens)."""
    inner = data_args.block_size - 2
    text_column = data_args.text_column
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [tokens + [sep] for tokens in ids]}

    def group(batch):
        stream = [token for tokens in batch["input_ids"] for token in tokens]
        usable = len(stream) // inner * inner
        return {"input_ids": [[cls, *stream[start : start + inner], sep] for start in range(0, usable, inner)]}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        grouped = tokenized.map(group, batched=True, batch_size=1000, desc=f"grouping into blocks of "
                                                                          f"{data_args.block_size}")
    if data_args.max_train_samples:
        grouped["train"] = grouped["train"].select(range(min(data_args.max_train_samples, len(grouped["train"]))))
    if data_args.max_eval_samples:
        grouped["validation"] = grouped["validation"].select(
            range(min(data_args.max_eval_samples, len(grouped["validation"])))
        )
    return grouped


def mask_once(blocks: Dataset, tokenizer, mlm_probability: float, seed: int) -> Dataset:
    """The held-out blocks masked once with a seeded collator: input_ids with [MASK] / random / kept tokens and the
    labels (-100 off the masked positions). Every model and every evaluation sees these same masks."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
    batch = collator([{"input_ids": ids} for ids in blocks["input_ids"]])
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})


class MaskingCollator:
    """Training blocks are masked on the fly (``DataCollatorForLanguageModeling``, seeded: the same masks for every
    model trained with the same seed and batch order); already masked held-out blocks (they carry labels) are only
    stacked."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int):
        self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)

    def __call__(self, features):
        if "labels" in features[0]:
            return default_data_collator(features)
        return self.mlm(features)


def unigram_baseline(train: Dataset, validation: Dataset, vocab_size: int) -> dict:
    """A model that ignores context: the masked targets scored by the training split's token frequencies (add-one
    smoothed cross-entropy), and the accuracy of always predicting the most frequent token."""
    counts = Counter(token for block in train["input_ids"] for token in block[1:-1])
    total = sum(counts.values()) + vocab_size
    targets = [token for labels in validation["labels"] for token in labels if token != -100]
    loss = -sum(math.log((counts[token] + 1) / total) for token in targets) / len(targets)
    most_common = counts.most_common(1)[0][0]
    return {"masked_loss": loss, "masked_accuracy": sum(t == most_common for t in targets) / len(targets)}


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def per_token_outputs(logits, labels):
    """Kept per eval batch instead of the (B, N, V) logits: the predicted token and the cross-entropy (0 where the
    label is -100)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return logits.argmax(-1), nll.view(labels.shape)


def masked_token_metrics(eval_prediction) -> dict:
    """Accuracy and token-mean cross-entropy over all masked held-out tokens (Trainer's eval_loss is instead the
    mean of per-batch means)."""
    predictions, nll = eval_prediction.predictions
    labels = torch.as_tensor(eval_prediction.label_ids)
    predictions, nll = torch.as_tensor(predictions), torch.as_tensor(nll, dtype=torch.float64)
    masked = labels != -100
    return {
        "masked_accuracy": (predictions[masked] == labels[masked]).double().mean().item(),
        "masked_loss": nll[masked].mean().item(),
        "masked_tokens": int(masked.sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def build_performer(model_args: ModelArguments, tokenizer) -> PerformerForMaskedLM:
    if model_args.model_name_or_path:
        return AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    config = PerformerConfig(
        **{
            "causal": False,
            "vocab_size": len(tokenizer),
            "hidden_size": model_args.hidden_size,
            "num_hidden_layers": model_args.num_hidden_layers,
            "num_attention_heads": model_args.num_attention_heads,
            "intermediate_size": model_args.intermediate_size,
            "hidden_act": "gelu",
            "norm_type": "layernorm",
            "attention_bias": True,  # as BERT's q, k, v, o
            "feature_map": model_args.feature_map,
            "nb_features": model_args.nb_features,
            "feature_redraw_interval": model_args.feature_redraw_interval,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    return PerformerForMaskedLM(config)


def build_bert(performer_config, tokenizer, block_size: int) -> BertForMaskedLM:
    """BERT (softmax attention, learned absolute positions, post-norm) with the Performer's sizes, dropouts,
    activation, LayerNorm epsilon and initialisation; its decoder is tied to the embeddings as the Performer's."""
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=performer_config.hidden_size,
        num_hidden_layers=performer_config.num_hidden_layers,
        num_attention_heads=performer_config.num_attention_heads,
        intermediate_size=performer_config.intermediate_size,
        hidden_act=performer_config.hidden_act,
        hidden_dropout_prob=performer_config.hidden_dropout,
        attention_probs_dropout_prob=performer_config.attention_dropout,
        max_position_embeddings=block_size,  # positions cost parameters; the Performer's are rotary (none)
        type_vocab_size=1,
        layer_norm_eps=performer_config.layer_norm_eps,
        initializer_range=performer_config.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return BertForMaskedLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def choose_cpu_threads(requested: int | None) -> None:
    """As train_clm.py: on a CPU that other work keeps busy, one thread per process is faster than several."""
    if requested:
        torch.set_num_threads(requested)
        return
    if has_accelerator() or "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if cores > 1 and load >= cores - 0.5:
        torch.set_num_threads(1)
        logger.info("the CPU is busy (load %.1f on %d cores): training on 1 thread", load, cores)


def train_and_evaluate(name: str, model, training_args, data, tokenizer, data_args, callbacks=()) -> tuple:
    """One model through Trainer on the shared data, masks and optimizer settings; returns (trainer, results)."""
    set_seed(training_args.seed)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=MaskingCollator(tokenizer, data_args.mlm_probability, training_args.seed),
        compute_metrics=masked_token_metrics,
        preprocess_logits_for_metrics=per_token_outputs,
        callbacks=list(callbacks),
    )
    logger.info("training %s (%s parameters)", name, f"{count_parameters(model):,}")
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    total_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps \
        * training_args.world_size
    results = {
        "model": type(trainer.model).__name__,
        "parameters": count_parameters(trainer.model),
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * total_batch * data_args.block_size,
        "train_runtime_s": train_result.metrics["train_runtime"],
        "train_loss": train_result.training_loss,
        "masked_accuracy": metrics["eval_masked_accuracy"],
        "masked_loss": metrics["eval_masked_loss"],
        "masked_tokens": metrics["eval_masked_tokens"],
        "eval_loss": metrics["eval_loss"],
    }
    return trainer, results


def results_table(rows: dict) -> str:
    header = ("model", "params", "steps", "train tokens", "wall (s)", "masked acc", "masked loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in rows.items():
        if "steps" in row:
            cells = (name, f"{row['parameters']:,}", str(row["steps"]), f"{row['train_tokens']:,}",
                     f"{row['train_runtime_s']:.0f}", f"{row['masked_accuracy']:.4f}", f"{row['masked_loss']:.4f}")
        else:
            cells = (name, "-", "-", "-", "-", f"{row['masked_accuracy']:.4f}", f"{row['masked_loss']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # Without an accelerator, `use_cpu` is what makes Trainer set up multi-process CPU training (gloo) under
    # torchrun / accelerate launch; otherwise every process would train alone.
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not has_accelerator(), dataloader_pin_memory=has_accelerator())
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    push_repo = None
    if training_args.push_to_hub:
        push_repo = training_args.hub_model_id or Path(training_args.output_dir).name
    training_args.push_to_hub = False  # we push the finished folder ourselves, with our model card
    set_seed(training_args.seed)
    choose_cpu_threads(model_args.torch_threads)

    raw = load_raw_datasets(data_args)
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        if tokenizer.mask_token is None:
            raise ValueError("masked-LM training needs a tokenizer with a mask token")
    else:
        tokenizer = train_word_tokenizer(raw["train"][data_args.text_column], model_args.vocab_size)
    data = tokenize_and_group(raw, tokenizer, data_args, training_args)
    data["validation"] = mask_once(data["validation"], tokenizer, data_args.mlm_probability, training_args.seed)
    baseline = unigram_baseline(data["train"], data["validation"], len(tokenizer))
    logger.info("data: %d train / %d validation blocks of %d tokens, vocabulary %d", len(data["train"]),
                len(data["validation"]), data_args.block_size, len(tokenizer))

    set_seed(training_args.seed)
    performer = build_performer(model_args, tokenizer)
    performer_trainer, performer_results = train_and_evaluate(
        "Performer", performer, training_args, data, tokenizer, data_args, [PerformerFeatureRedrawCallback()]
    )
    performer_results["feature_map"] = performer_trainer.model.config.feature_map
    performer_results["feature_redraws"] = performer_trainer.model.feature_redraw_count
    performer_trainer.save_model()  # model + tokenizer (processing_class), config with auto_map, the modeling code
    results = {"performer": performer_results}

    bert_dir = None
    if model_args.compare_bert:
        bert_args = copy.deepcopy(training_args)
        bert_args.output_dir = bert_dir = str(Path(training_args.output_dir).resolve()) + "-bert"
        set_seed(training_args.seed)
        bert = build_bert(performer_trainer.model.config, tokenizer, data_args.block_size)
        bert_trainer, results["bert"] = train_and_evaluate("BERT", bert, bert_args, data, tokenizer, data_args)
        bert_trainer.save_model()
    results["unigram_baseline"] = baseline
    results["untrained_loss"] = math.log(len(tokenizer))  # uniform over the vocabulary
    results["world_size"] = training_args.world_size
    if not performer_trainer.is_world_process_zero():
        return results

    output_dir = Path(training_args.output_dir).resolve()
    fill = pipeline("fill-mask", model=str(output_dir), device="cpu")
    candidates = fill(data_args.fill_mask_text, top_k=data_args.top_k)
    results["fill_mask"] = {
        "text": data_args.fill_mask_text,
        "predictions": [{"token": c["token_str"], "score": float(c["score"])} for c in candidates],
    }

    hyperparameters = {
        "max_steps": performer_results["steps"],
        "train batch size (total)": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * training_args.world_size,
        "block_size": data_args.block_size,
        "mlm_probability": data_args.mlm_probability,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
        "tokens seen": performer_results["train_tokens"],
        "tokenizer": f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)",
    }
    note = (f"Held-out masked tokens: {performer_results['masked_tokens']} (masked once with seed "
            f"{training_args.seed}). A unigram model of the training tokens scores a masked loss of "
            f"{baseline['masked_loss']:.4f}; always predicting the most frequent token, accuracy "
            f"{baseline['masked_accuracy']:.4f}.")
    if "bert" in results:
        note += (f" A softmax BertForMaskedLM of the same sizes ({results['bert']['parameters']:,} parameters) "
                 f"trained the same way: masked accuracy {results['bert']['masked_accuracy']:.4f}, masked loss "
                 f"{results['bert']['masked_loss']:.4f}.")
    save_model_card(
        output_dir,
        performer_trainer.model,
        repo_id=push_repo or f"your-username/{output_dir.name}",
        description="A small bidirectional Performer masked language model trained with `examples/train_mlm.py`.",
        dataset_id=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        dataset_name=data_args.train_file,
        metrics={"masked_accuracy": performer_results["masked_accuracy"],
                 "masked_loss": performer_results["masked_loss"]},
        hyperparameters=hyperparameters,
        evaluation_note=note,
        example_prompt=data_args.fill_mask_text,
    )
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")

    rows = {"Performer (" + performer_results["feature_map"] + ")": performer_results}
    if "bert" in results:
        rows["BERT (softmax)"] = results["bert"]
    rows["unigram (no context)"] = baseline
    print("\n" + "=" * 100)
    print(f"held-out: {len(data['validation'])} blocks of {data_args.block_size} tokens, "
          f"{performer_results['masked_tokens']} masked tokens (same masks for every model); "
          f"untrained loss ln(V) = {results['untrained_loss']:.4f}")
    print(results_table(rows))
    if "bert" in results:
        print(f"parameters: Performer {performer_results['parameters']:,}, BERT {results['bert']['parameters']:,}")
    print(f"feature redraws: {performer_results['feature_redraws']} "
          f"(every {performer_trainer.model.config.feature_redraw_interval} steps)")
    print(f"fill-mask ({data_args.fill_mask_text!r}):")
    for candidate in results["fill_mask"]["predictions"]:
        print(f"  {candidate['score']:.3f}  {candidate['token']}")
    print("=" * 100)
    print(f"model, tokenizer and model card saved to {output_dir}" + (f"; BERT to {bert_dir}" if bert_dir else ""))
    print(f"total time {time.perf_counter() - STARTED:.0f} s")

    if push_repo:
        repo_id = push_folder_to_hub(output_dir, push_repo, private=training_args.hub_private_repo,
                                     token=training_args.hub_token)
        results["hub_repo_id"] = repo_id
        print(f"pushed to https://huggingface.co/{repo_id}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
