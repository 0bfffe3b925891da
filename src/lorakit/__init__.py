"""lorakit: Low-Rank Adaptation for transformer models.

Two faces over one implementation: the PEFT-style API (LoraConfig, get_peft_model, PeftModel) and
plain functions over any torch nn.Module (add_adapter, save_adapter, merge_and_unload, ...).
"""

from .adapters import (
    active_adapters,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_report,
    unload,
    unmerge,
)
from .checkpoint import load_adapter, read_adapter, save_adapter
from .combine import CombineReport, add_weighted_adapter, combine_adapters, negate_adapter
from .combine_dirs import combine_adapter_dirs
from .config import LoraConfig
from .errors import LorakitError
from .layers import LoraLayer
from .peft_compat import (
    LoraModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .models import compile_layers, enable_checkpointing, load_model
from .quant import merge_to_full_precision, quantization_config, quantize_model, weight_memory_report
from .routing import adapter_rows
from .runs import RunConfig, load_run
from .variants import lora_plus_optimizer, lora_plus_param_groups



__version__ = "0.1.0"
TaskType = type("TaskType", (), {t: t for t in ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS",
                                                 "QUESTION_ANS", "FEATURE_EXTRACTION")})
