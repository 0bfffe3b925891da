"""A model's output head: never quantized, never part of "all-linear" (as PEFT and transformers do)."""

from __future__ import annotations

from torch import nn


def output_head_name(model: nn.Module) -> str | None:
    """The module name of `model`'s output embeddings (the LM head), or None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, mod in model.named_modules() if mod is head), None)
