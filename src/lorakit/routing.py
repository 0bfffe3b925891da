"""Mixed-adapter batches: each row of a batch names its own adapter (or the base), one forward.

The base matmul runs once for the whole batch; only the low-rank part differs per row. Rows are
grouped by adapter (sorted segments), so each layer loops over the distinct adapters present, not
over rows. "__base__" marks a row that runs the base model alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, layers
from .errors import LorakitError

BASE = "__base__"


@contextlib.contextmanager
def adapter_rows(model: nn.Module, adapter_names: list[str]):
    """Within this block every LoRA layer of `model` routes batch row i to adapter_names[i]."""
    known = set(adapters.configs(model))
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    if unknown:
        raise LorakitError(f"adapter_names holds unknown adapter(s) {unknown}; this model has {sorted(known)} "
                           f"(use {BASE!r} for base rows)")
    for name, layer in adapters.lora_layers(model):
        if layer.merged_adapters:
            raise LorakitError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(adapter_names):
        groups.setdefault(n, []).append(i)
    rows = {"n": len(adapter_names), "groups": {n: torch.tensor(ix) for n, ix in groups.items() if n != BASE}}
    previous = layers._ROWS[0]
    layers._ROWS[0] = rows
    try:
        yield
    finally:
        layers._ROWS[0] = previous


def mixed_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, rows: dict) -> torch.Tensor:
    """result (B, ..., out) plus, for each adapter's rows, that adapter's low-rank output."""
    if x.shape[0] != rows["n"]:
        raise LorakitError(f"adapter_names has {rows['n']} entries but the batch has {x.shape[0]} rows; "
                           "give one adapter name per row")
    out_dtype = result.dtype
    result = result.clone()
    for name, index in rows["groups"].items():
        if name not in layer.lora_A:
            continue
        if name in layer.lora_magnitude_vector:
            raise LorakitError(f"adapter {name!r} is DoRA; mixed-adapter batches support plain LoRA adapters only")
        index = index.to(x.device)
        sub_x = x.index_select(0, index)
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if layer.kind == "embedding":
            delta = (layer._embed(sub_x, A.T) @ B.T) * s
        else:
            delta = F.linear(F.linear(layer.lora_dropout[name](sub_x.to(A.dtype)), A), B) * s
        result.index_add_(0, index, delta.to(result.dtype))
    return result.to(out_dtype)
