"""The PEFT-style face: code written for PEFT runs with only the import changed.

    from lorakit import LoraConfig, get_peft_model, PeftModel
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters(); model.save_pretrained("adapter")
    model = PeftModel.from_pretrained(base_model, "adapter")

    model.py   PeftModel, LoraModel, get_peft_model, PeftModelFor* (thin calls into adapters/, combine/)
    state.py   get/set_peft_model_state_dict, inject_adapter_in_model, get/set_base_model_state_dict
    card.py    the model card README.md written next to a saved adapter

Where lorakit differs from PEFT on purpose: docs/peft-compat.md.
"""

from ..adapters import TokenWrapper as TrainableTokensWrapper  # PEFT's name of the wrapped embedding
from ..config import PeftType, TaskType, VeloraConfig
from .model import (LoadResult, LoraModel, PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                    PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                    PeftModelForTokenClassification, get_peft_model)
from .state import (get_base_model_state_dict, get_peft_model_state_dict, inject_adapter_in_model,
                    set_base_model_state_dict, set_peft_model_state_dict)

__all__ = ["LoadResult", "LoraModel", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
           "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
           "PeftModelForTokenClassification", "PeftType", "TaskType", "TrainableTokensWrapper", "VeloraConfig",
           "get_base_model_state_dict",
           "get_peft_model", "get_peft_model_state_dict", "inject_adapter_in_model", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
