"""lorakit: Low-Rank Adaptation for transformer models.

Two faces over one implementation: the PEFT-style API (LoraConfig, get_peft_model, PeftModel) and
plain functions over any torch nn.Module (add_adapter, save_adapter, merge_and_unload, ...). This file
re-exports the public API and nothing else; the package tree is the architecture (README, Layout).
"""

from . import _compat
from .adapters import (
    active_adapters,
    adapter_rows,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    merge_to_full_precision,
    read_adapter,
    save_adapter,
    set_adapter,
    trainable_report,
    unload,
    unmerge,
)
from .combine import CombineReport, add_weighted_adapter, combine_adapter_dirs, combine_adapters, negate_adapter
from .config import BdLoraConfig, LoraConfig, VeloraConfig
from .errors import LorakitError
from .layers import LoraLayer
from .models import compile_layers, enable_checkpointing, load_model
from .models.quantize import quantization_config, quantize_model, weight_memory_report
from .peft_compat import (
    LoraModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftType,
    TaskType,
    TrainableTokensWrapper,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .train import RunConfig, load_run, lora_plus_optimizer, lora_plus_param_groups

_compat.install()

__version__ = "0.1.0"
__all__ = [
    "BdLoraConfig",
    "CombineReport",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LorakitError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "RunConfig",
    "TaskType",
    "TrainableTokensWrapper",
    "VeloraConfig",
    "active_adapters",
    "adapter_rows",
    "add_adapter",
    "add_weighted_adapter",
    "combine_adapter_dirs",
    "combine_adapters",
    "compile_layers",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_checkpointing",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_adapter",
    "load_model",
    "load_run",
    "lora_layers",
    "lora_plus_optimizer",
    "lora_plus_param_groups",
    "merge",
    "merge_and_unload",
    "merge_to_full_precision",
    "negate_adapter",
    "quantization_config",
    "quantize_model",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "trainable_report",
    "unload",
    "unmerge",
    "weight_memory_report",
]
