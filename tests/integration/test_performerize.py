"""examples/performerize.py end to end, shortened: a softmax model saved locally is switched to kernel attention
and its quality recovers by distillation (measured against the softmax model's own perplexity)."""

from helpers import load_example


def test_performerize_recovers_quality(tmp_path):
    example = load_example("performerize")
    args = example.parse_args([
        "--teacher", str(tmp_path / "teacher"), "--output", str(tmp_path / "student"), "--quiet",
        "--teacher-steps", "120", "--distill-steps", "30", "--finetune-steps", "20", "--nb-features", "32",
        "--seq-len", "64", "--eval-windows", "24",
    ])
    outcome = example.run(args)
    ppl = outcome["perplexity"]
    original = ppl["softmax (original)"]
    assert original < 40  # the teacher learned something (uniform over bytes is 256)
    before, after = outcome["attention_error"]
    assert after < 0.8 * before  # layer-wise attention distillation reduces the attention-output error
    assert ppl["+ logit distillation fine-tune"] < ppl["performer, no recovery"]
    assert (tmp_path / "teacher" / "config.json").exists() and (tmp_path / "student" / "config.json").exists()
