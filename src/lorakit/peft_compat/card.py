"""The model card (README.md) PEFT writes next to a saved adapter: Hub metadata and a short body.

Metadata as PEFT 0.21 writes it: library_name "peft", tags ("lora", "transformers" for a transformers
model, "base_model:adapter:<name>"), base_model from the model's config (absent for a plain torch
module), pipeline_tag "text-generation" for causal LMs. An existing README.md is updated, not replaced.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ..atomic import atomic_write_text
from ..config import LoraConfig

CARD_NAME = "README.md"


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    name = to_dict().get("_name_or_path") if callable(to_dict) else None
    return name if isinstance(name, str) and name else None


def card_tags(model: nn.Module, config: LoraConfig) -> list[str]:
    tags = set(getattr(model, "model_tags", None) or [])
    if type(model).__module__.startswith("transformers."):
        tags.add("transformers")
    if config.peft_type == "LORA":
        tags.add("lora")
    name = _base_model_name(model)
    if name:
        tags.add(f"base_model:adapter:{name}")
    return sorted(tags)


def write_model_card(directory: str | Path, model: nn.Module, config: LoraConfig) -> Path:
    """Create or update directory/README.md with the adapter's Hub metadata (atomically)."""
    path = Path(directory) / CARD_NAME
    if path.is_file():
        card = ModelCard.load(path)
        data, body = card.data or ModelCardData(), card.text
    else:
        data, body = ModelCardData(), "\n# LoRA adapter\n\nSaved by lorakit in PEFT's format.\n"
    data.library_name = "peft"
    data.tags = card_tags(model, config)
    if config.task_type == "CAUSAL_LM" and not data.pipeline_tag:
        data.pipeline_tag = "text-generation"
    base = _base_model_name(model)
    if base:
        data.base_model = base
    atomic_write_text(path, f"---\n{data.to_yaml()}\n---\n{body}")
    return path
