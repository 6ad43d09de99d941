"""Writes the regression checkpoints in tests/data/checkpoints: tiny random models saved by an earlier version of
hf_performer, with the logits that version computed on fixed (padded) inputs. tests check that today's code loads
them and computes the same logits. Run once with the version being frozen; do not rerun to "fix" a failing test.

    python tests/data/make_checkpoints.py
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import hf_performer  # noqa: E402
from hf_performer import PerformerConfig, PerformerForCausalLM, PerformerForSequenceClassification  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "checkpoints")
BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, nb_features=16,
            max_position_embeddings=256, attention_chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    "causal_favor": (PerformerForCausalLM, {}),
    "causal_mixed": (PerformerForCausalLM, dict(local_attn_heads=[1, 2], local_window_size=4, shift_tokens=True,
                                                ff_glu=True, norm_type="scalenorm", local_rotary=True,
                                                position_embedding_type="absolute", begin_kernel=3)),
    "causal_windowed": (PerformerForCausalLM, dict(use_causal_windowed=True, causal_window_length=2,
                                                   causal_window_decay=0.9, feature_map="relu")),
    "causal_exact": (PerformerForCausalLM, dict(feature_map="exact", norm_type="rmsnorm")),
    "encoder_relu": (PerformerForSequenceClassification, dict(causal=False, feature_map="relu", num_labels=3,
                                                              position_embedding_type="axial",
                                                              axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16],
                                                              local_attn_heads=1, local_window_size=3)),
    "encoder_favorpp": (PerformerForSequenceClassification, dict(causal=False, feature_map="favor++", num_labels=2,
                                                                 scale_by_length=True)),
}


def inputs() -> dict:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 97, (3, 21), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding
    attention_mask[2, -7:] = 0  # right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def main() -> None:
    torch.manual_seed(0)
    batch = inputs()
    for name, (model_class, options) in CASES.items():
        config = PerformerConfig(**{**BASE, **options, "feature_seed": 7})
        model = model_class(config).eval()
        if name == "causal_favor":
            model.redraw_features()  # the saved projections are not the fresh-model draw
        folder = os.path.join(HERE, name)
        model.save_pretrained(folder)
        os.remove(os.path.join(folder, "README.md"))
        for path in os.listdir(folder):  # remote code is not part of the fixture
            if path.endswith(".py"):
                os.remove(os.path.join(folder, path))
        with torch.no_grad():
            logits = model(**batch).logits
        save_file({**batch, "logits": logits.contiguous()}, os.path.join(folder, "expected.safetensors"))
        print(name, tuple(logits.shape), float(logits.abs().mean()))


if __name__ == "__main__":
    main()
