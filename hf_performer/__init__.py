"""hf_performer: Performer (kernel / linear attention) models as first-class Hugging Face Transformers models.

Importing the package registers ``model_type="performer"`` with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

# Importing attention_backend registers attn_implementation="performer" with transformers.
from .attention_backend import PerformerKernel, prepare_model_for_performer_attention
from .cache_performer import PerformerCache
from .callbacks import PerformerFeatureRedrawCallback
from .configuration_performer import PerformerConfig
from .convert_performer_pytorch import convert_performer_pytorch
from .decode_step import PerformerDecodeStep
from .feature_maps import (
    FEATURE_MAPS,
    FeatureMap,
    RandomProjectionFeatureMap,
    available_feature_maps,
    get_feature_map_class,
    register_feature_map,
)
from .kernel_attention import KernelAttention
from .modeling_performer import (
    PerformerForCausalLM,
    PerformerForMaskedLM,
    PerformerForMultipleChoice,
    PerformerForQuestionAnswering,
    PerformerForSequenceClassification,
    PerformerForTokenClassification,
    PerformerModel,
    PerformerPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("performer", PerformerConfig, exist_ok=True)
AutoModel.register(PerformerConfig, PerformerModel, exist_ok=True)
AutoModelForCausalLM.register(PerformerConfig, PerformerForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PerformerConfig, PerformerForSequenceClassification, exist_ok=True)
AutoModelForMaskedLM.register(PerformerConfig, PerformerForMaskedLM, exist_ok=True)
AutoModelForTokenClassification.register(PerformerConfig, PerformerForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(PerformerConfig, PerformerForQuestionAnswering, exist_ok=True)
AutoModelForMultipleChoice.register(PerformerConfig, PerformerForMultipleChoice, exist_ok=True)

# save_pretrained() copies the modeling code and writes `auto_map`, so checkpoints load with trust_remote_code=True
# where hf_performer is not installed.
PerformerConfig.register_for_auto_class()
PerformerModel.register_for_auto_class("AutoModel")
PerformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PerformerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
PerformerForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
PerformerForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
PerformerForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
PerformerForMultipleChoice.register_for_auto_class("AutoModelForMultipleChoice")

_LAZY = {  # the linearization pipeline imports Trainer: loaded on first use, not with the package
    "linearize": "linearization",
    "LinearizeArguments": "linearization",
    "convert_llama_to_performer": "convert_llama",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "linearize",
    "LinearizeArguments",
    "convert_llama_to_performer",
    "PerformerKernel",
    "prepare_model_for_performer_attention",
    "convert_performer_pytorch",
    "PerformerConfig",
    "PerformerModel",
    "PerformerForCausalLM",
    "PerformerForSequenceClassification",
    "PerformerForMaskedLM",
    "PerformerForTokenClassification",
    "PerformerForQuestionAnswering",
    "PerformerForMultipleChoice",
    "PerformerPreTrainedModel",
    "PerformerCache",
    "PerformerDecodeStep",
    "PerformerFeatureRedrawCallback",
    "FeatureMap",
    "RandomProjectionFeatureMap",
    "FEATURE_MAPS",
    "available_feature_maps",
    "get_feature_map_class",
    "register_feature_map",
    "KernelAttention",
]
