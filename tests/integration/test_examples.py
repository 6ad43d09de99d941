"""The examples, end to end with tiny settings: train_clm.py trains on the embedded corpus until it beats the unigram
baseline, saves a complete folder (pushed to a stubbed Hub), generates; generate.py streams from that folder."""

import json
import math

import pytest
from datasets import Dataset

from helpers import REPO, load_example

EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.usefixtures("single_thread_per_module")
# A LayerNorm + GELU block learns faster than the default Llama-style one at this tiny width (and exercises
# --config_overrides).
TINY = ["--config_overrides", '{"norm_type": "layernorm", "ff_glu": false, "hidden_act": "gelu", "mlp_bias": true}',
        "--hidden_size", "32", "--intermediate_size", "128", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--block_size", "64",
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--warmup_steps", "10",
        "--max_eval_samples", "32", "--eval_steps", "1000", "--logging_steps", "50", "--max_new_tokens", "20",
        "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def train_clm():
    return load_example("train_clm")


def test_unigram_baseline_is_the_cross_entropy_of_train_frequencies(train_clm):
    train = Dataset.from_dict({"input_ids": [[0, 0, 1], [0, 2, 2]]})  # counts 0:3, 1:1, 2:2
    validation = Dataset.from_dict({"input_ids": [[3, 0, 1], [1, 3, 2]]})  # targets: 0, 1, 3, 2
    total = 6 + 4  # add-one over a vocabulary of 4
    expected = -(math.log(4 / total) + math.log(2 / total) + math.log(1 / total) + math.log(3 / total)) / 4
    assert train_clm.unigram_baseline_loss(train, validation, vocab_size=4) == pytest.approx(expected)


def test_embedded_corpus_split_is_by_topic_and_needs_no_download(train_clm):
    from pydoc_data.topics import topics

    corpus = train_clm.embedded_corpus()
    train, validation = corpus["train"]["text"], corpus["validation"]["text"]
    assert len(train) + len(validation) == len(topics)
    assert not set(train) & set(validation)
    assert 0.05 < len(validation) / len(topics) < 0.2


def test_train_clm_beats_the_unigram_baseline_saves_pushes_and_generates(train_clm, offline_hub, tmp_path,
                                                                          capsys):
    output_dir = tmp_path / "run"
    results = train_clm.main(["--output_dir", str(output_dir), "--max_steps", "150", "--feature_redraw_interval",
                              "50", "--push_to_hub", "--hub_model_id", "someone/pydoc-performer", *TINY])
    printed = capsys.readouterr().out

    assert results["validation_loss"] < results["unigram_baseline_loss"] - 0.2
    assert results["feature_redraws"] == 3
    for name in ("config.json", "model.safetensors", "modeling_performer.py", "tokenizer_config.json",
                 "README.md", "eval_results.json"):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["validation_loss"] == pytest.approx(results["validation_loss"])
    assert "model-index" in (output_dir / "README.md").read_text()
    assert sorted(p.name for p in (offline_hub.root / "someone/pydoc-performer").iterdir()) == \
        sorted(p.name for p in output_dir.iterdir())
    assert f"saved to {output_dir.resolve()}" in printed
    assert "sample ('The with statement'):\nThe with statement" in printed

    generate = load_example("generate")
    text = generate.main(["--model_name_or_path", str(output_dir), "--prompt", "def f(x):", "--max_new_tokens", "12", "--seed", "1"])
    streamed = capsys.readouterr().out
    assert text.startswith("def f(x):") and len(text.encode()) > len("def f(x):")
    assert text[len("def f(x):"):].strip() in streamed  # the new tokens were streamed to stdout


def test_train_clm_reads_a_local_text_file(train_clm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(400)))
    results = train_clm.main(["--output_dir", str(tmp_path / "run"), "--train_file", str(corpus),
                              "--validation_split_percentage", "10", "--max_steps", "3", *TINY])
    assert math.isfinite(results["validation_loss"]) and math.isfinite(results["unigram_baseline_loss"])


def test_generate_takes_the_readme_flag_and_refuses_two_models():
    generate = load_example("generate")
    assert generate.parse_args(["--model_name_or_path", "some/model"]).model == "some/model"
    assert generate.parse_args(["some/model"]).model == "some/model"  # the positional form still works
    for argv in ([], ["a", "--model_name_or_path", "b"]):
        with pytest.raises(SystemExit):
            generate.parse_args(argv)
