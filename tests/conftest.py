import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels are tested in Triton's CPU interpreter (read when a kernel is defined, so before
# hf_performer.ops_triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_performer  # noqa: E402  (registers the Auto classes)
from hf_performer import PerformerConfig  # noqa: E402


def tiny_config(**overrides) -> PerformerConfig:
    """A model small enough for CPU tests, large enough to have several heads and layers."""
    options = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        nb_features=16,
        max_position_embeddings=256,
        attention_chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    options.update(overrides)
    return PerformerConfig(**options)


@pytest.fixture
def make_config():
    return tiny_config
