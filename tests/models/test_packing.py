"""Padding-free packed training: documents concatenated in one row with restarting positions
(``DataCollatorWithFlattening``) or flash-attention's ``cu_seq_lens``. Every attention kind resets at the
boundaries, so logits, loss and gradients equal each document run alone (before, attention leaked across
documents: logits differed by 0.18)."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from hf_performer import PerformerCache, PerformerForCausalLM, PerformerModel

from helpers import seeded, tiny_config

KINDS = {
    "favor+ chunked": dict(attention_implementation="chunked"),
    "favor+ quadratic": dict(attention_implementation="quadratic"),
    "favor+ triton": dict(attention_implementation="triton"),  # Triton's CPU interpreter without a GPU
    "relu": dict(feature_map="relu"),
    "exact": dict(feature_map="exact"),
    "local heads + token shift": dict(local_attn_heads=1, local_window_size=4, shift_tokens=True),
    "windowed": dict(use_causal_windowed=True, causal_window_length=2, causal_chunk_length=2),
    "begin_kernel": dict(begin_kernel=3),
}
LENGTHS = (7, 13, 4, 10)


def documents(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=generator).tolist() for n in LENGTHS]


def embedding_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return model.model.embed_tokens.weight.grad.clone()


@pytest.mark.parametrize("kind", KINDS)
def test_packed_causal_lm_equals_each_document_alone(kind):
    model = seeded(PerformerForCausalLM, tiny_config(**KINDS[kind]))
    docs = documents()
    batch = DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    alone = [model(input_ids=torch.tensor([doc]), labels=torch.tensor([doc])) for doc in docs]
    torch.testing.assert_close(packed.logits[0], torch.cat([out.logits[0] for out in alone]), rtol=1e-5, atol=1e-5)
    # the collator masks each document's first label, so the packed loss is the token-weighted mean of the others
    weights = torch.tensor([n - 1 for n in LENGTHS], dtype=torch.float32)
    expected_loss = (torch.stack([out.loss for out in alone]) * weights).sum() / weights.sum()
    torch.testing.assert_close(packed.loss, expected_loss, rtol=1e-5, atol=1e-6)
    grad_packed = embedding_grad(model, packed.loss)
    grad_alone = embedding_grad(model, expected_loss)
    torch.testing.assert_close(grad_packed, grad_alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [dict(feature_map="favor++"), dict(shift_tokens=True, local_attn_heads=1,
                                                                      local_window_size=3)])
def test_packed_encoder_by_positions_or_cu_seqlens_equals_each_document_alone(options):
    model = seeded(PerformerModel, tiny_config(causal=False, **options))
    docs = documents(1)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": doc} for doc in docs])
    alone = torch.cat([model(input_ids=torch.tensor([doc])).last_hidden_state[0] for doc in docs])
    by_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state[0]
    by_cu_seqlens = model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"]).last_hidden_state[0]
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu_seqlens, alone, rtol=1e-5, atol=1e-5)


def test_left_padding_is_not_mistaken_for_packing_and_a_packed_cache_is_refused():
    model = seeded(PerformerForCausalLM, tiny_config())
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes: the real tokens start at 0
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits[mask.bool()],
                               model(ids, attention_mask=mask).logits[mask.bool()])
    batch = DataCollatorWithFlattening()([{"input_ids": doc} for doc in documents()])
    with pytest.raises(ValueError, match="packed documents"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], past_key_values=PerformerCache(model.config))
