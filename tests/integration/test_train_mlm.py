"""examples/train_mlm.py end to end with a tiny budget (issue 14, the MLM main job): a Performer and a same-size BERT
masked LM trained the same way on the embedded corpus; the saved folders reload and reproduce the reported held-out
numbers, eval_results.json is what main() returned, fill-mask runs on the saved Performer."""

import json
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, TrainingArguments

from helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread_per_module")
VOCAB = 500
TOP_K = 4
EVAL_BATCH = 8
TINY = ["--vocab_size", str(VOCAB), "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2",
        "--num_attention_heads", "2", "--block_size", "64", "--max_steps", "20", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", str(EVAL_BATCH), "--learning_rate", "5e-3", "--warmup_steps", "2",
        "--max_eval_samples", "24", "--eval_steps", "1000", "--logging_steps", "10", "--feature_redraw_interval", "8",
        "--top_k", str(TOP_K), "--seed", "3", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def train_mlm():
    return load_example("train_mlm")


@pytest.fixture(scope="module")
def run(train_mlm, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mlm") / "run"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = train_mlm.main(["--output_dir", str(output_dir), "--compare_bert", *TINY])
    return output_dir, results, printed.getvalue()


def held_out(train_mlm, folder, tmp_path):
    """The held-out blocks rebuilt from scratch with the saved tokenizer and the run's seed and masking."""
    data_args = train_mlm.DataArguments(block_size=64, max_eval_samples=24)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = train_mlm.tokenize_and_group(train_mlm.embedded_corpus(), tokenizer, data_args, args)
    return train_mlm.mask_once(data["validation"], tokenizer, data_args.mlm_probability, seed=3)


def test_eval_results_json_is_what_main_returned(run):
    output_dir, results, _ = run
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for name in ("config.json", "model.safetensors", "modeling_performer.py", "tokenizer_config.json", "README.md"):
        assert (output_dir / name).is_file(), name
    assert (output_dir.parent / "run-bert" / "model.safetensors").is_file()
    assert "pipeline_tag: fill-mask" in (output_dir / "README.md").read_text()


def test_both_models_are_scored_on_the_same_masks_and_beat_an_untrained_model(run):
    _, results, printed = run
    performer, bert = results["performer"], results["bert"]
    assert results["untrained_loss"] == pytest.approx(math.log(VOCAB))
    for row in (performer, bert):
        assert 0.0 <= row["masked_accuracy"] <= 1.0
        assert row["steps"] == 20 and row["train_tokens"] == 20 * 8 * 64
    assert performer["masked_tokens"] == bert["masked_tokens"] > 0
    assert math.isfinite(performer["masked_loss"]) and performer["masked_loss"] < math.log(VOCAB)
    assert performer["feature_redraws"] == 2
    assert abs(bert["parameters"] - performer["parameters"]) / performer["parameters"] < 0.1  # same size
    assert f"parameters: Performer {performer['parameters']:,}, BERT {bert['parameters']:,}" in printed
    assert "| Performer (favor+) |" in printed and "| BERT (softmax) |" in printed


@pytest.mark.parametrize("name", ["performer", "bert"])
def test_saved_models_reproduce_the_reported_held_out_numbers(train_mlm, run, tmp_path, name):
    output_dir, results, _ = run
    folder = output_dir if name == "performer" else output_dir.parent / "run-bert"
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    blocks = held_out(train_mlm, folder, tmp_path)
    correct, nll, count = 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), EVAL_BATCH):
            batch = blocks[start : start + EVAL_BATCH]
            ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
            logits = model(input_ids=ids).logits
            masked = labels != -100
            correct += (logits.argmax(-1)[masked] == labels[masked]).sum().item()
            nll += torch.nn.functional.cross_entropy(logits[masked], labels[masked], reduction="sum").double().item()
            count += int(masked.sum())
    reported = results[name]
    assert count == reported["masked_tokens"]
    assert correct / count == pytest.approx(reported["masked_accuracy"], abs=1e-12)
    assert nll / count == pytest.approx(reported["masked_loss"], abs=1e-5)


def test_fill_mask_on_the_saved_performer_gives_top_k_candidates(run):
    _, results, printed = run
    predictions = results["fill_mask"]["predictions"]
    assert "[MASK]" in results["fill_mask"]["text"]
    assert len(predictions) == TOP_K
    assert all(isinstance(p["token"], str) and 0.0 <= p["score"] <= 1.0 for p in predictions)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    assert "fill-mask (" in printed


def test_training_masks_are_seeded_and_the_held_out_blocks_are_kept(train_mlm):
    """Two models trained with the same seed see the same masks; already masked held-out blocks pass unchanged."""
    tokenizer = train_mlm.train_word_tokenizer(train_mlm.embedded_corpus()["train"]["text"][:5], 200)
    features = [{"input_ids": [2, *range(5, 60), 3]} for _ in range(4)]
    first = train_mlm.MaskingCollator(tokenizer, 0.15, seed=7)(features)
    second = train_mlm.MaskingCollator(tokenizer, 0.15, seed=7)(features)
    assert torch.equal(first["labels"], second["labels"]) and torch.equal(first["input_ids"], second["input_ids"])
    assert (first["labels"][:, [0, -1]] == -100).all()  # [CLS] / [SEP] are never masked
    fixed = [{"input_ids": row.tolist(), "labels": labels.tolist()}
             for row, labels in zip(first["input_ids"], first["labels"])]
    kept = train_mlm.MaskingCollator(tokenizer, 0.15, seed=8)(fixed)
    assert torch.equal(kept["labels"], first["labels"]) and torch.equal(kept["input_ids"], first["input_ids"])
