"""Train a small causal Performer with Trainer + datasets, compare it with a unigram baseline, save it, generate.

The default run downloads nothing: it trains on the Python documentation that ships with every CPython
(``pydoc_data.topics``, split by topic into train and validation) with byte-level tokens (``ByT5Tokenizer`` needs
no files), and takes about 5 minutes on 2 CPU cores.

    python examples/train_clm.py
    python examples/train_clm.py --dataset_name Salesforce/wikitext --dataset_config wikitext-2-raw-v1
    python examples/train_clm.py --train_file my_corpus.txt [--validation_file my_val.txt]
    python examples/train_clm.py --packing                                     # padding-free: documents packed
    torchrun --nproc_per_node 2 examples/train_clm.py                          # DDP, gloo on CPU
    accelerate launch --multi_gpu --num_processes 2 examples/train_clm.py      # the same through accelerate
    torchrun --nproc_per_node 2 examples/train_clm.py --fsdp "full_shard auto_wrap"   # FSDP (on GPUs)

``--packing`` trains on documents (paragraphs of a topic, grouped up to ``block_size`` tokens: lengths vary) instead of
fixed blocks: ``DataCollatorWithFlattening`` concatenates the documents of a batch into one row without padding, with
``position_ids`` restarting at 0 at every document, and the model attends within each document only.

Runs are deterministic at a fixed seed and thread count (``--torch_threads``; ``scripts/train.sh`` passes 1): same
data order, weights, feature redraws and losses, bit for bit.

Every ``TrainingArguments`` flag works (``--bf16``, ``--activation_checkpointing``, ``--torch_compile``, ...). On CPU,
accelerate's ``--multi_gpu`` launcher simply starts the processes; they train with gloo.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports, so the reported total is what the user waits

import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    DataCollatorWithFlattening,
    default_data_collator,
    pipeline,
    set_seed,
)

import hf_performer  # noqa: F401  (registers model_type="performer" with the Auto classes)
from hf_performer import PerformerConfig, PerformerFeatureRedrawCallback, PerformerForCausalLM
from hf_performer.model_card import push_folder_to_hub, save_model_card

logger = logging.getLogger("train_clm")

# Fits the ~10 minute budget of a 2-core CPU machine with room to spare (measured: see the README).
TRAINING_DEFAULTS = dict(
    output_dir="runs/performer-pydoc",
    max_steps=300,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=20,
    weight_decay=0.01,
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=100,
    save_strategy="no",
    report_to="none",
    seed=42,
    ddp_find_unused_parameters=False,  # every parameter takes part in every step
)


# RMSNorm and a SwiGLU feed-forward: on this corpus, 350 steps reached a validation loss of 2.22-2.26 nats/byte,
# where a LayerNorm + GELU block with 128 hidden units stopped at 2.56 after 300 steps, in more time.
LLAMA_STYLE_BLOCK = {"norm_type": "rmsnorm", "ff_glu": True, "hidden_act": "silu", "mlp_bias": False}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue training a saved model (local path or Hub id) instead of a new one."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer path or Hub id; default: byte-level (ByT5Tokenizer, no files)."}
    )
    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    feature_map: str = field(default="favor+", metadata={"help": "One of hf_performer.available_feature_maps()."})
    nb_features: int | None = None
    feature_redraw_interval: int = field(
        default=100, metadata={"help": "Optimizer steps between redraws of the random features; 0 = never."}
    )
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads per process; default: torch's, or 1 when the machine is already busy."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "More PerformerConfig fields as JSON, e.g. '{\"local_attn_heads\": 2}'."},
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
    block_size: int = field(default=256, metadata={"help": "Training sequence length in tokens."})
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free training on documents of varying length (at most block_size tokens), a "
                          "batch's documents concatenated into one row by DataCollatorWithFlattening."},
    )
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    prompt: str = "The with statement"
    max_new_tokens: int = 200


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def embedded_corpus() -> DatasetDict:
    """CPython's documentation topics: one document per topic; every 10th topic (sorted by name) is validation."""
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


def tokenize_and_group(raw: DatasetDict, tokenizer, data_args: DataArguments, training_args) -> DatasetDict:
    """Documents become one token stream (EOS between documents), cut into blocks of ``block_size``."""
    block_size = data_args.block_size
    text_column = data_args.text_column
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [tokens + [eos] if eos is not None else tokens for tokens in ids]}

    def group(batch):
        stream = [token for tokens in batch["input_ids"] for token in tokens]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        grouped = tokenized.map(group, batched=True, batch_size=1000, desc=f"grouping into blocks of {block_size}")
    if data_args.max_train_samples:
        grouped["train"] = grouped["train"].select(range(min(data_args.max_train_samples, len(grouped["train"]))))
    if data_args.max_eval_samples:
        grouped["validation"] = grouped["validation"].select(
            range(min(data_args.max_eval_samples, len(grouped["validation"])))
        )
    return grouped


