"""Model cards per head: pipeline tag, wording and a usage snippet that runs; the template ships in the package."""

import contextlib
import io
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers.pipelines import SUPPORTED_TASKS

import hf_performer
from hf_performer import (
    PerformerForCausalLM,
    PerformerForMaskedLM,
    PerformerForMultipleChoice,
    PerformerForQuestionAnswering,
    PerformerForSequenceClassification,
    PerformerForTokenClassification,
    PerformerModel,
)
from hf_performer.model_card import CARD_TASKS, TEMPLATE_PATH, build_model_card

from helpers import REPO, build_tokenizer, tiny_config

REPO_ROOT = REPO
# (head, causal, pipeline tag, Auto class)
CARDS = [
    (PerformerForCausalLM, True, "text-generation", "AutoModelForCausalLM"),
    (PerformerForMaskedLM, False, "fill-mask", "AutoModelForMaskedLM"),
    (PerformerForSequenceClassification, False, "text-classification", "AutoModelForSequenceClassification"),
    (PerformerForTokenClassification, False, "token-classification", "AutoModelForTokenClassification"),
    (PerformerForQuestionAnswering, False, "question-answering", "AutoModelForQuestionAnswering"),
    (PerformerForMultipleChoice, False, "multiple-choice", "AutoModelForMultipleChoice"),
    (PerformerModel, False, "feature-extraction", "AutoModel"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def usage_snippet(card: ModelCard) -> str:
    return re.search(r"## Usage.*?```python\n(.*?)```", card.text, re.S).group(1)


@pytest.mark.parametrize("model_class, causal, pipeline_tag, auto_class", CARDS)
def test_card_follows_the_head(model_class, causal, pipeline_tag, auto_class):
    torch.manual_seed(0)
    model = model_class(tiny_config(causal=causal, num_labels=3))
    card = build_model_card(model, repo_id="someone/tiny", metrics={"loss": 1.5})
    assert card.data.pipeline_tag == pipeline_tag
    assert card.data.eval_results[0].task_type == pipeline_tag
    snippet = usage_snippet(card)
    assert f'{auto_class}.from_pretrained("someone/tiny", trust_remote_code=True)' in snippet
    if pipeline_tag in SUPPORTED_TASKS:
        assert f'pipeline("{pipeline_tag}"' in snippet
    else:  # multiple choice, and question answering since transformers 5.24: no pipeline to call
        assert "pipeline(" not in snippet
    assert CARD_TASKS[model_class.__name__].model_kind in card.text
    generates = pipeline_tag == "text-generation"
    assert ("generation keeps a" in card.text) == generates
    assert ("language model." in card.text.split("## Usage")[0]) == (model_class is PerformerForCausalLM)


@pytest.mark.parametrize("model_class, causal, pipeline_tag, auto_class", CARDS)
def test_card_usage_snippet_runs_on_the_saved_folder(model_class, causal, pipeline_tag, auto_class, tokenizer,
                                                     tmp_path):
    torch.manual_seed(1)
    config = tiny_config(causal=causal, num_labels=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    card = ModelCard(build_model_card(model, repo_id=str(tmp_path)).content)
    snippet = usage_snippet(card).replace("max_new_tokens=100", "max_new_tokens=3")  # the same code, faster
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        exec(compile(snippet, f"<{pipeline_tag} card>", "exec"), {})
    assert printed.getvalue().strip() or pipeline_tag == "feature-extraction"


def test_template_is_package_data():
    assert TEMPLATE_PATH.parent == Path(hf_performer.__file__).resolve().parent
    assert TEMPLATE_PATH.is_file()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*\nhf_performer = \[[^\]]*"model_card_template\.md"',
                     pyproject)


CARD_FROM_WHEEL = textwrap.dedent(
    """
    import sys
    import hf_performer
    from hf_performer import PerformerConfig, PerformerForMaskedLM
    assert hf_performer.__file__.startswith(sys.argv[1]), hf_performer.__file__
    config = PerformerConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, causal=False)
    PerformerForMaskedLM(config).save_pretrained(sys.argv[2])
    """
)


def test_a_wheel_install_writes_the_full_card(tmp_path):
    """Build the wheel, install it into a folder of its own (no editable install, no repository on the path) and
    let save_pretrained write a card there: the package's template, not huggingface_hub's fallback."""
    started = time.monotonic()
    source, wheels, target, saved = tmp_path / "src", tmp_path / "wheels", tmp_path / "site", tmp_path / "saved"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):  # a copy: setuptools writes build/ and egg-info beside the source
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hf_performer", source / "hf_performer", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=180)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("hf_performer-*.whl")
    assert "hf_performer/model_card_template.md" in zipfile.ZipFile(wheel).namelist()
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "card.py"
    script.write_text(CARD_FROM_WHEEL)
    result = subprocess.run(
        [sys.executable, str(script), str(target), str(saved)], capture_output=True, text=True, cwd=tmp_path,
        timeout=180, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(target),
                          "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard.load(saved / "README.md")
    assert card.data.pipeline_tag == "fill-mask"
    assert 'pipeline("fill-mask"' in card.text and "| architecture | PerformerForMaskedLM |" in card.text
    assert time.monotonic() - started < 120
