"""examples/train_clm.py --packing end to end on a tiny budget: documents of varying length reach the model as rows of
concatenated documents (positions restarting at 0, no padding, nothing predicted across a boundary), and the model
trains on them (finite, falling loss; an evaluation loss below the unigram baseline)."""

import math

import pytest
import torch

from helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread_per_module")
TINY = ["--config_overrides", '{"norm_type": "layernorm", "ff_glu": false, "hidden_act": "gelu", "mlp_bias": true}',
        "--hidden_size", "32", "--intermediate_size", "128", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--block_size", "64", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--warmup_steps", "10",
        "--max_eval_samples", "64", "--eval_steps", "60", "--logging_steps", "10", "--max_new_tokens", "8",
        "--feature_redraw_interval", "50", "--torch_threads", "1", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def train_clm():
    return load_example("train_clm")


def test_documents_have_varying_lengths_within_the_block_size(train_clm):
    text = "a" * 10 + "\n\n" + "b" * 30 + "\n\n" + "c" * 150
    documents = train_clm.paragraph_documents(text, lambda s: list(s.encode()), block_size=64)
    assert [len(document) for document in documents] == [12 + 32, 64, 64, 152 - 128]
    assert bytes(sum(documents, [])).decode() == text + "\n\n"  # nothing lost, order kept


@pytest.fixture(scope="module")
def packed_run(train_clm, tmp_path_factory):
    """One --packing run (150 steps), recording what the base model receives in training and its Trainer."""
    seen, trainers = [], []
    build_model, trainer_class = train_clm.build_model, train_clm.Trainer

    def hooked_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def record(module, args, kwargs):
            if module.training and len(seen) < 20:
                seen.append({key: kwargs.get(key) for key in ("input_ids", "position_ids", "attention_mask")})

        model.model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    class RecordingTrainer(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training and len(seen) < 20:
                labels.append(inputs["labels"].clone())
            return super().compute_loss(model, inputs, *args, **kwargs)

    labels = []
    mp = pytest.MonkeyPatch()
    mp.setattr(train_clm, "build_model", hooked_build_model)
    mp.setattr(train_clm, "Trainer", RecordingTrainer)
    try:
        output_dir = tmp_path_factory.mktemp("packed")
        results = train_clm.main(["--packing", "--output_dir", str(output_dir), "--max_steps", "150", *TINY])
    finally:
        mp.undo()
    return results, seen, labels, trainers[0]


def test_packed_rows_reach_the_model(packed_run):
    _, seen, labels, _ = packed_run
    assert len(seen) >= 10
    restarts_per_row = []
    for inputs, row_labels in zip(seen, labels):
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        assert ids.shape[0] == 1 and positions.shape == ids.shape  # one row of concatenated documents
        assert inputs["attention_mask"] is None  # no padding
        starts = positions[0] == 0
        assert starts[0]
        restarts_per_row.append(int(starts[1:].sum()))
        # positions count up inside each document
        previous = torch.cat([positions.new_tensor([-1]), positions[0, :-1]])
        assert torch.equal(positions[0][~starts], previous[~starts] + 1)
        # nothing predicts a document's first token from the document before it
        assert torch.equal(row_labels[0] == -100, starts)
    assert min(restarts_per_row) >= 1  # several documents in every row (8 per batch)
    lengths = {int(inputs["input_ids"].shape[1]) for inputs in seen}
    assert len(lengths) > 1  # rows as long as their documents, not a fixed padded size


def test_packed_training_learns(packed_run):
    results, _, _, trainer = packed_run
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) >= 10 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert math.isfinite(results["validation_loss"])
    assert results["validation_loss"] < results["unigram_baseline_loss"]
    assert trainer.state.num_input_tokens_seen > 0
