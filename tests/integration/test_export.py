"""Deployment: torch.export with dynamic batch and length (with and without a padding mask), ONNX through
onnxruntime on lengths other than the traced one, and torch.compile(fullgraph=True) with padding. Each failed
before: a data-dependent "is the mask all ones?" branch, a guard on the length from the path choice, and ONNX's
missing cummax and chunked op."""

import pytest
import torch
from torch.export import Dim, export

from hf_performer import PerformerForCausalLM, PerformerModel

from helpers import seeded, tiny_config

CASES = {
    "encoder": (PerformerModel, dict(causal=False), "last_hidden_state"),
    "causal lm": (PerformerForCausalLM, dict(use_cache=False), "logits"),
    "causal lm, exact": (PerformerForCausalLM, dict(use_cache=False, feature_map="exact"), "logits"),
    "causal lm, relu + absolute": (PerformerForCausalLM, dict(use_cache=False, feature_map="relu",
                                                            position_embedding_type="absolute"), "logits"),
}


def padded(batch: int, length: int, pad: int, seed: int):
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on one row
    return ids.masked_fill(mask == 0, 0), mask


class Output(torch.nn.Module):
    """One tensor out, for exporters that want plain outputs."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[self.key]


DYNAMIC = {0: Dim("batch", min=1, max=32), 1: Dim("length", min=2, max=200)}


@pytest.mark.parametrize(("name", "with_mask"), [(name, True) for name in CASES] + [("causal lm", False)])
def test_torch_export_with_dynamic_batch_and_length(name, with_mask):
    model_class, options, key = CASES[name]
    wrapped = Output(seeded(model_class, tiny_config(**options)), key)
    ids, mask = padded(2, 12, 3, seed=0)
    args = (ids, mask if with_mask else torch.ones_like(mask))
    program = export(wrapped, args, dynamic_shapes=(DYNAMIC, DYNAMIC), strict=False)
    for batch, length in ((3, 21), (1, 5), (4, 64)):
        ids, mask = padded(batch, length, 4 if with_mask else 0, seed=length)
        torch.testing.assert_close(program.module()(ids, mask), wrapped(ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["encoder", "causal lm"])
def test_onnx_export_agrees_with_onnxruntime_on_other_lengths(name, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    pytest.importorskip("onnxscript", reason="onnxscript is a test extra")
    model_class, options, key = CASES[name]
    wrapped = Output(seeded(model_class, tiny_config(**options)), key)
    ids, mask = padded(2, 12, 3, seed=0)
    program = torch.onnx.export(wrapped, (ids, mask), dynamo=True, dynamic_shapes=(DYNAMIC, DYNAMIC))
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, length in ((3, 21), (1, 40)):
        ids, mask = padded(batch, length, 5, seed=length)
        (got,) = session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})
        expected = wrapped(ids, mask).detach()
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_with_padding_matches_eager():
    model = seeded(PerformerForCausalLM, tiny_config(use_cache=False))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for length in (9, 30):
        ids, mask = padded(2, length, 4, seed=length)
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


def test_an_exported_decode_step_continues_the_prompt_at_every_batch_size():
    from hf_performer.decode_step import PerformerDecodeStep

    model = seeded(PerformerForCausalLM, tiny_config())
    step = PerformerDecodeStep(model)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    kv, log_scale, positions = step.initial_state(model(ids, use_cache=True).past_key_values)
    batch = Dim("batch", min=1, max=32)
    program = export(step, (ids[:, :1], positions, kv, log_scale),
                     dynamic_shapes=({0: batch}, {0: batch}, {1: batch}, {1: batch}), strict=False)
    for rows in (3, 1):  # batch sizes other than the traced one, three steps each
        ids = torch.randint(3, 97, (rows, 5), generator=torch.Generator().manual_seed(rows))
        kv, log_scale, positions = step.initial_state(model(ids, use_cache=True).past_key_values)
        sequence = ids
        for _ in range(3):
            logits, kv, log_scale = program.module()(sequence[:, -1:] * 0 + 7, positions, kv, log_scale)
            sequence = torch.cat([sequence, torch.full((rows, 1), 7)], dim=1)
            positions = positions + 1
            torch.testing.assert_close(logits, model(sequence).logits[:, -1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shift_tokens"):
        PerformerDecodeStep(seeded(PerformerForCausalLM, tiny_config(shift_tokens=True)))
