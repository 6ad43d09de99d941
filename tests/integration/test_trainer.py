"""Trainer integration: the feature-redraw callback, checkpoint resume, remote-code loading, bf16 autocast,
gradient checkpointing and torch.compile through TrainingArguments.

Expected projections are recomputed here from the documented seed (config seed, layer, redraw counter) with
``gaussian_projection``, independently of the model's redraw path.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_performer import PerformerConfig, PerformerFeatureRedrawCallback, PerformerForCausalLM

from helpers import REPO, expected_projection

pytestmark = pytest.mark.usefixtures("single_thread_per_module")  # tiny models: two threads only wait
LENGTH = 16


def tiny_model(**overrides) -> PerformerForCausalLM:
    # "chunked": the path long training sequences take (16 tokens would otherwise pick the quadratic one).
    options = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, nb_features=8,
                   attention_chunk_size=8, attention_implementation="chunked", feature_redraw_interval=1000,
                   feature_seed=3)
    options.update(overrides)
    torch.manual_seed(0)
    return PerformerForCausalLM(PerformerConfig(**options))


def periodic_dataset(blocks: int = 48) -> Dataset:
    """Sequences of a repeating pattern with random phase: learnable in a few steps."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.tensor([3, 7, 11, 5, 9, 13, 4])
    starts = torch.randint(0, len(pattern), (blocks,), generator=generator)
    ids = [pattern[(start + torch.arange(LENGTH)) % len(pattern)].tolist() for start in starts]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=6,
                   save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
                   logging_steps=1, dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)


def projections(model) -> list[torch.Tensor]:
    return [layer.self_attn.feature_map.projection.clone() for layer in model.model.layers]


class StepRecorder(TrainerCallback):
    """Records (optimizer step, redraw counter) at every step end and the number of micro-batches."""

    def __init__(self):
        self.counters, self.micro_batches, self.first_step_state = [], 0, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.first_step_state is None:
            self.first_step_state = (state.global_step, model.feature_redraw_count, projections(model))

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.micro_batches += 1
        self.counters.append((state.global_step, model.feature_redraw_count))


# ---------------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------------


def test_redraws_count_optimizer_steps_not_micro_batches(tmp_path):
    model = tiny_model()
    recorder = StepRecorder()
    trainer = Trainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=3, max_steps=7),
                      train_dataset=periodic_dataset(), callbacks=[PerformerFeatureRedrawCallback(interval=2), recorder])
    trainer.train()

    assert recorder.micro_batches == 21  # 7 optimizer steps x 3 micro-batches
    assert recorder.counters == [(step, step // 2) for step in range(1, 8)]
    assert model.feature_redraw_count == 3
    for layer, projection in enumerate(projections(model)):
        torch.testing.assert_close(projection, expected_projection(model.config, layer, 3), rtol=0, atol=0)


def test_interval_defaults_to_config_and_respects_fixed_features(tmp_path):
    model = tiny_model(feature_redraw_interval=3)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=periodic_dataset(),
            callbacks=[PerformerFeatureRedrawCallback()]).train()
    assert model.feature_redraw_count == 2  # steps 3 and 6

    fixed = tiny_model(feature_redraw_interval=3)
    fixed.fix_features()
    before = projections(fixed)
    Trainer(model=fixed, args=training_args(tmp_path), train_dataset=periodic_dataset(),
            callbacks=[PerformerFeatureRedrawCallback(interval=1)]).train()
    assert fixed.feature_redraw_count == 0
    for old, new in zip(before, projections(fixed)):
        assert torch.equal(old, new)


def test_callback_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        PerformerFeatureRedrawCallback(interval=-1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: resume and remote code
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """8 steps, redraw every 3, checkpoints every 4: checkpoint-4 holds redraw #1, the run ends at redraw #2."""
    output_dir = tmp_path_factory.mktemp("run")
    model = tiny_model()
    trainer = Trainer(model=model, args=training_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4),
                      train_dataset=periodic_dataset(), callbacks=[PerformerFeatureRedrawCallback(interval=3)])
    trainer.train()
    return output_dir, model


def test_resume_restores_projections_and_redraw_counter(checkpointed_run, tmp_path):
    output_dir, finished = checkpointed_run
    resumed = tiny_model()  # fresh weights and the initial (redraw #0) projections
    recorder = StepRecorder()
    trainer = Trainer(model=resumed, args=training_args(output_dir, max_steps=8, save_strategy="no"),
                      train_dataset=periodic_dataset(),
                      callbacks=[PerformerFeatureRedrawCallback(interval=3), recorder])
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))

    step, counter, loaded = recorder.first_step_state
    assert (step, counter) == (4, 1)
    for layer, projection in enumerate(loaded):
        torch.testing.assert_close(projection, expected_projection(resumed.config, layer, 1), rtol=0, atol=0)
        assert not torch.equal(projection, expected_projection(resumed.config, layer, 0))
    assert recorder.counters == [(5, 1), (6, 2), (7, 2), (8, 2)]
    # The resumed run ends where the uninterrupted one did: same projections, counter and weights.
    assert resumed.feature_redraw_count == finished.feature_redraw_count == 2
    for name, tensor in finished.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


