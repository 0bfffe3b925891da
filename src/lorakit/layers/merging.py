"""Merging adapters into a LoRA layer's base weight and taking them out again.

merge: W <- W + s·B·A for each adapter (a variant, e.g. DoRA, computes its own merged weight; a
lora_bias adapter also folds s·b into the base bias); unmerge undoes the merges last first and
restores W0 up to float rounding. The layer (layer.LoraLayer) exposes both as methods, as PEFT's
layers do; the weight is read and written through its base kind (bases.py), so quantized and
transposed bases merge the same way.
"""

from __future__ import annotations

import torch

from ..errors import LorakitError, MergeError


@torch.no_grad()
def merge(layer, names: list[str] | None = None, safe: bool = False) -> None:
    """Fold adapters into the base weight: W <- W + s·BA (a variant computes its own merged weight)."""
    if layer._offloaded():
        raise LorakitError(f"{layer._label()}: cannot merge into an offloaded base weight (meta device); load the "
                           "model without disk offload (no model_kwargs.device_map / max_memory) to merge")
    for name in names if names is not None else layer.active_adapters:
        if name in layer.merged_adapters or name not in layer.lora_A:
            continue
        if name in layer.lora_bias and getattr(layer.base_layer, "bias", None) is None:
            raise MergeError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: "
                             f"adapter {name!r}, {layer._label()}; keep the adapter unmerged")
        W = layer.dense_weight()
        variant = layer.variants.get(name)
        if variant:  # its norm is of the weight without the adapters merged before (what forward sees)
            base = unmerged_dense_weight(layer) if layer.merged_adapters else None
            new_W = variant.merged_weight(layer, name, W, base)
        else:
            new_W = W + layer.delta_weight(name).to(W.dtype)
        if safe and not torch.isfinite(new_W).all():
            raise LorakitError(f"merging adapter {name!r} would put NaN/Inf into {layer._label()}; "
                               "the adapter weights are broken (check training for divergence)")
        layer._set_dense_weight(new_W)
        merge_bias(layer, name, +1)
        layer.merged_adapters.append(name)
    if layer.kind == "mha":
        merge(layer.base_layer.out_proj, names, safe)


@torch.no_grad()
def unmerge(layer) -> None:
    """Undo merges in reverse order; restores W0 up to float rounding."""
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        W = layer.dense_weight()
        variant = layer.variants.get(name)
        layer._set_dense_weight(variant.unmerged_weight(layer, name, W) if variant
                               else W - layer.delta_weight(name).to(W.dtype))
        merge_bias(layer, name, -1)
    if layer.kind == "mha":
        unmerge(layer.base_layer.out_proj)


def unmerged_dense_weight(layer) -> torch.Tensor:
    """A copy of the dense weight with the merged adapters taken out again (last merged first)."""
    W = layer.dense_weight().detach().clone()
    for name in reversed(layer.merged_adapters):
        variant = layer.variants.get(name)
        W = (variant.unmerged_weight(layer, name, W, forget=False) if variant
             else W - layer.delta_weight(name).to(W.dtype))
    return W


def merge_bias(layer, name: str, sign: int) -> None:
    """Fold s·(B's bias) into the base bias (sign +1) or take it out again (-1)."""
    if name in layer.lora_bias:
        b = layer.base_layer.bias
        b.data += sign * layer.scaling[name] * layer.lora_bias[name].to(b.dtype)
