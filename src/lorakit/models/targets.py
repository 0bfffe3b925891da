"""Default LoRA target modules per transformers architecture (model_type), PEFT 0.21's choices.

Used when a LoraConfig leaves target_modules at None: the adapter then goes where PEFT would put it
(the attention query/value projections for most decoders). A list means module-name suffixes, a string a
full-name regex, as in LoraConfig.target_modules.
"""

from __future__ import annotations

from torch import nn

_QV = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]
_FUSED_QKV = ["query_key_value"]
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _QV, "gpt2": ["c_attn"], "bloom": _FUSED_QKV,
    "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": _QV, "gptj": _QV, "gpt_neox": _FUSED_QKV, "gpt_neo": _QV,
    "bert": _QUERY_VALUE, "roberta": _QUERY_VALUE, "xlm-roberta": _QUERY_VALUE, "electra": _QUERY_VALUE,
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "layoutlm": _QUERY_VALUE,
    "llama": _QV, "llama4": _QV, "chatglm": _FUSED_QKV, "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": _FUSED_QKV, "RefinedWeb": _FUSED_QKV, "falcon": _FUSED_QKV, "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "mistral": _QV, "mixtral": _QV, "stablelm": _QV,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def model_type(model: nn.Module) -> str | None:
    """The transformers model_type of `model` (None for a plain torch module)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    to_dict = getattr(config, "to_dict", None)
    found = to_dict().get("model_type") if callable(to_dict) else getattr(config, "model_type", None)
    return found if isinstance(found, str) else None


def default_targets(model: nn.Module) -> list[str] | str | None:
    """PEFT's default target_modules for this model's architecture, or None when it has none."""
    found = DEFAULT_TARGETS.get(model_type(model) or "")
    return list(found) if isinstance(found, list) else found
