"""PEFT's state-dict functions on lorakit models: adapter tensors out and in, direct injection, and the
base model's own state dict under its original names.

get_peft_model_state_dict / set_peft_model_state_dict use PEFT's on-disk keys (no adapter name in them),
prefixed with "base_model.model." for a PeftModel and bare for a module given adapters directly
(inject_adapter_in_model). Loading reports what did not fit, as PEFT's functions do, instead of raising.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from ..adapters import files, manage
from ..config import LoraConfig
from ..errors import LorakitError

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
_WRAPPER_INFIXES = (".token_adapter", ".base_layer", ".original_module")  # what wrapping adds to a base parameter's name
_ADAPTER_PARTS = (".lora_", ".modules_to_save.", ".trainable_tokens_")  # names of adapter tensors (never base ones)


def _split(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the adapters, the key prefix PEFT uses for it). A PeftModel inside a wrapper
    that forwards attributes (FSDP, DDP's .module aside) is found through it."""
    for candidate in (model, getattr(model, "module", None)):
        if candidate is not None and callable(getattr(candidate, "get_base_model", None)):
            return candidate.get_base_model(), files.PREFIX
    return model, ""


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: bool | str = "auto"
                              ) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under PEFT's keys (from `state_dict`, a state dict of `model`, if given)."""
    inner, prefix = _split(model)
    manage._check_name(inner, adapter_name, must_exist=True)
    if state_dict is not None and prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return files.adapter_state_dict(inner, adapter_name, save_embedding_layers, prefix=prefix, state=state_dict)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False
                              ) -> IncompatibleKeys:
    """Copy PEFT-keyed adapter tensors into adapter `adapter_name`. Returns (missing_keys: the adapter's
    keys absent from the dict, unexpected_keys: keys that match nothing). A shape mismatch raises, or with
    ignore_mismatched_sizes is skipped and reported as missing."""
    inner, prefix = _split(model)
    manage._check_name(inner, adapter_name, must_exist=True)
    wanted, params = files.adapter_targets(inner, adapter_name)
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in peft_model_state_dict.items()}
    unexpected, mismatched, pairs = [], [], []
    for key, value in state.items():
        target = files.load_target(wanted, params, key)
        if target is None:
            unexpected.append(prefix + key)
        elif tuple(target.shape) != tuple(value.shape):
            mismatched.append(f"{prefix + key}: {tuple(value.shape)} given, {tuple(target.shape)} needed")
        else:
            pairs.append((target, value))
    if mismatched and not ignore_mismatched_sizes:
        LorakitError.collect(mismatched, "adapter tensors whose shapes do not fit this model (another r or base "
                                         "model? pass ignore_mismatched_sizes=True to skip them):")
    devices = files.adapter_devices(inner)
    with torch.no_grad():
        for target, value in pairs:
            files.fill(target, value, devices)
    loaded = {id(t) for t, _ in pairs}
    missing = [prefix + k for k, t in wanted.items() if id(t) not in loaded]
    return IncompatibleKeys(missing, unexpected)


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """Add the adapter to `model` in place (no PeftModel wrapper); returns the same model. With
    low_cpu_mem_usage its tensors are empty, on the meta device, until set_peft_model_state_dict fills them."""
    manage.add_adapter(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return model


def _original_key(key: str) -> str:
    for infix in _WRAPPER_INFIXES:
        key = key.replace(f"{infix}.", ".")
    return key


def _base_keys(model: nn.Module) -> dict[str, str]:
    """{original key: current key} of the base model's tensors (adapter tensors left out)."""
    inner, _ = _split(model)
    return {_original_key(k): k for k in inner.state_dict() if not any(p in k for p in _ADAPTER_PARTS)}


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names (as before any adapter was added)."""
    inner, _ = _split(model)
    state = inner.state_dict()
    return {original: state[current] for original, current in _base_keys(model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
    """Load a state dict under the base model's original names; strict raises on missing/unexpected keys."""
    inner, _ = _split(model)
    keys = _base_keys(model)
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        LorakitError.collect([f"missing key(s): {missing}"] * bool(missing) +
                             [f"unexpected key(s): {unexpected}"] * bool(unexpected),
                             "the state dict does not fit the base model (pass strict=False to load what fits):")
    inner.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return IncompatibleKeys(missing, unexpected)
