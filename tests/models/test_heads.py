"""The encoder heads (issue 14): masked LM, token classification, question answering, multiple choice.

Each head trains, saves and reloads bit-identically (also through trust_remote_code with hf_performer hidden), is
padding invariant, and runs in its transformers pipeline with a tokenizer trained here on CPython's documentation
topics (no download).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
    DataCollatorForLanguageModeling,
    pipeline,
)
from transformers.pipelines import SUPPORTED_TASKS

from hf_performer import (
    PerformerForMaskedLM,
    PerformerForMultipleChoice,
    PerformerForQuestionAnswering,
    PerformerForTokenClassification,
)

from helpers import HIDE_HF_PERFORMER, build_tokenizer, seeded, tiny_config

AUTO_CLASSES = {
    PerformerForMaskedLM: AutoModelForMaskedLM,
    PerformerForTokenClassification: AutoModelForTokenClassification,
    PerformerForQuestionAnswering: AutoModelForQuestionAnswering,
    PerformerForMultipleChoice: AutoModelForMultipleChoice,
}
HEADS = list(AUTO_CLASSES)
VOCAB = 300
# (head, causal): the masked LM is an encoder only; the other heads also run on a causal model
PER_TOKEN_HEADS = [
    (PerformerForMaskedLM, False),
    (PerformerForTokenClassification, False),
    (PerformerForTokenClassification, True),
    (PerformerForQuestionAnswering, False),
    (PerformerForQuestionAnswering, True),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCAB)


def head_config(causal=False, **overrides):
    return tiny_config(**{"vocab_size": VOCAB, "causal": causal, "num_labels": 3, **overrides})


def random_batch(model_class, batch=4, length=10, choices=3, seed=0):
    """Inputs and labels for a head: (B, N) ids, or (B, C, N) for multiple choice."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, choices, length) if model_class is PerformerForMultipleChoice else (batch, length)
    ids = torch.randint(5, VOCAB, shape, generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_class is PerformerForMaskedLM:
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        inputs["labels"] = labels
    elif model_class is PerformerForTokenClassification:
        inputs["labels"] = torch.randint(0, 3, shape, generator=generator)
    elif model_class is PerformerForQuestionAnswering:
        inputs["start_positions"] = torch.randint(0, length // 2, (batch,), generator=generator)
        inputs["end_positions"] = inputs["start_positions"] + 2
    else:
        inputs["labels"] = torch.randint(0, choices, (batch,), generator=generator)
    return inputs


def outputs_of(output) -> list[torch.Tensor]:
    """The tensors a head returns, in a fixed order."""
    return [output.start_logits, output.end_logits] if hasattr(output, "start_logits") else [output.logits]


# -- training --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", HEADS)
def test_every_head_trains_and_gradients_reach_the_embeddings(model_class):
    model = seeded(model_class, head_config(), seed=1).train()
    batch = random_batch(model_class)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(**batch).loss
        assert torch.isfinite(loss), step
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grad = model.get_input_embeddings().weight.grad
            assert grad is not None and grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_masked_lm_trains_on_the_language_modeling_collator(tokenizer):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:8]
    features = [tokenizer(text, truncation=True, max_length=48) for text in texts]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3, seed=0)
    batch = collator(features)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    model = seeded(PerformerForMaskedLM, head_config(), seed=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    with torch.no_grad():  # the loss is the cross-entropy over the masked positions only
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = model(**batch).loss
    masked = batch["labels"] != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[masked], batch["labels"][masked]))


def test_masked_lm_needs_an_encoder():
    with pytest.raises(ValueError, match="causal=False"):
        PerformerForMaskedLM(head_config(causal=True))


def test_masked_lm_decoder_is_the_embedding_matrix(tmp_path):
    model = seeded(PerformerForMaskedLM, head_config(), seed=3)
    assert model.lm_head.decoder.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.decoder.weight is reloaded.model.embed_tokens.weight
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


# -- save / load -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", HEADS)
def test_save_reload_is_bit_identical(tmp_path, model_class):
    model = seeded(model_class, head_config(), seed=4)
    model.redraw_features()  # a drawn projection that is not the initial one must survive too
    model.save_pretrained(tmp_path)
    reloaded = AUTO_CLASSES[model_class].from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    batch = random_batch(model_class, seed=5)
    batch["attention_mask"][..., -3:] = 0
    with torch.no_grad():
        first, second = model(**batch), reloaded(**batch)
    assert torch.equal(first.loss, second.loss)
    for a, b in zip(outputs_of(first), outputs_of(second)):
        assert torch.equal(a, b)
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    for key in state:
        assert torch.equal(state[key], state2[key]), key
    assert reloaded.feature_redraw_count == 1