def paragraph_documents(text: str, tokens, block_size: int) -> list[list[int]]:
    """One text's tokens as documents of at most ``block_size`` tokens: consecutive paragraphs (blank-line
    separated) grouped while they fit; a paragraph longer than ``block_size`` is cut."""
    documents, current = [], []
    for paragraph in text.split("\n\n"):
        ids = tokens(paragraph + "\n\n")
        if current and len(current) + len(ids) > block_size:
            documents.append(current)
            current = []
        current = current + ids
        while len(current) > block_size:
            documents.append(current[:block_size])
            current = current[block_size:]
    if current:
        documents.append(current)
    return documents


def tokenize_documents(raw: DatasetDict, tokenizer, data_args: DataArguments, training_args) -> DatasetDict:
    """For ``--packing``: every text becomes documents of varying length, at most ``block_size`` tokens (EOS closes
    each text's last document), with ``labels`` equal to ``input_ids`` (the collator masks each document's first)."""
    block_size = data_args.block_size
    text_column = data_args.text_column
    eos = tokenizer.eos_token_id

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def split(batch):
        documents = []
        for text in batch[text_column]:
            pieces = paragraph_documents(text, tokens, block_size - 1)
            if pieces and eos is not None:
                pieces[-1] = pieces[-1] + [eos]
            documents += [piece for piece in pieces if len(piece) > 1]  # a 1-token document has no target
        return {"input_ids": documents, "labels": [list(document) for document in documents]}

    with training_args.main_process_first(desc="tokenizing"):
        documents = raw.map(split, batched=True, remove_columns=raw["train"].column_names,
                            desc="splitting into documents")
    if data_args.max_train_samples:
        documents["train"] = documents["train"].select(range(min(data_args.max_train_samples,
                                                                 len(documents["train"]))))
    if data_args.max_eval_samples:
        documents["validation"] = documents["validation"].select(
            range(min(data_args.max_eval_samples, len(documents["validation"])))
        )
    return documents


