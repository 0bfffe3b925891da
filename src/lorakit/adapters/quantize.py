"""QLoRA at the model level: from a quantized base with adapters to an exact full-precision model."""

from __future__ import annotations

import torch
from torch import nn

from ..models.quantize import dequantize_model
from . import manage


def merge_to_full_precision(model: nn.Module, dtype: torch.dtype = torch.float32, safe_merge: bool = False,
                            adapter_names: list[str] | None = None) -> nn.Module:
    """Dequantize the base, merge the adapters exactly, return a plain model in `dtype` (no lorakit modules).

    The merge happens in fp32 (W = dequant(Wq) + s·BA, DoRA likewise), then the whole model is cast to
    dtype. Accepts a plain model with lorakit adapters or a lorakit PeftModel (its base model is returned).
    The result equals the unmerged QLoRA model up to fp32 rounding; save it with save_pretrained. Use
    requantize_merged on it for a quantized deployment, and read the error that adds.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dequantize_model(base, torch.float32)
    if any(True for _ in manage.lora_layers(base)):
        manage.merge_and_unload(base, safe_merge=safe_merge, adapter_names=adapter_names)
    base.to(dtype)
    if getattr(base, "config", None) is not None and hasattr(base.config, "dtype"):
        base.config.dtype = dtype
    return base

