"""Runs transformers' own common model tests against the Performer classes.

Not part of CI: the mixins live in transformers' test tree (``tests/`` of the transformers repository or of its
sdist), which is not installed with the wheel. Point ``HFP_TRANSFORMERS_TESTS_DIR`` at that folder, or use
``scripts/transformers_common_tests.py --tests-dir DIR``, which sets it and runs this module.

What is imported from the tree, at run time only: ``ModelTesterMixin`` and the tensor helpers from
``test_modeling_common.py``, ``ConfigTester`` from ``test_configuration_common.py`` and ``GenerationTesterMixin``
from ``generation/test_utils.py``. The PyPI sdist ships only the top-level ``tests/*.py`` files, so
``generation/test_utils.py``, ``exporters/test_export.py`` (``ExportTesterMixin``, the torch.export tests) and
``utils/test_configuration_utils.py`` may be missing: each missing one is replaced by an empty stand-in (listed in
``MISSING_FROM_TREE`` and printed in the run's header), so that the rest still runs. Those tests are then simply not
collected; nothing is faked to pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import unittest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_performer  # noqa: E402  (registers model_type "performer" with the Auto classes)
from hf_performer import (  # noqa: E402
    PerformerConfig,
    PerformerForCausalLM,
    PerformerForSequenceClassification,
    PerformerModel,
)

# The tree is imported as a package under this name, so its relative imports work and it cannot collide with this
# project's own ``tests`` folder.
TREE_PACKAGE = "hf_transformers_tests"
MISSING_FROM_TREE: list[str] = []


def _tests_dir() -> str:
    path = os.environ.get("HFP_TRANSFORMERS_TESTS_DIR")
    if not path:
        pytest.skip("HFP_TRANSFORMERS_TESTS_DIR is not set: run scripts/transformers_common_tests.py --tests-dir DIR",
                    allow_module_level=True)
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "test_modeling_common.py")):
        raise RuntimeError(f"{path} has no test_modeling_common.py: pass transformers' tests/ folder")
    return path


def _stand_in(module_name: str, **attributes) -> None:
    """Register an empty module for a file the tree lacks (only when it really lacks it)."""
    module = types.ModuleType(module_name)
    module.__dict__.update(attributes)
    module.__dict__["__hfp_stand_in__"] = True
    sys.modules[module_name] = module
    parent, _, child = module_name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def _import_tree():
    tests_dir = _tests_dir()
    # transformers' tests/ has no __init__.py: declare the package by hand, its files found through __path__.
    package = types.ModuleType(TREE_PACKAGE)
    package.__path__ = [tests_dir]
    sys.modules[TREE_PACKAGE] = package

    def present(relative: str) -> bool:
        return os.path.isfile(os.path.join(tests_dir, relative))

    for subpackage in ("generation", "exporters", "utils"):
        name = f"{TREE_PACKAGE}.{subpackage}"
        if os.path.isdir(os.path.join(tests_dir, subpackage)):
            importlib.import_module(name)
        else:
            _stand_in(name, __path__=[])

    if not present("exporters/test_export.py"):
        MISSING_FROM_TREE.append("exporters/test_export.py (ExportTesterMixin: the torch.export tests)")
        _stand_in(f"{TREE_PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    if not present("utils/test_configuration_utils.py"):
        MISSING_FROM_TREE.append("utils/test_configuration_utils.py (config_common_kwargs, replaced by our own set)")
        # Non-default values for PreTrainedConfig's own arguments, read back by ConfigTester.check_config_arguments_init.
        own_common_kwargs = {
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 3,
            "architectures": ["PerformerModel"],
            "id2label": {0: "only"},
            "label2id": {"only": "0"},
            "problem_type": "regression",
        }
        _stand_in(f"{TREE_PACKAGE}.utils.test_configuration_utils", config_common_kwargs=own_common_kwargs)
    if not present("generation/test_utils.py"):
        MISSING_FROM_TREE.append("generation/test_utils.py (GenerationTesterMixin: the generate() tests)")
        # test_modeling_common imports GenerationTesterMixin from here, and test_utils imports test_modeling_common:
        # the stand-in only has to exist before test_modeling_common is imported.
        _stand_in(
            f"{TREE_PACKAGE}.generation.test_utils",
            GenerationTesterMixin=type("GenerationTesterMixin", (), {"all_generative_model_classes": ()}),
        )

    # test_configuration_common loads ``tests/__init__.py`` as a stand-in ``transformers`` module (and never uses
    # it); the sdist's tests/ has no such file, so hand it the installed transformers instead when it is missing.
    import transformers
    import transformers.utils as transformers_utils

    original_direct_import = transformers_utils.direct_transformers_import
    if not present("__init__.py"):
        transformers_utils.direct_transformers_import = lambda path, *args, **kwargs: transformers
    try:
        common = importlib.import_module(f"{TREE_PACKAGE}.test_modeling_common")
        config_common = importlib.import_module(f"{TREE_PACKAGE}.test_configuration_common")
    finally:
        transformers_utils.direct_transformers_import = original_direct_import
    generation = importlib.import_module(f"{TREE_PACKAGE}.generation.test_utils")
    return common, config_common, generation


_common, _config_common, _generation = _import_tree()
ModelTesterMixin = _common.ModelTesterMixin
ids_tensor = _common.ids_tensor
random_attention_mask = _common.random_attention_mask
ConfigTester = _config_common.ConfigTester
GenerationTesterMixin = _generation.GenerationTesterMixin


def _declare_performer_in_auto_names() -> None:
    """Several common tests pick the model's *role* from the Auto classes' ``*_MAPPING_NAMES`` tables (which head
    gets ``labels``, which one is a causal LM whose loss must honour ``shift_labels``). ``AutoModel*.register`` does
    not write to those tables, so without this a Performer head would be treated as a bare model and those checks
    would silently skip. Only the name tables are touched, not CONFIG_MAPPING_NAMES, so the Auto classes still find
    Performer through its registration."""
    from transformers.models.auto import modeling_auto

    for table, name in (
        ("MODEL_MAPPING_NAMES", "PerformerModel"),
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "PerformerForCausalLM"),
        ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "PerformerForSequenceClassification"),
    ):
        getattr(modeling_auto, table).setdefault("performer", name)


_declare_performer_in_auto_names()


class PerformerModelTester:
    """Builds a tiny causal Performer and the inputs the mixins expect (the same shapes transformers' own testers
    use: batch 13, length 7, vocabulary 99)."""

    config_class = PerformerConfig
    base_model_class = PerformerModel
    causal_lm_class = PerformerForCausalLM
    sequence_classification_class = PerformerForSequenceClassification

    def __init__(self, parent, batch_size=13, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, nb_features=16, attention_chunk_size=8, max_position_embeddings=512,
                 num_labels=3, type_sequence_label_size=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 is_training=True, use_input_mask=True, use_labels=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.nb_features = nb_features
        self.attention_chunk_size = attention_chunk_size
        self.max_position_embeddings = max_position_embeddings
        self.num_labels = num_labels
        self.type_sequence_label_size = type_sequence_label_size
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels

    @property
    def all_model_classes(self):
        return (self.base_model_class, self.causal_lm_class, self.sequence_classification_class)

    def get_config(self) -> PerformerConfig:
        return PerformerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            nb_features=self.nb_features,
            attention_chunk_size=self.attention_chunk_size,
            max_position_embeddings=self.max_position_embeddings,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        # Token ids start above the special ids so that no sequence is mistaken for padding.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        attention_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels) if self.use_labels else None
        return self.get_config(), input_ids, attention_mask, sequence_labels, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, _, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}

    def create_and_check_model(self, config, input_ids, attention_mask, *unused):
        model = self.base_model_class(config).eval()
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
            result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


# Tests whose premise does not hold for a kernel-attention model. Each skip names the premise; anything that fails
# for another reason is left to fail.
PREMISE_SKIPS: dict[str, str] = {}


class PerformerModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (PerformerModel, PerformerForCausalLM, PerformerForSequenceClassification)
    # Kernel attention never forms the (N, N) attention weights, so there are none to return.
    has_attentions = False
    # Absolute positions are not the default (rotary has no table to resize).
    test_resize_position_embeddings = False

    def setUp(self):
        self.model_tester = PerformerModelTester(self)
        # PerformerConfig wants an even head dim (rotary), so not the hidden_size=37 transformers' testers use.
        self.config_tester = ConfigTester(
            self, config_class=PerformerConfig, hidden_size=40, num_attention_heads=4, nb_features=16
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_sequence_classification_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        labels = ids_tensor([self.model_tester.batch_size], self.model_tester.type_sequence_label_size)
        model = PerformerForSequenceClassification(config).eval()
        result = model(**inputs, labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels))
        self.assertTrue(torch.isfinite(result.loss))


def _apply_premise_skips(cls) -> None:
    """Skip each test named in PREMISE_SKIPS, and its parameterized variants (``name_0_...``)."""
    for attr in dir(cls):
        for name, reason in PREMISE_SKIPS.items():
            if attr == name or attr.startswith(name + "_0") or attr.startswith(name + "_1"):
                setattr(cls, attr, unittest.skip(reason)(getattr(cls, attr)))


_apply_premise_skips(PerformerModelTest)


def test_tree_report():
    """Always runs: records which files of the tree were missing (their tests were not collected)."""
    print("transformers test tree:", os.environ.get("HFP_TRANSFORMERS_TESTS_DIR"))
    for entry in MISSING_FROM_TREE:
        print("  missing, not run:", entry)