HIDE_HF_PERFORMER = textwrap.dedent("""
    import importlib.abc, json, sys

    class HideHfPerformer(importlib.abc.MetaPathFinder):
        # The editable install puts a finder on sys.meta_path; this one answers first, for every path entry.
        def find_spec(self, name, path=None, target=None):
            if name == "hf_performer" or name.startswith("hf_performer."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideHfPerformer())
    # The repository itself must not be on the path either (its virtual environment may live inside it).
    sys.path = [entry for entry in sys.path if entry.startswith(sys.prefix) or not entry.startswith(REPO)]
    try:
        import hf_performer
        sys.exit("hf_performer is importable; the test would prove nothing")
    except ModuleNotFoundError:
        pass
""")


def test_trainer_checkpoint_loads_with_remote_code_where_hf_performer_is_absent(checkpointed_run, tmp_path):
    output_dir, _ = checkpointed_run
    checkpoint = output_dir / "checkpoint-8"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_performer.PerformerForCausalLM"
    assert (checkpoint / "modeling_performer.py").is_file()

    reference = PerformerForCausalLM.from_pretrained(checkpoint).eval()
    prompt = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        logits = reference(prompt).logits
        greedy = reference.generate(prompt, max_new_tokens=6, do_sample=False)

    child = HIDE_HF_PERFORMER.replace("REPO)", f"{str(REPO)!r})") + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        prompt = torch.tensor([[3, 7, 11, 5, 9]])
        with torch.no_grad():
            logits = model(prompt).logits
            greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)
        print(json.dumps({{"module": type(model).__module__, "redraws": model.feature_redraw_count,
                          "hf_performer_loaded": any(n.split(".")[0] == "hf_performer" for n in sys.modules),
                          "logits": logits.tolist(), "greedy": greedy.tolist()}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", child], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert loaded["module"].startswith("transformers_modules.")
    assert not loaded["hf_performer_loaded"]
    assert loaded["redraws"] == 2
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, rtol=1e-5, atol=1e-6)
    assert loaded["greedy"] == greedy.tolist()


# ---------------------------------------------------------------------------------------------------------------
# TrainingArguments features: bf16 autocast, gradient checkpointing, torch.compile
# ---------------------------------------------------------------------------------------------------------------


def run_steps(tmp_path, model, steps=3, **args) -> list[float]:
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=steps, **args),
                      train_dataset=periodic_dataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]




@pytest.mark.parametrize("implementation", ["quadratic", "chunked"])
def test_bf16_autocast_training(tmp_path, implementation):
    model = tiny_model(attention_implementation=implementation)
    initial = {name: tensor.clone() for name, tensor in model.named_parameters()}
    seen_dtypes = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen_dtypes.append(out.dtype))
    losses = run_steps(tmp_path, model, bf16=True)

    assert seen_dtypes and all(dtype == torch.bfloat16 for dtype in seen_dtypes)  # autocast was on
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # master weights stay fp32
    changed = [name for name, tensor in model.named_parameters() if not torch.equal(tensor, initial[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_gradient_checkpointing_recomputes_and_matches_plain_training(tmp_path):
    plain = tiny_model()
    plain_losses = run_steps(tmp_path, plain)

    checkpointed = tiny_model()
    calls = []
    # A pre-hook on the layer's first op: recomputation stops early once it has what backward needs.
    checkpointed.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *unused: calls.append(1))
    checkpointed_losses = run_steps(tmp_path, checkpointed, gradient_checkpointing=True)

    assert checkpointed.model.gradient_checkpointing
    assert len(calls) == 2 * 3  # each step runs the layer forward twice: once, then again during backward
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, tensor), other in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(other, tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_training(tmp_path):
    eager = tiny_model()
    eager_losses = run_steps(tmp_path, eager)

    compiled = tiny_model()
    trainer = Trainer(model=compiled, train_dataset=periodic_dataset(),
                      args=training_args(tmp_path, max_steps=3, torch_compile=True,
                                         torch_compile_backend="aot_eager"))
    trainer.train()
    compiled_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert trainer.model_wrapped is not compiled and hasattr(trainer.model_wrapped, "_orig_mod")  # it was compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
