"""Speed and memory switches for training a model: compiled decoder layers, activation checkpointing."""

from __future__ import annotations

import torch

from ..errors import LorakitError


def compile_layers(model: torch.nn.Module, **compile_kwargs) -> int:
    """torch.compile each repeated block (decoder layer) in place; returns how many were compiled.

    Per block rather than the whole model: the blocks share one code path, so one compiled graph
    serves all of them (compile time does not grow with depth), graph breaks stay local, and
    gradient checkpointing and lorakit's loss path outside the blocks are left as they are. The
    first step pays the compilation (tens of seconds on CPU); it pays back only on long runs.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lists = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        raise LorakitError(f"compile: found no repeated layers (nn.ModuleList) in {type(inner).__name__}")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant): far less activation memory, ~40% more
    time. transformers >= 5.2x names it activation_checkpointing_enable; older ones gradient_…"""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
