"""Model cards and Hub readiness without a network: the card's metadata, and `push_to_hub` up to the upload.

The Hub calls are replaced by a stub that writes each committed file into a local folder, which then stands in for
the Hub repository: whatever was uploaded must load and compute what the pushed model computes.
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from hf_performer import PerformerConfig, PerformerForCausalLM
from hf_performer.model_card import build_model_card, push_folder_to_hub, save_model_card


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PerformerForCausalLM(PerformerConfig(vocab_size=384, hidden_size=32, num_hidden_layers=3,
                                                num_attention_heads=4, nb_features=12, feature_redraw_interval=50))


def table_value(text: str, field: str) -> str:
    """The value column of the markdown table row ``| field | value |``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == field:
            return cells[1]
    raise AssertionError(f"no table row {field!r}")


def test_card_metadata_and_text(model, tmp_path):
    model.redraw_features()
    metrics = {"loss": 1.234, "perplexity": 3.435}
    path = save_model_card(tmp_path, model, repo_id="someone/tiny-performer", metrics=metrics,
                           hyperparameters={"learning_rate": 0.003}, evaluation_note="Unigram baseline: 3.1")
    card = ModelCard.load(path)  # what the Hub parses

    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"custom_code", "performer"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"
    assert "datasets" not in data  # the embedded corpus is not a Hub dataset
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == metrics
    assert all(result.dataset_type == "pydoc_data.topics" and result.dataset_split == "validation"
               for result in results.values())
    assert card.data.model_name == "tiny-performer"

    text = card.text
    assert 'from_pretrained("someone/tiny-performer", trust_remote_code=True)' in text
    assert table_value(text, "hidden_size") == str(model.config.hidden_size)
    assert table_value(text, "num_hidden_layers") == "3"
    assert table_value(text, "random features per head") == "12"
    assert table_value(text, "feature redraws so far") == "1"
    assert table_value(text, "parameters") == f"{sum(p.numel() for p in model.parameters()):,}"
    assert table_value(text, "loss") == "1.234"
    assert "pydoc_data.topics" in text and "Unigram baseline: 3.1" in text


def test_card_names_a_hub_dataset(model):
    card = build_model_card(model, dataset_id="Salesforce/wikitext", dataset_config="wikitext-2-raw-v1",
                            metrics={"loss": 2.0})
    assert card.data.datasets == ["Salesforce/wikitext"]
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_config) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert "wikitext-2-raw-v1" in card.text


def test_missing_template_falls_back_to_the_hub_default_with_the_same_metadata(model, tmp_path):
    card = build_model_card(model, template_path=tmp_path / "absent.md", metrics={"loss": 2.0})
    assert "custom_code" in card.data.tags
    assert card.data.eval_results[0].metric_value == 2.0


def test_push_to_hub_uploads_a_self_contained_checkpoint(model, offline_hub):
    model.redraw_features()
    model.push_to_hub("someone/tiny-performer", tags=["pydoc"])

    ((repo_id, _, files),) = offline_hub.commits
    assert repo_id == "someone/tiny-performer"
    assert {"config.json", "model.safetensors", "modeling_performer.py", "configuration_performer.py",
            "README.md"} <= set(files)
    pushed = offline_hub.root / repo_id
    config = json.loads((pushed / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_performer.PerformerForCausalLM"
    assert "pydoc" in (pushed / "README.md").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(pushed)
    assert loaded.feature_redraw_count == 1
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_saved_folder_with_card_and_tokenizer_uploads_as_is(model, offline_hub, tmp_path):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    save_model_card(folder, model, repo_id="someone/tiny-performer", metrics={"loss": 1.5})

    repo_id = push_folder_to_hub(folder, "someone/tiny-performer")

    pushed = offline_hub.root / repo_id
    assert sorted(p.name for p in pushed.iterdir()) == sorted(p.name for p in folder.iterdir())
    for path in folder.iterdir():
        assert (pushed / path.name).read_bytes() == path.read_bytes(), path.name
    metadata = (pushed / "README.md").read_text().split("---")[1]
    assert "custom_code" in metadata and "value: 1.5" in metadata
