"""Attaching and detaching inference-only adapters quickly, for a server that swaps them all the time.

    attach(model, config, tensors, name, directory)   add adapter `name` from read tensors (frozen)
    detach(model, name)                                 remove it; layers left empty stay wrapped

files.attach_adapter checks a folder against the whole model: it walks every module and parameter,
and the walk grows with the adapters attached (each adapter adds modules to every layer): about
0.3 s per attach with 64 adapters on a 4-layer model. Here a per-model index of the LoraLayers by
module path (checked on use with get_submodule, rebuilt when it no longer matches) maps each file
key `<module>.lora_A.weight` / `.lora_B.weight` straight to its layer, shapes checked, so an attach
costs the copy of its own tensors. Anything else falls back to files.attach_adapter, with its full
checks and messages: a target not wrapped yet, embedding factors, biases, DoRA magnitudes, unknown
keys, wrong shapes. Detaching leaves wrapped layers in place (the next adapter reuses them), unlike
manage.delete_adapter, which unwraps the model when its last adapter goes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import LoraConfig
from . import files, manage

INDEX_ATTR = "lorakit_layer_index"
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>A|B)\.weight")


def _index(model: nn.Module, rebuild: bool = False) -> dict:
    index = model.__dict__.get(INDEX_ATTR)
    if index is None or rebuild:
        index = model.__dict__[INDEX_ATTR] = dict(manage.lora_layers(model))
    return index


def _layer(model: nn.Module, index: dict, path: str):
    layer = index.get(path)
    if layer is None:
        return None
    try:
        return layer if model.get_submodule(path) is layer else None
    except AttributeError:
        return None


def _fast_plan(model: nn.Module, config: LoraConfig, state: dict) -> dict | None:
    """{module path: (layer, A, B)} when every tensor is a plain factor of an already wrapped layer with
    the right shape; None otherwise (the caller takes the checked path)."""
    if config.use_dora or config.lora_bias or config.bias != "none" or config.modules_to_save:
        return None
    index = _index(model)
    plan: dict = {}
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        layer = _layer(model, index, m.group("module")) if m else None
        if layer is None or layer.kind not in ("linear", "conv1d"):
            return None
        plan.setdefault(m.group("module"), [layer, None, None])[1 if m.group("ab") == "A" else 2] = value
    for path, (layer, A, B) in plan.items():
        r = config.rank_for(path)
        if A is None or B is None or tuple(A.shape) != (r, layer.in_features) or \
                tuple(B.shape) != (layer.out_features, r):
            return None
    return plan


def attach(model: nn.Module, config: LoraConfig, tensors: dict, name: str, directory) -> None:
    """Add frozen adapter `name` (not activated) from read_adapter's config and tensors."""
    state = files._strip_prefix(tensors)
    plan = _fast_plan(model, config, state)
    if plan is None:
        files.attach_adapter(model, config, tensors, directory, name, activate=False)
        _index(model, rebuild=True)  # it may have wrapped new layers
        return
    with torch.no_grad():
        for path, (layer, A, B) in plan.items():
            layer.add_frozen(name, A, B, config.scaling_for(path))
    manage.configs(model)[name] = config.replace(inference_mode=True)


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer that holds it; wrapped layers stay."""
    for layer in _index(model, rebuild=INDEX_ATTR not in model.__dict__).values():
        if name in layer.r:
            layer.delete(name)
    manage.configs(model).pop(name, None)
