"""Named adapters on a plain nn.Module: add, activate, disable, delete, merge, unload, report.

These functions are lorakit's own API and the implementation behind the PEFT-style wrapper. The
configs of a model's adapters live in `model.lorakit_configs` (a plain dict attribute, not state).
Lifecycle: add_adapter wraps and freezes; set_adapter picks what runs; merge/unmerge fold weights
in and out; merge_and_unload / unload return a plain model with no lorakit modules left.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from torch import nn

from ..config import ALL_LINEAR, LoraConfig
from ..errors import LorakitError
from ..layers import LoraLayer, Variant
from ..layers.kasa import kasa_loss as _layer_kasa_loss
from ..layers.gptq import keep_trainable
from . import variants
from .inject import (ModulesToSave, find_parameter_targets, find_targets, layer_kind, resolve_targets, unwrap, wrap,
                     wrap_modules_to_save)
from . import trainable_tokens as tokens
from .placement import compute_device

CONFIGS_ATTR = "lorakit_configs"


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on `model`, name -> config (empty if none)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ModulesToSave):
            yield name, mod


def _check_name(model: nn.Module, name: str, must_exist: bool) -> None:
    have = configs(model)
    if must_exist and name not in have:
        raise LorakitError(f"Adapter {name} does not exist: no adapter named {name!r}; this model has "
                           f"{sorted(have) or 'none'}")
    if not must_exist and name in have:
        raise LorakitError(f"an adapter named {name!r} already exists; pick another name or delete it first")


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", activate: bool = True,
                autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> nn.Module:
    """Wrap the targeted layers, create adapter `name` in each, freeze everything else.

    low_cpu_mem_usage (PEFT's): the adapter's tensors are created empty on the meta device, to be filled
    by loading its state dict (peft_compat.set_peft_model_state_dict, load_adapter); it cannot run before.

    Trainable afterwards: the adapter's A, B (A frozen with lora_fa), DoRA magnitudes, modules_to_save
    copies, and biases when config.bias is 'all' or 'lora_only'.
    """
    _check_name(model, name, must_exist=False)
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"expected a lorakit LoraConfig, got {type(config).__name__}")
    _check_bias(model, config, name)
    _check_kasa(model, config, name)
    config = resolve_targets(model, config)
    targets = find_targets(model, config)
    param_targets = find_parameter_targets(model, config, targets)
    if config.target_modules == ALL_LINEAR:  # PEFT records the expanded module names
        config = config.replace(target_modules=sorted(targets))
    if any(layer_kind(model.get_submodule(t)) == "conv1d" for t in targets) and not config.fan_in_fan_out:
        config = config.replace(fan_in_fan_out=True)  # as PEFT does for GPT-2's Conv1D
    keep_trainable(model)  # GPTQ/AWQ kernels, also those without an adapter: no inference repacking
    placed = [(t, None) for t in targets] + param_targets  # PEFT: modules, then parameters
    chosen = [variants.choose(config, target, config.rank_for(target)) for target, _ in placed]  # errors first
    for (target, parameter), (variant, init) in zip(placed, chosen):
        layer = wrap(model, target, parameter)
        layer.add(name, r=config.rank_for(target), scaling=config.scaling_for(target),
                  dropout=config.lora_dropout, init=init, variant=variant, upcast=autocast_adapter_dtype,
                  bias=config.lora_bias, meta=low_cpu_mem_usage, device=compute_device(layer.base_layer))
        if config.lora_bias and getattr(layer.base_layer, "bias", 0) is None:  # PEFT's warning, its words
            kind = type(layer.base_layer).__name__
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {kind} has no bias "
                          f"({target}): the adapter trains, but it cannot be merged", stacklevel=3)
        if config.lora_fa:  # LoRA-FA (Zhang et al. 2023): A stays at its random init; only B trains
            layer.lora_A[name].requires_grad_(False)
    if config.modules_to_save:
        wrap_modules_to_save(model, config, name)
    if config.trainable_token_indices is not None:
        tokens.wrap_trainable_tokens(model, config, name)
    configs(model)[name] = config
    _freeze_base(model, config)
    if activate or len(configs(model)) == 1:
        set_adapter(model, name)
    else:
        set_trainable(model, name, False)
    return model


def _check_kasa(model: nn.Module, config: LoraConfig, name: str) -> None:
    """KaSA truncates base weights when added, so it never shares a model with non-KaSA adapters (PEFT's rule)."""
    new = config.kasa_config is not None
    for other, c in configs(model).items():
        if (c.kasa_config is not None) is not new:
            raise LorakitError(f"KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                               f"weights: the new adapter {name!r} {'uses' if new else 'does not use'} KaSA but adapter "
                               f"{other!r} {'does not' if new else 'does'}; put them on separate copies of the model")


def _check_bias(model: nn.Module, config: LoraConfig, name: str) -> None:
    """Biases are shared by all adapters, so at most one adapter may train them (PEFT's rule)."""
    biased = [n for n, c in configs(model).items() if c.bias != "none"] + ([name] if config.bias != "none" else [])
    if len(biased) > 1:
        raise LorakitError(f"adapters {biased} all train biases (bias != 'none'), but only one adapter of a model "
                           "may (the base biases are shared by all adapters); set bias='none' for the others")


def _freeze_base(model: nn.Module, config: LoraConfig) -> None:
    """Freeze every parameter that is not an adapter's; then open the biases the config asks for."""
    for pname, p in model.named_parameters():
        if ".lora_" not in pname and ".modules_to_save." not in pname and f".{tokens.DELTA}." not in pname:
            p.requires_grad_(False)
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)


def set_trainable(model: nn.Module, name: str, flag: bool) -> None:
    """Make adapter `name`'s own tensors (A, B, magnitudes, modules_to_save copies) trainable or frozen;
    A stays frozen for LoRA-FA."""
    fa = configs(model)[name].lora_fa if name in configs(model) else False
    for _, layer in lora_layers(model):
        variant = layer.variants.get(name) or Variant()  # plain LoRA: no stores of its own, nothing frozen
        frozen = [getattr(layer, s) for s in variant.frozen]
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.lora_bias, layer.lora_diag,
                      *variant.stores(layer)):
            if name in store:
                store[name].requires_grad_(flag and not (fa and store is layer.lora_A)
                                           and not any(store is f for f in frozen))
    for _, mod in _saved_modules(model):
        if name in mod.modules_to_save:
            mod.modules_to_save[name].requires_grad_(flag)
    tokens.set_trainable(model, name, flag)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s): they run in forward and are the trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _check_name(model, n, must_exist=True)
    saved = list(_saved_modules(model))
    problems = []
    for path, mod in saved:  # one copy of a module runs at a time (checked before anything changes)
        held = [n for n in names if n in mod.modules_to_save]
        if len(held) > 1:
            problems.append(f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {held} each "
                            f"keep their own copy of {path!r} (modules_to_save); activate one of them")
    LorakitError.collect(problems)
    tokens.set_active(model, names)
    for other in configs(model):
        set_trainable(model, other, other in names)
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_A]
    for _, mod in saved:
        mod.active_adapter = next((n for n in names if n in mod.modules_to_save), None)


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    return []


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside this block the model computes as its base (merged adapters are unmerged first)."""
    mods = [m for _, m in lora_layers(model)] + [m for _, m in _saved_modules(model)] + [
        m for _, m in tokens.token_layers(model)]
    for m in mods:
        if not isinstance(m, ModulesToSave) and m.merged_adapters:
            m.unmerge()
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, flag in zip(mods, before):
            m.disabled = flag


def set_disabled(model: nn.Module, flag: bool) -> None:
    """Switch every adapter off (the model computes as its base; merged ones are unmerged) or back on."""
    for _, layer in lora_layers(model):
        if flag and layer.merged_adapters:
            layer.unmerge()
        layer.disabled = flag
    for _, mod in _saved_modules(model):
        mod.disabled = flag
    for _, mod in tokens.token_layers(model):
        if flag and mod.merged_adapters:
            mod.unmerge()
        mod.disabled = flag


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove every trace of adapter `name`; layers left with no adapter go back to their base layer."""
    _check_name(model, name, must_exist=True)
    if any(name in layer.merged_adapters for _, layer in [*lora_layers(model), *tokens.token_layers(model)]):
        raise LorakitError(f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first.")
    for _, layer in lora_layers(model):
        layer.delete(name)
    for _, mod in _saved_modules(model):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if mod.active_adapter == name:
            mod.active_adapter = None
    for _, mod in tokens.token_layers(model):
        mod.delete(name)
    del configs(model)[name]
    if not configs(model):
        unwrap(model)
        model.__dict__.pop(CONFIGS_ATTR, None)
    elif not active_adapters(model):
        set_adapter(model, next(iter(configs(model))))


def merge(model: nn.Module, names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights; zero added latency."""
    for n in names or []:
        _check_name(model, n, must_exist=True)
    layers = [layer for _, layer in lora_layers(model)]
    wanted = lambda layer: [n for n in (names or layer.active_adapters) if n in layer.lora_A]  # noqa: E731
    if layers and all(set(wanted(layer)) <= set(layer.merged_adapters) for layer in layers):
        warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
        return
    for layer in layers:
        layer.merge(names, safe=safe_merge)
    for _, layer in tokens.token_layers(model):
        layer.merge(names, safe=safe_merge)


def unmerge(model: nn.Module) -> None:
    for _, layer in [*lora_layers(model), *tokens.token_layers(model)]:
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the active adapters and return the plain model (same object), with no lorakit modules."""
    merge(model, adapter_names, safe_merge=safe_merge)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging: the base model comes back unchanged."""
    unwrap(model)
    model.__dict__.pop(CONFIGS_ATTR, None)
    return model


def kasa_loss(model: nn.Module, names: str | list[str] | None = None):
    """KaSA's regulariser summed over layers for adapters `names` (default: the active ones), with each
    adapter's beta and gamma; 0.0 without KaSA adapters (PEFT's LoraModel._get_kasa_loss). Add it to the loss."""
    names = active_adapters(model) if names is None else [names] if isinstance(names, str) else names
    total = 0.0
    for _, layer in lora_layers(model):
        for n in names:
            if n in layer.lora_diag:
                kasa = configs(model)[n].kasa_config
                total = total + _layer_kasa_loss(layer, n, kasa["beta"], kasa["gamma"])
    return total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) counted like PEFT: 4-bit packed parameters count twice per stored byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n = n * 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT's exact line: 'trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330'."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