def unigram_baseline_loss(train: Dataset, validation: Dataset, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on the validation targets of the train split's token frequencies (add-one
    smoothed): the loss of a model that ignores context. The model's loss is over the same targets (every token
    of a block but the first)."""
    counts = Counter(token for block in train["input_ids"] for token in block)
    total = sum(counts.values()) + vocab_size
    targets = [token for block in validation["input_ids"] for token in block[1:]]
    return -sum(math.log((counts[token] + 1) / total) for token in targets) / len(targets)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, tokenizer) -> PerformerForCausalLM:
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    config = PerformerConfig(
        **{
            **LLAMA_STYLE_BLOCK,
            "vocab_size": len(tokenizer),
            "hidden_size": model_args.hidden_size,
            "num_hidden_layers": model_args.num_hidden_layers,
            "num_attention_heads": model_args.num_attention_heads,
            "intermediate_size": model_args.intermediate_size,
            "feature_map": model_args.feature_map,
            "nb_features": model_args.nb_features,
            "feature_redraw_interval": model_args.feature_redraw_interval,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            **overrides,
        }
    )
    return PerformerForCausalLM(config)


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def choose_cpu_threads(requested: int | None) -> None:
    """Threads of one op wait for each other; on a CPU that other work keeps busy that waiting dominates (measured:
    a training step of the default model took 4-8 s with 2 threads and 0.8 s with 1 on a loaded 2-core machine)."""
    if requested:
        torch.set_num_threads(requested)
        return
    if has_accelerator() or "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if cores > 1 and load >= cores - 0.5:
        torch.set_num_threads(1)
        logger.info("the CPU is busy (load %.1f on %d cores): training on 1 thread", load, cores)


def ranks_agree(model) -> bool:
    """Whether every process holds the same random projections and redraw counter (and, under DDP, the same
    parameters). FSDP shards parameters, so there only the (unsharded) buffers are compared."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    compare_parameters = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    unwrapped = getattr(model, "module", model)
    fingerprint = {
        name: (tensor.double().sum().item(), tensor.double().abs().sum().item())
        for name, tensor in unwrapped.state_dict().items()
        if compare_parameters or name.endswith(("feature_map.projection", "feature_redraws"))
    }
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, fingerprint)
    return all(other == gathered[0] for other in gathered)


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
    if training_args.fsdp and not has_accelerator():
        logger.warning(
            "--fsdp: accelerate shards models only on accelerators; on CPU Trainer trains with DDP instead "
            "(FSDP2's fully_shard itself works on CPU in a plain PyTorch loop, see tests/test_distributed.py)"
        )
    set_seed(training_args.seed)
    choose_cpu_threads(model_args.torch_threads)

    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    elif model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = ByT5Tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    raw = load_raw_datasets(data_args)
    if data_args.packing:
        data = tokenize_documents(raw, tokenizer, data_args, training_args)
        # One row of concatenated documents per batch, positions restarting at 0 at each document; the labels of
        # each document's first token are -100 (nothing predicts across a document boundary). Trainer's
        # remove_unused_columns only drops dataset columns the model does not take (here: none); the position_ids
        # the collator adds reach the model.
        collator = DataCollatorWithFlattening()
    else:
        data = tokenize_and_group(raw, tokenizer, data_args, training_args)
        collator = default_data_collator
    baseline = unigram_baseline_loss(data["train"], data["validation"], len(tokenizer))
    model = build_model(model_args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    if data_args.packing:
        lengths = [len(ids) for ids in data["train"]["input_ids"]]
        logger.info(
            "model: %s parameters, feature_map=%s; data: %d train / %d validation documents of %d-%d tokens "
            "(mean %.0f), packed without padding", f"{parameters:,}", model.config.feature_map, len(data["train"]),
            len(data["validation"]), min(lengths), max(lengths), sum(lengths) / len(lengths),
        )
    else:
        logger.info(
            "model: %s parameters, feature_map=%s; data: %d train / %d validation blocks of %d tokens",
            f"{parameters:,}", model.config.feature_map, len(data["train"]), len(data["validation"]),
            data_args.block_size,
        )
    if data_args.packing and training_args.include_num_input_tokens_seen in ("no", False):
        training_args.include_num_input_tokens_seen = "all"  # batches differ in size: count what was seen

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[PerformerFeatureRedrawCallback()],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    val_loss = metrics["eval_loss"]
    agree = ranks_agree(trainer.model_wrapped)
    trainer.save_model()  # model + tokenizer (processing_class), config with auto_map, the modeling code

    results = {
        "validation_loss": val_loss,
        "validation_perplexity": math.exp(val_loss),
        "unigram_baseline_loss": baseline,
        "unigram_baseline_perplexity": math.exp(baseline),
        "train_loss": train_result.training_loss,
        "train_runtime_s": train_result.metrics["train_runtime"],
        "feature_redraws": trainer.model.feature_redraw_count,
        "world_size": training_args.world_size,
        "ranks_agree": agree,
    }
    if not trainer.is_world_process_zero():
        return results

    output_dir = Path(training_args.output_dir).resolve()
    hyperparameters = {
        "max_steps": trainer.state.global_step,
        "train batch size (total)": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * training_args.world_size,
        "block_size": data_args.block_size,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type.value),
        "tokens seen": trainer.state.num_input_tokens_seen if data_args.packing
        else trainer.state.global_step * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * training_args.world_size * data_args.block_size,
        "packing": data_args.packing,
        "tokenizer": type(tokenizer).__name__,
    }
    save_model_card(
        output_dir,
        trainer.model,
        repo_id=push_repo or f"your-username/{output_dir.name}",
        description="A small causal Performer language model trained with `examples/train_clm.py`.",
        dataset_id=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        dataset_name=data_args.train_file,
        metrics={"loss": val_loss, "perplexity": math.exp(val_loss)},
        hyperparameters=hyperparameters,
        evaluation_note=(
            f"A unigram model of the training tokens (no context) scores a validation loss of {baseline:.4f} "
            f"(perplexity {math.exp(baseline):.2f}) on the same targets."
        ),
        example_prompt=data_args.prompt,
    )
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")

    generator = pipeline("text-generation", model=str(output_dir), device="cpu")
    set_seed(training_args.seed)
    sample = generator(
        data_args.prompt, max_new_tokens=data_args.max_new_tokens, do_sample=True, temperature=0.8, top_k=40
    )[0]["generated_text"]

    verdict = "below" if val_loss < baseline else "ABOVE"
    print("\n" + "=" * 100)
    print(f"validation loss      {val_loss:.4f} nats/token (perplexity {math.exp(val_loss):.2f})")
    print(f"unigram baseline     {baseline:.4f} nats/token (perplexity {math.exp(baseline):.2f})  "
          f"-> the model is {abs(baseline - val_loss):.4f} {verdict} it")
    if training_args.world_size > 1:
        print(f"{training_args.world_size} processes ({type(trainer.model_wrapped).__name__}): random features "
              f"identical on all ranks: {agree}")
    print(f"feature redraws      {results['feature_redraws']} (every {model.config.feature_redraw_interval} steps)")
    print(f"sample ({data_args.prompt!r}):\n{sample}")
    print("=" * 100)
    print(f"model, tokenizer and model card saved to {output_dir}")
    print(f"  generate more: python examples/generate.py {output_dir} --prompt \"{data_args.prompt}\"")
    print(f"total time {time.perf_counter() - STARTED:.0f} s")

    if push_repo:
        repo_id = push_folder_to_hub(output_dir, push_repo, private=training_args.hub_private_repo,
                                     token=training_args.hub_token)
        results["hub_repo_id"] = repo_id
        print(f"pushed to https://huggingface.co/{repo_id}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
