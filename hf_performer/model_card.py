"""Model cards for Performer checkpoints, filled from ``model_card_template.md`` (package data, so a wheel install
has it too) with ``huggingface_hub.ModelCard``.

Each head gets its own card: the pipeline tag, the wording and the usage snippet (Auto class and pipeline) follow
the model's task (``CARD_TASKS``). The card's metadata (tags including ``custom_code``, the training data, the evaluation results as a model-index) is
what the Hub indexes; its text records the architecture read from the config, so a card never disagrees with the
checkpoint it describes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card_template.md"
# The checkpoint ships its modeling code (config.auto_map); the Hub shows `custom_code` models with a
# trust_remote_code notice.
BASE_TAGS = ("performer", "linear-attention", "kernel-attention", "custom_code")
EMBEDDED_CORPUS = "pydoc_data.topics"


@dataclass(frozen=True)
class CardTask:
    """What a card says about one head: the Hub's pipeline tag, the Auto class that loads it, the words for the
    model and its outputs, and the usage snippet (``{repo_id}`` and ``{example}`` are filled in)."""

    pipeline_tag: str
    auto_class: str
    task_name: str
    model_kind: str
    outputs_noun: str
    default_example: str
    usage: str


_LOAD = """from transformers import {auto_class}, AutoTokenizer{extra_import}

model = {auto_class}.from_pretrained("{{repo_id}}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{repo_id}}")
"""


def _usage(auto_class: str, body: str, extra_import: str = ", pipeline") -> str:
    return _LOAD.format(auto_class=auto_class, extra_import=extra_import) + body


CARD_TASKS = {
    "PerformerForCausalLM": CardTask(
        "text-generation", "AutoModelForCausalLM", "Causal language modeling", "language model", "generations",
        "The with statement",
        _usage("AutoModelForCausalLM", 'generator = pipeline("text-generation", model=model, tokenizer=tokenizer)\n'
               'print(generator("{example}", max_new_tokens=100, do_sample=True)[0]["generated_text"])'),
    ),
    "PerformerForMaskedLM": CardTask(
        "fill-mask", "AutoModelForMaskedLM", "Masked language modeling", "masked language model (encoder)",
        "predicted tokens", "The [MASK] statement",
        _usage("AutoModelForMaskedLM", 'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)\n'
               'text = "{example}".replace("[MASK]", tokenizer.mask_token)\n'
               'for candidate in fill(text, top_k=5):\n'
               '    print(candidate["token_str"], round(candidate["score"], 3))'),
    ),
    "PerformerForSequenceClassification": CardTask(
        "text-classification", "AutoModelForSequenceClassification", "Text classification", "text classifier",
        "labels", "The with statement",
        _usage("AutoModelForSequenceClassification",
               'classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)\n'
               'print(classifier("{example}"))'),
    ),
    "PerformerForTokenClassification": CardTask(
        "token-classification", "AutoModelForTokenClassification", "Token classification", "token classifier",
        "token labels", "The with statement",
        _usage("AutoModelForTokenClassification",
               'tagger = pipeline("token-classification", model=model, tokenizer=tokenizer)\n'
               'print(tagger("{example}"))'),
    ),
    "PerformerForQuestionAnswering": CardTask(
        "question-answering", "AutoModelForQuestionAnswering", "Question answering",
        "extractive question-answering model", "answers",
        "The with statement wraps the execution of a block with methods defined by a context manager.",
        _usage("AutoModelForQuestionAnswering",
               "# transformers 5.24 has no question-answering pipeline: the best span of the context, by hand\n"
               'question, context = "What does the with statement wrap?", "{example}"\n'
               'inputs = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)\n'
               'offsets = inputs.pop("offset_mapping")[0].tolist()\n'
               "output = model(**inputs)\n"
               "start_logits, end_logits = output.start_logits[0].tolist(), output.end_logits[0].tolist()\n"
               "context_tokens = [i for i, sequence in enumerate(inputs.sequence_ids(0)) if sequence == 1]\n"
               "start = max(context_tokens, key=lambda i: start_logits[i])\n"
               "end = max((i for i in context_tokens if i >= start), key=lambda i: end_logits[i])\n"
               "print(context[offsets[start][0]:offsets[end][1]])", extra_import=""),
    ),
    "PerformerForMultipleChoice": CardTask(
        "multiple-choice", "AutoModelForMultipleChoice", "Multiple choice", "multiple-choice model", "choices",
        "The with statement",
        _usage("AutoModelForMultipleChoice",
               'prompt, choices = "{example}", ["uses a context manager.", "defines a class."]\n'
               'inputs = tokenizer([prompt] * len(choices), choices, return_tensors="pt", padding=True)\n'
               'logits = model(**{{name: value.unsqueeze(0) for name, value in inputs.items()}}).logits'
               '  # (1, num_choices)\n'
               'print(choices[int(logits.argmax(-1))])', extra_import=""),
    ),
    "PerformerModel": CardTask(
        "feature-extraction", "AutoModel", "Feature extraction", "encoder", "features", "The with statement",
        _usage("AutoModel", 'extractor = pipeline("feature-extraction", model=model, tokenizer=tokenizer)\n'
               'features = extractor("{example}")  # [1][tokens][hidden_size]'),
    ),
}


def card_task(model) -> CardTask:
    """The ``CARD_TASKS`` entry of the model's class, or of the nearest Performer class it derives from."""
    for cls in type(model).__mro__:
        if cls.__name__ in CARD_TASKS:
            return CARD_TASKS[cls.__name__]
    return CARD_TASKS["PerformerModel"]


