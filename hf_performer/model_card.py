"""Model cards for Performer checkpoints, filled from ``model_cards/performer.md`` with ``huggingface_hub.ModelCard``.

The card's metadata (tags including ``custom_code``, the training data, the evaluation results as a model-index) is
what the Hub indexes; its text records the architecture read from the config, so a card never disagrees with the
checkpoint it describes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "performer.md"
# The checkpoint ships its modeling code (config.auto_map); the Hub shows `custom_code` models with a
# trust_remote_code notice.
BASE_TAGS = ("performer", "linear-attention", "kernel-attention", "custom_code")
EMBEDDED_CORPUS = "pydoc_data.topics"


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
    example_prompt: str = "The with statement",
    template_path: str | Path | None = None,
) -> ModelCard:
    """A filled model card for ``model``.

    ``dataset_id`` names a Hub dataset (it goes to the ``datasets`` metadata); without one the card describes the
    embedded CPython documentation corpus. ``metrics`` maps names (``loss``, ``perplexity``, ...) to validation
    values; each becomes an ``EvalResult`` so the Hub shows it in the model-index.
    """
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
            task_type="text-generation",
            task_name="Causal language modeling",
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
        pipeline_tag="text-generation" if model.config.causal else None,
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        datasets=[dataset_id] if dataset_id else None,
        metrics=list(metrics) or None,
        eval_results=eval_results or None,
    )
    template_kwargs = dict(
        model_name=model_name,
        repo_id=repo_id,
        model_description=description or f"A {model.config.num_hidden_layers}-layer Performer language model.",
        example_prompt=example_prompt,
        architecture=architecture_rows(model),
        training_data=training_data,
        hyperparameters=[(name, _format(value)) for name, value in (hyperparameters or {}).items()],
        results=[(name, _format(value)) for name, value in metrics.items()],
        evaluation_note=evaluation_note,
    )
    template_path = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not template_path.is_file():
        # A wheel install does not ship the repository's model_cards/; the Hub's generic template still carries
        # the same metadata.
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


__all__ = ["build_model_card", "save_model_card", "push_folder_to_hub", "architecture_rows"]
