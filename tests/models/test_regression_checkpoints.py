"""Checkpoints saved by an earlier version (tests/data/make_checkpoints.py) load and compute the same logits."""

import os

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import CHECKPOINTS

HERE = str(CHECKPOINTS)
CASES = sorted(os.listdir(HERE))


@pytest.mark.parametrize("name", CASES)
def test_saved_checkpoint_logits_unchanged(name):
    folder = os.path.join(HERE, name)
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    auto = AutoModelForSequenceClassification if name.startswith("encoder") else AutoModelForCausalLM
    model = auto.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