def architecture_rows(model) -> list[tuple[str, Any]]:
    """(field, value) rows describing the model, read from its config and weights."""
    config = model.config
    rows = [
        ("model_type", config.model_type),
        ("architecture", type(model).__name__),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        ("vocab_size", config.vocab_size),
        ("hidden_size", config.hidden_size),
        ("num_hidden_layers", config.num_hidden_layers),
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
        ("causal", config.causal),
        ("feature_map", f"`{config.feature_map}`"),
    ]
    if config.feature_map != "exact":
        rows += [
            ("random features per head", config.num_random_features),
            ("orthogonal_features", config.orthogonal_features),
            ("feature_redraw_interval", config.feature_redraw_interval),
            ("feature_seed", config.feature_seed),
        ]
        if hasattr(model, "feature_redraw_count"):
            rows.append(("feature redraws so far", model.feature_redraw_count))
    rows += [
        ("position_embedding_type", config.position_embedding_type),
        ("norm_type", config.norm_type),
    ]
    if getattr(config, "local_attn_heads", 0):  # exact sliding-window heads, where the config has them
        rows += [("local_attn_heads", config.local_attn_heads), ("local_window_size", config.local_window_size)]
    return rows


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def build_model_card(
    model,
    *,
    repo_id: str | None = None,
    description: str | None = None,
    dataset_id: str | None = None,
    dataset_config: str | None = None,
    dataset_name: str | None = None,
    training_data: str | None = None,
    metrics: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    evaluation_note: str | None = None,
    license: str = "apache-2.0",
    language: str | list[str] | None = "en",
    tags: list[str] | tuple[str, ...] = (),
    example_prompt: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """A filled model card for ``model``.

    ``dataset_id`` names a Hub dataset (it goes to the ``datasets`` metadata); without one the card describes the
    embedded CPython documentation corpus. ``metrics`` maps names (``loss``, ``perplexity``, ...) to validation
    values; each becomes an ``EvalResult`` so the Hub shows it in the model-index. The pipeline tag, the wording
    and the usage snippet follow the model's head (``card_task``); ``example_prompt`` replaces the snippet's input
    text (for a fill-mask model it should contain ``[MASK]``, for question answering it is the context).
    """
    task = card_task(model)
    example_prompt = task.default_example if example_prompt is None else example_prompt
    repo_id = repo_id or "your-username/performer-model"
    model_name = repo_id.split("/")[-1]
    dataset_label = dataset_name or dataset_id or EMBEDDED_CORPUS
    if training_data is None:
        if dataset_id is None:
            training_data = (f"The Python documentation topics shipped with CPython (`{EMBEDDED_CORPUS}`), split "
                             "by topic into train and validation.")
        else:
            config_part = f" (config `{dataset_config}`)" if dataset_config else ""
            training_data = f"The [{dataset_id}](https://huggingface.co/datasets/{dataset_id}) dataset{config_part}."
    metrics = {name: float(value) for name, value in (metrics or {}).items() if value is not None}
    eval_results = [
        EvalResult(
            task_type=task.pipeline_tag,
            task_name=task.task_name,
            dataset_type=dataset_id or EMBEDDED_CORPUS,
            dataset_name=dataset_label,
            dataset_config=dataset_config,
            dataset_split="validation",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
        if math.isfinite(value)
    ]
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        language=language,
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        datasets=[dataset_id] if dataset_id else None,
        metrics=list(metrics) or None,
        eval_results=eval_results or None,
    )
    template_kwargs = dict(
        model_name=model_name,
        repo_id=repo_id,
        model_description=description or f"A {model.config.num_hidden_layers}-layer Performer {task.model_kind}.",
        outputs_noun=task.outputs_noun,
        generates=task.pipeline_tag == "text-generation",
        usage=task.usage.format(repo_id=repo_id, example=example_prompt.replace('"', '\\"')),
        example_prompt=example_prompt,
        architecture=architecture_rows(model),
        training_data=training_data,
        hyperparameters=[(name, _format(value)) for name, value in (hyperparameters or {}).items()],
        results=[(name, _format(value)) for name, value in metrics.items()],
        evaluation_note=evaluation_note,
    )
    template_path = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not template_path.is_file():
        # a template path the caller gave that does not exist: the Hub's generic template still carries the same
        # metadata
        logger.warning("model card template %s not found; using huggingface_hub's default template", template_path)
        return ModelCard.from_template(card_data, model_description=template_kwargs["model_description"])
    return ModelCard.from_template(card_data, template_path=str(template_path), **template_kwargs)


def save_model_card(save_directory: str | Path, model, **kwargs) -> Path:
    """Write ``README.md`` (the card) into ``save_directory``; returns its path."""
    path = Path(save_directory) / "README.md"
    build_model_card(model, **kwargs).save(path)
    return path


def push_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload Performer model") -> str:
    """Upload a saved model folder as it is (weights, config with ``auto_map``, modeling code, tokenizer, card).

    ``model.push_to_hub`` re-saves the model and takes the card from the Hub repository (a generic one for a new
    repository); this keeps the card written by ``save_model_card``. One commit, like ``push_to_hub``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, token=token)
    return repo_id


__all__ = ["build_model_card", "save_model_card", "push_folder_to_hub", "architecture_rows", "card_task", "CARD_TASKS"]
