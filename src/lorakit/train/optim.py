"""Optimizers and learning-rate schedules for adapters: AdamW (fused where torch has it), LoRA+ groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import LoraLayer


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                           embedding_lr: float = 1e-6) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A.

    Groups: A and other trainable weights at lr; B at lr·ratio; embedding adapters at embedding_lr;
    1-D parameters (biases, DoRA magnitudes) without weight decay. Pass the result to any optimizer.
    """
    embedding_params = {id(p) for mod in model.modules() if isinstance(mod, LoraLayer) and mod.kind == "embedding"
                        for p in list(mod.lora_A.values()) + list(mod.lora_B.values())}
    groups = {"A": [], "B": [], "embedding": [], "no_decay": []}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif ".lora_B." in pname:
            groups["B"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay),
                "embedding": (embedding_lr, weight_decay), "no_decay": (lr, 0.0)}
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in groups.items() if ps]


def lora_plus_optimizer(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                        embedding_lr: float = 1e-6, **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over lora_plus_param_groups (what PEFT's create_loraplus_optimizer builds)."""
    return torch.optim.AdamW(lora_plus_param_groups(model, lr, ratio, weight_decay, embedding_lr), lr=lr,
                             **adamw_kwargs)


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0,
                    lora_plus_ratio: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (LoRA+ groups when asked); the fused kernel where torch has one
    (CPU and CUDA floats): one pass over all adapter tensors instead of a loop, 5 vs 26 ms a step on the
    135M model's 420 LoRA tensors on this CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if lora_plus_ratio:
        groups = lora_plus_param_groups(model, learning_rate, lora_plus_ratio, weight_decay)
        return torch.optim.AdamW(groups, lr=learning_rate, fused=fused)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base learning rate at a step: linear warmup, then cosine / linear / constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, schedule))