REMOTE_SCRIPT = HIDE_HF_PERFORMER + textwrap.dedent(
    """

    import transformers
    jobs = json.loads(sys.argv[1])
    loaded = {}
    for name, job in jobs.items():
        model = getattr(transformers, job["auto_class"]).from_pretrained(job["folder"], trust_remote_code=True).eval()
        batch = torch.load(job["inputs"])
        with torch.no_grad():
            output = model(**batch)
        tensors = [output.start_logits, output.end_logits] if hasattr(output, "start_logits") else [output.logits]
        torch.save(tensors, job["inputs"] + ".out")
        loaded[name] = [type(model).__module__, type(model).__name__]
    print(json.dumps(loaded))
    """
)


def test_remote_code_loading_of_every_head_without_the_package(tmp_path):
    jobs, expected = {}, {}
    for model_class in HEADS:
        name = model_class.__name__
        model = seeded(model_class, head_config(), seed=6)
        folder = tmp_path / name
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        auto_class = AUTO_CLASSES[model_class].__name__
        assert config["auto_map"][auto_class] == f"modeling_performer.{name}"
        batch = {key: value for key, value in random_batch(model_class, seed=7).items()
                 if key in ("input_ids", "attention_mask")}
        batch["attention_mask"][..., -2:] = 0
        torch.save(batch, tmp_path / f"{name}.pt")
        with torch.no_grad():
            expected[name] = outputs_of(model(**batch))
        jobs[name] = {"auto_class": auto_class, "folder": str(folder), "inputs": str(tmp_path / f"{name}.pt")}
    script = tmp_path / "load.py"
    script.write_text(REMOTE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(jobs)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name in jobs:
        module, class_name = loaded[name]
        assert class_name == name and not module.startswith("hf_performer")
        remote = torch.load(tmp_path / f"{name}.pt.out")
        for a, b in zip(remote, expected[name]):
            assert torch.equal(a, b), name


# -- padding ---------------------------------------------------------------------------------------------------


def padded_batch(lengths, width, side, seed, pad_token_id=0):
    """(B, width) ids and mask with row i holding lengths[i] real tokens on the right or left of its padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, pad_token_id), mask


def real_span(side, width, n):
    return slice(0, n) if side == "right" else slice(width - n, width)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_class, causal", PER_TOKEN_HEADS)
def test_per_token_heads_are_padding_invariant(model_class, causal, side):
    model = seeded(model_class, head_config(causal=causal), seed=8)
    lengths, width = [12, 7, 3], 12
    ids, mask = padded_batch(lengths, width, side, seed=9)
    with torch.no_grad():
        batched = outputs_of(model(ids, attention_mask=mask))
        for row, n in enumerate(lengths):
            span = real_span(side, width, n)
            alone = outputs_of(model(ids[row : row + 1, span]))
            for together, single in zip(batched, alone):
                torch.testing.assert_close(together[row, span], single[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_multiple_choice_scores_each_choice_as_if_alone(causal, side):
    model = seeded(PerformerForMultipleChoice, head_config(causal=causal), seed=10)
    lengths, width = [[11, 4, 7], [2, 11, 9]], 11  # (B, C) real tokens per choice
    flat_ids, flat_mask = padded_batch([n for row in lengths for n in row], width, side, seed=11)
    ids, mask = flat_ids.view(2, 3, width), flat_mask.view(2, 3, width)  # (B, C, N)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        output = model(ids, attention_mask=mask, labels=labels)
        assert output.logits.shape == (2, 3)
        for b, row in enumerate(lengths):
            for c, n in enumerate(row):
                alone = model(ids[b : b + 1, c : c + 1, real_span(side, width, n)]).logits  # (1, 1)
                torch.testing.assert_close(output.logits[b, c], alone[0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    with torch.no_grad():  # the Trainer's gradient-accumulation normaliser: a sum over num_items_in_batch
        summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(8)).loss
    torch.testing.assert_close(summed, output.loss * 2 / 8)


def test_multiple_choice_refuses_inputs_without_a_choice_dimension():
    model = seeded(PerformerForMultipleChoice, head_config(), seed=12)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(5, VOCAB, (2, 9)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(5, VOCAB, (2, 3, 9)), attention_mask=torch.ones(6, 9, dtype=torch.long))


# -- per-head losses and masking -------------------------------------------------------------------------------


def test_question_answering_masks_padded_positions_and_ignores_outside_answers():
    model = seeded(PerformerForQuestionAnswering, head_config(), seed=13)
    ids, mask = padded_batch([10, 6], 10, "right", seed=14)
    start, end = torch.tensor([2, 1]), torch.tensor([4, 3])
    with torch.no_grad():
        output = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
    lowest = torch.finfo(output.start_logits.dtype).min
    for logits in (output.start_logits, output.end_logits):
        assert torch.all(logits[mask == 0] == lowest)
        assert torch.all(logits[mask == 1] > lowest)
        assert torch.all(mask.gather(1, logits.argmax(-1, keepdim=True)) == 1)  # the best span is never padding
    cross_entropy = torch.nn.functional.cross_entropy
    manual = (cross_entropy(output.start_logits, start) + cross_entropy(output.end_logits, end)) / 2
    torch.testing.assert_close(output.loss, manual)
    # an answer outside the (truncated) sequence is ignored, as in BERT: only row 0 counts
    with torch.no_grad():
        outside = model(ids, attention_mask=mask, start_positions=torch.tensor([2, 50]),
                        end_positions=torch.tensor([4, 50])).loss
    manual = (cross_entropy(output.start_logits[:1], start[:1]) + cross_entropy(output.end_logits[:1], end[:1])) / 2
    torch.testing.assert_close(outside, manual)


def test_token_classification_loss_ignores_minus_100():
    model = seeded(PerformerForTokenClassification, head_config(), seed=15)
    ids, mask = padded_batch([9, 5], 9, "right", seed=16)
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(17))
    labels[mask == 0] = -100
    labels[0, 3] = -100  # a sub-word continuation
    with torch.no_grad():
        output = model(ids, attention_mask=mask, labels=labels)
    kept = labels != -100
    assert int(kept.sum()) == 13
    manual = torch.nn.functional.cross_entropy(output.logits[kept], labels[kept])
    torch.testing.assert_close(output.loss, manual)


# -- pipelines -------------------------------------------------------------------------------------------------


def save_with_tokenizer(model_class, tokenizer, folder, seed, **config):
    model = seeded(model_class, head_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            **config), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_fill_mask_pipeline_on_a_saved_model(tokenizer, tmp_path):
    model = save_with_tokenizer(PerformerForMaskedLM, tokenizer, tmp_path, seed=18)
    fill = pipeline("fill-mask", model=str(tmp_path))
    assert isinstance(fill.model, PerformerForMaskedLM)
    text = f"the {tokenizer.mask_token} statement is used to wrap the execution of a block"
    candidates = fill(text, top_k=4)
    assert len(candidates) == 4
    assert all({"score", "token", "token_str", "sequence"} <= set(c) for c in candidates)
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    # the pipeline's top-k are the model's own: softmax over the vocabulary at the mask position
    encoded = tokenizer(text, return_tensors="pt")
    position = int((encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    with torch.no_grad():
        probabilities = model(**encoded).logits[0, position].softmax(-1)
    top = probabilities.topk(4)
    assert [c["token"] for c in candidates] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(scores), top.values, rtol=1e-5, atol=1e-6)
    # two masks: one top-k list per mask
    two = fill(f"the {tokenizer.mask_token} statement {tokenizer.mask_token}", top_k=3)
    assert len(two) == 2 and all(len(per_mask) == 3 for per_mask in two)


def test_token_classification_pipeline_on_a_saved_model(tokenizer, tmp_path):
    model = save_with_tokenizer(PerformerForTokenClassification, tokenizer, tmp_path, seed=19)
    tagger = pipeline("token-classification", model=str(tmp_path))
    text = "the with statement is used to wrap the execution of a block"
    entities = tagger(text)
    assert isinstance(tagger.model, PerformerForTokenClassification)
    assert entities and all(text[e["start"]:e["end"]].lower() == e["word"] for e in entities)
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits[0].argmax(-1)
    for entity in entities:
        assert entity["entity"] == model.config.id2label[int(predicted[entity["index"]])]


@pytest.mark.skipif("question-answering" not in SUPPORTED_TASKS,
                    reason="this transformers has no question-answering pipeline (removed in 5.24); the model card's "
                           "hand decoding is run in test_model_card_heads.py")
def test_question_answering_pipeline_on_a_saved_model(tokenizer, tmp_path):
    save_with_tokenizer(PerformerForQuestionAnswering, tokenizer, tmp_path, seed=20)
    answerer = pipeline("question-answering", model=str(tmp_path))
    assert isinstance(answerer.model, PerformerForQuestionAnswering)
    context = "the with statement is used to wrap the execution of a block with methods defined by a context manager"
    answers = answerer(question="what does the with statement wrap", context=context, top_k=2)
    assert len(answers) == 2
    for answer in answers:
        assert 0 <= answer["start"] < answer["end"] <= len(context)
        assert context[answer["start"]:answer["end"]] == answer["answer"]
        assert 0.0 <= answer["score"] <= 1.0
